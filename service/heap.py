"""Long-lived objects kept out of the garbage collector's full collections."""

from __future__ import annotations

import gc


def freeze_long_lived() -> None:
    """Move everything alive now out of the garbage collector's reach (after start-up, and
    again after a rollout has loaded, warmed and retired a version).

    torch, inductor and the loaded programs leave about 350,000 tracked objects; every full
    collection walked them all, holding the GIL for 100–250 ms, and a worker stalled that long
    answers nothing (the cause of the p99 at high load). A loaded model lives until a rollout
    replaces it, so its objects are frozen (``gc.freeze``) and later collections see only what
    requests create. Frozen objects are first unfrozen and collected once: a version a rollout
    retired is then freed even where it holds reference cycles, and the new one is frozen. That
    one collection is the same pause start-up takes, once per rollout.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
