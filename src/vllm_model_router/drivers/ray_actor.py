"""The Ray actor that runs one unit's engine on the node the router placed it on (ray_engine.py creates it).

The actor holds a ProcessDriver for its one unit, so that an engine on the cluster is started, checked for
readiness, logged and stopped exactly as a local one is (process group, SIGTERM then SIGKILL, log file). What
the actor adds is a tie between the engine and itself: the engine runs in its own session, so nothing of
Ray's reaches it when the actor's worker dies (a lost node, a crash, ``ray.kill``); ``parent_death_hook``
makes the kernel SIGKILL the engine when the thread that started it goes away. That thread is the actor's
event loop, which lives as long as the actor's process. Children the engine forks itself (vLLM's EngineCore)
are not covered by it: they rely on the engine's own shutdown, which the actor's ``stop`` waits for.

Every method answers with plain data, never raises into the router: a Ray error there means the actor
itself is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

import ray

from vllm_model_router.config import ModelConfig
from vllm_model_router.drivers.base import LoadError
from vllm_model_router.drivers.process import LOG_LINES, ProcessDriver

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` after which the child gets SIGKILL when the thread that forked it exits (None where
    the kernel has no such thing). libc is looked up here, in the parent: the child of a threaded process
    must not take locks (dlopen does) before it execs."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request took effect: nobody would kill us
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _node_address() -> str:
    """The address other nodes reach this one at (127.0.0.1 in a one-machine test cluster)."""
    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def _assigned_resources(ctx: Any) -> dict[str, float]:
    """What Ray reserved for this actor ({"GPU": 0.5, ...})."""
    return {str(k): float(v) for k, v in ctx.get_assigned_resources().items()}


class EngineActor:
    """One unit's engine. Created detached and named after the unit, so that it outlives the router that
    created it and a restarted router finds it (``ray_engine.RayEngineDriver.adopt``)."""

    def __init__(self, unit: str, config: ModelConfig) -> None:
        self._unit = unit
        self._host = _node_address()
        self._driver = ProcessDriver({unit: config}, host=self._host, preexec=parent_death_hook())
        self._driver.set_exit_callback(self._exited_on_its_own)
        self._gpus: tuple[int, ...] = ()
        self._exit: asyncio.Future[str] | None = None
        self._lines: deque[str] = deque(maxlen=LOG_LINES)
        self._count = 0  # lines ever taken in: a reader says how many it has seen and gets the rest
        self._queue: asyncio.Queue[str] | None = None
        self._drain: asyncio.Task[None] | None = None

    # -------------------------------------------------------------- lifecycle
    async def place(self) -> dict[str, Any]:
        """Where the actor runs; answered once Ray has placed and started it."""
        ctx = ray.get_runtime_context()
        return {"node": ctx.get_node_id(), "host": self._host, "ray_gpus": [str(g) for g in ray.get_gpu_ids()],
                "resources": _assigned_resources(ctx), "actor_pid": os.getpid()}

    async def start(self, gpus: tuple[int, ...]) -> dict[str, Any]:
        """Start the engine on ``gpus`` (the node's own indices) and wait for its health check: its
        endpoint, or the error (message and status) the router reports."""
        if self._queue is None:
            self._queue = self._driver.subscribe_logs(self._unit)
            self._drain = asyncio.create_task(self._take_lines(self._queue))
        self._exit = asyncio.get_running_loop().create_future()
        self._gpus = tuple(gpus)
        try:
            await self._driver.start(self._unit, self._gpus)
        except LoadError as e:
            return {"error": str(e), "status": e.status}
        return await self.status()

    async def stop(self, force: bool = False) -> None:
        """Stop the engine; returns when none of its processes is left."""
        await self._driver.stop(self._unit, force)

    async def wait_exit(self) -> str:
        """Answers only when the engine exited on its own (after it was reaped): why."""
        while self._exit is None:  # noqa: ASYNC110 - asked before the first start: nothing to wait on yet
            await asyncio.sleep(0.1)
        return await asyncio.shield(self._exit)

    def _exited_on_its_own(self, unit: str, reason: str) -> None:
        if self._exit is not None and not self._exit.done():
            self._exit.set_result(reason)

    # ----------------------------------------------------------------- views
    async def status(self) -> dict[str, Any]:
        """What a router needs to take the engine over: its endpoint (None when it is not serving) and
        details for the admin view."""
        info = self._driver.info(self._unit)
        return {"endpoint": self._driver.endpoint(self._unit), "pid": info.get("pid"), "port": info.get("port"),
                "gpus": list(self._gpus), **await self.place()}

    async def lines_since(self, seen: int) -> tuple[int, list[str]]:
        """The lines printed after the first ``seen`` (those still kept), and how many there are in all."""
        self._absorb()
        new = min(self._count - seen, len(self._lines))
        return self._count, list(self._lines)[len(self._lines) - new:] if new > 0 else []

    async def _take_lines(self, queue: asyncio.Queue[str]) -> None:
        """Keep the subscription drained between reads (a full queue would lose lines)."""
        while True:
            self._keep(await queue.get())
            self._absorb()

    def _absorb(self) -> None:
        while self._queue is not None and not self._queue.empty():
            self._keep(self._queue.get_nowait())

    def _keep(self, line: str) -> None:
        self._lines.append(line)
        self._count += 1

    async def close(self) -> None:
        """Stop everything; the actor is killed next."""
        await self._driver.close()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
