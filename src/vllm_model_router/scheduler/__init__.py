"""The pure scheduler: events in, effects out. No asyncio, no I/O, no clock reads (see DESIGN.md)."""

from vllm_model_router.scheduler.core import ModelView, Scheduler, SchedulerConfig, State
from vllm_model_router.scheduler.effects import Effect, Grant, Reject, StartLoad, StopModel, WakeAt
from vllm_model_router.scheduler.events import (
    AdminUnload,
    Event,
    LoadDone,
    ModelAdded,
    ModelExited,
    ModelFound,
    ModelSpec,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    SetPinned,
    StopDone,
    Tick,
)

__all__ = [
    "AdminUnload",
    "Effect",
    "Event",
    "Grant",
    "LoadDone",
    "ModelAdded",
    "ModelExited",
    "ModelFound",
    "ModelSpec",
    "ModelView",
    "Reject",
    "RequestArrived",
    "RequestCancelled",
    "RequestFinished",
    "Scheduler",
    "SchedulerConfig",
    "SetPinned",
    "StartLoad",
    "State",
    "StopDone",
    "StopModel",
    "Tick",
    "WakeAt",
]
