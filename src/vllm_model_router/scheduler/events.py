"""Events the shell feeds into the scheduler. Small frozen dataclasses; the core dispatches with match."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestArrived:
    """A request (or an admin load) for a configured model; the shell resolved aliases already."""

    req_id: int
    model: str


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The client went away. Drops a waiting request; releases one in flight."""

    req_id: int


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A granted request completed (successfully or not): its in-flight slot is released."""

    req_id: int


@dataclass(frozen=True, slots=True)
class LoadDone:
    """A StartLoad finished. On failure the driver has already reaped every process of the model."""

    model: str
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class StopDone:
    """A StopModel finished: the model's whole process group is gone."""

    model: str


@dataclass(frozen=True, slots=True)
class ModelExited:
    """A loaded model's server died by itself; the driver has already reaped its process group."""

    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class AdminUnload:
    """Operator asked to unload: gracefully (after in-flight requests) or by force."""

    model: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class SetPinned:
    """Operator pins (never evicted; still counts against capacity) or unpins a model."""

    model: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (a WakeAt came due). Deadlines are checked on every event anyway."""


Event = (
    RequestArrived | RequestCancelled | RequestFinished | LoadDone | StopDone | ModelExited | AdminUnload | SetPinned
    | Tick
)
