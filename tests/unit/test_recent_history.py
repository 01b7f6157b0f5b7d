"""The last hour in memory (runtime/recent.py): units' states as spans, lifecycle marks, per-minute request
figures and the waiting total, clipped to the window asked for and bounded however long the router runs.

Most tests script the scheduler's view and its lifecycle events on a clock they move; the last ones run the
real runtime (scheduler and pump) over the in-memory fake driver."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from vllm_model_router.http.security import KeyScrubber
from vllm_model_router.runtime.recent import (
    BUCKET_S,
    MAX_MARKS,
    MAX_QUEUE,
    MAX_SPANS,
    POLL_S,
    REASON_JSON_CHARS,
    RESERVOIR,
    STATELESS,
    WINDOW_S,
    RecentHistory,
)
from vllm_model_router.scheduler import ModelView, State, StopReason
from vllm_model_router.state.lifecycle import EventKind, EventLog, LifecycleEvent
from vllm_model_router.testing.fake_driver import FakeDriver, Script

from .test_runtime import runtime

T0 = 1_764_000_000.0  # a whole minute (T0 % 60 == 0)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakePump:
    """The scheduler's view, as a test sets it; it counts the reads of every unit and of one."""

    def __init__(self, units: dict[str, str]) -> None:
        """``units``: unit name -> model (a replica ``m@1`` -> ``m``)."""
        self.reads = {"views": 0, "state_of": 0}
        self._views = {
            u: ModelView(name=u, state=State.UNLOADED, since=0.0, last_used=None, in_flight=0, waiting=0,
                         memory_gb=1.0, loads=0, failures=0, last_error=None, draining=False, pinned=False,
                         group=m, replica=int(u.rpartition("@")[2]) if "@" in u else 0)
            for u, m in units.items()
        }

    def views(self) -> list[ModelView]:
        self.reads["views"] += 1
        return list(self._views.values())

    def knows(self, model: str) -> bool:
        return model in self._views

    def state_of(self, model: str) -> State:
        self.reads["state_of"] += 1
        return self._views[model].state

    def add(self, unit: str, model: str, state: State) -> None:
        self._views[unit] = replace(next(iter(self._views.values())), name=unit, group=model, state=state,
                                    replica=int(unit.rpartition("@")[2]) if "@" in unit else 0, waiting=0)

    def set(self, unit: str, state: State | None = None, waiting: int | None = None) -> None:
        v = self._views[unit]
        self._views[unit] = replace(v, state=state if state is not None else v.state,
                                    waiting=waiting if waiting is not None else v.waiting)

    def remove(self, unit: str) -> None:
        del self._views[unit]


class Scripted:
    """Lifecycle events as the runtime emits them: the event first, then the scheduler's state changes, then
    what was deferred runs (as ``loop.call_soon`` would, after the pump's synchronous work)."""

    def __init__(self, units: dict[str, str], clock: Clock | None = None, keys: tuple[str, ...] = ()) -> None:
        self.clock = clock or Clock()
        self.pump = FakePump(units)
        self.deferred: list[Callable[[], None]] = []
        self.scrubber = KeyScrubber(keys)
        self.store = RecentHistory(self.pump, EventLog(), scrub=self.scrubber.text, clock=self.clock,
                                   defer=self.deferred.append, rng=random.Random(7))
        self.seq = 0

    def at(self, offset: float) -> Scripted:
        self.clock.t = T0 + offset
        return self

    def event(self, kind: EventKind, unit: str | None, then: State | None = None, cause: str = "",
              reason: str = "", **data: Any) -> LifecycleEvent:
        self.seq += 1
        event = LifecycleEvent(self.seq, self.clock.t, kind, unit, reason or kind.value, data, cause)
        self.store.on_event(event)
        if then is not None and unit is not None:
            self.pump.set(unit, then)
        self.flush()
        return event

    def flush(self) -> None:
        while self.deferred:
            self.deferred.pop(0)()


def spans(history: dict[str, Any], unit: str) -> list[tuple[str, float, float | None]]:
    lane = next(la for la in history["lanes"] if la["unit"] == unit)
    return [(s["state"], s["start"] - T0, None if s["end"] is None else s["end"] - T0) for s in lane["spans"]]


