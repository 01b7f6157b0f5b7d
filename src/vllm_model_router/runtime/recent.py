"""The last hour of what happened, in memory and bounded, for the operator's charts (``GET /admin/history``).

Three records, each kept for ``WINDOW_S`` and each capped, so that a model that flaps or ten thousand
requests a second cost a fixed amount of memory:

- per scheduler unit (``chat``, ``chat@1``...), its states as spans. The state is read from the
  scheduler, never guessed from an event's kind: a lifecycle event is emitted just before the scheduler
  hears the outcome (a ``loaded`` before its ``LoadDone``), so the state of the unit the event names (it
  alone: an event's cost does not grow with the units) is read once the event's synchronous handling is
  over (``loop.call_soon``), and the change is dated by the event. The kinds that change no state
  (``STATELESS``: a rejection, one per request turned away...) read nothing. A poll every ``POLL_S`` reads
  every unit, for any change no event announced.
- marks: the lifecycle events worth a marker on a timeline (a swap, a failure, a load, a sleep, a wake, a
  node joining or lost), each quoting the start of its reason, scrubbed of keys before it is cut.
- per model clients name (replicas merged) and per minute: requests, errors, and the median and 99th
  percentile of the wait for the model and of the time to first byte; plus the total of waiting requests,
  sampled by the poll only (at most once per ``POLL_S``): on change and at least every ``QUEUE_EVERY_S``.

Every text of the answer has been through ``scrub`` (a mark's when it is kept, a name when it is sent), so
that it is sent without a walk through its thousands of values. This is not the usage history
(runtime/history.py): that one is persisted, feeds restarts and predictive preloading, and keeps no timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_model_router.scheduler import ModelView, State, StopReason
from vllm_model_router.scheduler.events import split_unit
from vllm_model_router.state.lifecycle import EventKind, EventLog, LifecycleEvent

log = logging.getLogger("vllm_model_router.runtime")

WINDOW_S = 3600.0  # everything older is dropped
BUCKET_S = 60  # width of the per-model buckets
POLL_S = 1.0  # how often the waiting total and the units' states are read
QUEUE_EVERY_S = 5.0  # a queue sample at least this often, and on every change
MAX_SPANS = 720  # per unit: a change every 5 s for an hour; a model flapping faster loses its oldest spans
MAX_MARKS = 2000  # in all
MAX_QUEUE = int(WINDOW_S / POLL_S) + 100  # the poll cannot sample more often than once per POLL_S
RESERVOIR = 512  # samples kept per figure of the open minute: exact quantiles up to this many requests
REASON_JSON_CHARS = 360  # a mark's reason, as JSON (escapes counted): a timeline shows its first lines
REJECTED_MARK_S = 10.0  # one "rejected" mark per model in this long (one is emitted per rejected request)

FAILURES = frozenset({EventKind.LOAD_FAILED, EventKind.EXITED, EventKind.SLEEP_FAILED, EventKind.WAKE_FAILED,
                      EventKind.MEMORY_NOT_RELEASED, EventKind.REJECTED})
MARK_KINDS = {EventKind.LOADED: "load", EventKind.SLEPT: "sleep", EventKind.WOKEN: "wake",
              EventKind.NODE_JOINED: "node", EventKind.NODE_LOST: "node", **dict.fromkeys(FAILURES, "failure")}
SWAP_CAUSES = frozenset({StopReason.LRU.value})  # stopped, or put to sleep, to make room for another model
STATELESS = frozenset({EventKind.REJECTED, EventKind.PINNED, EventKind.UNPINNED, EventKind.PRELOAD,  # no state
                       EventKind.SCALED, EventKind.SATURATED, EventKind.UNSATURATED,  # changed: what they lead to,
                       EventKind.NODE_JOINED, EventKind.NODE_LOST})  # a load or a stop, has its own event
CUT = "…"


def is_error(status: int) -> bool:
    """A request the router or its model could not serve: any 5xx, and 429 (turned away, queue full). A
    client's own mistakes (4xx) and a client that left (499) are not errors of the router."""
    return status >= 500 or status == 429


def mark_kind(event: LifecycleEvent) -> str | None:
    """What a marker for ``event`` means on the timeline, or None when it gets none."""
    if event.kind in (EventKind.UNLOADING, EventKind.SLEEP_STARTED):
        return "swap" if event.cause in SWAP_CAUSES else None
    return MARK_KINDS.get(event.kind)


