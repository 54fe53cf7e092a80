"""The commands the READMEs quote still run: every ``python -m`` entry point of ours that a bash
block of README.md, deploy/README.md or a page of docs/ calls answers ``--help`` with exit 0 and
knows every flag the quote passes, and every quoted ``make`` target exists. Docs and code cannot
drift apart silently."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
DOCUMENTS = (
    "README.md",
    "deploy/README.md",
    *sorted(str(p.relative_to(REPOSITORY)) for p in (REPOSITORY / "docs").glob("*.md")),
)
OUR_PACKAGES = ("service", "model", "loadtest")
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Quote:
    document: str
    line: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.document}: {self.line}"


def quoted_commands() -> list[Quote]:
    """Each command line of the bash blocks: continuations joined, comments and a trailing ``&``
    dropped, split at ``&&`` and ``;``."""
    quotes: list[Quote] = []
    for document in DOCUMENTS:
        text = (REPOSITORY / document).read_text()
        for block in BASH_BLOCK.findall(text):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                command: list[str] = []
                for word in [*words, ";"]:
                    if word in ("&&", ";", "&"):
                        if command:
                            quotes.append(Quote(document, " ".join(command), tuple(command)))
                        command = []
                    else:
                        command.append(word)
    return quotes


def entry_point(words: tuple[str, ...]) -> str | None:
    """The module a ``python -m X`` or ``torchrun ... -m X`` command runs, if it is ours."""
    program = Path(words[0]).name
    if not (program.startswith("python") or program == "torchrun") or "-m" not in words:
        return None
    module = words[words.index("-m") + 1]
    return module if module.split(".")[0] in OUR_PACKAGES else None


QUOTES = quoted_commands()
ENTRY_POINTS = [(q, m) for q in QUOTES if (m := entry_point(q.words)) is not None]
MAKE_TARGETS = sorted({w for q in QUOTES if q.words[0] == "make" for w in q.words[1:]})


def test_the_readmes_quote_what_this_test_checks() -> None:
    """Guards the parser above: if it found nothing, the tests below would pass vacuously."""
    modules = {module for _, module in ENTRY_POINTS}
    assert {"service", "model.demo", "model.train", "loadtest", "loadtest.capacity"} <= modules
    assert {"run", "run-redis", "test"} <= set(MAKE_TARGETS)


@pytest.mark.slow
@pytest.mark.parametrize(("quote", "module"), ENTRY_POINTS, ids=[str(q) for q, _ in ENTRY_POINTS])
def test_quoted_entry_point_answers_help_and_knows_its_flags(quote: Quote, module: str) -> None:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IFA_")}
    environment["PYTHONPATH"] = str(REPOSITORY)
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True, text=True, cwd=REPOSITORY, env=environment, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    after_module = quote.words[quote.words.index(module) + 1 :]
    flags = {word.split("=", 1)[0] for word in after_module if word.startswith("--")}
    known = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", result.stdout))
    assert flags <= known, f"{quote}: {sorted(flags - known)} not in `{module} --help`"


@pytest.mark.parametrize("target", MAKE_TARGETS)
def test_quoted_make_target_exists(target: str) -> None:
    result = subprocess.run(
        ["make", "-n", "-C", str(REPOSITORY), target], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
