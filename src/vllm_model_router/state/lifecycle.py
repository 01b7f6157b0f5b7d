"""Lifecycle events (a model started loading, was evicted, failed...) with a short history.

The runtime emits; listeners (metrics, logs, the admin event stream) observe. Every event names its
model and says why it happened: ``reason`` in words for people, and for a stop ``cause`` as a bounded
code (the scheduler's ``StopReason``) for machines, so that no listener parses the words back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class EventKind(StrEnum):
    """What happened. The values are on the wire (``/admin/events``, logs): they never change."""

    LOAD_STARTED = "load_started"
    LOADED = "loaded"
    LOAD_FAILED = "load_failed"
    UNLOADING = "unloading"  # a stop began (``cause``: why)
    UNLOADED = "unloaded"
    MEMORY_NOT_RELEASED = "memory_not_released"  # a stopped model's GPU memory did not come back in time
    EXITED = "exited"  # its server died by itself
    GONE = "gone"  # an adapter was unloaded behind the router's back
    FOUND = "found"  # an adapter was loaded behind the router's back
    ADOPTED = "adopted"  # a server left running by a previous router process was taken over
    ORPHAN_STOPPED = "orphan_stopped"  # ... or stopped instead
    SLEEP_STARTED = "sleep_started"
    SLEPT = "slept"
    SLEEP_FAILED = "sleep_failed"
    WAKE_STARTED = "wake_started"
    WOKEN = "woken"
    WAKE_FAILED = "wake_failed"
    REJECTED = "rejected"  # a waiting request was answered with an error
    PINNED = "pinned"
    UNPINNED = "unpinned"
    PRELOAD = "preload"  # predicted from the usage history
    SCALED = "scaled"  # an operator set the replicas a model keeps
    SATURATED = "saturated"  # a replicated model's engines queue requests: another replica is wanted
    UNSATURATED = "unsaturated"  # ... and no longer do
    ENGINE_DOWN = "engine_down"  # one of the engines of endpoint mode stopped answering
    ENGINE_UP = "engine_up"  # ... and answers again
    NODE_JOINED = "node_joined"  # a node of the Ray cluster joined (its GPUs give room)
    NODE_LOST = "node_lost"  # ... or was lost, with the engines it ran


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    seq: int
    time: float  # Unix time
    kind: EventKind
    model: str | None
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    cause: str = ""  # a bounded code for why (a stop's StopReason); not on the wire, where ``reason`` is

    def to_dict(self) -> dict[str, Any]:
        """The event as the admin event stream sends it."""
        return {"seq": self.seq, "time": self.time, "kind": self.kind.value, "model": self.model,
                "reason": self.reason, "data": dict(self.data)}


Listener = Callable[[LifecycleEvent], None]


class EventLog:
    def __init__(self, history: int = 500) -> None:
        self._seq = itertools.count(1)
        self._history: deque[LifecycleEvent] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._queues: set[asyncio.Queue[LifecycleEvent]] = set()

    def emit(self, kind: EventKind, model: str | None, reason: str = "", *, cause: str = "",
             **data: Any) -> LifecycleEvent:
        event = LifecycleEvent(next(self._seq), time.time(), kind, model, reason, data, cause)
        self._history.append(event)
        for listener in list(self._listeners):
            listener(event)
        for q in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(event)  # a subscriber too slow to keep up loses events, never blocks us
        return event

    def recent(self, n: int | None = None) -> list[LifecycleEvent]:
        items = list(self._history)
        return items if n is None else items[-n:] if n > 0 else []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def subscribe(self, maxsize: int = 1000) -> asyncio.Queue[LifecycleEvent]:
        q: asyncio.Queue[LifecycleEvent] = asyncio.Queue(maxsize=maxsize)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[LifecycleEvent]) -> None:
        self._queues.discard(q)
