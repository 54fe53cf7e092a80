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


def test_a_redis_url_alone_selects_the_redis_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL alone must never leave events in memory, where a restart loses them."""
    monkeypatch.setenv("REDIS_URL", "redis://:pw@cache:6380/2")
    settings = Settings()
    assert (settings.store, settings.redis_url) == ("redis", "redis://:pw@cache:6380/2")
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setenv("IFA_REDIS_URL", "rediss://cache:6380/0")
    assert Settings().store == "redis"


def test_an_explicit_memory_store_wins_over_a_url_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/0")
    monkeypatch.setenv("IFA_STORE", "memory")
    with caplog.at_level("WARNING", logger="service"):
        assert Settings().store == "memory"
    assert "the Redis URL given is not used" in caplog.text


def test_without_a_url_the_store_is_in_memory() -> None:
    assert Settings().store == "memory"


def test_the_history_cap_defaults_to_the_training_window() -> None:
    assert Settings().resolved_max_history(None) == 1000
    assert Settings().resolved_max_history(250) == 250
    assert Settings(max_history=64).resolved_max_history(250) == 64
