"""Effects the scheduler asks the shell to carry out. Slow ones come back later as events."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_model_router.scheduler.states import StopReason


@dataclass(frozen=True, slots=True)
class StartLoad:
    """Make the model resident (on these GPUs, when GPUs are known); answer with LoadDone."""

    model: str
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StopModel:
    """Stop the model's process group (SIGTERM, then SIGKILL after stop_timeout); answer with StopDone.

    ``reason`` says why as a code (metrics count by it), ``detail`` in words (logs and events).
    ``force`` means in-flight requests may be cut off (operator's choice); the scheduler never sets it
    on its own for a model with requests in flight.
    """

    model: str
    reason: StopReason
    detail: str
    force: bool = False


@dataclass(frozen=True, slots=True)
class SleepModel:
    """Put an idle model's engine to sleep (vLLM sleep mode) to free its GPU memory; answer with SleepDone.
    ``reason`` and ``detail`` say why, as for StopModel."""

    model: str
    level: int
    reason: StopReason
    detail: str


@dataclass(frozen=True, slots=True)
class WakeModel:
    """Wake a sleeping engine (and warm it up); answer with WakeDone."""

    model: str
    level: int


@dataclass(frozen=True, slots=True)
class Grant:
    """The request may go to the model's server now; it is counted in flight until RequestFinished."""

    req_id: int
    model: str


@dataclass(frozen=True, slots=True)
class Reject:
    """The request ends with an error: ``status`` 503 (load failed), 504 (waited past load_timeout) or 429
    (too many waiting; ``retry_after`` seconds)."""

    req_id: int
    model: str
    status: int
    message: str
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class TimerAt:
    """Deliver a Tick at this time (the earliest pending deadline). A timer, not an engine's wake-up."""

    when: float


Effect = StartLoad | StopModel | SleepModel | WakeModel | Grant | Reject | TimerAt