def marks(history: dict[str, Any]) -> list[tuple[float, str | None, str | None, str]]:
    return [(m["time"] - T0, m["unit"], m["model"], m["kind"]) for m in history["marks"]]


# ------------------------------------------------------------------------------------------ states
def test_spans_and_marks_follow_a_load_a_swap_a_failure_and_a_sleep_and_wake() -> None:
    s = Scripted({"a": "a", "b": "b", "c": "c"})
    s.at(10).event(EventKind.LOAD_STARTED, "a", State.LOADING)
    s.at(40).event(EventKind.LOADED, "a", State.LOADED, seconds=30.0)
    # b is wanted and there is room for one: a is evicted (a swap), b loads
    s.at(100).event(EventKind.UNLOADING, "a", State.UNLOADING, cause=StopReason.LRU.value)
    s.at(100).event(EventKind.LOAD_STARTED, "b", State.LOADING)
    s.at(105).event(EventKind.UNLOADED, "a", State.UNLOADED)
    s.at(130).event(EventKind.LOADED, "b", State.LOADED)
    # c fails to load
    s.at(200).event(EventKind.LOAD_STARTED, "c", State.LOADING)
    s.at(205).event(EventKind.LOAD_FAILED, "c", State.FAILED, reason="process exited with code 1")
    # b is put to sleep to make room, then woken
    s.at(300).event(EventKind.SLEEP_STARTED, "b", State.FALLING_ASLEEP, cause=StopReason.LRU.value, level=1)
    s.at(302).event(EventKind.SLEPT, "b", State.SLEEPING, level=1)
    s.at(400).event(EventKind.WAKE_STARTED, "b", State.WAKING, level=1)
    s.at(401).event(EventKind.WOKEN, "b", State.LOADED, level=1)
    # an operator's unload is no swap; a pin makes no mark
    s.at(500).event(EventKind.PINNED, "b")
    s.at(510).event(EventKind.UNLOADING, "b", State.UNLOADING, cause=StopReason.OPERATOR.value)
    s.at(511).event(EventKind.UNLOADED, "b", State.UNLOADED)

    h = s.at(600).store.snapshot(60)
    assert h["now"] == T0 + 600 and h["since"] == T0 + 600 - 3600 and h["minutes"] == 60
    assert h["bucket_seconds"] == 60
    assert [la["unit"] for la in h["lanes"]] == ["a", "b", "c"]
    # "unloaded" spans are left out
    assert spans(h, "a") == [("loading", 10, 40), ("loaded", 40, 100), ("unloading", 100, 105)]
    assert spans(h, "b") == [("loading", 100, 130), ("loaded", 130, 300), ("falling_asleep", 300, 302),
                             ("sleeping", 302, 400), ("waking", 400, 401), ("loaded", 401, 510),
                             ("unloading", 510, 511)]
    assert spans(h, "c") == [("loading", 200, 205), ("failed", 205, None)]
    assert marks(h) == [(40, "a", "a", "load"), (100, "a", "a", "swap"), (130, "b", "b", "load"),
                        (205, "c", "c", "failure"), (300, "b", "b", "swap"), (302, "b", "b", "sleep"),
                        (401, "b", "b", "wake")]
    failure = h["marks"][3]["event"]
    assert failure == {"seq": 8, "time": T0 + 205, "kind": "load_failed", "model": "c",
                       "reason": "process exited with code 1", "data": {}}


def test_the_state_is_the_scheduler_s_after_the_event_not_guessed_from_its_kind() -> None:
    # a load that times out is stopped and left failed: its "unloaded" event ends in the failed state
    s = Scripted({"a": "a"})
    s.at(0).event(EventKind.LOAD_STARTED, "a", State.LOADING)
    s.at(30).event(EventKind.UNLOADING, "a", State.UNLOADING, cause=StopReason.LOAD_TIMEOUT.value)
    s.at(31).event(EventKind.UNLOADED, "a", State.FAILED)
    # a loaded model whose server exits is failed, dated by the exit
    s.at(40).event(EventKind.LOAD_STARTED, "a", State.LOADING)
    s.at(45).event(EventKind.LOADED, "a", State.LOADED)
    s.at(50).event(EventKind.EXITED, "a", State.FAILED, reason="process exited with code -9")
    h = s.at(60).store.snapshot()
    assert spans(h, "a") == [("loading", 0, 30), ("unloading", 30, 31), ("failed", 31, 40), ("loading", 40, 45),
                             ("loaded", 45, 50), ("failed", 50, None)]
    assert [m[3] for m in marks(h)] == ["load", "failure"]


