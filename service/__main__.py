"""``python -m service``: run the ranking service under uvicorn.

Every option is a field of :class:`service.settings.Settings`, also read from the environment
(``IFA_<NAME>``); the command line wins. ``--help`` lists them with defaults and variables.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import uvicorn

from service.app import create_app
from service.runtime import ModelDirectoryError, check_model_dir
from service.settings import parse_settings

logger = logging.getLogger("service")


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        check_model_dir(settings.model_dir)
    except ModelDirectoryError as error:
        logger.debug("model directory check failed", exc_info=error.__cause__ or error)
        logger.error("%s", error)
        sys.exit(2)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
    )


if __name__ == "__main__":
    main()
