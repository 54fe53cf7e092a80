"""``python -m loadtest``: see :mod:`loadtest.runner`."""

from __future__ import annotations

import sys

from loadtest.runner import main

sys.exit(main())