def test_a_change_no_event_announced_is_caught_by_the_poll() -> None:
    s = Scripted({"a": "a"})
    s.pump.set("a", State.LOADED)  # e.g. adopted before the record existed
    s.at(3).store.poll()
    assert spans(s.store.snapshot(), "a") == [("loaded", 3, None)]


def test_an_event_reads_only_the_unit_it_names_and_a_rejection_none() -> None:
    # a client flooding a full queue: one "rejected" per request, each answered at once. The record reads no
    # unit for them, takes no queue sample but the poll's (MAX_QUEUE holds an hour of those), and a load
    # reads its own unit only, however many there are
    s = Scripted({f"m{i}": f"m{i}" for i in range(1000)})
    s.pump.reads.update(views=0, state_of=0)
    polls = 0
    for k in range(5000):  # 10 s of 429s while the waiting total moves
        s.at(k * 0.002)
        s.pump.set("m0", waiting=k % 7)
        s.event(EventKind.REJECTED, "m0", status=429, reason="too many requests waiting for m0; try again later")
        if k % 500 == 499:
            s.store.poll()
            polls += 1
    assert polls == 10 and s.pump.reads == {"views": polls, "state_of": 0}
    assert s.store.sizes()["queue"] == 1 + polls  # the one when it was made, then one per poll
    assert s.store.snapshot()["queue"][0] == [T0, 0]  # nothing lost since the record was made
    assert s.pump.reads == {"views": polls + 1, "state_of": 0}  # and no sample by the snapshot's read either
    assert [m["event"]["kind"] for m in s.store.snapshot()["marks"]] == ["rejected"]

    for kind in STATELESS - {EventKind.NODE_JOINED, EventKind.NODE_LOST}:  # a pin, a preload...: no state
        s.event(kind, "m1")
    assert s.pump.reads["state_of"] == 0
    s.pump.reads.update(views=0)
    s.at(20).event(EventKind.LOAD_STARTED, "m1", State.LOADING)
    s.at(21).event(EventKind.LOADED, "m1", State.LOADED)
    s.at(22).event(EventKind.LOAD_STARTED, "m2", State.LOADING)
    assert s.pump.reads == {"views": 0, "state_of": 3}
    h = s.store.snapshot()
    assert spans(h, "m1") == [("loading", 20, 21), ("loaded", 21, None)] and spans(h, "m2") == [("loading", 22, None)]


def test_a_unit_added_since_the_last_read_gets_its_lane_from_its_first_event() -> None:
    s = Scripted({"chat": "chat"})
    s.pump.add("chat@1", "chat", State.UNLOADED)  # a replica or an adapter added: the poll has not seen it
    s.at(5).event(EventKind.LOAD_STARTED, "chat@1", State.LOADING)
    s.pump.remove("chat@1")
    s.at(7).event(EventKind.UNLOADED, "chat@1")  # and the scheduler let it go: it ends with the event
    h = s.store.snapshot()
    assert [(la["unit"], la["model"], la["replica"]) for la in h["lanes"]] == [("chat", "chat", 0),
                                                                               ("chat@1", "chat", 1)]
    assert spans(h, "chat@1") == [("loading", 5, 7)]


def test_replicas_are_lanes_of_their_model_and_nodes_and_rejections_are_marked() -> None:
    s = Scripted({"chat": "chat", "chat@1": "chat"})
    s.at(5).event(EventKind.LOAD_STARTED, "chat@1", State.LOADING)
    s.at(6).event(EventKind.NODE_LOST, None, node="n1")
    for t in (7, 8, 9, 18):  # one rejected request after another: one mark per model per 10 s
        s.at(t).event(EventKind.REJECTED, "chat", status=503)
    h = s.at(20).store.snapshot()
    assert [(la["unit"], la["model"], la["replica"]) for la in h["lanes"]] == [("chat", "chat", 0),
                                                                               ("chat@1", "chat", 1)]
    assert spans(h, "chat@1") == [("loading", 5, None)] and spans(h, "chat") == []
    assert marks(h) == [(6, None, None, "node"), (7, "chat", "chat", "failure"), (18, "chat", "chat", "failure")]


