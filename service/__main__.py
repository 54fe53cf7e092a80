"""``python -m service``: run the ranking service under uvicorn.

Every option is also a setting read from the environment (``IFA_<NAME>``); the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from service.app import create_app
from service.metrics import MULTIPROCESS_ENV
from service.settings import Settings


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="interface to bind (IFA_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (IFA_PORT)")
    parser.add_argument("--model-dir", type=Path, help="artefact directory (IFA_MODEL_DIR)")
    parser.add_argument("--program-format", help="auto, torchscript, export, aoti or eager")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="IFA_PRECISION")
    parser.add_argument("--workers", type=int, help="server processes (IFA_WORKERS)")
    parser.add_argument("--model-queue-limit", type=int)
    parser.add_argument("--arrival-log", type=Path)
    parser.add_argument("--store", choices=("memory", "redis"), help="state store (IFA_STORE)")
    parser.add_argument("--redis-url", help="Redis URL (IFA_REDIS_URL or REDIS_URL)")
    parser.add_argument("--redis-prefix", help="prefix of every Redis key (IFA_REDIS_PREFIX)")
    parser.add_argument("--seed-world", type=Path, help="world directory to seed the store from")
    parser.add_argument("--max-candidates", type=int)
    parser.add_argument("--default-k", type=int)
    parser.add_argument("--max-events-per-post", type=int)
    parser.add_argument("--state-ttl-seconds", type=int)
    parser.add_argument("--torch-threads", type=int)
    parser.add_argument("--model-workers", type=int)
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--access-log", action="store_true", default=None)
    args = vars(parser.parse_args(argv))
    return {name: value for name, value in args.items() if value is not None}


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings(**parse_args(argv))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    workers = settings.resolved_workers()
    if workers > 1 and settings.store == "memory":
        print(
            f"python -m service: {workers} workers need a store they can share, and the memory "
            "store lives inside one process (each worker would keep its own events and states). "
            "Use --store redis (with --redis-url), or --workers 1.",
            file=sys.stderr,
        )
        return 2
    if workers == 1:
        app: Any = create_app(settings)
    else:
        # uvicorn's own process model: the parent binds the port and supervises (restarting a
        # worker that dies); each worker builds the app from the environment, so the settings
        # resolved here travel as IFA_* variables.
        os.environ.update(settings_environment(settings))
        prepare_multiprocess_metrics()
        app = "service.app:create_app"
    uvicorn.run(
        app,
        factory=workers > 1,
        workers=workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
    )
    return 0


def settings_environment(settings: Settings) -> dict[str, str]:
    """``IFA_<NAME>`` variables that make ``Settings()`` in another process equal ``settings``."""
    environment = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        environment[f"IFA_{name.upper()}"] = text
    return environment


def prepare_multiprocess_metrics() -> None:
    """Point every worker at one empty directory for prometheus-client's multiprocess mode.

    Samples of an earlier run would be summed into this one's, so the directory starts empty:
    a fresh temporary one, or the operator's ``PROMETHEUS_MULTIPROC_DIR`` with its old files
    removed.
    """
    directory = os.environ.get(MULTIPROCESS_ENV)
    if directory:
        for stale in Path(directory).glob("*.db"):
            stale.unlink()
    else:
        directory = tempfile.mkdtemp(prefix="ifa-metrics-")
        os.environ[MULTIPROCESS_ENV] = directory


if __name__ == "__main__":
    sys.exit(main())