def quote(text: str, limit: int = REASON_JSON_CHARS) -> str:
    """The longest start of ``text`` that takes at most ``limit`` characters as JSON (as the answer is written:
    a newline two, a non-ASCII character six or twelve), ``CUT`` included when it is cut, so that a reason
    of control or non-ASCII characters costs no more than another. Cut only what was scrubbed already: a
    key straddling the cut would leave its first characters."""
    def size(t: str) -> int:
        return len(json.dumps(t)) - 2
    if len(text) <= limit and size(text) <= limit:
        return text
    room = limit - size(CUT)
    lo, hi = 0, min(len(text), room)  # text[:lo] fits; none longer than room characters does
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(text[:mid]) <= room else (lo, mid - 1)
    return text[:lo] + CUT


class Reservoir:
    """A uniform sample of at most ``RESERVOIR`` values (Vitter's algorithm R): every value so far, while
    there are few, then each one kept with the same chance, so a busy minute's quantiles are estimated from
    a fixed amount of memory. Chosen over a sketch (DDSketch, t-digest) for having nothing to tune and no
    dependency: a minute of an LLM router rarely has more requests than it keeps, and then it is exact."""

    __slots__ = ("seen", "values")

    def __init__(self) -> None:
        self.seen = 0
        self.values: list[float] = []

    def add(self, value: float, rng: random.Random) -> None:
        self.seen += 1
        if len(self.values) < RESERVOIR:
            self.values.append(value)
        else:
            slot = rng.randrange(self.seen)
            if slot < RESERVOIR:
                self.values[slot] = value

    def quantiles(self) -> tuple[float | None, float | None]:
        """The median and the 99th percentile (linear between the closest ranks), None without values."""
        values = self.values
        if not values:
            return None, None
        if len(values) == 1:
            return round(values[0], 6), round(values[0], 6)
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        return round(cuts[49], 6), round(cuts[98], 6)


@dataclass(slots=True)
class Bucket:
    """One model's requests in one minute. Only the open (latest) minute keeps samples; a closed one keeps
    its four figures."""

    start: float
    requests: int = 0
    errors: int = 0
    wait: Reservoir | None = field(default_factory=Reservoir)
    first_byte: Reservoir | None = field(default_factory=Reservoir)
    figures: tuple[float | None, float | None, float | None, float | None] = (None, None, None, None)

    def close(self) -> None:
        if self.wait is not None and self.first_byte is not None:
            self.figures = (*self.wait.quantiles(), *self.first_byte.quantiles())
            self.wait = self.first_byte = None

    def to_dict(self) -> dict[str, Any]:
        if self.wait is not None and self.first_byte is not None:
            figures = (*self.wait.quantiles(), *self.first_byte.quantiles())
        else:
            figures = self.figures
        return {"start": self.start, "requests": self.requests, "errors": self.errors,
                "wait_p50": figures[0], "wait_p99": figures[1],
                "first_byte_p50": figures[2], "first_byte_p99": figures[3]}


@dataclass(slots=True)
class Lane:
    """One unit's states: (start, state), oldest first; each lasts until the next one starts."""

    model: str
    replica: int
    spans: deque[tuple[float, State]] = field(default_factory=lambda: deque(maxlen=MAX_SPANS))
    present: bool = True  # the scheduler still has this unit


def _trim_series(series: deque[Any], horizon: float, start: Callable[[Any], float]) -> None:
    """Drop what ended before ``horizon``, keeping the last entry that began before it (it is still in
    effect at the horizon)."""
    while len(series) >= 2 and start(series[1]) <= horizon:
        series.popleft()


class Units(Protocol):
    """What the record reads of the runtime (the pump, runtime/pump.py, has all three)."""

    def views(self) -> list[ModelView]: ...

    def knows(self, model: str) -> bool: ...

    def state_of(self, model: str) -> State: ...