def test_a_mark_s_long_reason_is_cut_to_its_first_360_characters_as_sent() -> None:
    s = Scripted({"a": "a"})
    s.at(1).event(EventKind.LOAD_FAILED, "a", State.FAILED, reason="x" * 100_000)
    s.at(2).event(EventKind.LOADED, "a", State.LOADED, reason="ready")
    s.at(3).event(EventKind.EXITED, "a", State.FAILED, reason="line\n" * 1000)
    s.at(4).event(EventKind.EXITED, "a", State.FAILED, reason="模型" * 1000)
    s.at(5).event(EventKind.EXITED, "a", State.FAILED, reason="y" * REASON_JSON_CHARS)
    failed, loaded, lines, wide, whole = (m["event"]["reason"] for m in s.store.snapshot()["marks"])
    assert REASON_JSON_CHARS == 360
    assert failed == "x" * 354 + "…" and loaded == "ready"  # "…" is written \u2026: six characters
    assert lines == "line\n" * 59 + "…"  # a newline is written as two
    assert wide == "模型" * 29 + "模…"  # and each of these as six
    assert whole == "y" * 360  # not cut: no "…"
    for reason in (failed, lines, wide, whole):
        assert len(json.dumps(reason)) - 2 <= REASON_JSON_CHARS


KEY = "sk-admin-0123456789abcdefghijklmnopqrstuv"


def test_a_key_straddling_the_cut_of_a_reason_leaves_none_of_its_characters() -> None:
    # scrubbed, then cut: a key cut first would no longer match, and its first characters would be sent
    head = "process exited with code 1. Last log lines:\n"
    for where in (REASON_JSON_CHARS - 6, 4096):  # where the key starts: around the cut, and the former one
        for k in range(len(KEY) + 1):
            s = Scripted({"m": "m"}, keys=(KEY, "other-key"))
            reason = head + "x" * (where - len(head) - k) + KEY + " more" * 50
            s.event(EventKind.LOAD_FAILED, "m", State.FAILED, reason=reason)
            served = s.store.snapshot()["marks"][0]["event"]["reason"]
            assert KEY[:2] not in served, (where, k, served[-60:])
            assert served.endswith("…") and len(json.dumps(served)) - 2 <= REASON_JSON_CHARS
            assert served[:-1] == reason.replace(KEY, "***")[:len(served) - 1]  # the start of the scrubbed text


def test_every_text_of_the_answer_is_scrubbed() -> None:
    # the route sends the snapshot as it is: the record scrubs what it quotes and the names it keys on (a
    # model's name may be an adapter's an engine reported)
    secret = "team-secret-adapter"
    s = Scripted({"m": "m", secret: secret, f"{secret}@1": secret}, keys=(KEY, secret))
    s.at(1).event(EventKind.LOAD_FAILED, f"{secret}@1", State.FAILED, reason=f"api_key={KEY} refused")
    s.at(2).event(EventKind.NODE_LOST, None, reason=KEY, node=KEY)
    s.at(3).event(EventKind.REJECTED, secret, status=503, reason=f"{secret} failed")
    s.store.request_done(secret, "/v1/completions", 200, 0.1)
    s.store.request_done("m", "/v1/completions", 200, 0.1)
    h = s.store.snapshot()
    texts: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                collect(k)
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    collect(h)
    assert not [t for t in texts if KEY in t or secret in t]
    assert [(la["unit"], la["model"]) for la in h["lanes"]] == [("m", "m"), ("***", "***"), ("***@1", "***")]
    assert sorted(h["models"]) == ["***", "m"]
    assert [(m["unit"], m["model"], m["event"]["model"], m["event"]["reason"], m["event"]["data"])
            for m in h["marks"]] == [("***@1", "***", "***@1", "api_key=*** refused", {}),
                                     (None, None, None, "***", {"node": "***"}),
                                     ("***", "***", "***", "*** failed", {"status": 503})]


