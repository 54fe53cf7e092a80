"""Closed by default: the bearer token on POST /events, PUT /items, POST /explain and /admin (401
without a credential, 403 with a wrong one), the refusal to serve a network address without a
token, the explicit opt-out, /explain's rate buckets per client, and an OpenAPI document that
declares exactly what is enforced."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from loadtest.harness import running_service
from service.__main__ import main
from service.access import is_loopback, log_access, match_token
from service.rate_limits import ClientRateLimits
from tests.support import T0, make_settings, service_client

pytestmark = pytest.mark.anyio

TOKEN = "access-token-1"
OLD_TOKEN = "access-token-0"
AUTH = {"authorization": f"Bearer {TOKEN}"}
EVENTS = {
    "events": [{"event_id": "a1", "user_id": 3, "item_id": 5, "action": "click", "timestamp": T0}]
}
ITEMS = {"items": [{"item_id": 5000, "attributes": {"category": 1, "author": 2}}]}
EXPLAIN = {"user_id": 3, "item_id": 5, "top": 3}

# (method, path, body) of every route the token guards.
GUARDED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/events", EVENTS),
    ("PUT", "/items", ITEMS),
    ("POST", "/explain", EXPLAIN),
    ("GET", "/admin/model", None),
    ("POST", "/admin/model", {"version": "ifa-no-such-version"}),
]
GUARDED_OPERATIONS = {(method.lower(), path) for method, path, _ in GUARDED}


async def call(
    client: httpx.AsyncClient, method: str, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    return await client.request(method, path, json=body, headers=headers)


# -- the token ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "body"), GUARDED)
async def test_a_missing_credential_is_a_401_and_a_wrong_one_a_403(
    artifact_dir: Path, method: str, path: str, body: Any
) -> None:
    async with service_client(make_settings(artifact_dir, api_token=TOKEN)) as client:
        missing = await call(client, method, path, body, {})
        basic = await call(client, method, path, body, {"authorization": f"Basic {TOKEN}"})
        wrong = await call(client, method, path, body, {"authorization": "Bearer guess"})
        right = await call(client, method, path, body, AUTH)
        metrics = (await client.get("/metrics")).text
    for refused in (missing, basic):  # no bearer credential at all
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
    assert wrong.status_code == 403, wrong.text
    assert "www-authenticate" not in wrong.headers
    for answer in (missing, basic, wrong):
        assert TOKEN not in answer.text
        assert "bearer token" in answer.json()["detail"]
    # The token is accepted (the admin POST names no such version: a 404 after the check).
    assert right.status_code == (404 if path == "/admin/model" and body else 200), right.text
    assert 'ifa_errors_total{kind="unauthorized"} 2.0' in metrics
    assert 'ifa_errors_total{kind="forbidden"} 1.0' in metrics


async def test_the_read_routes_stay_open_with_a_token(artifact_dir: Path) -> None:
    async with service_client(make_settings(artifact_dir, api_token=TOKEN)) as client:
        ranked = await client.post("/rank", json={"user_id": 3, "candidate_ids": [5]})
        info = await client.get("/model")
    assert ranked.status_code == 200 and info.status_code == 200


async def test_every_token_of_a_rotation_is_accepted(artifact_dir: Path) -> None:
    settings = make_settings(artifact_dir, api_token=f"{TOKEN}, {OLD_TOKEN}")
    async with service_client(settings) as client:
        new = await client.post("/events", json=EVENTS, headers=AUTH)
        old = await client.post(
            "/events", json=EVENTS, headers={"authorization": f"Bearer {OLD_TOKEN}"}
        )
        both = await client.post(
            "/events", json=EVENTS, headers={"authorization": f"Bearer {TOKEN},{OLD_TOKEN}"}
        )
    assert (new.status_code, old.status_code, both.status_code) == (200, 200, 403)


def test_tokens_match_by_value_and_an_empty_token_is_refused() -> None:
    tokens = (b"first", b"second")
    assert match_token(b"second", tokens) == 1
    assert match_token(b"first", tokens) == 0
    for guess in (b"", b"firs", b"first ", b"secondsecond"):
        assert match_token(guess, tokens) is None
    with pytest.raises(ValueError, match="empty"):
        make_settings(Path("."), api_token="one,,two")
    with pytest.raises(ValueError, match="empty"):
        make_settings(Path("."), api_token=" ")


async def test_without_a_token_on_loopback_writes_are_open_and_admin_is_refused(
    artifact_dir: Path,
) -> None:
    async with service_client(make_settings(artifact_dir)) as client:
        events = await client.post("/events", json=EVENTS)
        items = await client.put("/items", json=ITEMS)
        explained = await client.post("/explain", json=EXPLAIN)
        admin = await client.get("/admin/model", headers=AUTH)
    assert (events.status_code, items.status_code, explained.status_code) == (200, 200, 200)
    assert admin.status_code == 403
    assert "IFA_API_TOKEN" in admin.json()["detail"]


# -- the bind -----------------------------------------------------------------------------------


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "ranker.internal", ""):
        assert not is_loopback(host), host


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
def test_a_network_bind_without_a_token_refuses_to_start(
    host: str, artifact_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("IFA_API_TOKEN", "IFA_ALLOW_UNAUTHENTICATED_WRITES"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.ERROR, logger="service"):
        code = main(["--host", host, "--port", "8000", "--model-dir", str(artifact_dir)])
    assert code == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert message.startswith(f"refusing to serve on {host}:8000 without an api_token")
    for remedy in ("IFA_API_TOKEN", "--host 127.0.0.1", "--allow-unauthenticated-writes"):
        assert remedy in message


def test_the_start_says_what_a_caller_without_a_token_may_do(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test-access")
    with caplog.at_level(logging.INFO, logger="test-access"):
        log_access(make_settings(Path("."), host="127.0.0.1"), logger)
        log_access(
            make_settings(Path("."), host="0.0.0.0", api_token=f"{TOKEN},{OLD_TOKEN}"), logger
        )
    loopback, closed = caplog.records
    assert loopback.levelno == logging.WARNING
    assert "POST /events, PUT /items and POST /explain are open to any caller on this machine" in (
        loopback.getMessage()
    )
    assert closed.levelno == logging.INFO
    assert closed.getMessage().endswith("and /admin require a bearer token (2 accepted)")


@pytest.mark.e2e
def test_the_opt_out_starts_open_and_says_so_loudly(artifact_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "service.log"
    # The harness binds 127.0.0.1; the later --host wins, so the service binds every interface.
    args = ["--host", "0.0.0.0", "--allow-unauthenticated-writes", "--log-level", "info"]
    with running_service(artifact_dir, log, env={"IFA_STORE": "memory"}, args=args) as service:
        posted = httpx.post(f"{service.url}/events", json=EVENTS, timeout=10)
        admin = httpx.get(f"{service.url}/admin/model", timeout=10)
    assert posted.status_code == 200
    assert admin.status_code == 403
    text = log.read_text()
    assert "WARNING" in text and "OPEN TO ANYONE" in text
    assert "POST /events, PUT /items and POST /explain" in text


# -- /explain's rate limit ------------------------------------------------------------------------


@asynccontextmanager
async def from_address(client: httpx.AsyncClient, host: str) -> AsyncIterator[httpx.AsyncClient]:
    """Another caller of the same running app, from ``host``."""
    transport = httpx.ASGITransport(app=client.app, client=(host, 40000))  # type: ignore[attr-defined]
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as other:
        yield other


async def test_explain_rate_buckets_are_per_client(artifact_dir: Path) -> None:
    settings = make_settings(artifact_dir, api_token=TOKEN, explain_rate_per_second=0.001)
    async with (
        service_client(settings) as client,
        from_address(client, "10.0.0.7") as operator,
    ):
        spent = [
            (await client.post("/explain", json=EXPLAIN, headers=AUTH)).status_code
            for _ in range(6)
        ]
        # One client has spent its burst; another caller with the same token still gets in.
        other = await operator.post("/explain", json=EXPLAIN, headers=AUTH)
        again = await client.post("/explain", json=EXPLAIN, headers=AUTH)
    assert spent == [200] * 5 + [429]
    assert other.status_code == 200
    assert again.status_code == 429


def test_rate_buckets_are_bounded() -> None:
    limits = ClientRateLimits(rate=0.001, burst=1, max_clients=3)
    assert limits.take("a") == 0 and limits.take("a") > 0
    for client in ("b", "c", "d"):
        assert limits.take(client) == 0
    assert len(limits) == 3
    # "a" was seen least recently: its bucket was dropped, and it starts full again.
    assert limits.take("a") == 0
    assert limits.take("d") > 0  # the others keep theirs


# -- the OpenAPI document ---------------------------------------------------------------------


def operations(schema: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, methods in schema["paths"].items()
        for method, operation in methods.items()
    }


async def test_the_schema_declares_the_token_where_it_is_enforced(artifact_dir: Path) -> None:
    async with service_client(make_settings(artifact_dir, api_token=TOKEN)) as client:
        schema = (await client.get("/openapi.json")).json()
    scheme = schema["components"]["securitySchemes"]["HTTPBearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    secured = {key for key, op in operations(schema).items() if "security" in op}
    assert secured == GUARDED_OPERATIONS
    for key in GUARDED_OPERATIONS:
        responses = operations(schema)[key]["responses"]
        assert {"401", "403"} <= set(responses), key
        assert "WWW-Authenticate" in responses["401"]["headers"]
    for key, operation in operations(schema).items():
        if key not in GUARDED_OPERATIONS:
            assert not {"401", "403"} & set(operation["responses"]), key


async def test_without_a_token_the_schema_declares_no_security(artifact_dir: Path) -> None:
    async with service_client(make_settings(artifact_dir)) as client:
        schema = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in schema.get("components", {})
    assert not [key for key, op in operations(schema).items() if "security" in op]
    assert "403" in operations(schema)[("get", "/admin/model")]["responses"]
    assert "401" not in operations(schema)[("post", "/events")]["responses"]
