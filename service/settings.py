"""Every setting of the service, from the environment (prefix ``IFA_``) or the command line."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("service")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MAX_HISTORY = 1000
"""History cap when neither the setting nor the model manifest names one."""


class Settings(BaseSettings):
    """Service settings. Each is read from ``IFA_<NAME>``; ``redis_url`` also from ``REDIS_URL``."""

    model_config = SettingsConfigDict(env_prefix="IFA_", populate_by_name=True, extra="ignore")

    host: str = Field(default="127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port uvicorn listens on.")
    model_dir: Path = Field(
        default=Path("artifacts"),
        description="Artefact directory: <model_dir>/LATEST names the version to serve "
        "(or model_dir is itself one version's directory).",
    )
    program_format: str = Field(
        default="torchscript", description="Exported program format to load."
    )
    store: Literal["memory", "redis"] = Field(
        default="memory",
        description="Behaviour log and state cache: in-process, or Redis. Unset while a Redis URL "
        "is given (IFA_REDIS_URL or REDIS_URL), it is redis: a URL alone never leaves events in "
        "memory, where a restart loses them.",
    )
    redis_url: str = Field(
        default=DEFAULT_REDIS_URL,
        validation_alias=AliasChoices("IFA_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis connection URL (store=redis): redis://[:password@]host:port/db, or "
        "rediss:// for TLS (?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem).",
    )
    redis_prefix: str = Field(default="ifa", min_length=1, description="Prefix of every Redis key.")
    redis_max_connections: int = Field(default=64, ge=1, description="Redis connection pool size.")
    redis_timeout_seconds: float = Field(
        default=0.25,
        gt=0,
        description="Socket connect and read timeout of one Redis call (the request budget "
        "bounds the whole request on top of it).",
    )
    redis_retries: int = Field(
        default=1,
        ge=0,
        le=10,
        description="Retries of a Redis call that failed on a connection error or a timeout, "
        "after a jittered backoff of redis_retry_backoff_seconds; within the request budget.",
    )
    redis_retry_backoff_seconds: float = Field(
        default=0.01, ge=0, description="Base of the exponential backoff between Redis retries."
    )
    request_budget_seconds: float = Field(
        default=0.5,
        gt=0,
        description="Deadline of one /rank or /events request, whatever it waits on (store, "
        "model queue); well under a client's timeout. A /rank past it is a 503 + Retry-After.",
    )
    state_fetch_share: float = Field(
        default=0.4,
        gt=0,
        le=1,
        description="Share of the request budget the user state may take (store reads, folds). "
        "Past it, /rank answers from a locally cached or empty state (state_cache: degraded).",
    )
    local_states: int = Field(
        default=4096,
        ge=0,
        description="Recent user states kept in each worker's memory (LRU), answered from when "
        "the store is unavailable (about 4.4 KiB each).",
    )
    max_inflight: int = Field(
        default=64,
        ge=1,
        description="Requests (/rank, /events) one worker handles at once; beyond it a 503 with "
        "Retry-After is answered at once, before any queue grows.",
    )
    retry_after_seconds: int = Field(
        default=1, ge=0, description="Retry-After of 503 answers (overload, store unavailable)."
    )
    max_body_bytes: int = Field(
        default=1 << 20,
        ge=1024,
        description="Largest request body; a larger one is a 413, refused before it is parsed.",
    )
    api_token: SecretStr | None = Field(
        default=None,
        description="Bearer token /events requires (Authorization: Bearer <token>); unset, "
        "/events is open. Mount it from a Kubernetes Secret.",
    )
    max_clock_skew_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How far in the future an event timestamp may be (against this server's "
        "clock) before it is a 422: with time decay on, a future event would freeze the user's "
        "reference time.",
    )
    max_history: int | None = Field(
        default=None,
        ge=1,
        description="Events of a user's log the state covers: the most recent max_history by "
        "log position (older ones are folded out and trimmed). Unset: the model manifest's "
        "max_history (the training window), else 1000.",
    )
    dedup_window: int = Field(
        default=10_000,
        ge=1,
        description="Event ids remembered per user for idempotent /events: the ids of the last "
        "dedup_window events appended. A retry of an older event is appended again.",
    )
    state_ttl_seconds: int = Field(
        default=7 * 86400,
        ge=1,
        description="Time to live of a cached user state (a read refreshes it once less than "
        "half of it is left, so that reads do not write).",
    )
    state_cache: bool = Field(
        default=True,
        description="Cache each user's state and fold new events into it. Off (IFA_STATE_CACHE="
        "off) recomputes the state from the whole log on every request: the baseline that "
        "capacity tests compare the cache against.",
    )
    max_candidates: int = Field(
        default=2000, ge=1, description="Largest candidate set a /rank accepts."
    )
    default_k: int = Field(
        default=50, ge=1, description="Items returned when a /rank request omits k."
    )
    max_events_per_post: int = Field(
        default=1000, ge=1, description="Largest batch a /events accepts."
    )
    torch_threads: int = Field(
        default=1, ge=1, description="torch intra-op threads, set once at start."
    )
    model_workers: int = Field(
        default=1, ge=1, description="Threads of the executor that runs the encoder and the scorer."
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="Log level of the service and uvicorn."
    )
    access_log: bool = Field(default=False, description="Let uvicorn log every request.")
    seed_world: Path | None = Field(
        default=None,
        description="Demo world directory (events.parquet, users.parquet) whose histories "
        "seed the store at start; users that already have a log are left alone.",
    )

    @model_validator(mode="after")
    def _a_redis_url_means_redis(self) -> Settings:
        """A Redis URL given without a store picks Redis; with store=memory it is only ignored
        because that was asked for explicitly (and the log says so)."""
        url_given = "redis_url" in self.model_fields_set
        if url_given and "store" not in self.model_fields_set:
            self.store = "redis"
        elif url_given and self.store == "memory":
            logger.warning("store=memory was set explicitly: the Redis URL given is not used")
        return self

    def resolved_max_history(self, manifest_max_history: int | None) -> int:
        """The history cap: this setting, else the training window of the model, else 1000."""
        if self.max_history is not None:
            return self.max_history
        return manifest_max_history if manifest_max_history is not None else DEFAULT_MAX_HISTORY
