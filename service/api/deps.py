"""Typed dependencies: what the lifespan built, handed to the routes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady
from service.metrics import Metrics
from service.ranker import Ranker
from service.runtime import ModelRuntime
from service.settings import Settings
from service.stores.base import Store


@dataclass(frozen=True)
class Services:
    """Everything a request may use; built by the lifespan, closed by it."""

    settings: Settings
    metrics: Metrics
    runtime: ModelRuntime
    store: Store
    ranker: Ranker


def get_services(request: Request) -> Services:
    services = getattr(request.app.state, "services", None)
    if not isinstance(services, Services):
        raise NotReady("the service has not finished starting")
    return services


def get_settings(request: Request) -> Settings:
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_metrics(request: Request) -> Metrics:
    metrics = request.app.state.metrics
    assert isinstance(metrics, Metrics)
    return metrics


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
