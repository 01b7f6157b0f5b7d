"""What the scheduler remembers about each model and each waiting request, and the read-only snapshot of
a model it hands out (``ModelView``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vllm_model_router.scheduler.events import ModelSpec
from vllm_model_router.scheduler.states import State, StopReason, is_resident


@dataclass(slots=True)
class ModelRecord:
    """One model's mutable record: its state and everything the rules look at."""

    name: str
    spec: ModelSpec
    order: int  # configuration order: the last tie-breaker of the LRU order
    state: State = State.UNLOADED
    since: float = 0.0
    last_used: float = -math.inf
    in_flight: set[int] = field(default_factory=set)
    loads: int = 0
    failures: int = 0
    out_of_band: int = 0
    last_error: str | None = None
    load_started: float | None = None
    drain_seq: int | None = None  # while set, waiters that arrived after this one are held back
    unload_requested: bool = False
    stop_reason: StopReason | None = None  # why it is on its way out (stopping or falling asleep)
    pinned: bool = False  # never evicted: pinned by an operator (or the config), or kept by its model's replicas
    pin: bool = False  # pinned by an operator or the config
    kept: bool = False  # one of the replicas its model keeps (``Group.floor``)
    placed: tuple[int, ...] = ()  # the GPUs it holds memory on while loading, loaded or stopping
    asleep_level: int = 0  # the level of the current sleep (falling asleep, sleeping, or stopped asleep); 0: awake
    wakes: int = 0
    sleeps: int = 0
    last_arrival: float | None = None
    gap: float | None = None  # smoothed time between its requests: small means in steady use
    load_seconds: float | None = None  # how long its last cold load took: what evicting it would cost
    wake_seconds: float | None = None  # how long its last wake took: that cost, when it would be put to sleep
    extra: bool = False  # a replica beyond the ones its model keeps: evicted first, stopped when idle a while

    @property
    def memory_gb(self) -> float:
        return self.spec.memory_gb

    @property
    def group(self) -> str:
        """The model this unit is a copy of (itself, for a model without replicas)."""
        return self.spec.group or self.name

    @property
    def base(self) -> str | None:
        return self.spec.base

    @property
    def draining(self) -> bool:
        return self.drain_seq is not None

    def admits(self, seq: int) -> bool:
        """Whether the waiter that arrived ``seq``-th may be granted on this model now."""
        return self.state is State.LOADED and (self.drain_seq is None or seq <= self.drain_seq)


AFFINITY_ENTRIES = 4096  # prompt prefixes remembered per replicated model


@dataclass(slots=True)
class Group:
    """A model and its replicas (units). A model without replicas is a group of one."""

    name: str
    members: list[ModelRecord] = field(default_factory=list)  # by replica number
    floor: int = 0  # replicas kept resident (pinned): ``replicas.min``, or what an operator set
    saturated: bool = False  # its engines report requests queued inside them (ReplicaPressure)
    dormant: bool = True  # not started yet (the shell's SetReplicas starts it), or an operator unloaded it:
    # the replicas it keeps come back with its next request
    affinity: dict[int, str] = field(default_factory=dict)  # prompt-prefix hash -> the unit that last served it

    @property
    def replicated(self) -> bool:
        return len(self.members) > 1

    def served(self, key: int | None, unit: str) -> None:
        """``unit`` was granted a request whose prompt starts like ``key``: remember it (bounded, oldest
        forgotten first)."""
        if key is None or not self.replicated:
            return
        self.affinity.pop(key, None)
        self.affinity[key] = unit
        if len(self.affinity) > AFFINITY_ENTRIES:
            del self.affinity[next(iter(self.affinity))]


@dataclass(slots=True)
class Waiter:
    req_id: int
    model: str  # the model (group) it waits for; it is granted on one of its units
    arrived: float
    seq: int  # arrival order
    affinity: int | None = None  # hash of the prompt's start (see RequestArrived)
    eligible: frozenset[str] | None = None  # the units that may take it (None: any of its model's)


@dataclass(frozen=True, slots=True)
class ModelView:
    """A read-only snapshot of one model, for the admin API and metrics."""

    name: str
    state: State
    since: float
    last_used: float | None
    in_flight: int
    waiting: int
    memory_gb: float
    loads: int
    failures: int
    last_error: str | None
    draining: bool
    pinned: bool
    base: str | None = None
    external: bool = False
    out_of_band: int = 0
    gpus: tuple[int, ...] = ()
    asleep_level: int = 0  # the level it sleeps at now, or was stopped at (0: not asleep); the configured one
    # is in its spec
    wakes: int = 0
    sleeps: int = 0
    group: str = ""  # the model it is a replica of (its own name when it has no replicas)
    replica: int = 0
    extra: bool = False  # a replica beyond the ones kept: the first to go

    @property
    def resident(self) -> bool:
        """Holding its memory and a place against ``max_resident`` (see ``states.RESIDENT``)."""
        return is_resident(self.state, self.external, self.asleep_level)

    @classmethod
    def of(cls, m: ModelRecord, waiting: int) -> ModelView:
        return cls(
            name=m.name,
            state=m.state,
            since=m.since,
            last_used=None if m.last_used == -math.inf else m.last_used,
            in_flight=len(m.in_flight),
            waiting=waiting,
            memory_gb=m.memory_gb,
            loads=m.loads,
            failures=m.failures,
            last_error=m.last_error,
            draining=m.draining,
            pinned=m.pinned,
            base=m.base,
            external=m.spec.external,
            out_of_band=m.out_of_band,
            gpus=m.placed,
            asleep_level=m.asleep_level,
            wakes=m.wakes,
            sleeps=m.sleeps,
            group=m.group,
            replica=m.spec.replica,
            extra=m.extra,
        )
