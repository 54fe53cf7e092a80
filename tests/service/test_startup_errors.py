"""``python -m service`` without a usable model says which directory and what to run, in one
paragraph and without a traceback (which ``--log-level debug`` still prints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]


def start(model_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IFA_")}
    environment["PYTHONPATH"] = str(REPOSITORY)
    return subprocess.run(
        [sys.executable, "-m", "service", "--port", "0", "--model-dir", str(model_dir), *args],
        capture_output=True, text=True, cwd=REPOSITORY, env=environment, timeout=60,
    )  # fmt: skip


def missing(tmp_path: Path) -> Path:
    return tmp_path / "no-such-dir"


def empty(tmp_path: Path) -> Path:
    return tmp_path


def latest_names_nothing(tmp_path: Path) -> Path:
    (tmp_path / "LATEST").write_text("v-gone\n")
    return tmp_path


def manifest_malformed(tmp_path: Path) -> Path:
    (tmp_path / "manifest.json").write_text("{not json")
    return tmp_path


@pytest.mark.parametrize("layout", [missing, empty, latest_names_nothing, manifest_malformed])
def test_no_model_is_one_paragraph_naming_the_directory_and_the_build_command(
    tmp_path: Path, layout: object
) -> None:
    model_dir = layout(tmp_path)  # type: ignore[operator]
    result = start(model_dir)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"No model to serve in '{model_dir}'" in lines[0]
    assert f"python -m model.demo --out {model_dir}" in lines[0]
    assert "make run" in lines[0]


def test_the_traceback_stays_at_debug_level(tmp_path: Path) -> None:
    result = start(tmp_path, "--log-level", "debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert "FileNotFoundError" in result.stderr
    assert "No model to serve" in result.stderr
