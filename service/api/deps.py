"""Typed dependencies: what the lifespan built, handed to the routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.activity import ActivityTracker
from service.errors import NotReady, Unauthorized
from service.explain import EagerNets, RateLimit
from service.metrics import Metrics
from service.ranker import Ranker
from service.rollout import ModelHolder, Rollout
from service.runtime import ModelRuntime
from service.settings import Settings
from service.stores.base import Store


@dataclass(frozen=True)
class Services:
    """Everything a request may use; built by the lifespan, closed by it."""

    settings: Settings
    metrics: Metrics
    model: ModelHolder
    store: Store
    rollout: Rollout
    activity: ActivityTracker
    explain_nets: EagerNets
    explain_limit: RateLimit

    @property
    def runtime(self) -> ModelRuntime:
        """The version served now; a request that needs the runtime and the ranker of one
        version reads ``model.current`` once instead."""
        return self.model.current.runtime

    @property
    def ranker(self) -> Ranker:
        return self.model.current.ranker


# Dependencies are coroutines: FastAPI runs a plain ``def`` dependency in its thread pool, a
# thread hand-off per request for what is an attribute read.
async def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if not isinstance(services, Services):
        raise NotReady("the service has not finished starting")
    return services


def get_settings(request: Request) -> Settings:
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics = request.app.state.metrics
    assert isinstance(metrics, Metrics)
    return metrics


ServicesDep = Annotated[Services, Depends(get_services)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


_bearer = HTTPBearer(
    auto_error=False,
    description="Required by /events when the service has an api_token (IFA_API_TOKEN).",
)


async def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Refuse the request unless it carries the configured bearer token (if one is set)."""
    token = get_settings(request).api_token
    if token is None:
        return
    expected = token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    # Constant-time: the comparison must not tell an attacker how much of a guess was right.
    if (
        credentials is None
        or credentials.scheme.lower() != "bearer"
        or not hmac.compare_digest(given, expected)
    ):
        raise Unauthorized("a valid bearer token is required (Authorization: Bearer <token>)")


TokenDep = Annotated[None, Depends(require_token)]
