"""Error responses: every failure is a JSON body that says what went wrong, and is counted.

* validation (422, or 400 for a body that is not JSON): ``{"detail": [{loc, field, msg, type}]}``
  where ``msg`` starts with the field it is about, e.g. ``candidate_ids[3]: Input should be ...``;
* store unreachable, or the model not loaded yet: 503 ``{"detail": "..."}``;
* a worker at a capacity limit: 503 with ``Retry-After``;
* a model failure or anything unexpected: 500 ``{"detail": "..."}``, with the cause in the log
  and never in the body.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.responses import Response

from service.metrics import Metrics
from service.stores.base import StoreError

logger = logging.getLogger("service")


class ModelError(RuntimeError):
    """The encoder or the scorer failed on an input the edge accepted."""


class NotReady(RuntimeError):
    """A request arrived before the lifespan loaded the model (or after it shut down)."""


class Overloaded(RuntimeError):
    """This worker is at a capacity limit: shed the request now (503 + Retry-After) rather
    than queue it behind work it would wait seconds for."""

    def __init__(self, detail: str, retry_after_seconds: int = 1) -> None:
        super().__init__(detail)
        self.retry_after_seconds = retry_after_seconds


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")


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


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
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

    async def on_store_error(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="store").inc()
        logger.warning("store error on %s: %s", request.url.path, exc)
        return json_response({"detail": f"state store unavailable: {exc}"}, status_code=503)

    async def on_not_ready(request: Request, exc: Exception) -> Response:
        return json_response({"detail": str(exc)}, status_code=503)

    async def on_overloaded(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Overloaded)
        metrics.errors.labels(kind="overloaded").inc()
        response = json_response({"detail": str(exc)}, status_code=503)
        response.headers["Retry-After"] = str(exc.retry_after_seconds)
        return response

    async def on_model_error(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="model").inc()
        logger.exception("model error on %s", request.url.path, exc_info=exc)
        return json_response({"detail": "the model failed to score this request"}, 500)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        metrics.errors.labels(kind="internal").inc()
        logger.exception("internal error on %s", request.url.path, exc_info=exc)
        return json_response({"detail": "internal error"}, status_code=500)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StoreError, on_store_error)
    app.add_exception_handler(NotReady, on_not_ready)
    app.add_exception_handler(Overloaded, on_overloaded)
    app.add_exception_handler(ModelError, on_model_error)
    app.add_exception_handler(Exception, on_unexpected)
