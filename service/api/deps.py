"""Typed dependencies: what the lifespan built, handed to the routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.access import match_token
from service.activity import ActivityTracker
from service.errors import Forbidden, NotReady, Unauthorized
from service.explain import EagerNets
from service.metrics import Metrics
from service.ranker import Ranker
from service.rate_limits import ClientRateLimits
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
    explain_limits: ClientRateLimits

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
    description="The api_token (IFA_API_TOKEN): POST /events, PUT /items, POST /explain and "
    "/admin require it when one is configured.",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _accepted(credentials: HTTPAuthorizationCredentials | None, tokens: tuple[bytes, ...]) -> int:
    """The index of the accepted token the request carries; 401 without one, 403 if wrong."""
    if credentials is None:  # no Authorization header, or not the Bearer scheme
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    index = match_token(credentials.credentials.encode(), tokens)
    if index is None:
        raise Forbidden("the bearer token is not accepted")
    return index


async def require_token(request: Request, credentials: BearerDep) -> int | None:
    """The accepted token the request carries (its index), or None where no token is configured
    and the route is open (:mod:`service.access` says when that may be)."""
    tokens = get_settings(request).accepted_tokens()
    return _accepted(credentials, tokens) if tokens else None


async def require_admin_token(request: Request, credentials: BearerDep) -> int:
    """As :func:`require_token`, but never open: without a configured token, a 403."""
    tokens = get_settings(request).accepted_tokens()
    if not tokens:
        raise Forbidden("/admin is refused while no api_token is configured (set IFA_API_TOKEN)")
    return _accepted(credentials, tokens)


TokenDep = Annotated[int | None, Depends(require_token)]
AdminTokenDep = Annotated[int, Depends(require_admin_token)]
