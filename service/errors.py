"""Error responses: every failure is a JSON body that says what went wrong, and is counted.

* validation (422, or 400 for a body that is not JSON): ``{"detail": [{loc, field, msg, type}]}``
  where ``msg`` starts with the field it is about, e.g. ``candidate_ids[3]: Input should be ...``;
  a body the published schema accepts but the server's state refuses (an event timestamp past
  the server's clock) is a 409 in the same shape;
* a method the path does not serve: 405 whose ``Allow`` lists every method the path serves;
* store unreachable, the worker overloaded, the request budget spent, or the model not loaded
  yet: 503 ``{"detail": "..."}`` with ``Retry-After``;
* a route that requires the bearer token called without one: 401 with ``WWW-Authenticate:
  Bearer``; with a token that is not accepted: 403;
* a model failure or anything unexpected: 500 ``{"detail": "..."}``.

Bodies never carry internal exception text (a Redis error names hosts and commands): the cause
goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from service.metrics import Metrics
from service.stores.base import StoreError

logger = logging.getLogger("service")


class ModelError(RuntimeError):
    """The encoder or the scorer failed on an input the edge accepted."""


class NotReady(RuntimeError):
    """A request arrived before the lifespan loaded the model (or after it shut down)."""


class Overloaded(RuntimeError):
    """This worker cannot take the request now (in-flight limit, a full queue, the request
    budget spent): a 503 with Retry-After, so that the client retries, elsewhere or later.

    The message is public: it is the body's detail, so it must not carry internal text.
    """


class Unauthorized(RuntimeError):
    """The route requires the bearer token and the request did not carry it."""


class Conflict(RuntimeError):
    """A body the published schema accepts that the server's state refuses, such as an event
    later than the server's clock allows (JSON Schema cannot say "now"): one (loc, msg, type)
    per field, answered as a 409 in the validation shape."""

    def __init__(self, issues: Sequence[tuple[Sequence[str | int], str, str]]) -> None:
        super().__init__("; ".join(msg for _, msg, _ in issues))
        self.issues = issues


class Forbidden(RuntimeError):
    """The request carried a bearer token that is not accepted (or the route is refused)."""


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(content),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def unavailable(detail: str, retry_after_seconds: int) -> Response:
    """A 503 that tells the client when to retry."""
    return json_response({"detail": detail}, 503, headers={"retry-after": str(retry_after_seconds)})


def field_path(loc: Sequence[str | int]) -> str:
    """('body', 'events', 3, 'action') -> 'events[3].action'; the body itself -> 'body'."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "body"


def validation_error(loc: Sequence[str | int], msg: str, kind: str) -> RequestValidationError:
    """A 422 raised by a route, in the same shape as pydantic's own."""
    return validation_errors([(loc, msg, kind)])


def validation_errors(
    issues: Sequence[tuple[Sequence[str | int], str, str]],
) -> RequestValidationError:
    """One 422 listing several (loc, msg, type) issues."""
    return RequestValidationError(
        [{"loc": tuple(loc), "msg": msg, "type": kind} for loc, msg, kind in issues]
    )


def _issue(error: dict[str, Any]) -> dict[str, Any]:
    loc = list(error.get("loc", ()))
    kind = str(error.get("type", "value_error"))
    msg = str(error.get("msg", "invalid"))
    if kind == "json_invalid":
        cause = (error.get("ctx") or {}).get("error", "not valid JSON")
        position = loc[1] if len(loc) > 1 else "?"
        return {
            "loc": ["body"],
            "field": "body",
            "msg": f"body: malformed JSON at character {position}: {cause}",
            "type": kind,
        }
    if kind == "missing" and loc == ["body"]:
        msg = "a JSON request body is required"
    path = field_path(loc)
    return {"loc": loc, "field": path, "msg": f"{path}: {msg}", "type": kind}


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route of the app serves at the request's path."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL
               for route in routes)
    ]  # fmt: skip


def install_error_handlers(app: FastAPI, metrics: Metrics, retry_after_seconds: int = 1) -> None:
    async def on_validation(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        metrics.errors.labels(kind="validation").inc()
        issues = [_issue(dict(e)) for e in exc.errors()]
        content_type = request.headers.get("content-type", "")
        if "json" not in content_type:
            for issue in issues:
                if issue["loc"] == ["body"] and issue["type"] == "model_attributes_type":
                    issue["msg"] = (
                        f"body: expected a JSON object sent with content-type: application/json, "
                        f"got content-type {content_type!r}"
                    )
        malformed = any(i["type"] == "json_invalid" for i in issues)
        return json_response({"detail": issues}, status_code=400 if malformed else 422)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 400:
            # FastAPI's own 400 for a body it cannot even decode (bytes that are not UTF-8): the
            # same shape as every other malformed body.
            metrics.errors.labels(kind="validation").inc()
            issue = {
                "loc": ["body"],
                "field": "body",
                "msg": "body: not valid JSON (the bytes do not decode as UTF-8 text)",
                "type": "json_invalid",
            }
            return json_response({"detail": [issue]}, status_code=400)
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only (GET and POST
            # /admin/model are two routes).
            others = {k: v for k, v in (headers or {}).items() if k.lower() != "allow"}
            headers = others | {"allow": ", ".join(allowed_methods(request))}
        return json_response({"detail": exc.detail}, exc.status_code, headers=headers)

    async def on_conflict(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Conflict)
        metrics.errors.labels(kind="validation").inc()
        issues = [_issue({"loc": loc, "msg": msg, "type": kind}) for loc, msg, kind in exc.issues]
        return json_response({"detail": issues}, status_code=409)

    async def on_store_error(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="store").inc()
        logger.warning("store error on %s: %s", request.url.path, exc)
        return unavailable("state store unavailable; retry later", retry_after_seconds)

    async def on_not_ready(request: Request, exc: Exception) -> Response:
        return unavailable(str(exc), retry_after_seconds)

    async def on_overloaded(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="overloaded").inc()
        return unavailable(str(exc), retry_after_seconds)

    async def on_unauthorized(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="unauthorized").inc()
        return json_response(
            {"detail": str(exc)}, 401, headers={"www-authenticate": 'Bearer realm="ifa"'}
        )

    async def on_forbidden(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="forbidden").inc()
        return json_response({"detail": str(exc)}, 403)

    async def on_model_error(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="model").inc()
        logger.exception("model error on %s", request.url.path, exc_info=exc)
        return json_response({"detail": "the model failed to score this request"}, 500)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="internal").inc()
        logger.exception("internal error on %s", request.url.path, exc_info=exc)
        return json_response({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(StoreError, on_store_error)
    app.add_exception_handler(NotReady, on_not_ready)
    app.add_exception_handler(Overloaded, on_overloaded)
    app.add_exception_handler(Unauthorized, on_unauthorized)
    app.add_exception_handler(Forbidden, on_forbidden)
    app.add_exception_handler(Conflict, on_conflict)
    app.add_exception_handler(ModelError, on_model_error)
    app.add_exception_handler(Exception, on_unexpected)
