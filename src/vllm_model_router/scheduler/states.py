"""The scheduler's vocabulary: a model's states, the sets of states each rule talks about, and why a
model is stopped.

Everything that asks "is this model resident?" or "does it hold memory?" (metrics, the admin API, the
dashboard, the usage history) uses these definitions, so the answer is the same everywhere.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    """Where a model is in its life. The values are on the wire (``/v1/models``, ``/admin/models``,
    metrics labels)."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"
    FAILED = "failed"
    FALLING_ASLEEP = "falling_asleep"
    SLEEPING = "sleeping"
    WAKING = "waking"


HOLDS_CAPACITY = frozenset({State.LOADING, State.LOADED, State.UNLOADING, State.FALLING_ASLEEP, State.SLEEPING,
                            State.WAKING})
"""Holding GPU memory (a sleeper only its residue): what the budgets account for."""

RESIDENT = HOLDS_CAPACITY - {State.SLEEPING}
"""Resident: awake or on the way in or out, holding its full memory and a place against ``max_resident``.
A model on its way to sleep or back counts like one loading or stopping, so a wake never races a sleep
for the same memory."""

LOADABLE = frozenset({State.UNLOADED, State.FAILED})
"""Cold: bringing it in starts a process."""

WANTS_IN = LOADABLE | {State.SLEEPING}
"""What a request can bring in: a cold load or a wake."""

STARTING = frozenset({State.LOADING, State.WAKING})
"""On the way in: bounded by ``load_timeout``."""


def is_resident(state: State, external: bool = False, asleep_level: int = 0) -> bool:
    """Whether a model in ``state`` is resident (an external engine is never counted: the router does not
    manage it). A sleeper being stopped (``unloading`` with an ``asleep_level``) is not: it holds only its
    residue, and that is on its way out."""
    return state in RESIDENT and not external and not (state is State.UNLOADING and asleep_level)


def holds_residue_only(state: State, asleep_level: int) -> bool:
    """A sleeper, or a sleeper being stopped: it holds only its memory residue and no place against
    ``max_resident``."""
    return state is State.SLEEPING or (state is State.UNLOADING and asleep_level > 0)


class StopReason(StrEnum):
    """Why the scheduler stops a model (or puts it to sleep). The values are the ``reason`` label of the
    ``router_model_evictions`` metric; the words for people travel alongside (``StopModel.detail``)."""

    LRU = "lru"  # evicted (least recently used first) to make room for another model
    TTL = "ttl"  # idle longer than its ttl
    OPERATOR = "operator"  # an operator's unload, after its in-flight requests
    OPERATOR_FORCED = "operator_forced"  # an operator's forced unload
    LOAD_TIMEOUT = "load_timeout"  # not ready within load_timeout (leaves the model failed)
    OVER_CAPACITY = "over_capacity"  # loaded outside the router beyond the budget
    HOST_BUDGET = "host_budget"  # level-1 sleepers' weights over the host memory budget
    SLEEP_FAILED = "sleep_failed"  # could not be put to sleep
    WAKE_FAILED = "wake_failed"  # could not be woken (it comes back cold)
    SCALE_DOWN = "scale_down"  # an extra replica idle for replicas.idle, or beyond what an operator set
