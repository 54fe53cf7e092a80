"""docs/your-own-logs.md runs as written: its bash blocks, in order, as one script in an empty
directory (prepare → train → export → serve → replay → the fair comparison), and each step
leaves what the page says it leaves."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
TUTORIAL = REPOSITORY / "docs" / "your-own-logs.md"
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


def tutorial_script() -> str:
    blocks = BASH_BLOCK.findall(TUTORIAL.read_text())
    return "set -euo pipefail\n" + "\n".join(blocks)


def test_the_tutorial_has_every_step() -> None:
    script = tutorial_script()
    for step in (
        "model.prepare --example",
        "model.prepare --impressions",
        "model.train",
        "model.export",
        "python -m service ",
        "service.replay",
        "model.experiment fair --world",
    ):
        assert step in script, step


@pytest.mark.slow
@pytest.mark.e2e
def test_the_tutorial_runs_as_written(tmp_path: Path) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IFA_")}
    # `python` is this interpreter, as it is for a reader inside the project's environment.
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"
    environment["PYTHONPATH"] = str(REPOSITORY)
    process = subprocess.Popen(
        ["bash", "-c", tutorial_script()],
        cwd=tmp_path,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own group: a failed step cannot leave the service behind
    )
    try:
        output, _ = process.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    assert process.returncode == 0, output[-6000:]

    report = json.loads((tmp_path / "shop-world" / "report.json").read_text())
    assert report["actions"] == ["impression", "click", "cart", "purchase"]
    assert report["dropped"] == {}
    assert "replayed" in output and "0 duplicates" in output
    assert "objectives ['impression', 'click', 'cart', 'purchase']" in output
    assert "fusion {'cart': 0.3, 'purchase': 1.0}" in output
    fair = json.loads((tmp_path / "shop-results" / "fair_shop-world.json").read_text())
    assert set(fair["metrics"]) == {"din", "twin", "ifa"}
    assert set(fair["metrics"]["ifa"]["gauc"]) == {"impression", "click", "cart", "purchase"}
