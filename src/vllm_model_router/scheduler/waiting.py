"""The waiting requests: one queue in arrival order, and beside it each model's own queue.

The planning pass asks "who waits for this model?", "which models have waiters, and who is first?" and
"who has waited too long?" after every event; a single list would answer each by walking every waiter.
The per-model queues answer the first two directly, and since the scheduler's clock never goes back,
the oldest waiters are at the front of the arrival order, which answers the third. Beside them, each
model's first waiter is kept in planning order (higher priority first, then oldest), so that planning
reads only as far as the first load that has to wait.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Collection, Container, Iterator, Sequence

from vllm_model_router.scheduler.records import Waiter


class WaitQueue:
    """Waiters by request id, in arrival order, and per model in arrival order."""

    def __init__(self) -> None:
        self._all: dict[int, Waiter] = {}  # insertion order = arrival order
        self._by_model: dict[str, dict[int, Waiter]] = {}
        self._priority: dict[str, int] = {}  # model -> its priority (as given with its waiters)
        self._first_keys: list[tuple[int, int, str]] = []  # (-priority, seq, model) of each model's first

    def add(self, w: Waiter, priority: int = 0) -> None:
        """``w`` joins the queues; ``priority``: its model's (what orders ``in_planning_order``)."""
        self._all[w.req_id] = w
        self._priority[w.model] = priority
        queue = self._by_model.setdefault(w.model, {})
        queue[w.req_id] = w
        if len(queue) == 1:
            insort(self._first_keys, (-priority, w.seq, w.model))

    def pop(self, req_id: int) -> Waiter | None:
        w = self._all.pop(req_id, None)
        if w is not None:
            queue = self._by_model[w.model]
            was_first = next(iter(queue)) == req_id
            del queue[req_id]
            if was_first:
                prio = -self._priority[w.model]
                del self._first_keys[bisect_left(self._first_keys, (prio, w.seq, w.model))]
                if queue:
                    insort(self._first_keys, (prio, next(iter(queue.values())).seq, w.model))
            if not queue:
                del self._by_model[w.model]
        return w

    def __len__(self) -> int:
        return len(self._all)

    def __bool__(self) -> bool:
        return bool(self._all)

    def __contains__(self, req_id: int) -> bool:
        return req_id in self._all

    def __iter__(self) -> Iterator[Waiter]:
        """Every waiter, in arrival order."""
        return iter(self._all.values())

    def of(self, model: str) -> list[Waiter]:
        """``model``'s waiters, in arrival order."""
        return list(self._by_model.get(model, {}).values())

    def count(self, model: str) -> int:
        return len(self._by_model.get(model, ()))

    def firsts(self) -> dict[str, Waiter]:
        """Each model with waiters, and its oldest waiter."""
        return {model: next(iter(queue.values())) for model, queue in self._by_model.items()}

    def in_planning_order(self, among: Sequence[Container[str]]) -> Iterator[Waiter]:
        """The first waiter of each model named in one of ``among`` (sets of names, or anything that answers
        ``in``, looked at as it reads),
        by its model's priority (highest first) and then in arrival order. Read at once (step 4 reads it whole
        before it plans, on every pass), ``among`` asked of each model in turn."""
        by_model = self._by_model
        if len(among) <= 3:  # (up to three: asked without a loop per model)
            a, b, c = (*among, (), ())[:3]
            return iter([next(iter(by_model[model].values())) for _, _, model in self._first_keys
                         if model in a or model in b or model in c])
        return iter([next(iter(by_model[model].values())) for _, _, model in self._first_keys
                     if any(model in names for names in among)])

    def admitted(self, admits: Callable[[Waiter], bool], among: Collection[str]) -> list[Waiter]:
        """The waiters that ``admits`` lets through, in arrival order, where only models in
        ``among`` may admit any (the loaded ones: a pass looks at the models both loaded and waited for,
        not at every model with waiters). A model admits its waiters up to some arrival (a drain holds
        back the newer ones), so they are the front of its queue: the walk stops at each model's first
        refusal."""
        out: list[Waiter] = []
        for model in self._by_model.keys() & among:  # (walks the smaller of the two)
            for w in self._by_model[model].values():
                if not admits(w):
                    break
                out.append(w)
        return sorted(out, key=lambda w: w.seq)

    def older_than(self, now: float, age: float) -> list[Waiter]:
        """The waiters that have waited ``age`` or longer at ``now``: a prefix of the arrival order."""
        out = []
        for w in self._all.values():
            if now - w.arrived < age:
                break
            out.append(w)
        return out

    def first_arrival(self) -> float | None:
        """When the oldest waiter arrived (None: nobody waits)."""
        return next(iter(self._all.values())).arrived if self._all else None


class ScanningWaitQueue(WaitQueue):
    """The same answers, found by walking every waiter: the reference the property tests hold the queue
    to (and one that does not rely on the clock never going back)."""

    def of(self, model: str) -> list[Waiter]:
        return [w for w in self._all.values() if w.model == model]

    def count(self, model: str) -> int:
        return len(self.of(model))

    def firsts(self) -> dict[str, Waiter]:
        out: dict[str, Waiter] = {}
        for w in self._all.values():
            out.setdefault(w.model, w)
        return out

    def in_planning_order(self, among: Sequence[Container[str]]) -> Iterator[Waiter]:
        firsts = [w for w in self.firsts().values() if any(w.model in names for names in among)]
        return iter(sorted(firsts, key=lambda w: (-self._priority[w.model], w.seq)))

    def admitted(self, admits: Callable[[Waiter], bool], among: Collection[str]) -> list[Waiter]:
        return [w for w in self._all.values() if admits(w)]

    def older_than(self, now: float, age: float) -> list[Waiter]:
        return [w for w in self._all.values() if now - w.arrived >= age]

    def first_arrival(self) -> float | None:
        return min((w.arrived for w in self._all.values()), default=None)
