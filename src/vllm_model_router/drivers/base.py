"""The one protocol every way of making a model resident implements.

The process driver spawns a server per model (and puts it to sleep and wakes it through vLLM's sleep
mode); the adapter driver loads LoRA adapters into a running vLLM; the endpoint driver stands for the one
vLLM of endpoint mode, which the router never starts. All implement the same calls, so the runtime never
knows which one it talks to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class LoadError(Exception):
    """A load failed; the message says why and carries the last lines the server printed.

    ``status`` is what waiting clients get: 503 (the model could not be loaded) or 502 (the engine it
    is loaded on could not be reached).
    """

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


# Called by a driver when a loaded model's server dies on its own (after the driver reaped it).
ExitCallback = Callable[[str, str], None]


class Driver(Protocol):
    def set_exit_callback(self, callback: ExitCallback) -> None: ...

    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        """Make the model servable (on ``gpus`` when the router placed it); return when it answers its
        health check, raise LoadError otherwise.

        On failure nothing of the model may be left running. Cancellation (a stop during a load)
        must also leave nothing behind once ``stop`` returns.
        """

    async def stop(self, model: str, force: bool = False) -> None:
        """Return only when every process (or resource) of the model is gone."""

    def endpoint(self, model: str) -> str | None:
        """Base URL (``http://host:port``) to forward requests to, or None when not running."""

    def info(self, model: str) -> dict[str, Any]:
        """Driver details for the admin view (pid, port, ...)."""

    def logs(self, model: str, lines: int) -> list[str]:
        """The last lines the model's server printed."""

    def pids(self, model: str) -> list[int]:
        """Every live process of the model (empty for models without processes of their own)."""

    async def sleep(self, model: str, level: int) -> None:
        """Put the model's engine to sleep (vLLM sleep mode); raise on failure."""

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        """Wake the engine (level 2: reload the weights) and, with ``warmup``, send it a 1-token request
        before returning; raise on failure."""

    async def close(self) -> None:
        """Stop everything this driver started."""
