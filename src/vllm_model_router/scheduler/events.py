"""Events the shell feeds into the scheduler. Small frozen dataclasses; the core dispatches with match."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What the scheduler needs to know about a model."""

    memory_gb: float = 0.0
    base: str | None = None  # adapters: the model they are loaded on; they count against its max_adapters
    max_adapters: int = 4  # bases: adapters loaded at once
    external: bool = False  # always resident and never managed (the engine in endpoint mode)
    gpus: tuple[int, ...] | None = None  # fixed GPUs (memory_gb needed on each); None: the router places it
    gpu_count: int = 1  # GPUs it is placed on when the router places it (tensor x pipeline parallel), one node
    needs: frozenset[str] = frozenset()  # node resources it must be placed with (a cluster's; see Capacity)
    sleep_level: int = 0  # configured: 0 stopped to make room; 1 or 2 put to sleep (vLLM sleep mode) instead
    sleeping_gb: float = 1.0  # what a sleeping model still holds on each of its GPUs
    weights_gb: float = 0.0  # host memory a level-1 sleeper holds (its weights, moved to host RAM)
    ttl: float = 0.0  # idle this long (seconds) → unloaded; 0: never
    priority: int = 0  # higher wins a contested slot and is evicted last
    max_waiting: int = 100  # requests waiting for it beyond this get 429
    # replicas: every copy of a model is a unit of its own (own process, port, GPUs, memory); the first is
    # named like the model, the others ``<model>@<n>`` (``replica_name``). Requests name the model (the group).
    group: str | None = None  # the model this unit is a copy of; None: the unit is its own model
    replica: int = 0  # which copy (0: the first, named like the model)
    replicas_min: int = 0  # copies kept resident (pinned and brought in when they fit)
    replicas_max: int = 1  # copies resident at most
    target_in_flight: int = 32  # requests per loaded copy above which another copy is started
    replica_idle: float = 60.0  # an extra copy idle this long (seconds) is stopped


@dataclass(frozen=True, slots=True)
class RequestArrived:
    """A request (or an admin load) for a configured model; the shell resolved aliases already.

    ``affinity``: a hash of the start of the prompt (None: none), so that among equally loaded replicas the
    one that last served the same prefix gets it (vLLM's prefix cache is per engine)."""

    req_id: int
    model: str
    affinity: int | None = None
    eligible: frozenset[str] | None = None  # only these units may take it (engines that serve the model)


@dataclass(frozen=True, slots=True)
class RequestCancelled:
    """The client went away. Drops a waiting request; releases one in flight."""

    req_id: int


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """A granted request completed (successfully or not): its in-flight slot is released."""

    req_id: int


@dataclass(frozen=True, slots=True)
class LoadDone:
    """A StartLoad finished. On failure the driver has already reaped every process of the model.

    ``status`` is what the waiting clients get on failure: 503 (the model could not be loaded) or 502
    (the engine it is loaded on could not be reached).
    """

    model: str
    ok: bool
    error: str = ""
    status: int = 503


@dataclass(frozen=True, slots=True)
class SleepDone:
    """A SleepModel finished: the engine is asleep (``ok``), or could not be put to sleep."""

    model: str
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class WakeDone:
    """A WakeModel finished: the engine is awake and warmed up (``ok``), or the wake failed."""

    model: str
    ok: bool
    error: str = ""


@dataclass(frozen=True, slots=True)
class StopDone:
    """A StopModel finished: the model's whole process group is gone."""

    model: str


@dataclass(frozen=True, slots=True)
class ModelExited:
    """A loaded model went away by itself: its server died (the driver already reaped its process group;
    ``failed``), or an adapter was unloaded behind the router's back (not ``failed``), or one of several
    external engines stopped answering (it is down until ``ModelFound``)."""

    model: str
    reason: str
    failed: bool = True


@dataclass(frozen=True, slots=True)
class ModelFound:
    """A model the router thought unloaded turned out to be loaded: an adapter loaded out of band, a
    server a previous router process started and this one adopted (on ``gpus``), or an external engine
    that answers again."""

    model: str
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelAdded:
    """A model discovered at run time (an adapter directory, an adapter found on the engine)."""

    model: str
    spec: ModelSpec


@dataclass(frozen=True, slots=True)
class AdminUnload:
    """Operator asked to unload: gracefully (after in-flight requests) or by force."""

    model: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class SetPinned:
    """Operator pins (never evicted; still counts against capacity) or unpins a model."""

    model: str
    pinned: bool


@dataclass(frozen=True, slots=True)
class GpuUsage:
    """GPU memory held by processes the router did not start, per GPU (measured): it is taken off those
    GPUs' budgets, so placement avoids a GPU that someone else is filling."""

    foreign_gb: tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class Capacity:
    """The GPUs changed: a node joined or left the cluster. Every GPU's budget and the node it is on; a GPU
    not listed is gone. The shell reports the units that were on a lost node (``ModelExited``): this only
    changes the books that placement reads."""

    gpu_memory_gb: tuple[tuple[int, float], ...]
    gpu_nodes: tuple[tuple[int, str], ...] = ()
    node_resources: tuple[tuple[str, frozenset[str]], ...] = ()  # what each node offers (a model ``needs`` it)


@dataclass(frozen=True, slots=True)
class Preload:
    """Load (or wake) a model ahead of demand, only if it fits without evicting anything."""

    model: str


@dataclass(frozen=True, slots=True)
class ReplicaPressure:
    """The engines of a replicated model say they are saturated (requests queued inside vLLM, its
    ``vllm:num_requests_waiting``, for a while) or no longer are: another replica is started when one fits."""

    model: str
    saturated: bool


@dataclass(frozen=True, slots=True)
class SetReplicas:
    """Operator sets how many replicas of ``model`` are kept (within its ``replicas.min`` and ``max``), or the
    shell starts keeping ``replicas.min`` once restart recovery has adopted what it could:
    that many are pinned and brought in when they fit; resident copies beyond it are stopped once idle.
    Demand may still start more, up to ``max``."""

    model: str
    replicas: int
    trim: bool = True  # resident copies beyond ``replicas`` stop once idle (not at startup: adopted ones stay)


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed (a TimerAt came due), or the shell wants a planning pass. Deadlines are checked on every
    event anyway. ``due``: the time the timer was set for (the shell's business: a timer may fire a hair
    early, and the shell then hands the scheduler that time instead of its clock's)."""

    due: float | None = None


Event = (
    RequestArrived | RequestCancelled | RequestFinished | LoadDone | StopDone | SleepDone | WakeDone | ModelExited
    | ModelFound | ModelAdded | AdminUnload | SetPinned | Preload | GpuUsage | Capacity | ReplicaPressure | SetReplicas
    | Tick
)


def replica_name(model: str, replica: int) -> str:
    """The unit name of ``model``'s replica number ``replica`` (0 is the model's own name)."""
    return model if replica == 0 else f"{model}@{replica}"


def split_unit(unit: str) -> tuple[str, int]:
    """The model and replica number of a unit name (``chat@2`` → ``("chat", 2)``; ``chat`` → ``("chat", 0)``).
    Configured names never end in ``@<digits>`` (the config refuses them), so this cannot misread one."""
    model, sep, number = unit.rpartition("@")
    if sep and model and number.isdigit():
        return model, int(number)
    return unit, 0
