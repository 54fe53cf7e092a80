"""``python -m service``: run the ranking service under uvicorn.

Every option is a field of :class:`service.settings.Settings`, also read from the environment
(``IFA_<NAME>``); the command line wins. ``--help`` lists them with defaults and variables.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn

from service.access import bind_refusal, log_access
from service.app import create_app
from service.metrics import MULTIPROCESS_ENV
from service.runtime import ModelDirectoryError, check_model_dir
from service.settings import parse_settings, settings_environment

logger = logging.getLogger("service")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    refusal = bind_refusal(settings)
    if refusal is not None:
        logger.error("%s", refusal)
        return 2
    try:
        check_model_dir(settings.model_dir)
    except ModelDirectoryError as error:
        logger.debug("model directory check failed", exc_info=error.__cause__ or error)
        logger.error("%s", error)
        return 2
    log_access(settings, logger)
    workers = settings.resolved_workers()
    if workers > 1 and settings.store == "memory":
        logger.error(
            "%d workers need a store they can share, and the memory store lives inside one "
            "process (each worker would keep its own events and states). Use --store redis "
            "(with --redis-url), or --workers 1.",
            workers,
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
        limit_concurrency=settings.limit_concurrency,
    )
    return 0


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
