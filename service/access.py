"""Who may call what, decided in one place: the bearer tokens, the bind the service refuses to
open without one, and the OpenAPI document of exactly what is enforced.

* A token configured (``api_token``, several comma-separated during a rotation): POST /events,
  PUT /items, POST /explain and /admin need ``Authorization: Bearer <token>``: 401 with
  ``WWW-Authenticate: Bearer`` without a credential, 403 with a wrong one.
* No token: the service binds only a loopback address, where those routes (not /admin) are open
  to the machine's own callers, a development set-up; a non-loopback bind is refused at start
  unless the operator sets ``allow_unauthenticated_writes``. /admin is refused without a token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.settings import Settings

TOKEN_ROUTES = "POST /events, PUT /items and POST /explain"
"""The routes a token guards that are open on loopback without one (/admin never is)."""
SECURITY_SCHEME = "HTTPBearer"
"""The name FastAPI gives the HTTPBearer dependency's scheme in the OpenAPI document."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` reaches only this machine. A host name other than localhost is
    not: it may resolve to any interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(settings: Settings) -> str | None:
    """Why the service must not start with these settings (an open write API on a network
    address), or None."""
    if (
        settings.accepted_tokens()
        or is_loopback(settings.host)
        or settings.allow_unauthenticated_writes
    ):
        return None
    return (
        f"refusing to serve on {settings.host}:{settings.port} without an api_token: anyone "
        f"who reaches the port could write users' histories, change the item features every "
        f"ranking uses and read any user's history ({TOKEN_ROUTES}). Set a token "
        f"(IFA_API_TOKEN=$(openssl rand -hex 32), or --api-token), bind a loopback address "
        f"(--host 127.0.0.1), or open those routes explicitly with "
        f"--allow-unauthenticated-writes (IFA_ALLOW_UNAUTHENTICATED_WRITES=true)."
    )


def log_access(settings: Settings, logger: logging.Logger) -> None:
    """Say at start what a caller without a token may do."""
    tokens = settings.accepted_tokens()
    where = f"{settings.host}:{settings.port}"
    if tokens:
        logger.info("%s and /admin require a bearer token (%d accepted)", TOKEN_ROUTES, len(tokens))
        if settings.allow_unauthenticated_writes:
            logger.info("allow_unauthenticated_writes has no effect: an api_token is set")
    elif is_loopback(settings.host):
        logger.warning(
            "no api_token: %s are open to any caller on this machine (%s is loopback); /admin "
            "is refused. Set IFA_API_TOKEN to require a token.",
            TOKEN_ROUTES, where,
        )  # fmt: skip
    else:
        logger.warning(
            "allow_unauthenticated_writes is set and there is no api_token: %s are OPEN TO "
            "ANYONE who reaches %s (histories written, item features changed, any user's "
            "history read); /admin is refused. Set IFA_API_TOKEN to close them.",
            TOKEN_ROUTES, where,
        )  # fmt: skip


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def match_token(given: bytes, tokens: Sequence[bytes]) -> int | None:
    """The index of the accepted token ``given`` is, or None.

    Constant time: digests of equal length are compared with every token, whatever matched, so
    the time taken tells neither how much of a guess was right nor how long a token is.
    """
    given_digest = _digest(given)
    matched = None
    for index, token in enumerate(tokens):
        if hmac.compare_digest(given_digest, _digest(token)) and matched is None:
            matched = index
    return matched


# -- the OpenAPI document ----------------------------------------------------------------------


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any] | None]:
    for dependency in dependant.dependencies:
        yield dependency.call
        yield from _calls(dependency)


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    if headers:
        response["headers"] = headers
    return response


MISSING_CREDENTIAL = _error(
    "No bearer credential was sent (Authorization: Bearer <token>).",
    {
        "WWW-Authenticate": {
            "description": "The scheme to authenticate with: Bearer.",
            "schema": {"type": "string"},
        }
    },
)
WRONG_CREDENTIAL = _error("The bearer token sent is not an accepted api_token.")
NO_TOKEN_CONFIGURED = _error("No api_token is configured: /admin is refused.")


def document_access(
    schema: dict[str, Any],
    routers: Sequence[APIRouter],
    settings: Settings,
    token_dependency: Callable[..., Any],
    admin_dependency: Callable[..., Any],
) -> None:
    """Make ``schema`` declare what the app of ``routers`` enforces with ``settings``: the bearer
    scheme and its 401 and 403 on the operations that depend on ``token_dependency`` or
    ``admin_dependency`` when a token is configured; without one, no scheme at all, and /admin's
    403."""
    configured = bool(settings.accepted_tokens())
    for route in (route for router in routers for route in router.routes):
        if not isinstance(route, APIRoute):
            continue
        calls = set(_calls(route.dependant))
        admin = admin_dependency in calls
        if not admin and token_dependency not in calls:
            continue
        for method in route.methods or ():
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            if configured:
                operation["security"] = [{SECURITY_SCHEME: []}]
                responses["401"] = MISSING_CREDENTIAL
                responses["403"] = WRONG_CREDENTIAL
            else:
                operation.pop("security", None)
                if admin:
                    responses["403"] = NO_TOKEN_CONFIGURED
    if not configured:
        components = schema.get("components", {})
        components.get("securitySchemes", {}).pop(SECURITY_SCHEME, None)
        if components.get("securitySchemes") == {}:
            del components["securitySchemes"]
