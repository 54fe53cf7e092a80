"""``python -m service``: run the ranking service under uvicorn.

Every option is also a setting read from the environment (``IFA_<NAME>``); the command line wins.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from service.app import create_app
from service.settings import Settings


def parse_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="interface to bind (IFA_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (IFA_PORT)")
    parser.add_argument("--model-dir", type=Path, help="artefact directory (IFA_MODEL_DIR)")
    parser.add_argument("--program-format", help="torchscript, export, aoti or eager")
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


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings(**parse_args(argv))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
    )


if __name__ == "__main__":
    main()
