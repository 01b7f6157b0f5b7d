"""A driver that keeps its models in memory: the runtime's tests run against it where a real process would
add nothing but seconds.

Each model follows a :class:`Script`: how long a load takes (or until the test lets it finish), how many
loads fail (and with which status), whether a loaded model exits on its own after a while, how long a
stop takes, whether sleep and wake fail. A test changes a script between two requests with
:meth:`FakeDriver.script`, makes a loaded model exit now with :meth:`FakeDriver.exit`, and reads what the
runtime asked for in :attr:`FakeDriver.calls`.

Every wait is a real ``asyncio.sleep``, so a stop that cancels a load, or a request that gives up while a
load goes on, behaves as it would against a slow process.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vllm_model_router.drivers.base import ExitCallback, LoadError


@dataclass
class Script:
    """How one model behaves."""

    load_s: float = 0.0  # how long a load takes
    hold: asyncio.Event | None = None  # a load also waits for this (a test releases it when it is ready)
    fail_loads: int = 0  # this many loads fail (the next ones, counted down), then they succeed
    error: str = "simulated load failure"  # a failed load's message
    status: int = 503  # a failed load's status for the waiting clients (503, or 502: engine unreachable)
    exit_after_s: float | None = None  # a loaded model exits on its own this long after its load
    exit_reason: str = "process exited with code 1"
    stop_s: float = 0.0  # how long a stop takes
    fail_sleep: bool = False
    fail_wake: bool = False


@dataclass
class _Model:
    script: Script
    running: bool = False
    sleeping: int = 0  # the level it sleeps at; 0: awake
    loads: int = 0
    exit_timer: asyncio.TimerHandle | None = None
    lines: list[str] = field(default_factory=list)


class FakeDriver:
    """The driver protocol (``drivers/base.py``) in memory, following a :class:`Script` per model."""

    def __init__(self, scripts: dict[str, Script] | None = None, default: Script | None = None) -> None:
        self._default = default if default is not None else Script()
        self._models: dict[str, _Model] = {name: _Model(s) for name, s in (scripts or {}).items()}
        self._on_exit: ExitCallback | None = None
        self.calls: list[tuple[str, str]] = []  # (call, model) in the order the runtime made them

    def _model(self, name: str) -> _Model:
        if name not in self._models:
            self._models[name] = _Model(dataclasses.replace(self._default))
        return self._models[name]

    # ------------------------------------------------------------------------------ for the test
    def script(self, model: str, **changes: Any) -> None:
        """Change how ``model`` behaves from its next call on (``Script``'s fields)."""
        m = self._model(model)
        m.script = dataclasses.replace(m.script, **changes)

    def running(self, model: str) -> bool:
        return self._model(model).running

    def exit(self, model: str, reason: str | None = None) -> None:
        """The loaded model's server dies now, as a process would on its own."""
        m = self._model(model)
        if not m.running:
            return
        self._forget(m)
        m.lines.append(f"exited: {reason or m.script.exit_reason}")
        if self._on_exit is not None:
            self._on_exit(model, reason or m.script.exit_reason)

    def _forget(self, m: _Model) -> None:
        m.running = False
        m.sleeping = 0
        if m.exit_timer is not None:
            m.exit_timer.cancel()
            m.exit_timer = None

    # ------------------------------------------------------------------------------ the protocol
    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        self.calls.append(("start", model))
        m = self._model(model)
        script = m.script
        m.lines.append(f"starting on GPUs {list(gpus)}" if gpus else "starting")
        await asyncio.sleep(script.load_s)  # a stop meanwhile cancels this: nothing was started
        if script.hold is not None:
            await script.hold.wait()
        if script.fail_loads > 0:
            m.script = dataclasses.replace(script, fail_loads=script.fail_loads - 1)
            m.lines.append(script.error)
            raise LoadError(f"Failed to load model {model}: {script.error}", script.status)
        m.running = True
        m.loads += 1
        m.lines.append("ready")
        if script.exit_after_s is not None:
            m.exit_timer = asyncio.get_running_loop().call_later(script.exit_after_s, self.exit, model)

    async def stop(self, model: str, force: bool = False) -> None:
        self.calls.append(("stop", model))
        m = self._model(model)
        if m.script.stop_s and not force:
            await asyncio.sleep(m.script.stop_s)
        self._forget(m)
        m.lines.append("stopped")

    def endpoint(self, model: str) -> str | None:
        return f"http://fake-driver.invalid/{model}" if self._model(model).running else None

    def info(self, model: str) -> dict[str, Any]:
        m = self._model(model)
        return {"pid": None, "port": None, "running": m.running, "loads": m.loads}

    def logs(self, model: str, lines: int) -> list[str]:
        return self._model(model).lines[-lines:] if lines > 0 else []

    def pids(self, model: str) -> list[int]:
        return []

    async def sleep(self, model: str, level: int) -> None:
        self.calls.append(("sleep", model))
        m = self._model(model)
        if m.script.fail_sleep:
            raise RuntimeError(f"{model}: simulated sleep failure")
        m.sleeping = level

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        self.calls.append(("wake", model))
        m = self._model(model)
        if m.script.fail_wake:
            raise RuntimeError(f"{model}: simulated wake failure")
        m.sleeping = 0

    async def close(self) -> None:
        for m in self._models.values():
            self._forget(m)
