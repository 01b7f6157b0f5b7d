"""A scheduler on a fake clock, for the scheduler's scenario tests (test_scheduler*.py): events in, effects
out, without the TimerAt noise (kept in ``timers``)."""

from __future__ import annotations

from collections.abc import Mapping

from vllm_model_router.scheduler import (
    Effect,
    Event,
    Grant,
    LoadDone,
    ModelSpec,
    RequestArrived,
    Scheduler,
    SchedulerConfig,
    StartLoad,
    TimerAt,
)


class Run:
    """A scheduler plus a fake clock; ``step`` returns the effects without TimerAt noise."""

    def __init__(self, models: Mapping[str, ModelSpec | float] | None = None, *, max_resident: int = 1,
                 memory_gb: float | None = None, load_timeout: float = 600.0, max_wait: float = 30.0,
                 keep_idle: float = 0.0, **more: object) -> None:
        self.now = 0.0
        self.s = Scheduler(SchedulerConfig(models or {"a": 0.0, "b": 0.0, "c": 0.0}, max_resident, memory_gb,
                                           load_timeout, max_wait, keep_idle=keep_idle, **more))  # type: ignore[arg-type]
        self.timers: list[float] = []  # every Tick asked for

    def step(self, event: Event, at: float | None = None) -> list[Effect]:
        if at is not None:
            self.now = at
        out = self.s.handle(event, self.now)
        self.timers += [e.when for e in out if isinstance(e, TimerAt)]
        return [e for e in out if not isinstance(e, TimerAt)]

    def loaded(self, model: str, req: int) -> None:
        """Bring ``model`` to loaded through request ``req`` (which stays in flight)."""
        assert self.step(RequestArrived(req, model)) == [StartLoad(model)]
        assert self.step(LoadDone(model, True)) == [Grant(req, model)]

    def in_flight(self) -> dict[str, int]:
        """The units with requests in flight, and how many."""
        return {v.name: v.in_flight for v in self.s.view() if v.in_flight}