def test_the_largest_answer_stays_small() -> None:
    # every cap full: MAX_MARKS marks of the longest reasons (of the characters that cost most as JSON), the
    # queue sampled every second for the hour, units with long names, times with all their digits: the
    # answer is written in one go, so its size is what the event loop waits for
    model = "meta-llama/Llama-3.1-70B-Instruct"
    units = {f"{model}@{i}" if i else model: model for i in range(8)}
    s = Scripted(units)
    s.seq = 10_000_000
    names = sorted(units)
    for i in range(int(WINDOW_S / POLL_S)):
        s.at(i * POLL_S + 0.123456)
        s.pump.set(names[0], waiting=i)  # a change every second: a sample every second
        s.store.poll()
        if i < MAX_MARKS:
            reason = ("\U0001F600", "\x1b", "模", "x\n", "x")[i % 5] * 100_000
            s.event(EventKind.MEMORY_NOT_RELEASED, names[i % len(names)], reason=reason, seconds=123.456789012345)
    h = s.store.snapshot()
    assert len(h["marks"]) == MAX_MARKS and len(h["queue"]) >= WINDOW_S / POLL_S
    size = len(json.dumps(h))
    assert size < 1_500_000, size


def test_a_unit_the_scheduler_no_longer_has_ends_and_is_forgotten_after_the_window() -> None:
    s = Scripted({"a": "a", "lora": "lora"})
    s.at(0).event(EventKind.LOADED, "lora", State.LOADED)
    s.pump.remove("lora")
    s.at(10).store.sync()
    assert spans(s.store.snapshot(), "lora") == [("loaded", 0, 10)]
    s.at(10 + WINDOW_S + 1).store.sync()
    assert [la["unit"] for la in s.store.snapshot()["lanes"]] == ["a"]


# ------------------------------------------------------------------------------------------ requests
def test_buckets_count_requests_and_errors_and_give_the_quantiles_of_wait_and_first_byte() -> None:
    s = Scripted({"a": "a", "b": "b"})
    store = s.store
    waits, firsts = [], []
    for i in range(100):
        s.at(i * 0.5)  # 50 s: one minute
        wait, first = i / 100, 0.05 + i / 1000
        store.waited("a", wait)
        waits.append(wait)
        status = 503 if i % 10 == 0 else 429 if i % 10 == 1 else 499 if i % 10 == 2 else 404 if i % 10 == 3 else 200
        store.request_done("a", "/v1/chat/completions", status, first)
        if status in (200, 404):
            firsts.append(first)
    for name in ("", "nope", "a@1"):  # the proxy's "" for no configured model, or anything else: ignored
        store.waited(name, 1.0)
        store.request_done(name, "other", 404, 0.1)
    s.at(61).store.request_done("b", "/v1/completions", 200, 2.0)  # the next minute

    h = store.snapshot()
    assert set(h["models"]) == {"a", "b"}
    [bucket] = h["models"]["a"]
    cuts_wait = statistics.quantiles(waits, n=100, method="inclusive")
    cuts_first = statistics.quantiles(firsts, n=100, method="inclusive")
    assert bucket == {"start": T0, "requests": 100, "errors": 20,
                      "wait_p50": round(cuts_wait[49], 6), "wait_p99": round(cuts_wait[98], 6),
                      "first_byte_p50": round(cuts_first[49], 6), "first_byte_p99": round(cuts_first[98], 6)}
    assert h["models"]["b"] == [{"start": T0 + 60, "requests": 1, "errors": 0, "wait_p50": None, "wait_p99": None,
                                 "first_byte_p50": 2.0, "first_byte_p99": 2.0}]

    # a's minute closes when its next request opens another: its figures stay the same
    s.at(125).store.request_done("a", "/v1/chat/completions", 200, 0.1)
    closed, opened = store.snapshot()["models"]["a"]
    assert closed == bucket and opened["start"] == T0 + 120 and opened["requests"] == 1


def test_a_busy_minute_keeps_a_bounded_sample_and_estimates_its_quantiles() -> None:
    s = Scripted({"a": "a"})
    rng = random.Random(1)
    for _ in range(50_000):
        s.store.waited("a", rng.random())
        s.store.request_done("a", "/v1/completions", 200, 10 * rng.random())
    assert s.store.sizes()["samples"] == 2 * RESERVOIR
    [bucket] = s.store.snapshot()["models"]["a"]
    assert bucket["requests"] == 50_000
    assert abs(bucket["wait_p50"] - 0.5) < 0.08 and bucket["wait_p99"] > 0.95
    assert abs(bucket["first_byte_p50"] - 5) < 0.8 and bucket["first_byte_p99"] > 9.5


