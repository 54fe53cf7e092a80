"""The app factory: ``create_app(settings)`` wires routers, middleware and error handlers; the
lifespan loads the model, opens the store and (first run) seeds it. Nothing does I/O at import.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.access import document_access
from service.activity import ActivityTracker
from service.admission import AdmissionMiddleware
from service.api import admin, events, explain, health, info, items, rank
from service.api.deps import Services, require_admin_token, require_token
from service.api.docs import install_docs
from service.arrivals import ArrivalLogMiddleware
from service.errors import install_error_handlers
from service.explain import EagerNets
from service.heap import freeze_long_lived
from service.items import LiveCatalogue
from service.loop_lag import watch_loop_lag
from service.metrics import Metrics, retire_dead_workers, retire_worker
from service.middleware import HttpMetricsMiddleware
from service.model_queue import ModelQueue
from service.ranker import Ranker
from service.rate_limits import ClientRateLimits
from service.rollout import ModelHolder, Rollout, Serving
from service.runtime import ModelRuntime, load_runtime
from service.schemas import MAX_ID, MIN_ATTRIBUTE
from service.seed import load_seed
from service.settings import Settings
from service.stores import open_store, store_location
from service.stores.base import Store, StoreError
from service.stores.instrumented import InstrumentedStore
from service.stores.layout import LayoutMismatch
from service.stores.records import EventLog

logger = logging.getLogger("service")

USER_COUNT_BUDGET = 100_000
"""Keys examined at most to count the store's users for the start-up log line."""

GIL_SWITCH_INTERVAL_S = 0.0002
"""How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms).

A worker has two threads: the event loop (parsing, featurisation, serialisation) and the model
thread, which needs the GIL for a moment between its torch calls. Under load the loop is busy,
and with the default interval each of those moments can cost the model thread 5 ms: measured on
the development machine, a 4 ms scorer call took 51 ms beside a busy loop thread at 5 ms, 11.5 ms
at 1 ms and 5.0 ms at 0.2 ms."""
SHUTDOWN_DRAIN_SECONDS = 2.0
"""How long shutdown waits for background state write-backs before closing the store."""

EXPLAIN_BURST = 5
"""/explain calls a worker accepts at once from one client before its rate limit applies."""

ROUTES = (rank, events, items, explain, admin, health, info)
"""The modules whose routers make the API."""

