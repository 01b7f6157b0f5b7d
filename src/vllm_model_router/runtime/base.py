"""What the runtime's parts (adapter sync, usage history, GPU monitor) may ask of the event pump.

They feed it events and read its view; they never touch the scheduler or the pump's internals, so the
pump stays the one place where decisions are taken and carried out.
"""

from __future__ import annotations

from typing import Protocol

from vllm_model_router.drivers.base import Driver
from vllm_model_router.scheduler import Event, ModelView


class Pump(Protocol):
    @property
    def driver(self) -> Driver:
        """Where the models run (their endpoints, processes and pids)."""

    @property
    def closing(self) -> bool:
        """Shutdown has begun."""

    def now(self) -> float:
        """The event loop's clock, the one the scheduler's times are on."""

    def submit(self, event: Event) -> None:
        """Hand an event to the scheduler and carry out what it decides."""

    def views(self) -> list[ModelView]:
        """Every model as the scheduler sees it now."""

    def knows(self, model: str) -> bool:
        """The scheduler has this model (configured, or an adapter added since)."""

    def model_exited(self, model: str, reason: str) -> None:
        """A model's server went away by itself (the driver reaped what was left of it)."""

    def units(self, model: str) -> list[str]:
        """``model``'s units: its replicas (a model without replicas: itself)."""

    def resident(self) -> list[str]:
        """The models holding a place against ``max_resident``."""
