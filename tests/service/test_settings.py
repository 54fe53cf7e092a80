"""Settings come from IFA_* variables (REDIS_URL too) and the command line, which wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.__main__ import parse_args
from service.settings import Settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("IFA_") or name == "REDIS_URL":
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = Settings()
    assert (settings.store, settings.max_candidates, settings.seed_world) == ("memory", 2000, None)


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IFA_STORE", "redis")
    monkeypatch.setenv("IFA_MAX_CANDIDATES", "500")
    monkeypatch.setenv("IFA_SEED_WORLD", "/data/world")
    settings = Settings()
    assert (settings.store, settings.max_candidates) == ("redis", 500)
    assert settings.seed_world == Path("/data/world")


def test_plain_redis_url_is_honoured_and_the_prefixed_one_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    assert Settings().redis_url == "redis://plain:6379/0"
    monkeypatch.setenv("IFA_REDIS_URL", "redis://prefixed:6379/0")
    assert Settings().redis_url == "redis://prefixed:6379/0"


def test_command_line_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IFA_PORT", "9000")
    monkeypatch.setenv("REDIS_URL", "redis://env:6379/0")
    args = parse_args(["--port", "8123", "--model-dir", "/m", "--redis-url", "redis://cli:1/0"])
    settings = Settings(**args)
    assert (settings.port, settings.model_dir) == (8123, Path("/m"))
    assert settings.redis_url == "redis://cli:1/0"
    assert Settings(**parse_args([])).port == 9000


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IFA_STORE", "cassandra")
    with pytest.raises(ValidationError):
        Settings()
