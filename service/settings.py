"""Every setting of the service, declared once: read from the environment (``IFA_<NAME>``) and
the command line (``--<name>``, generated from the fields; the command line wins).

A field added to :class:`Settings` is a flag of ``python -m service`` and an ``IFA_*`` variable
with nothing else to write; ``--help`` shows its default and variable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python
from pydantic_settings import (
    BaseSettings,
    CliApp,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

# The window the model is trained with, and the history cap when neither the setting nor the
# model's manifest names one.
from model.features import DEFAULT_MAX_HISTORY

ENV_PREFIX = "IFA_"
PLAIN_REDIS_URL = "REDIS_URL"

logger = logging.getLogger("service")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


RETRY_BACKOFF_CAP = 8
"""The longest backoff before a Redis retry, in multiples of redis_retry_backoff_seconds."""


class Settings(BaseSettings):
    """IFA ranking service: each setting is --<name> or IFA_<NAME> (the flag wins)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        cli_prog_name="python -m service",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_show_env_vars=True,
    )

    host: str = Field(default="127.0.0.1", description="Interface uvicorn binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port uvicorn listens on.")
    model_dir: Path = Field(
        default=Path("artifacts"),
        description="Artefact directory: <model_dir>/LATEST names the version to serve "
        "(or model_dir is itself one version's directory).",
    )
    program_format: Literal["auto", "torchscript", "export", "aoti", "eager"] = Field(
        default="auto",
        description="Exported program format to load. auto: AOTInductor where the artefact "
        "has programs compiled for this CPU and torch version (fastest, see "
        "results/model_bench.md), TorchScript otherwise.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="Arithmetic of the scorer. bf16: its objective towers in bfloat16 "
        "(accepted on quality: AUC within 0.001 of fp32, top-50 overlap 0.997; about 0.7x "
        "the fp32 scorer's time; results/precision.md); refused where the CPU has no bfloat16 "
        "instructions or the artefact no bf16 scorer. auto: bf16 where both hold, fp32 "
        "otherwise. The encoder, whose output is the cached state, is always fp32.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        description="Server processes on one port (uvicorn's process model), each with its "
        "own model, torch threads and model thread; they share the Redis store. Unset: one per "
        "CPU this process may run on with the Redis store, one with the memory store (which "
        "lives inside a process and so refuses more).",
    )
    store: Literal["memory", "redis"] = Field(
        default="memory",
        description="Behaviour log and state cache: in-process, or Redis. Unset while a Redis URL "
        "is given (IFA_REDIS_URL or REDIS_URL), it is redis: a URL alone never leaves events in "
        "memory, where a restart loses them.",
    )
    redis_url: str = Field(
        default=DEFAULT_REDIS_URL,
        description="Redis connection URL (store=redis): redis://[:password@]host:port/db, or "
        "rediss:// for TLS (?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem); "
        f"{PLAIN_REDIS_URL} is read too, below {ENV_PREFIX}REDIS_URL.",
    )
    redis_cluster: bool = Field(
        default=False,
        description="The Redis URL names one node of a Redis Cluster (store=redis): the client "
        "discovers the other nodes and routes every user's keys to their slot.",
    )
    redis_prefix: str = Field(default="ifa", min_length=1, description="Prefix of every Redis key.")
    redis_max_connections: int = Field(
        default=64,
        ge=1,
        description="Redis connections per worker (per node on a cluster). When all are busy a "
        "call waits for one, up to redis_timeout_seconds.",
    )
    redis_timeout_seconds: float = Field(
        default=0.08,
        gt=0,
        description="Socket connect and read timeout of one Redis call, and the longest wait "
        "for a free connection of a full pool. The call and its retries must fit the user "
        "state's share of the request budget (request_budget_seconds x state_fetch_share), so "
        "that a slow read gets its retry before /rank degrades: a start with settings where "
        "they do not is refused.",
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
    limit_concurrency: int = Field(
        default=1024,
        ge=2,
        description="Connections plus requests in progress one worker's server (uvicorn) "
        "accepts; at the limit it answers every new request, probes included, with a plain "
        "503 (text, Connection: close, no Retry-After) before the app sees it. A backstop "
        "against connection floods, kept well above max_inflight (which sheds work with a "
        "JSON 503 and Retry-After first) and above the connections a load balancer keeps open "
        "to one worker; a start with it at or below max_inflight is refused.",
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
        description="Bearer token that POST /events, PUT /items, POST /explain and /admin "
        "require (Authorization: Bearer <token>); several, comma-separated, are each accepted "
        "(a rotation: new,old). Mount it from a Kubernetes Secret. Unset, the service refuses "
        "to bind a non-loopback host unless allow_unauthenticated_writes is set; on loopback "
        "those routes are open to local callers and /admin is refused.",
    )
    allow_unauthenticated_writes: bool = Field(
        default=False,
        description="Start on a non-loopback host without an api_token: POST /events, PUT "
        "/items and POST /explain are then open to anyone who reaches the port (histories "
        "written, item features changed, any user's history read). For a network that only "
        "trusted callers reach; logged as a warning at start. /admin stays refused.",
    )
    max_clock_skew_seconds: float = Field(
        default=300.0,
        ge=0,
        description="How far in the future an event timestamp may be (against this server's "
        "clock) before it is a 409: with time decay on, a future event would freeze the user's "
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
        default=512,
        ge=1,
        description="Events per user whose ids are remembered for idempotent /events (as 8-byte "
        "digests, 12 B each): a re-post of one of the user's last dedup_window events within "
        "dedup_seconds is a duplicate; an older one is appended again. A post may hold at "
        "most dedup_window events of one user, so that a retried post is always recognised.",
    )
    dedup_seconds: int = Field(
        default=3600,
        ge=1,
        description="How long an event id is remembered for idempotency: the retry horizon.",
    )
    user_retention_seconds: int = Field(
        default=30 * 86400,
        ge=1,
        description="A user's log, remembered ids and profile expire after this long without "
        "an event appended (reads do not extend it); a user who returns later starts from an "
        "empty history.",
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
    item_cache_ttl_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a worker uses an item's features from its own cache before asking "
        "the item table again: an item updated through PUT /items on another worker or replica "
        "is ranked with its new features within this time (at once on the worker that took "
        "the PUT). Each id a worker sees costs a table lookup once per TTL, batched per request.",
    )
    item_cache_size: int = Field(
        default=50_000,
        ge=0,
        description="Items outside the model's catalogue (added through PUT /items, or unknown "
        "ids) whose features each worker caches, the oldest dropped first (about 100 B each). "
        "Items of the model's catalogue are cached in arrays beside it, without a bound.",
    )
    max_items_per_put: int = Field(
        default=1000, ge=1, description="Largest batch a PUT /items accepts."
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
    model_execution: Literal["inline", "thread"] = Field(
        default="inline",
        description="Where a worker runs the scorer and folds: inline on its event loop (one "
        "busy thread per worker, so workers = cores never oversubscribe the CPUs), or on its "
        "model thread. Whole-history encodes always run on the model thread. Measured in "
        "results/capacity.md.",
    )
    model_queue_limit: int = Field(
        default=32,
        ge=1,
        description="Jobs (encodes, folds, scores) that may wait for a worker's model thread; "
        "past it a request is answered 503 with Retry-After instead of queueing without bound.",
    )
    arrival_log: Path | None = Field(
        default=None,
        description="Directory where each worker appends the arrival time of every request "
        "(load-test verification: loadtest.capacity checks the arrivals it offered against "
        "them). Off when unset.",
    )
    model_poll_seconds: float = Field(
        default=10.0,
        ge=0,
        description="How often each worker reads <model_dir>/LATEST; a new version there is "
        "loaded, warmed and switched to while the old one serves (0: never, the version loaded "
        "at start is served until restart). POST /admin/model writes LATEST.",
    )
    rollout_warm_users: int = Field(
        default=10_000,
        ge=0,
        description="Most recently active users whose states a rollout encodes for a new "
        "encoder before switching (only when the state version changes; a fusion or scorer-only "
        "change keeps every cached state). Also the users the store remembers as active.",
    )
    rollout_warm_duty: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Share of one CPU's time a rollout's warm-up may take on this server, split "
        "over its workers: after each user a worker pauses for (1 - d) / d times the encoding's "
        "duration, d = duty / workers, so the version serving keeps its latency.",
    )
    rollout_cleanup_delay_seconds: float = Field(
        default=120.0,
        ge=0,
        description="Wait after a switch before the cached states of other state versions are "
        "deleted (background scan, in batches): long enough for every worker to follow LATEST "
        "(model_poll_seconds) and warm.",
    )
    rollout_retry_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Wait before a failed rollout (a bad artefact, the store down during the "
        "warm-up) is tried again; it doubles with each failure of the same version, up to 64 "
        "times. A new version in LATEST is tried at once.",
    )
    explain_rate_per_second: float = Field(
        default=2.0,
        ge=0,
        description="POST /explain calls one worker accepts per second (a debugging call: it "
        "reads the user's whole window); bursts of up to 5. Past it, 429 with Retry-After. 0 "
        "turns /explain off.",
    )
    seed_world: Path | None = Field(
        default=None,
        description="Demo world directory (events.parquet, users.parquet) whose histories "
        "seed the store at start; users that already have a log are left alone.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            PlainRedisUrl(settings_cls),
            dotenv_settings,
            file_secret_settings,
        )

    def resolved_workers(self) -> int:
        """The worker processes to run: ``workers``, or the default it documents."""
        if self.workers is not None:
            return self.workers
        if self.store == "memory":
            return 1
        return len(os.sched_getaffinity(0))

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

    @field_validator("api_token")
    @classmethod
    def _tokens_are_not_empty(cls, token: SecretStr | None) -> SecretStr | None:
        """An empty token would let an empty credential in: refused rather than read as unset."""
        if token is not None and not all(split_tokens(token.get_secret_value())):
            raise ValueError(
                "an empty token (or an empty entry of a comma-separated list) is not a token; "
                "unset api_token instead"
            )
        return token

    def accepted_tokens(self) -> tuple[bytes, ...]:
        """The bearer tokens a request may carry (empty: no token is configured)."""
        if self.api_token is None:
            return ()
        return tuple(t.encode() for t in split_tokens(self.api_token.get_secret_value()))

    @model_validator(mode="after")
    def _a_redis_retry_fits_the_state_budget(self) -> Settings:
        """A Redis call that times out must leave time for its retries within the state's
        budget: otherwise the budget expires first, a slow read never gets its retry, and
        each expiry tears a connection down mid-command."""
        if self.store != "redis":
            return self
        budget = self.request_budget_seconds * self.state_fetch_share
        worst = self.redis_call_seconds()
        if worst > budget:
            raise ValueError(
                f"a Redis call may take {worst:.3f} s (redis_timeout_seconds="
                f"{self.redis_timeout_seconds:g} x {self.redis_retries + 1} attempts, plus "
                f"backoff), more than the user state's budget of {budget:.3f} s "
                f"(request_budget_seconds={self.request_budget_seconds:g} x state_fetch_share="
                f"{self.state_fetch_share:g}): lower redis_timeout_seconds or redis_retries, or "
                f"raise the budget"
            )
        return self

    @model_validator(mode="after")
    def _the_server_limit_is_above_admission(self) -> Settings:
        """uvicorn's limit answers a bare 503 to everything, health probes included; the
        admission limit, which sheds only work with a Retry-After, must act first."""
        if self.limit_concurrency <= self.max_inflight:
            raise ValueError(
                f"limit_concurrency={self.limit_concurrency} must be above max_inflight="
                f"{self.max_inflight}: at the server's limit even /healthz is refused"
            )
        return self

    def redis_call_seconds(self) -> float:
        """The longest a Redis call takes with its retries: each attempt's socket timeout and
        the longest jittered backoff before each retry (min(cap, base x 2^k) for retry k)."""
        base = self.redis_retry_backoff_seconds
        backoff = sum(
            min(RETRY_BACKOFF_CAP * base, base * 2**k) for k in range(1, self.redis_retries + 1)
        )
        return (self.redis_retries + 1) * self.redis_timeout_seconds + backoff

    def resolved_max_history(self, manifest_max_history: int | None) -> int:
        """The history cap: this setting, else the training window of the model, else 1000."""
        if self.max_history is not None:
            return self.max_history
        return manifest_max_history if manifest_max_history is not None else DEFAULT_MAX_HISTORY


def split_tokens(value: str) -> list[str]:
    """The tokens of an api_token value: comma-separated, surrounding blanks dropped."""
    return [token.strip() for token in value.split(",")]


class PlainRedisUrl(PydanticBaseSettingsSource):
    """``REDIS_URL``, the name Redis clients and hosting platforms use, for ``redis_url``.

    A source of its own rather than an alias of the field, so that the command line keeps one
    ``--redis-url`` flag and ``IFA_REDIS_URL`` (read before this source) wins.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return os.environ.get(PLAIN_REDIS_URL), field_name, False

    def __call__(self) -> dict[str, Any]:
        url = os.environ.get(PLAIN_REDIS_URL)
        return {} if url is None else {"redis_url": url}


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the command line (``argv``, default ``sys.argv[1:]``) over the environment.

    ``--help`` prints every setting with its default and variable and exits; a malformed flag or
    an invalid value (from either side) exits 2 with a one-line message per setting.
    """
    try:
        return CliApp.run(Settings, cli_args=None if argv is None else list(argv))
    except ValidationError as error:
        problems = "; ".join(
            # Without the value given: it may be a secret.
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
            for e in error.errors()
        )
        print(f"{Settings.model_config['cli_prog_name']}: error: {problems}", file=sys.stderr)
        raise SystemExit(2) from None


def settings_environment(settings: Settings) -> dict[str, str]:
    """``settings`` as ``IFA_<NAME>`` variables, from which ``Settings()`` in another process
    (a uvicorn worker) rebuilds the same values. A setting that is ``None`` has no variable, so
    that process's environment must hold no other ``IFA_*`` (or ``REDIS_URL``) variables."""
    environment: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr | SecretBytes):  # model_dump would mask it
            value = value.get_secret_value()
        plain = to_jsonable_python(value)
        # JSON for everything but strings: how pydantic-settings reads booleans, numbers and
        # complex fields back.
        text = plain if isinstance(plain, str) else json.dumps(plain)
        environment[f"{ENV_PREFIX}{name.upper()}"] = text
    return environment
