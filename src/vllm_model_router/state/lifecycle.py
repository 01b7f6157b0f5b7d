"""Lifecycle events (a model started loading, was evicted, failed...) with a short history.

The runtime emits; listeners (metrics, logs, the admin event stream) observe. Every event names its
model and says why it happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    seq: int
    time: float  # Unix time
    kind: str  # load_started, loaded, load_failed, unloading, unloaded, exited, rejected, ...
    model: str | None
    reason: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Listener = Callable[[LifecycleEvent], None]


class EventLog:
    def __init__(self, history: int = 500) -> None:
        self._seq = itertools.count(1)
        self._history: deque[LifecycleEvent] = deque(maxlen=history)
        self._listeners: list[Listener] = []
        self._queues: set[asyncio.Queue[LifecycleEvent]] = set()

    def emit(self, kind: str, model: str | None, reason: str = "", **data: Any) -> LifecycleEvent:
        event = LifecycleEvent(next(self._seq), time.time(), kind, model, reason, data)
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
