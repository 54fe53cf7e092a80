"""How much CPU the machine really gives: one busy process per CPU, each timing itself.

On a shared or throttled virtual machine the CPU count says little: two vCPUs may together get
the time of one core once both are busy (the host deschedules them). A capacity figure means
something only next to what the cores delivered while it was measured, so the load tools report
this beside their results.
"""

from __future__ import annotations

import os
import subprocess
import sys

_SPIN = """
import sys, time
wall_started, cpu_started = time.perf_counter(), time.process_time()
while time.perf_counter() - wall_started < float(sys.argv[1]):
    pass
print((time.process_time() - cpu_started) / (time.perf_counter() - wall_started))
"""


def busy_cpu_shares(seconds: float = 3.0, processes: int | None = None) -> list[float]:
    """The share of a core (0..1) each of ``processes`` (default: one per CPU) busy processes
    got over ``seconds`` of wall time, all running at once; their sum is the cores delivered."""
    count = processes or os.cpu_count() or 1
    spinners = [
        subprocess.Popen(
            [sys.executable, "-c", _SPIN, str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    return [float(spinner.communicate()[0]) for spinner in spinners]
