"""The scheduling simulator: Belady and naive LRU on hand-made sequences with known answers, and the
router's scheduler replayed on generated traces (every request answered once, capacity never exceeded)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_model_router.scheduler import Grant, RequestArrived, StartLoad, TimerAt
from vllm_model_router.testing.sim import (
    SimulationError,
    belady_loads,
    compare,
    lru_loads,
    percentile,
    simulate_naive_lru,
    simulate_router,
)
from vllm_model_router.testing.traces import (
    Request,
    Trace,
    alternating_trace,
    burst_trace,
    poisson_arrivals,
    rotating_trace,
    standard_traces,
    uniform_trace,
    zipf_trace,
)

ROOT = Path(__file__).resolve().parents[2]
# the operating-systems textbook reference string: 3 frames give OPT 9 faults, LRU 12
TEXTBOOK = [str(x) for x in (7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1)]


def trace(*requests: tuple[float, str], capacity: int = 1, service: float = 3.0) -> Trace:
    models = tuple(sorted({m for _, m in requests}))
    return Trace("hand", models, capacity, tuple(Request(at, m, service) for at, m in requests))


# ---------------------------------------------------------------------------------------------- Belady
@pytest.mark.parametrize(
    ("sequence", "capacity", "loads"),
    [
        ([], 1, 0),
        (list("aaaa"), 1, 1),
        (list("aabba"), 1, 3),  # one slot: every change of model is a load
        (list("abcabc"), 2, 4),  # a b c(evict b: next used later than a) a b(evict a: never again) c
        (list("abcabcabc"), 3, 3),  # everything fits: cold loads only
        (list("abcdabcd"), 8, 4),
        (TEXTBOOK, 3, 9),
        (TEXTBOOK, 4, 8),
    ],
)
def test_belady_known_answers(sequence: list[str], capacity: int, loads: int) -> None:
    assert belady_loads(sequence, capacity) == loads


def test_lru_known_answers_and_never_below_belady() -> None:
    assert lru_loads(TEXTBOOK, 3) == 12
    assert lru_loads(list("abcabc"), 2) == 6  # the cyclic worst case: every request misses
    for t in standard_traces(duration=600.0):
        assert lru_loads(t.sequence, t.capacity) >= belady_loads(t.sequence, t.capacity)


def test_belady_rejects_no_capacity() -> None:
    with pytest.raises(ValueError):
        belady_loads(["a"], 0)


# ------------------------------------------------------------------------------------------- naive LRU
def test_naive_lru_serves_in_arrival_order_with_head_of_line_blocking() -> None:
    t = trace((0, "a"), (1, "a"), (2, "b"), (3, "a"), capacity=1)
    r = simulate_naive_lru(t, load_time=10.0, stop_time=1.0)
    # a loads 0-10 (r0, r1 granted at 10, busy until 13); b: a drains (13), stops (14), b loads (24);
    # a again: b busy until 27, stops (28), a loads (38)
    assert r.loads == 3
    assert r.waits == (10.0, 9.0, 22.0, 35.0)
    assert r.end == 41.0


def test_naive_lru_blocks_a_resident_model_behind_a_miss() -> None:
    t = trace((0, "a"), (20, "b"), (21, "a"), capacity=2)
    r = simulate_naive_lru(t, load_time=10.0, stop_time=1.0)
    assert r.loads == 2  # two slots: no eviction
    assert r.waits == (10.0, 10.0, 9.0)  # the request for resident "a" waits for b's load


def test_naive_lru_loads_what_lru_misses() -> None:
    t = zipf_trace(duration=600.0, seed=3)
    assert simulate_naive_lru(t, 2.0).loads == lru_loads(t.sequence, t.capacity)


# ------------------------------------------------------------------------------------------ the router
def test_router_single_request_waits_one_load() -> None:
    r = simulate_router(trace((5.0, "a")), load_time=7.0)
    assert r.loads == 1
    assert r.waits == (7.0,)
    assert r.rejected == 0


@pytest.mark.parametrize("load_time", [2.0, 30.0])
@pytest.mark.parametrize("shape", [zipf_trace, burst_trace, alternating_trace, uniform_trace, rotating_trace])
def test_router_answers_every_request_once_within_capacity(shape: object, load_time: float) -> None:
    assert callable(shape)
    t: Trace = shape(duration=300.0, seed=1)
    r = simulate_router(t, load_time)  # raises SimulationError on a double answer or over capacity
    assert len(r.waits) + r.rejected == len(t.requests)
    assert all(w >= 0 for w in r.waits)
    assert 1 <= r.peak_resident <= t.capacity
    assert r.rejected or r.loads >= len(set(t.sequence))  # every model served was loaded at least once


def test_router_rejects_after_load_timeout_and_still_answers_everyone() -> None:
    t = trace((0, "a"), (1, "a"), (2, "b"), capacity=1)
    r = simulate_router(t, load_time=50.0, load_timeout=10.0)
    assert r.rejected == 3
    assert r.waits == ()


def test_router_max_wait_reaches_the_scheduler() -> None:
    # "a" busy without a gap (overlapping requests), "b" waiting for the one slot: b's wait follows
    # the fairness bound
    a = [(float(i), "a") for i in range(60)]
    t = trace(*a, (5.0, "b"), capacity=1, service=3.0)
    waits = {mw: simulate_router(t, 1.0, max_wait=mw, stop_time=0.5) for mw in (5.0, 20.0)}
    b_wait = {mw: max(r.waits) for mw, r in waits.items()}
    assert b_wait[5.0] < b_wait[20.0]


class _Broken:
    """A stand-in scheduler that breaks the contract on purpose."""

    def __init__(self, effects: list[object]) -> None:
        self.effects = effects

    def handle(self, event: object, now: float) -> list[object]:
        return self.effects if isinstance(event, RequestArrived) else []


def test_simulator_catches_contract_violations_and_unknown_effects() -> None:
    t = trace((0, "a"), (1, "b"), capacity=1)
    with pytest.raises(SimulationError, match=r"over capacity|second process"):
        simulate_router(t, 1.0, make_scheduler=lambda cfg: _Broken([StartLoad("a"), StartLoad("b")]))  # type: ignore
    with pytest.raises(SimulationError, match="not up"):
        simulate_router(t, 1.0, make_scheduler=lambda cfg: _Broken([Grant(0, "a")]))  # type: ignore
    with pytest.raises(SimulationError, match="never answered"):
        simulate_router(t, 1.0, make_scheduler=lambda cfg: _Broken([TimerAt(5.0)]))  # type: ignore
    with pytest.raises(SimulationError, match="does not know the effect"):
        simulate_router(t, 1.0, make_scheduler=lambda cfg: _Broken(["SleepModel"]))  # type: ignore


# ------------------------------------------------------------------------------------ traces, reports
def test_traces_are_seeded_poisson_and_in_order() -> None:
    assert zipf_trace(duration=600.0, seed=7) == zipf_trace(duration=600.0, seed=7)
    assert zipf_trace(duration=600.0, seed=7) != zipf_trace(duration=600.0, seed=8)
    for t in standard_traces(duration=600.0):
        times = [r.at for r in t.requests]
        assert times == sorted(times) and all(0 <= x < 600.0 for x in times)
        assert 3 <= len(t.models) <= 8 and 1 <= t.capacity <= 3
        assert set(t.sequence) <= set(t.models)
    import random

    n = len(poisson_arrivals(random.Random(1), 2.0, 1000.0))
    assert 1800 < n < 2200


def test_trace_shapes() -> None:
    alt = alternating_trace(pairs=2, duration=1200.0, switch_every=600.0)
    first = [r.model for r in alt.requests if r.at < 600.0]
    assert set(first) == {"m0", "m1"} and all(x != y for x, y in itertools.pairwise(first))
    assert {r.model for r in alt.requests if r.at >= 600.0} == {"m2", "m3"}
    zipf = zipf_trace(duration=3600.0)
    counts = [zipf.sequence.count(m) for m in zipf.models]
    assert counts[0] > counts[1] > counts[-1]
    rot = rotating_trace(duration=1200.0, period=600.0)
    top = [max(rot.models, key=[r.model for r in rot.requests if lo <= r.at < lo + 600].count) for lo in (0, 600)]
    assert top == ["m0", "m1"]


def test_percentile_and_comparison() -> None:
    assert percentile([], 99) == 0.0
    assert percentile([float(x) for x in range(1, 101)], 99) == 99.0
    assert percentile([1.0, 2.0], 50) == 1.0
    c = compare(zipf_trace(duration=300.0), 2.0)
    assert c.belady <= c.naive.loads and c.ratio == c.router.loads / c.belady
    assert c.as_dict()["belady_loads"] == c.belady


def test_bench_script_quick_json() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "simulate.py"), "--quick", "--json", "--traces", "zipf", "bursts",
         "--load-times", "2", "--max-wait", "10"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    report = json.loads(out)
    assert report["settings"]["max_wait_s"] == 10.0
    assert [row["trace"] for row in report["rows"]] == ["zipf", "bursts"]
    for row in report["rows"]:
        assert row["belady_loads"] <= row["naive_lru"]["loads"]
        assert row["router"]["loads"] >= 1


def test_bench_script_table() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "simulate.py"), "--quick", "--duration", "120", "--traces", "uniform",
         "--load-times", "30"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout
    assert "| trace | models | capacity | load time |" in out
    assert "| uniform | 8 | 3 | 30 s |" in out
    assert "lower bound on loads for arrival-order" in out
