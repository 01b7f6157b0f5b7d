"""The idle protection of step 4 (``Residency._hot_until``): a model in steady use is kept for a few of its
own measured reloads (a load, or a wake when it would be put to sleep), a newcomer in steady use waits
for it at most ``keep_idle_reloads`` of them and a lone one a single reload, never past ``max_wait``; a
model whose next request is not expected soon is not protected. On by default."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.scheduler_run import Run
from vllm_model_router.scheduler import (
    LoadDone,
    ModelSpec,
    RequestArrived,
    RequestFinished,
    SchedulerConfig,
    SleepDone,
    SleepModel,
    StartLoad,
    StopDone,
    StopModel,
    StopReason,
    Tick,
    WakeDone,
    WakeModel,
)
from vllm_model_router.testing.sim import DEFAULT_STOP_TIME, compare
from vllm_model_router.testing.traces import uniform_trace, zipf_trace

LRU = StopReason.LRU
ROOT = Path(__file__).resolve().parents[2]


def steady_a(r: Run, load: float, gap: float = 1.0, until: float = 10.0) -> float:
    """Load ``a`` (taking ``load`` s) and send it a 0.5 s request every ``gap`` s up to ``until``; the time
    it was last used."""
    r.step(RequestArrived(1, "a"), at=-load)
    r.step(LoadDone("a", True), at=0.0)
    r.step(RequestFinished(1), at=0.5)
    t, i = gap, 2
    while t <= until:
        r.step(RequestArrived(i, "a"), at=t)
        r.step(RequestFinished(i), at=t + 0.5)
        t, i = t + gap, i + 1
    return t - gap + 0.5


def test_the_protection_is_on_by_default() -> None:
    cfg = SchedulerConfig({"a": 0.0}, 1, None, 600.0, 30.0)
    assert cfg.keep_idle > 0 and cfg.keep_idle_reloads > 1


def test_a_newcomer_in_steady_use_waits_at_most_keep_idle_reloads_of_the_hot_models_reloads() -> None:
    r = Run(max_resident=1, keep_idle=60, keep_idle_reloads=6.5)
    steady_a(r, load=2.0, until=10.0)
    # b comes steadily too (a gap of 1 s): waiting gathers its requests into one load
    assert r.step(RequestArrived(100, "b"), at=10.6) == []
    assert r.step(RequestArrived(101, "b"), at=11.6) == []
    for i, t in enumerate([11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0, 18.0, 19.0, 20.0, 21.0, 22.0, 23.0], 200):
        r.step(RequestArrived(i, "a"), at=t)  # a stays busy or freshly used: hot throughout
        r.step(RequestFinished(i), at=t + 0.5)
    assert StopModel("a", LRU, "evicted to make room for b") not in r.step(Tick(), at=23.5)
    assert 10.6 + 6.5 * 2.0 in r.timers  # it cools for b 6.5 reloads (2 s each) after b's first request
    assert r.step(Tick(), at=23.6) == [StopModel("a", LRU, "evicted to make room for b")]


def test_a_lone_newcomer_waits_one_reload_of_the_hot_model() -> None:
    r = Run(max_resident=1, keep_idle=60)
    last = steady_a(r, load=2.0, gap=2.0, until=10.0)  # idle, it would be kept 4 s (twice its gap)
    assert r.step(RequestArrived(100, "b"), at=last + 0.1) == []  # its first request: not in steady use
    assert r.timers[-1] == last + 0.1 + 2.0
    assert r.step(Tick(), at=last + 2.1) == [StopModel("a", LRU, "evicted to make room for b")]


def test_an_idle_model_cools_after_a_few_of_its_reloads_even_for_a_steady_newcomer() -> None:
    r = Run(max_resident=1, keep_idle=60, keep_idle_reloads=20)
    steady_a(r, load=0.5, until=5.0)  # last used 5.5; four reloads: 2 s
    r.step(RequestArrived(100, "b"), at=5.6)
    r.step(RequestArrived(101, "b"), at=6.0)  # b in steady use: it would wait 20 reloads (to 15.6)
    assert r.step(Tick(), at=7.4) == []
    assert r.step(Tick(), at=7.5) == [StopModel("a", LRU, "evicted to make room for b")]
    # with slow loads (four reloads: 8 s), twice its usual gap bounds it instead: its user has moved on
    r = Run(max_resident=1, keep_idle=60, keep_idle_reloads=20)
    steady_a(r, load=2.0, until=5.0)
    r.step(RequestArrived(100, "b"), at=5.6)
    r.step(RequestArrived(101, "b"), at=6.0)
    gap = r.s._models["a"].gap
    assert gap is not None and 5.5 + 2 * gap < 5.5 + 8.0
    assert r.timers[-1] == pytest.approx(5.5 + 2 * gap)
    assert r.step(Tick(), at=5.5 + 2 * gap) == [StopModel("a", LRU, "evicted to make room for b")]


def test_keep_idle_caps_the_protection_and_max_wait_bounds_the_newcomers_wait() -> None:
    r = Run(max_resident=1, keep_idle=3, max_wait=100)
    steady_a(r, load=30.0, gap=2.0, until=10.0)  # last used 10.5; 4 reloads would be 2 min
    r.step(RequestArrived(100, "b"), at=10.6)
    r.step(RequestArrived(101, "b"), at=11.0)
    assert r.step(Tick(), at=13.4) == []
    assert r.step(Tick(), at=13.5) == [StopModel("a", LRU, "evicted to make room for b")]  # keep_idle: 3 s
    r = Run(max_resident=1, keep_idle=600, max_wait=5)
    steady_a(r, load=30.0, gap=1.0, until=10.0)
    r.step(RequestArrived(100, "b"), at=10.6)
    r.step(RequestArrived(101, "b"), at=11.0)
    for i, t in enumerate([11.0, 12.0, 13.0, 14.0, 15.0], 200):  # a hot all along
        r.step(RequestArrived(i, "a"), at=t)
        r.step(RequestFinished(i), at=t + 0.5)
    assert r.step(Tick(), at=15.6) == [StopModel("a", LRU, "evicted to make room for b")]  # b waited max_wait


def test_a_model_whose_next_request_is_not_expected_soon_is_not_protected() -> None:
    r = Run(max_resident=1, keep_idle=60)
    steady_a(r, load=1.0, gap=8.0, until=40.0)  # a request every 8 s: more than 6.5 of its 1 s reloads
    assert r.step(RequestArrived(100, "b"), at=41.0) == [StopModel("a", LRU, "evicted to make room for b")]


def test_a_model_that_would_sleep_is_protected_by_its_wake_time() -> None:
    models = {"a": ModelSpec(sleep_level=1), "b": ModelSpec(), "c": ModelSpec()}
    r = Run(models, max_resident=1, keep_idle=60)  # type: ignore[arg-type]
    steady_a(r, load=20.0, until=3.0)  # a cold load of 20 s
    assert r.step(RequestArrived(100, "b"), at=100.0) == [SleepModel("a", 1, LRU, "evicted to make room for b")]
    assert r.step(SleepDone("a", True), at=101.0) == [StartLoad("b")]
    r.step(LoadDone("b", True), at=102.0)
    r.step(RequestFinished(100), at=102.5)
    assert r.step(RequestArrived(101, "a"), at=110.0) == [StopModel("b", LRU, "evicted to make room for a")]
    assert r.step(StopDone("b"), at=110.5) == [WakeModel("a", 1)]
    r.step(WakeDone("a", True), at=111.0)  # a wake of 0.5 s
    r.step(RequestFinished(101), at=111.2)
    for i, t in enumerate([112.0 + 0.5 * k for k in range(10)], 200):  # in steady use again
        r.step(RequestArrived(i, "a"), at=t)
        r.step(RequestFinished(i), at=t + 0.2)
    assert r.step(RequestArrived(300, "c"), at=116.8) == []
    # a would sleep again: c waits one 0.5 s wake, not a 20 s load (a would then be kept to 119.56)
    assert r.timers[-1] == pytest.approx(117.3)
    assert r.step(Tick(), at=117.3) == [SleepModel("a", 1, LRU, "evicted to make room for c")]


def test_on_the_simulator_the_defaults_load_less_and_keep_p99_within_the_fairness_bound() -> None:
    """Cheap loads (2 s) at 1 request/s: with the defaults the router loads well under what it loads with
    the protection off, and p99 waits stay within max_wait plus the swap a forced eviction still needs."""
    for trace in (zipf_trace(duration=1800.0, exponent=1.1), uniform_trace(duration=1800.0)):
        on, off = compare(trace, 2.0), compare(trace, 2.0, keep_idle=0.0)
        assert on.router.loads < 0.8 * off.router.loads, trace.name
        assert on.router.p99_wait <= 30.0 + 3.0 + DEFAULT_STOP_TIME + 2.0, trace.name


def test_the_benchmark_sweeps_the_protection_settings() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "simulate.py"), "--sweep", "--json", "--duration", "600",
         "--traces", "zipf", "--rates", "1", "--load-times", "2", "--sweep-keep-idle", "60",
         "--sweep-reloads", "4", "10"],
        check=True, capture_output=True, text=True, timeout=120,
    ).stdout
    cells = json.loads(out)["sweep"]
    assert [(c["keep_idle_s"], c["keep_idle_reloads"]) for c in cells] == [(0.0, None), (60.0, 4.0), (60.0, 10.0)]
    loads = [c["rows"][0]["router"]["loads"] for c in cells]
    assert loads[2] < loads[0]  # more patience, fewer loads than with the protection off
