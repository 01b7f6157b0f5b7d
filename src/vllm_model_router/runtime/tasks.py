"""The scheduler's slow effects, carried out as tasks: start a model, stop it, put it to sleep, wake it.

Each task reports back to the pump with an event (LoadDone, StopDone, SleepDone, WakeDone) and a
lifecycle event, whatever the driver does (a driver bug included), so the scheduler always hears back.
A model has one task at a time: a stop cancels the load still in progress, whose cleanup reaps the
process; a load first checks that its GPUs have the memory free, a stop waits until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any

from vllm_model_router.config import RouterConfig
from vllm_model_router.drivers.base import LoadError
from vllm_model_router.runtime.base import Pump
from vllm_model_router.runtime.gpu_monitor import GpuMonitor
from vllm_model_router.scheduler import LoadDone, SleepDone, StopDone, WakeDone
from vllm_model_router.state.lifecycle import EventKind, EventLog

log = logging.getLogger("vllm_model_router.runtime")


class ModelTasks:
    def __init__(self, config: RouterConfig, gpus: GpuMonitor, events: EventLog, pump: Pump) -> None:
        self.config = config
        self.gpus = gpus
        self.events = events
        self._pump = pump
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def load(self, model: str, gpus: tuple[int, ...]) -> None:
        self._spawn(model, self._load(model, gpus))

    def stop(self, model: str, force: bool) -> None:
        self._spawn(model, self._stop(model, force, self._tasks.get(model)))

    def sleep(self, model: str, level: int) -> None:
        self._spawn(model, self._sleep(model, level))

    def wake(self, model: str, level: int) -> None:
        self._spawn(model, self._wake(model, level))

    async def cancel_all(self) -> None:
        """Shutdown: cancel every task and wait for each to clean up."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, model: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=model)
        self._tasks[model] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._tasks.get(model) is t:
                del self._tasks[model]
            if not t.cancelled() and t.exception() is not None:
                log.error("internal error in %s task: %r", model, t.exception())

        task.add_done_callback(done)

    async def _load(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        started = time.monotonic()
        try:
            await self.gpus.ensure_free(model, gpus)
            await self._pump.driver.start(model, gpus)
        except LoadError as e:
            log.error("Failed to load model %s: %s", model, e)
            self.events.emit(EventKind.LOAD_FAILED, model, str(e), seconds=time.monotonic() - started)
            self._pump.submit(LoadDone(model, False, str(e), e.status))
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a driver bug must still answer the waiters
            log.exception("Failed to load model %s", model)
            self.events.emit(EventKind.LOAD_FAILED, model, f"internal error: {e!r}", seconds=time.monotonic() - started)
            self._pump.submit(LoadDone(model, False, f"internal error: {e!r}"))
            return
        seconds = time.monotonic() - started
        log.info("Model %s loaded in %.2fs", model, seconds)
        self.events.emit(EventKind.LOADED, model, "ready", seconds=seconds)
        self._pump.submit(LoadDone(model, True))

    async def _sleep(self, model: str, level: int) -> None:
        started = time.monotonic()
        try:
            await self._pump.driver.sleep(model, level)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("Could not put model %s to sleep: %s", model, e)
            self.events.emit(EventKind.SLEEP_FAILED, model, str(e), level=level)
            self._pump.submit(SleepDone(model, False, str(e)))
            return
        seconds = time.monotonic() - started
        log.info("Model %s is asleep (level %d) after %.2fs", model, level, seconds)
        self.events.emit(EventKind.SLEPT, model, f"level {level}", level=level, seconds=seconds)
        self._pump.submit(SleepDone(model, True))

    async def _wake(self, model: str, level: int) -> None:
        started = time.monotonic()
        cfg = self.config.units().get(model)
        try:
            await self._pump.driver.wake(model, level, warmup=cfg.warmup if cfg else False)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("Failed to wake model %s: %s (falling back to a cold start)", model, e)
            self.events.emit(EventKind.WAKE_FAILED, model, str(e), seconds=time.monotonic() - started)
            self._pump.submit(WakeDone(model, False, str(e)))
            return
        seconds = time.monotonic() - started
        log.info("Model %s is awake after %.2fs", model, seconds)
        self.events.emit(EventKind.WOKEN, model, f"level {level}", level=level, seconds=seconds)
        self._pump.submit(WakeDone(model, True))

    async def _stop(self, model: str, force: bool, previous: asyncio.Task[None] | None) -> None:
        pids = set(self._pump.driver.pids(model))
        gpus = next((v.gpus for v in self._pump.views() if v.name == model), ())
        free_before = self.gpus.free_before_stop(model, gpus)
        if previous is not None and not previous.done():
            previous.cancel()  # a load in progress: its cleanup reaps the process
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        try:
            await self._pump.driver.stop(model, force)
        except Exception:
            log.exception("error while stopping %s", model)
        pids |= set(self._pump.driver.pids(model))  # (none, normally: the driver waited for the group to go)
        report = await self.gpus.wait_released(model, gpus, pids, free_before)
        if report is not None:
            self.events.emit(EventKind.MEMORY_NOT_RELEASED, model, report)
        log.info("Model %s unloaded", model)
        self.events.emit(EventKind.UNLOADED, model, "stopped")
        self._pump.submit(StopDone(model))
