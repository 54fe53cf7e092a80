"""Every setting of the service, from the environment (prefix ``IFA_``) or the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        default="memory", description="Behaviour log and state cache: in-process, or Redis."
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("IFA_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis connection URL (store=redis).",
    )
    redis_cluster: bool = Field(
        default=False,
        description="The Redis URL names one node of a Redis Cluster (store=redis): the client "
        "discovers the other nodes and routes every user's keys to their slot.",
    )
    redis_prefix: str = Field(default="ifa", min_length=1, description="Prefix of every Redis key.")
    redis_max_connections: int = Field(default=64, ge=1, description="Redis connection pool size.")
    redis_timeout_seconds: float = Field(
        default=1.0, gt=0, description="Socket connect and read timeout of Redis calls."
    )
    state_ttl_seconds: int = Field(
        default=7 * 86400,
        ge=1,
        description="Time to live of a cached user state (refreshed on reads).",
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