def test_the_poll_samples_the_waiting_total_on_change_and_every_5_seconds() -> None:
    s = Scripted({"a": "a", "b": "b"})  # a sample at 0 (0 waiting) when the record is made
    for second in (1, 2, 3):
        s.at(second).store.poll()  # no change, under 5 s
    s.pump.set("a", waiting=2)
    s.at(4).store.poll()
    s.pump.set("b", waiting=1)
    s.at(4.5).store.sync()  # a read of the states only (as a snapshot's): no sample
    s.at(5).store.poll()
    for later in (6, 7, 8, 9, 9.25):
        s.at(later).store.poll()
    s.at(10).store.poll()  # no change, but 5 s since the last sample: one more
    h = s.at(10.5).store.snapshot()
    assert [(t - T0, n) for t, n in h["queue"]] == [(0, 0), (4, 2), (5, 3), (10, 3)]


# ------------------------------------------------------------------------------------------ the window
def test_everything_is_clipped_to_the_minutes_asked_for() -> None:
    s = Scripted({"a": "a"})
    s.at(0).event(EventKind.LOAD_STARTED, "a", State.LOADING)
    s.pump.set("a", waiting=1)
    s.at(1).store.poll()
    s.at(10).event(EventKind.LOADED, "a", State.LOADED)
    s.pump.set("a", waiting=0)
    s.at(11).store.poll()
    s.store.request_done("a", "/v1/completions", 200, 0.5)
    s.at(500).event(EventKind.UNLOADING, "a", State.UNLOADING, cause=StopReason.LRU.value)
    s.at(501).event(EventKind.LOAD_STARTED, "a", State.LOADING)
    s.at(560).store.request_done("a", "/v1/completions", 503, 0.5)
    h = s.at(600).store.snapshot(5)
    assert h["since"] == T0 + 300 and h["minutes"] == 5
    assert spans(h, "a") == [("loaded", 300, 500), ("unloading", 500, 501), ("loading", 501, None)]
    assert marks(h) == [(500, "a", "a", "swap")]
    assert [(b["start"] - T0, b["requests"], b["errors"]) for b in h["models"]["a"]] == [(540, 1, 1)]
    # the count in effect at the window's start (the poll's samples: at 0, 1 and 11)
    assert [(t - T0, n) for t, n in h["queue"]] == [(300, 0)]
    assert h["queue"][0][0] == h["since"]

    full = s.store.snapshot(60)
    assert [(t - T0, n) for t, n in full["queue"]] == [(0, 0), (1, 1), (11, 0)]
    assert spans(full, "a")[0] == ("loading", 0, 10)
    assert [b["start"] - T0 for b in full["models"]["a"]] == [0, 540]


def test_a_long_run_with_a_flapping_model_and_many_requests_stays_within_the_bounds() -> None:
    s = Scripted({"flappy": "flappy", "busy": "busy", "calm": "calm"})
    s.at(0).event(EventKind.LOADED, "calm", State.LOADED)
    hours = 10
    step = 2  # seconds
    for i in range(int(hours * 3600 / step)):
        t = i * step
        s.at(t)
        if i % 2 == 0:  # flappy loads, then exits 2 s later: a change every 2 s, 2 marks every 4 s
            s.event(EventKind.LOAD_STARTED, "flappy", State.LOADING)
            s.event(EventKind.LOADED, "flappy", State.LOADED)
        else:
            s.event(EventKind.EXITED, "flappy", State.FAILED)
        s.event(EventKind.REJECTED, "flappy", status=503)
        s.pump.set("busy", waiting=i % 7)
        s.store.poll()
        for k in range(40 if i % 300 else 2000):  # a burst now and then
            s.store.waited("busy", k / 1000)
            s.store.request_done("busy", "/v1/completions", 200 if k % 5 else 502, 0.1)
        if i % 1800 == 0:
            sizes = s.store.sizes()
            assert sizes["spans"] <= MAX_SPANS and sizes["marks"] <= MAX_MARKS and sizes["queue"] <= MAX_QUEUE
            assert sizes["buckets"] <= WINDOW_S / BUCKET_S + 1 and sizes["samples"] <= 2 * RESERVOIR
            assert sizes["lanes"] == 3 and sizes["models"] <= 2

    now = s.clock.t
    h = s.store.snapshot(60)
    horizon = now - WINDOW_S
    sizes = s.store.sizes()
    assert sizes["spans"] == MAX_SPANS  # flappy changes every 2 s: the cap holds it, its oldest spans go
    assert sizes["marks"] == MAX_MARKS  # 2 an event every 4 s and a rejection every 10 s: over the cap
    assert len(h["queue"]) <= MAX_QUEUE and h["queue"][0][0] >= horizon
    assert all(m["time"] >= horizon for m in h["marks"])
    assert all(sp["start"] >= horizon for la in h["lanes"] for sp in la["spans"])
    assert spans(h, "calm") == [("loaded", 3600 * hours - step - 3600, None)]  # in that state since the start
    busy = h["models"]["busy"]
    assert len(busy) <= 61 and busy[0]["start"] + BUCKET_S > horizon
    assert sum(b["requests"] for b in busy) >= 40 * 29 * 60  # the last hour's requests are all counted
    assert "flappy" not in h["models"]  # no requests: no figures


