"""The scheduler's indexes decide nothing of their own: driven with the same random event sequences, the
scheduler with its indexes and one that scans the model table and the waiting requests on every question
(``ScanningIndex``, ``ScanningWaitQueue``) emit the same effects and show the same models after every
event, and the indexes always hold what a scan of the table finds."""

from __future__ import annotations

from hypothesis import given

from vllm_model_router.scheduler import Effect, Event, Scheduler, SchedulerConfig, State
from vllm_model_router.scheduler.eviction import Usage
from vllm_model_router.scheduler.index import ScanningIndex
from vllm_model_router.scheduler.states import WANTS_IN
from vllm_model_router.scheduler.waiting import ScanningWaitQueue

from .test_scheduler_properties import SameWorld, ops, run_world, settings


class Scanning(Scheduler):
    """The reference: every index question answered by a scan of the table or of every waiter."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._index = ScanningIndex(self._models)
        self._waiting = ScanningWaitQueue()


class CheckedIndexes(Scheduler):
    """The scheduler, shadowed by ``Scanning`` fed the same events at the same times."""

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.shadow = Scanning(config)
        self.scan = ScanningIndex(self._models)
        self.scan_waiting = ScanningWaitQueue()

    def handle(self, event: Event, now: float) -> list[Effect]:
        indexed = super().handle(event, now)
        scanned = self.shadow.handle(event, now)
        where = f"{type(event).__name__} at {now}"
        assert indexed == scanned, f"{where}: indexed {indexed}, scanning {scanned}"
        assert self.view() == self.shadow.view(), f"{where}: the models differ"
        assert self.resident() == self.shadow.resident(), f"{where}: the resident models differ"
        assert self.host_usage() == self.shadow.host_usage(), f"{where}: the host usage differs"
        self.check_indexes(where)
        return indexed

    def check_indexes(self, where: str) -> None:
        index, scan = self._index, self.scan
        for m in self._models.values():
            assert list(index.children(m)) == scan.children(m), f"{where}: children of {m.name}"
            for states in ([s] for s in State):
                assert index.count_adapters(m, states) == scan.count_adapters(m, states), f"{where}: {m.name}"
            if m.base is None:
                assert index.holders(m.name) == scan.holders(m.name), f"{where}: holders under {m.name}"
            for states in ([s] for s in State):
                assert index.count_holders(m.base, states) == scan.count_holders(m.base, states), where
                assert index.holders_gb(m.base, states) == scan.holders_gb(m.base, states), where
        assert index.holders(None) == scan.holders(None), f"{where}: top-level holders"
        assert list(index.bases()) == scan.bases(), f"{where}: bases"
        for m in self._models.values():  # what lets step 7 reset the drains of loaded models only
            assert m.state is State.LOADED or m.drain_seq is None, f"{where}: {m.name} drains while {m.state}"
        for domain in [None, *(m.name for m in self._models.values() if m.base is None)]:
            assert index.count(domain) == scan.count(domain), f"{where}: the count of {domain}"
            for m in [None, *self._models.values()]:
                for mine, scanned in ((index.held(domain, m), scan.held(domain, m)),
                                      (index.staying(domain, m), scan.staying(domain, m))):
                    assert totals(mine) == totals(scanned), f"{where}: what {domain} holds but {m}"
                for staying in (False, True):
                    part, whole = index.usage_on(domain, (0, 1), m, staying), scan.usage_on(domain, (0, 1), m, staying)
                    assert on_two_gpus(part) == on_two_gpus(whole), f"{where}: what {domain} holds on 0, 1 but {m}"
            for s in (State.LOADED, State.SLEEPING):
                assert list(index.lru(domain, s)) == list(scan.lru(domain, s)), f"{where}: {domain} {s} by lru"
                for gpus in ((0,), (1,), (0, 1), (1, 2, 3)):
                    assert list(index.lru_on(domain, s, gpus)) == list(scan.lru_on(domain, s, gpus)), \
                        f"{where}: {domain} {s} by lru on GPUs {gpus}"
        (kept, kept_wide), (scanned, scanned_wide) = index.freeable_each(), scan.freeable_each()
        assert {g: list(v) for g, v in kept.items() if v} == {g: list(v) for g, v in scanned.items()}, \
            f"{where}: freeable per GPU"
        assert {g: n for g, n in kept_wide.items() if n} == {g: n for g, n in scanned_wide.items() if n}, \
            f"{where}: freeable on several GPUs"
        for s in State:
            assert set(index.names_in(s)) == set(scan.names_in(s)), f"{where}: names {s}"
        assert {m.name for m in index.timed()} == {m.name for m in scan.timed()}, f"{where}: timed"
        for s in State:
            assert {m.name for m in index.in_state(s)} == {m.name for m in scan.in_state(s)}, f"{where}: {s}"
            assert {m.name for m in index.units_in(s)} == {m.name for m in scan.units_in(s)}, f"{where}: units {s}"
        waiting = self._waiting
        self.scan_waiting._all = dict(waiting._all)
        reference = self.scan_waiting
        assert waiting.firsts() == reference.firsts(), f"{where}: first waiters"
        reference._priority = waiting._priority
        among = [index.names_in(s) for s in WANTS_IN]
        assert list(waiting.in_planning_order(among)) == list(reference.in_planning_order(among)), where
        for m in self._models:
            assert waiting.of(m) == reference.of(m), f"{where}: waiters of {m}"
        assert waiting.first_arrival() == reference.first_arrival(), f"{where}: first arrival"


def on_two_gpus(u: Usage) -> tuple[int, float, dict[int, float]]:
    """What ``usage_on`` answers for GPUs 0 and 1 (rounded: the totals are kept up to date by sums)."""
    return u.count, round(u.pool_gb, 6), {g: round(u.gpu_gb.get(g, 0.0), 6) for g in (0, 1)}


def totals(u: Usage) -> tuple[int, float, dict[int, float]]:
    """A domain's totals, GPUs that hold nothing left out (kept up to date, they stay at 0)."""
    return u.count, u.pool_gb, {g: gb for g, gb in u.gpu_gb.items() if gb}


@given(ops=ops, **settings)
def test_indexes_decide_as_a_scan_of_the_table(
    ops: list[tuple[int, int, float]], max_resident: int, memory: float | None, max_wait: float, gpus: bool,
    sleep: int, host: float | None, keep_idle: float, policies: bool, replicas: int,
) -> None:
    run_world(CheckedIndexes, ops, max_resident, memory, max_wait, gpus, sleep, host, keep_idle, policies, replicas,
              world=SameWorld)
