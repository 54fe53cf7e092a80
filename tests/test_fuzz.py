"""Fuzzing the live API from its own OpenAPI schema: schemathesis with every check it has
(``--checks all``: no 5xx, status codes, content types, headers and bodies as documented, valid
data accepted, invalid data refused, the bearer token enforced where it is declared, ``Allow`` on
a 405, ...) and every phase that applies (boundary values, then generated data, positive and
negative), against the service run as a real process with a token configured.

The command is the one an operator or a reviewer runs by hand (``schemathesis run URL/openapi.json
--checks all -H 'Authorization: Bearer ...'``), with a fixed seed and a bounded number of examples
per operation, so that the run takes seconds, not minutes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.harness import LiveService, running_service

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

TOKEN = "fuzz-token"
EXAMPLES = 50
"""Per operation and phase."""
SEED = 1
GUARDED_PATHS = r"^/(events|items|explain|admin/)"
"""The paths whose operations require the token (test_access.py checks the list)."""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, artifact_dir: Path) -> Iterator[LiveService]:
    # A copy of the artefact: POST /admin/model may write its LATEST.
    root = tmp_path_factory.mktemp("fuzz-model") / "models"
    shutil.copytree(artifact_dir, root)
    env = {
        "IFA_STORE": "memory",
        "IFA_API_TOKEN": TOKEN,
        # Generated /explain bodies reach the route instead of its 429 (which is documented and
        # accepted by the checks, so the default rate passes too, testing less).
        "IFA_EXPLAIN_RATE_PER_SECOND": "1000",
    }
    log = tmp_path_factory.mktemp("fuzz-service") / "service.log"
    with running_service(root, log, env=env) as live:
        yield live


def schemathesis(url: str, cwd: Path, *args: str) -> str:
    """The output of ``schemathesis run`` with every check; fails the test unless it exits 0."""
    binary = Path(sys.executable).with_name("schemathesis")
    assert binary.is_file(), "schemathesis missing: pip install -e '.[dev]'"
    command = [str(binary), "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--no-color", "--output-truncate", "true", *args]  # fmt: skip
    # cwd: a directory of the test's own, so that no schemathesis.toml changes the run and the
    # Hypothesis database lands there.
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-12_000:]
    return output


def cases(output: str) -> int:
    """Test cases run, all of them passed (the summary line says so)."""
    match = re.search(r"(\d+) generated, (\d+) passed", output)
    assert match is not None, output[-4000:]
    assert match.group(1) == match.group(2), match.group(0)
    return int(match.group(1))


def test_every_check_passes_with_the_token(service: LiveService, tmp_path: Path) -> None:
    output = schemathesis(service.url, tmp_path, "-H", f"Authorization: Bearer {TOKEN}")
    operations = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", output)
    assert operations is not None, output[-4000:]
    selected, total, tested = map(int, operations.groups())
    assert selected == total == tested >= 10  # every operation of the schema
    assert cases(output) >= tested * EXAMPLES // 2
    assert "Authentication failed" not in output  # the token reached every guarded route
    assert service.process.poll() is None


def test_without_the_token_the_guarded_routes_answer_as_documented(
    service: LiveService, tmp_path: Path
) -> None:
    """The same checks on the guarded routes without a credential: every answer is the
    documented 401 (schemathesis warns that nothing but 401/403 came back, which is the point)."""
    output = schemathesis(service.url, tmp_path, "--include-path-regex", GUARDED_PATHS)
    assert cases(output) >= 5 * EXAMPLES // 2
    assert "5 operations returned only 401/403 responses" in output
    assert service.process.poll() is None