class RecentHistory:
    """The last hour, kept as lifecycle events happen and requests finish; also a ``RequestObserver``
    (http/proxy.py). ``scrub``: replaces every configured key in a text (http/security.py's ``KeyScrubber``),
    applied to every text the answer holds, to a mark's reason before it is cut; ``clock``: Unix time (tests
    move it); ``defer``: runs its argument once the current synchronous work is over (``loop.call_soon``)."""

    def __init__(self, pump: Units, events: EventLog, *, scrub: Callable[[str], str],
                 clock: Callable[[], float] = time.time, defer: Callable[[Callable[[], None]], object] | None = None,
                 rng: random.Random | None = None) -> None:
        self._pump = pump
        self._scrub = scrub
        self._clock = clock
        self._defer = defer
        self._rng = rng if rng is not None else random.Random()
        self._lanes: dict[str, Lane] = {}
        self._marks: deque[dict[str, Any]] = deque(maxlen=MAX_MARKS)
        self._models: dict[str, deque[Bucket]] = {}
        self._queue: deque[tuple[float, int]] = deque(maxlen=MAX_QUEUE)
        self._dated: dict[str, float] = {}  # units an event named since they were last read: when
        self._read_due = False
        self._last_rejected: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.poll()  # every unit's state now (the first span of each lane), and the waiting total
        events.add_listener(self.on_event)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Poll every ``POLL_S`` (the waiting total; a state change no event announced)."""
        self._task = asyncio.get_running_loop().create_task(self._poll(), name="recent-history")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.poll()
            except Exception:  # a bug here must not end the record for the router's lifetime
                log.exception("recent history: could not read the scheduler's view")

    # ------------------------------------------------------------ units' states and marks
    def on_event(self, event: LifecycleEvent) -> None:
        if event.model is not None and event.kind not in STATELESS:
            self._dated[event.model] = event.time
            if not self._read_due:
                self._read_due = True
                self._later(self._read_dated)
        kind = mark_kind(event)
        if kind is None:
            return
        if event.kind is EventKind.REJECTED and event.model is not None:
            last = self._last_rejected.get(event.model)
            if last is not None and 0 <= event.time - last < REJECTED_MARK_S:
                return
            self._last_rejected[event.model] = event.time
        unit = None if kind == "node" else event.model
        scrub = self._scrub
        quoted = event.to_dict()
        quoted.update(model=event.model and scrub(event.model), reason=quote(scrub(event.reason)),  # whole, then cut
                      data={k: scrub(v) if isinstance(v, str) else v for k, v in event.data.items()})
        model = self._model_of(unit)
        self._marks.append({"time": event.time, "unit": unit and scrub(unit), "model": model and scrub(model),
                            "kind": kind, "event": quoted})

    def _later(self, fn: Callable[[], None]) -> None:
        if self._defer is not None:
            self._defer(fn)
            return
        try:
            asyncio.get_running_loop().call_soon(fn)
        except RuntimeError:  # no event loop (a synchronous caller): now
            fn()

    def _read_dated(self) -> None:
        """Read the state of each unit an event named since (the others are the poll's), dated by its event."""
        self._read_due = False
        for unit, at in list(self._dated.items()):
            lane = self._lanes.get(unit)
            if not self._pump.knows(unit):  # not a unit (an engine's URL...), or one the scheduler let go
                if lane is not None and lane.present:
                    lane.present = False
                    self._enter(lane, State.UNLOADED, at)
            elif lane is None:  # a unit added since the last read: read them all, its model and replica too
                self.sync()
                return
            else:
                lane.present = True
                self._enter(lane, self._pump.state_of(unit), at)
            del self._dated[unit]

    def _model_of(self, unit: str | None) -> str | None:
        if unit is None:
            return None
        lane = self._lanes.get(unit)
        return lane.model if lane is not None else split_unit(unit)[0]

    def poll(self) -> None:
        """What the poll does every ``POLL_S``: read every unit, and sample the waiting total, when it changed
        or ``QUEUE_EVERY_S`` after the last sample. Nothing else samples it: ``MAX_QUEUE`` holds an hour."""
        waiting = sum(v.waiting for v in self.sync())
        now = self._clock()
        if not self._queue or self._queue[-1][1] != waiting or now - self._queue[-1][0] >= QUEUE_EVERY_S:
            self._queue.append((now, waiting))

    def sync(self) -> list[ModelView]:
        """Read every unit's state from the scheduler's view (no queue sample): a changed one gets a span,
        dated by the event that named it since it was last read (else now); one no longer there ends."""
        now = self._clock()
        dated, self._dated = self._dated, {}
        views = self._pump.views()
        seen = set()
        for v in views:
            seen.add(v.name)
            lane = self._lanes.get(v.name)
            if lane is None:
                lane = self._lanes[v.name] = Lane(v.group or v.name, v.replica)
            lane.present = True
            self._enter(lane, v.state, dated.get(v.name, now))
        for name, lane in self._lanes.items():
            if name not in seen and lane.present:  # no longer the scheduler's: it is gone
                lane.present = False
                self._enter(lane, State.UNLOADED, dated.get(name, now))
        self._trim(now)
        return views

    @staticmethod
    def _enter(lane: Lane, state: State, at: float) -> None:
        spans = lane.spans
        if spans and spans[-1][1] is state:
            return
        if spans and spans[-1][0] >= at:  # two changes in one instant: the later one stands
            at = spans[-1][0]
            spans.pop()
            if spans and spans[-1][1] is state:
                return
        spans.append((at, state))

    # ------------------------------------------------------------ RequestObserver
    def _bucket(self, model: str) -> Bucket | None:
        """The open minute of ``model``; None for a name the router does not serve (never a client's text)."""
        if not model or not self._pump.knows(model):
            return None
        now = self._clock()
        start = float(math.floor(now / BUCKET_S) * BUCKET_S)
        buckets = self._models.get(model)
        if buckets is None:
            buckets = self._models[model] = deque()
        if not buckets or buckets[-1].start < start:
            if buckets:
                buckets[-1].close()
            buckets.append(Bucket(start))
            while buckets[0].start + BUCKET_S <= now - WINDOW_S:
                buckets.popleft()
        return buckets[-1]

    def waited(self, model: str, seconds: float) -> None:
        bucket = self._bucket(model)
        if bucket is not None and bucket.wait is not None:
            bucket.wait.add(seconds, self._rng)

    def request_done(self, model: str, route: str, status: int, first_byte_seconds: float) -> None:
        """Counts the request; its time to first byte only when it was answered (not an error, and the
        client did not leave: a 499's time is the client's patience)."""
        bucket = self._bucket(model)
        if bucket is None:
            return
        bucket.requests += 1
        if is_error(status):
            bucket.errors += 1
        elif status != 499 and bucket.first_byte is not None:
            bucket.first_byte.add(first_byte_seconds, self._rng)

    # ------------------------------------------------------------ bounds and the answer
    def _trim(self, now: float) -> None:
        horizon = now - WINDOW_S
        for name, lane in list(self._lanes.items()):
            _trim_series(lane.spans, horizon, lambda s: s[0])
            if not lane.present and lane.spans and lane.spans[-1][0] <= horizon:
                del self._lanes[name]
        while self._marks and self._marks[0]["time"] <= horizon:
            self._marks.popleft()
        _trim_series(self._queue, horizon, lambda s: s[0])
        for model, buckets in list(self._models.items()):
            while buckets and buckets[0].start + BUCKET_S <= horizon:
                buckets.popleft()
            if not buckets:
                del self._models[model]
        for model, t in list(self._last_rejected.items()):
            if t <= horizon:
                del self._last_rejected[model]

    def snapshot(self, minutes: int = 60) -> dict[str, Any]:
        """The last ``minutes`` (1 to 60) as ``GET /admin/history`` answers them, scrubbed. The waiting total
        is the poll's last sample."""
        self.sync()
        now = self._clock()
        since = now - minutes * 60
        lanes = []
        for unit in sorted(self._lanes):
            lane = self._lanes[unit]
            spans = []
            items = list(lane.spans)
            for i, (start, state) in enumerate(items):
                end = items[i + 1][0] if i + 1 < len(items) else None
                if (end is not None and end <= since) or state is State.UNLOADED:
                    continue  # before the window; not running ("stopped" spans are left out)
                spans.append({"state": state.value, "start": max(start, since), "end": end})
            lanes.append({"unit": self._scrub(unit), "model": self._scrub(lane.model), "replica": lane.replica,
                          "spans": spans})
        queue: list[list[float]] = []
        for t, n in self._queue:
            if t <= since and queue:
                queue.pop()  # only the last sample before the window: the count in effect at its start
            queue.append([max(t, since), n])
        models = {}
        for model in sorted(self._models):
            entries = [b.to_dict() for b in self._models[model] if b.start + BUCKET_S > since and b.requests]
            if entries:
                models[self._scrub(model)] = entries
        return {
            "now": now, "since": since, "minutes": minutes, "bucket_seconds": BUCKET_S,
            "lanes": lanes,
            "marks": [dict(m) for m in self._marks if m["time"] >= since],
            "models": models,
            "queue": queue,
        }

    def sizes(self) -> dict[str, int]:
        """How much is kept (for the tests of the bounds)."""
        return {"lanes": len(self._lanes), "spans": max((len(la.spans) for la in self._lanes.values()), default=0),
                "marks": len(self._marks), "queue": len(self._queue), "models": len(self._models),
                "buckets": max((len(b) for b in self._models.values()), default=0),
                "samples": max((len(b.wait.values) + len(b.first_byte.values) for bs in self._models.values()
                                for b in bs if b.wait is not None and b.first_byte is not None), default=0)}
