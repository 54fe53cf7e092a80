"""/admin/model: which version this worker serves, and a rollout (or rollback) on request."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from service.api.deps import AdminTokenDep, ServicesDep
from service.rollout import UnknownVersion
from service.schemas import VALIDATION_RESPONSES, ErrorResponse

router = APIRouter(prefix="/admin", tags=["operations"])


class RolloutRequest(BaseModel):
    model_config = {"extra": "forbid"}

    version: str = Field(
        min_length=1,
        max_length=200,
        description="A version in the model directory (an older one is a rollback).",
    )


class RolloutState(BaseModel):
    serving: str = Field(description="The version this worker serves now.")
    state_version: str = Field(description="What its cached states are keyed by.")
    latest: str | None = Field(description="The version <model_dir>/LATEST names.")
    phase: Literal["serving", "loading", "warming", "failed"] = Field(
        description="serving: no rollout under way; loading / warming: one is; failed: the "
        "last one failed (error says why) and the old version still serves."
    )
    target: str | None = Field(description="The version being loaded or warmed.")
    warm_total: int = Field(description="Users the warm-up encodes (0 when states are kept).")
    warm_done: int = Field(description="Users warmed so far.")
    error: str | None = Field(description="Why the last rollout failed (phase failed).")
    history: list[str] = Field(description="Versions this worker has served, oldest first.")


def _state(services: ServicesDep) -> RolloutState:
    runtime, status = services.runtime, services.rollout.status
    return RolloutState(
        serving=runtime.version,
        state_version=runtime.state_version,
        latest=services.rollout.latest_version(),
        phase=status.phase,
        target=status.target,
        warm_total=status.warm_total,
        warm_done=status.warm_done,
        error=status.error,
        history=list(status.history),
    )


@router.get(
    "/model",
    response_model=RolloutState,
    summary="The version this worker serves and its rollout's progress",
)
async def get_model(services: ServicesDep, _: AdminTokenDep) -> RolloutState:
    return _state(services)


@router.post(
    "/model",
    response_model=RolloutState,
    status_code=202,
    summary="Roll out (or back) to a version of the model directory",
    description="Points <model_dir>/LATEST at the version and starts this worker's rollout "
    "(load, warm the most active users' states when the encoder changes, switch); the other "
    "workers sharing the directory follow at their next poll (model_poll_seconds). Answers at "
    "once: GET /admin/model shows the progress.",
    responses={
        **VALIDATION_RESPONSES,
        404: {"model": ErrorResponse, "description": "No such version in the model directory."},
        409: {"model": ErrorResponse, "description": "The model directory is not writable."},
    },
)
async def post_model(body: RolloutRequest, services: ServicesDep, _: AdminTokenDep) -> RolloutState:
    try:
        services.rollout.publish(body.version)
    except UnknownVersion as error:
        raise HTTPException(404, str(error)) from None
    except OSError as error:
        raise HTTPException(409, f"cannot write LATEST: {error}") from None
    services.rollout.start_check()
    return _state(services)
