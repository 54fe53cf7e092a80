"""Settings come from IFA_* variables (REDIS_URL too) and the command line, which wins; the
command line is generated from the one declaration in ``service/settings.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, SecretStr, ValidationError

from service.settings import Settings, parse_settings, settings_environment

REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
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
    monkeypatch.setenv("IFA_STORE", "redis")
    monkeypatch.setenv("IFA_REDIS_URL", "redis://env:6379/0")
    monkeypatch.setenv("IFA_ACCESS_LOG", "true")
    settings = parse_settings(
        ["--port", "8123", "--model-dir", "/m", "--redis-url", "redis://cli:1/0",
         "--no-access-log", "--seed-world", "/w"]
    )  # fmt: skip
    assert (settings.port, settings.model_dir) == (8123, Path("/m"))
    assert settings.seed_world == Path("/w")
    assert (settings.redis_url, settings.access_log) == ("redis://cli:1/0", False)
    # What the command line leaves alone comes from the environment, then the default.
    assert (settings.store, settings.max_candidates) == ("redis", 2000)
    assert parse_settings([]).port == 9000


def test_every_setting_is_a_flag_with_its_default_and_variable_in_the_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"],
        capture_output=True, text=True, cwd=REPOSITORY, env=_child_environment(), check=True,
    )  # fmt: skip
    help_text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert f"{flag} " in help_text, flag
        assert f"[env: IFA_{name.upper()}]" in help_text, name
        default = "null" if field.default is None else str(field.default)
        assert f"(default: {default})" in help_text, (name, default)
    # Each default is printed beside its own flag, not only somewhere in the text.
    assert "TCP port uvicorn listens on. (default: 8000) [env: IFA_PORT]" in help_text
    assert "(default: artifacts) [env: IFA_MODEL_DIR]" in help_text
    assert "REDIS_URL is read too" in help_text


def test_invalid_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IFA_STORE", "cassandra")
    with pytest.raises(ValidationError):
        Settings()


def test_an_invalid_flag_value_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", "99999", "--store", "cassandra"],
        capture_output=True, text=True, cwd=REPOSITORY, env=_child_environment(),
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "port: Input should be less than or equal to 65535" in result.stderr
    assert "store: Input should be 'memory' or 'redis'" in result.stderr


def test_settings_survive_the_trip_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker process rebuilds the parent's resolved settings from IFA_* variables alone."""
    monkeypatch.setenv("REDIS_URL", "redis://plain:6379/0")
    resolved = parse_settings(
        ["--port", "8123", "--store", "redis", "--seed-world", "/w", "--no-state-cache",
         "--access-log", "--redis-timeout-seconds", "0.05", "--log-level", "debug"]
    )  # fmt: skip
    environment = settings_environment(resolved)
    assert all(name.startswith("IFA_") for name in environment)
    monkeypatch.delenv("REDIS_URL")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    rebuilt = Settings()
    assert rebuilt == resolved
    assert rebuilt.redis_url == "redis://plain:6379/0"
    # None has no variable: the other process gets it back as the default.
    assert "IFA_SEED_WORLD" not in settings_environment(Settings(seed_world=None))


def test_secret_and_structured_settings_survive_the_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fields of kinds Settings may gain: a secret is written in clear (not masked), a list as
    JSON."""

    class Extended(Settings):
        token: SecretStr | None = None
        nodes: list[str] = Field(default_factory=list)

    resolved = Extended(token=SecretStr("s3cret"), nodes=["a:1", "b:2"])
    environment = settings_environment(resolved)
    assert environment["IFA_TOKEN"] == "s3cret"
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    rebuilt = Extended()
    assert rebuilt.token is not None and rebuilt.token.get_secret_value() == "s3cret"
    assert rebuilt.nodes == ["a:1", "b:2"]


def _child_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IFA_")}
    environment["PYTHONPATH"] = str(REPOSITORY)
    return environment


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