# ------------------------------------------------------------------------------------------ the real runtime
async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_against_the_runtime_a_swap_a_failure_and_a_sleep_give_their_spans_and_marks() -> None:
    driver = FakeDriver({"c": Script(fail_loads=1)}, default=Script(load_s=0.01))
    models = {"a": {}, "b": {"sleep": True, "cmd": ["never-started", "--port", "${PORT}", "--enable-sleep-mode"]},
              "c": {}}
    async with runtime(driver, models, capacity={"max_resident": 1}) as rt:
        store = RecentHistory(rt, rt.events, scrub=str)
        store.start()
        try:
            rt.release(await rt.acquire("b"))
            rt.release(await rt.acquire("a"))  # b is put to sleep for a
            rt.release(await rt.acquire("b"))  # a is stopped for b, b woken
            try:
                await rt.acquire("c")  # b asleep again; c fails
            except Exception as e:
                assert getattr(e, "status", None) == 503
            await settle()
            h = store.snapshot()
        finally:
            store.stop()
    states = {la["unit"]: [s["state"] for s in la["spans"]] for la in h["lanes"]}
    assert states["a"] == ["loading", "loaded", "unloading"]
    assert states["b"] == ["loading", "loaded", "falling_asleep", "sleeping", "waking", "loaded",
                           "falling_asleep", "sleeping"]
    assert states["c"] == ["loading", "failed"]
    for la in h["lanes"]:  # contiguous except around the "unloaded" ones left out
        for before, after in itertools.pairwise(la["spans"]):
            assert before["end"] is not None and before["end"] <= after["start"]
    kinds = [(m["unit"], m["kind"], m["event"]["kind"]) for m in h["marks"]]
    assert kinds == [("b", "load", "loaded"), ("b", "swap", "sleep_started"), ("b", "sleep", "slept"),
                     ("a", "load", "loaded"), ("a", "swap", "unloading"), ("b", "wake", "woken"),
                     ("b", "swap", "sleep_started"), ("b", "sleep", "slept"), ("c", "failure", "load_failed"),
                     ("c", "failure", "rejected")]
    # every change is dated by its event
    loaded_a = next(e for e in rt.events.recent() if e.kind is EventKind.LOADED and e.model == "a")
    span = next(s for la in h["lanes"] if la["unit"] == "a" for s in la["spans"] if s["state"] == "loaded")
    assert span["start"] == loaded_a.time


async def test_the_poll_samples_the_waiting_total_while_a_load_is_held() -> None:
    hold = asyncio.Event()
    driver = FakeDriver({"a": Script(hold=hold)})
    async with runtime(driver, {"a": {}}) as rt:
        store = RecentHistory(rt, rt.events, scrub=str)
        store.start()
        try:
            waiters = [asyncio.create_task(rt.acquire("a")) for _ in range(3)]
            await rt.wait_for(lambda: sum(v.waiting for v in rt.views()) == 3)
            await asyncio.sleep(1.3)  # the poll's period (1 s) and a margin
            assert store.sizes()["queue"] == 2  # 0 when it was made, then the poll saw the change
            h = store.snapshot()
            assert [n for _, n in h["queue"]] == [0, 3] and h["queue"][-1][0] < h["now"]
            hold.set()
            for lease in await asyncio.gather(*waiters):
                rt.release(lease)
        finally:
            store.stop()
