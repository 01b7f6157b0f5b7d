"""What a planning pass carries from step to step (``Pass``), and what step 4 keeps between passes and reads
as it plans (``Step4``, ``Hot``, ``plus``, ``noting_sleepers``): see ``Planner._plan_loads``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from vllm_model_router.scheduler.effects import Effect
from vllm_model_router.scheduler.eviction import Budget, Candidate, Occupant, Usage
from vllm_model_router.scheduler.records import Waiter
from vllm_model_router.scheduler.residency import Residency
from vllm_model_router.scheduler.states import State


@dataclass(slots=True)
class Pass:
    """What one planning pass carries from step to step."""

    now: float
    out: list[Effect]
    # model -> the arrival number of the newest waiter it still admits (-1: none); set by steps 4 and 7
    drain: dict[str, int] = field(default_factory=dict)
    blocked_since: float | None = None  # step 4: the oldest waiter of a load blocked behind busy models
    room_pending: bool = False  # step 4: a waiter's load waits for room (no replica may take any then)
    cooling: list[float] = field(default_factory=list)  # step 4: when hot models holding it back cool down
    # step 4: the room the loads planned so far wait for (their memory where they will go, less what they
    # hold now), per domain; later loads plan around it
    reserved: dict[str | None, Usage] = field(default_factory=dict)
    read_candidates: bool = False  # step 4 walked the eviction candidates (a model falling idle matters)
    rooms: dict[str, tuple[int, ...]] = field(default_factory=dict)  # step 4: where each load reserved room


@dataclass(frozen=True, slots=True)
class Step4:
    """What step 4 decided when it changed nothing (every load waits), and what that decision read: while
    none of it changes, the same pass would decide the same, and is not run again."""

    key: tuple[object, ...]  # what it read but the waiting loads, and which models were idle (None: not read)
    order: tuple[tuple[str, int], ...]  # the waiting loads the walk read (model, oldest waiter)
    unread_after: bool  # the walk stopped at the last of them, blocked: the loads after it were not read
    until: float  # a waiter's fairness bound or a hot model's cooling: the decision may change then
    blocked_since: float | None
    cooling: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Waits:
    """A load step 4 reserved room for, and what that planning read: the model of its oldest waiter and that
    waiter (its place in the planning order), its state then, the GPU stamp after it was planned, what it
    reserves there in place of what it holds, and whether it may be reserved there again without being
    planned (``KeptWalk._plan_in_order``; the others are kept for the room they reserved before later
    loads)."""

    model: str  # (the waiter's: a base brought in for an adapter is recorded under the adapter)
    seq: int
    state: State
    since: float
    stamp: int
    room: tuple[int, ...]
    reserves: Occupant
    holds: Occupant | None
    keep: bool


@dataclass(frozen=True, slots=True)
class Resume:
    """Where step 4's last walk stopped, at a load found blocked, and the pass just before that load: what a
    walk that starts again there needs (``KeptWalk._resume``)."""

    at: int  # the blocked load's place in the planning order
    reserved: dict[str | None, Usage]
    rooms: dict[str, tuple[int, ...]]
    planned: frozenset[str]
    room_pending: bool


@dataclass(frozen=True, slots=True)
class Kept:
    """The loads step 4's last pass left waiting in their rooms (``Waits``), in planning order, and the
    budget and rules they were planned under (``KeptWalk._plan_in_order``)."""

    budget: Budget
    rules: int
    stamp: int  # the GPU stamp when the walk that checked them began
    waits: list[Waits]
    where: dict[str, int]  # model -> its place in ``waits``
    stopped: int | None  # where in the order it stopped, at a blocked load (None: it read every load)
    resume: Resume | None = None


class Hot:
    """The models protected from eviction at ``now`` (``Residency._hot``) against a ``newcomer`` (its oldest
    waiter; None: another replica), asked of each candidate as the
    eviction order is read (not of every loaded model up front); each one found is noted with when it
    cools down (the timer of step 9)."""

    def __init__(self, planner: Residency, now: float, cooling: list[float], newcomer: Waiter | None = None,
                 noted: list[tuple[float, tuple[int, ...]]] | None = None) -> None:
        self._planner, self._now, self._cooling, self._newcomer = planner, now, cooling, newcomer
        self._noted = noted  # (each one found, with its GPUs: what a load found blocked keeps, see Blocked)

    def __contains__(self, name: object) -> bool:
        m = self._planner._models[name] if isinstance(name, str) else None
        if m is None or not self._planner._hot(m, self._now, self._newcomer):
            return False
        until = self._planner._hot_until(m, self._newcomer)
        self._cooling.append(until)
        if self._noted is not None:
            self._noted.append((until, m.placed))
        return True


def plus(usage: Usage, reserved: Usage | None) -> Usage:
    """``usage`` (a copy, changed in place) with the room that loads planned earlier in the pass reserve."""
    if reserved is not None:
        usage.count += reserved.count
        usage.pool_gb += reserved.pool_gb
        for g, gb in reserved.gpu_gb.items():
            usage.gpu_gb[g] = usage.gpu_gb.get(g, 0.0) + gb
    return usage


def noting_sleepers(candidates: Iterator[Candidate], asleep: list[bool]) -> Iterator[Candidate]:
    """``candidates`` as they are, noting in ``asleep`` each that would be put to sleep: when none would,
    walking them again as stops decides nothing new."""
    for c in candidates:
        if c.after is not None:
            asleep.append(True)
        yield c