WARMUP_CANDIDATES = (1, 100, 1000)
"""Candidate-set sizes scored once at start, so the first requests do not pay for program
specialisation (TorchScript profiles its first calls)."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        retire_dead_workers()  # this worker may be the replacement of one that died
        try:
            services = await start(settings, metrics)
        except BaseException:
            retire_worker()
            raise
        freeze_long_lived()
        app.state.services = services
        lag_watch = asyncio.create_task(watch_loop_lag(metrics.event_loop_lag))
        try:
            yield
        finally:
            lag_watch.cancel()
            app.state.services = None
            await services.rollout.stop()
            await services.activity.stop()
            await services.ranker.drain(SHUTDOWN_DRAIN_SECONDS)
            await services.store.close()
            services.runtime.queue.executor.shutdown(wait=True)
            retire_worker()

    app = FastAPI(
        title="IFA ranking service",
        summary="Ranks candidate sets over users' whole behaviour histories (IFA).",
        version="1.0",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by install_docs
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.services = None
    # Added last = outermost: the metrics middleware also counts what admission refuses.
    app.add_middleware(
        AdmissionMiddleware,
        metrics=metrics,
        max_inflight=settings.max_inflight,
        max_body_bytes=settings.max_body_bytes,
        retry_after_seconds=settings.retry_after_seconds,
    )
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    if settings.arrival_log is not None:
        app.add_middleware(ArrivalLogMiddleware, directory=settings.arrival_log)
    install_error_handlers(app, metrics, settings.retry_after_seconds)
    for module in ROUTES:
        app.include_router(module.router)
    install_docs(app)
    _document_runtime_limits(app, settings)
    return app


async def start(settings: Settings, metrics: Metrics) -> Services:
    """Load the model and open the store; raises (and the server does not start) on failure."""
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Worker processes of ``--workers N`` start without the parent's logging set-up.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("service").setLevel(settings.log_level.upper())
    torch.set_num_threads(settings.torch_threads)
    # Also in each worker: with OpenMP the thread count is a per-thread setting.
    executor = ThreadPoolExecutor(
        settings.model_workers,
        thread_name_prefix="ifa-model",
        initializer=torch.set_num_threads,
        initargs=(settings.torch_threads,),
    )
    queue = ModelQueue(
        executor,
        settings.model_queue_limit,
        inline=settings.model_execution == "inline",
        on_wait=lambda seconds: metrics.observe_stage("model_queue", seconds),
        on_depth=metrics.model_queue_depth.set,
    )
    loop = asyncio.get_running_loop()
    store: Store | None = None
    try:
        runtime = await loop.run_in_executor(
            executor,
            load_runtime,
            settings.model_dir,
            settings.program_format,
            settings.precision,
            queue,
            settings.model_workers,
        )
        await loop.run_in_executor(executor, warm_up, runtime)
        max_history = settings.resolved_max_history(runtime.trained_max_history)
        store = InstrumentedStore(open_store(settings, max_history), metrics)
        await agree_layout(store, runtime, max_history)
        if settings.seed_world is not None:
            histories = await loop.run_in_executor(
                None,
                load_seed,
                settings.seed_world,
                runtime.stored_actions.stored_names,
                runtime.spec.user_names,
            )
            written = await store.seed(histories)
            logger.info(
                "seeded %d of %d users (%d events) from %s",
                written, len(histories.user_ids), len(histories.records), settings.seed_world,
            )  # fmt: skip
        await log_store(store, settings)
    except BaseException:
        if store is not None:
            await store.close()
        executor.shutdown(wait=False)
        raise

    store_budget_seconds = settings.request_budget_seconds * settings.state_fetch_share

    def make_ranker(runtime: ModelRuntime, previous: Ranker | None = None) -> Ranker:
        """A version's ranker; with the same state version as ``previous`` (so the same base
        catalogue), it shares that ranker's recent states (degraded answers stay valid across
        the switch) and its item cache."""
        items = (
            previous.items
            if previous is not None
            else LiveCatalogue(
                runtime.catalogue,
                store,
                metrics,
                ttl_seconds=settings.item_cache_ttl_seconds,
                capacity=settings.item_cache_size,
                lookup_budget_seconds=store_budget_seconds,
            )
        )
        ranker = Ranker(
            runtime,
            store,
            metrics,
            settings.state_ttl_seconds,
            items=items,
            state_cache=settings.state_cache,
            # The store trims logs to the cap it opened with: every version keeps that window.
            max_history=max_history,
            state_budget_seconds=store_budget_seconds,
            local_states=settings.local_states,
        )
        if previous is not None:
            ranker.local = previous.local
        return ranker

    ranker = make_ranker(runtime)
    holder = ModelHolder(Serving(runtime, ranker))
    rollout = Rollout(settings, metrics, store, holder, queue, make_ranker, warm_up)
    activity = ActivityTracker(store, settings.rollout_warm_users)
    activity.start()
    rollout.start()
    logger.info(
        "serving %s (%s, %s, states %s, history cap %d) from %s",
        runtime.version, runtime.model.program_format, runtime.model.precision,
        runtime.state_version, max_history, settings.model_dir,
    )  # fmt: skip
    return Services(
        settings,
        metrics,
        holder,
        store,
        rollout,
        activity,
        EagerNets(),
        ClientRateLimits(settings.explain_rate_per_second, EXPLAIN_BURST),
    )


async def agree_layout(store: Store, runtime: ModelRuntime, max_history: int) -> None:
    """Bind the model to the store's layout record (its action vocabulary, its max_history).

    Raises :class:`LayoutMismatch` (the server does not start) for a model or a setting that
    would misread the store's logs. An unreachable store is a degraded start: the first request
    that reaches the store agrees, and until then /events refuses with a 503.
    """
    try:
        runtime.bind_layout(await store.agree_layout(runtime.actions, max_history))
    except LayoutMismatch as error:
        logger.error("refusing to serve model %s: %s", runtime.version, error)
        raise
    except StoreError as error:
        logger.warning("store layout not checked yet (%s): the first request will", error)


async def log_store(store: Store, settings: Settings) -> None:
    """Say which store serves, where, and how many users it holds: an empty store is why every
    /rank answers ``history_length: 0``, which a newcomer should not have to guess."""
    try:
        count = await store.count_users(USER_COUNT_BUDGET)
    except StoreError as error:  # degraded, not fatal: the store may come back
        logger.warning("store %s (%s): cannot count users (%s)",
                       settings.store, store_location(settings), error)  # fmt: skip
        return
    held = f"{count.users}" if count.complete else f"at least {count.users}"
    logger.info("store %s (%s) holds %s users with a behaviour log",
                settings.store, store_location(settings), held)  # fmt: skip
    if count.users == 0:
        logger.warning(
            "the store holds no histories: every user ranks with history_length 0 (an empty "
            "state) until POST /events adds behaviour; --seed-world DIR preloads a world's "
            "histories (make run seeds the demo world)"
        )


def warm_up(runtime: ModelRuntime) -> None:
    """Run the encoder and scorer on throwaway inputs (executor thread)."""
    rng = np.random.default_rng(0)
    log = EventLog(
        item_ids=rng.integers(0, 1000, 16),
        actions=np.zeros(16, dtype=np.int64),
        timestamps=np.sort(rng.uniform(1.7e9, 1.7e9 + 1e5, 16)),
        end=16,
        positions=np.arange(16),
    )
    state = runtime.encode_history(log)
    user = runtime.user_row(0, {})
    for m in WARMUP_CANDIDATES:
        rows, _ = runtime.candidate_rows(rng.integers(0, 1000, m))
        for _ in range(2):
            runtime.score(user, rows, state, state.reference_time)


def _document_runtime_limits(app: FastAPI, settings: Settings) -> None:
    """Write what is known only at run time into the OpenAPI document: max_candidates,
    max_events_per_post, which routes need the bearer token and, once the model is loaded, the
    action vocabulary and the item attributes PUT /items accepts."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            routes=app.routes,
        )
        routers = [module.router for module in ROUTES]
        document_access(schema, routers, settings, require_token, require_admin_token)
        components = schema.get("components", {}).get("schemas", {})
        _exact_integer_bounds(components)
        if "RankRequest" in components:
            components["RankRequest"]["properties"]["candidate_ids"]["maxItems"] = (
                settings.max_candidates
            )
        if "ExplainRequest" in components:
            for branch in components["ExplainRequest"]["properties"]["candidate_ids"]["anyOf"]:
                if branch.get("type") == "array":
                    branch["maxItems"] = settings.max_candidates
        if "EventsRequest" in components:
            components["EventsRequest"]["properties"]["events"]["maxItems"] = (
                settings.max_events_per_post
            )
        if "ItemsRequest" in components:
            components["ItemsRequest"]["properties"]["items"]["maxItems"] = (
                settings.max_items_per_put
            )
        services = app.state.services
        if isinstance(services, Services) and "EventIn" in components:
            components["EventIn"]["properties"]["action"]["enum"] = list(services.runtime.actions)
            if "ItemIn" in components:
                _declare_item_fields(components["ItemIn"], services.ranker.items.attribute_names)
            app.openapi_schema = schema  # complete: cache it
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _declare_item_fields(item: dict[str, Any], fields: Sequence[str]) -> None:
    """An item's attributes as the model's fields, each optional, and no other key: PUT /items
    refuses an attribute the model does not have."""
    attributes = item["properties"]["attributes"]
    value = attributes.pop("additionalProperties")
    attributes["properties"] = {name: value for name in fields}
    attributes["additionalProperties"] = False


def _exact_integer_bounds(node: Any) -> None:
    """FastAPI's OpenAPI model keeps ``maximum`` and ``minimum`` as floats, which round 2^63 - 1
    up to 2^63 and print -2^63 as -9.223372036854776e18, a bound a validator comparing in floats
    reads as admitting -2^63 - 1; put the exact integers back so that generated clients and
    schema validators get the real bounds."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            if node.get("maximum") == float(MAX_ID):
                node["maximum"] = MAX_ID
            if node.get("minimum") == float(MIN_ATTRIBUTE):
                node["minimum"] = MIN_ATTRIBUTE
        for value in node.values():
            _exact_integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _exact_integer_bounds(value)
