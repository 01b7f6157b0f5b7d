"""Whether a replicated model's engines are saturated: requests queued inside vLLM for a while.

vLLM accepts every request and queues those its batch or KV cache cannot take yet; it reports them as the
gauge ``vllm:num_requests_waiting`` on ``/metrics``. Requests outstanding at the router say how busy the
copies are, but not whether one engine is already full: a long-prompt workload saturates an engine with
far fewer requests than a chat workload. So every few seconds the loaded replicas' gauges are read, and a
model whose engines have had requests waiting for ``sustain`` seconds is reported saturated
(``ReplicaPressure``): the scheduler starts another replica when one fits. One reading of zero ends it.

The text format is parsed with prometheus_client's parser (already a dependency for the router's own
metrics) rather than by hand. An engine that does not answer, or has no such gauge (a non-vLLM server),
counts as not queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from vllm_model_router.config import RouterConfig
from vllm_model_router.runtime.base import Pump
from vllm_model_router.scheduler import ReplicaPressure, State
from vllm_model_router.state.lifecycle import EventKind, EventLog

log = logging.getLogger("vllm_model_router.runtime")

WAITING = "vllm:num_requests_waiting"
INTERVAL_S = 2.0
SUSTAIN_S = 4.0


def queued(text: str) -> float:
    """The requests an engine's ``/metrics`` says are waiting inside it (0 when it does not say)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == WAITING:
                total += sample.value
    return total


class Saturation:
    """The decision, apart from the polling: saturated once requests have been seen waiting in every reading
    for ``sustain`` seconds; one reading of zero ends it."""

    def __init__(self, sustain: float = SUSTAIN_S) -> None:
        self.sustain = sustain
        self._since: dict[str, float] = {}  # model -> when its engines were first seen queueing
        self.saturated: set[str] = set()

    def restart(self, model: str) -> None:
        """``model`` got another replica: the scheduler forgot its saturation, and so does this; it must be
        seen queueing for ``sustain`` seconds again before another replica is asked for."""
        self._since.pop(model, None)
        self.saturated.discard(model)

    def note(self, model: str, waiting: float, now: float) -> bool | None:
        """Take a reading; the new verdict when it changed, else None."""
        if waiting > 0:
            saturated = now - self._since.setdefault(model, now) >= self.sustain
        else:
            self._since.pop(model, None)
            saturated = False
        if saturated == (model in self.saturated):
            return None
        if saturated:
            self.saturated.add(model)
        else:
            self.saturated.discard(model)
        return saturated


class PressureWatch:
    """Polls the loaded replicas of every replicated model and tells the scheduler when that model's
    engines become saturated and when they stop being so."""

    def __init__(self, config: RouterConfig, pump: Pump, events: EventLog, interval: float = INTERVAL_S,
                 sustain: float = SUSTAIN_S) -> None:
        self._pump = pump
        self._events = events
        self.models = [name for name, m in config.models.items() if m.copies > 1]
        self.interval = interval
        self.saturation = Saturation(sustain)
        self._loaded: dict[str, int] = {}  # model -> how many replicas were loaded at the last reading
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        if self.models and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="replica-pressure")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        self.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad reading end the watch
                log.exception("Reading the replicas' queues failed")

    async def poll(self) -> None:
        """One reading of every replicated model's loaded replicas."""
        loaded = {v.name for v in self._pump.views() if v.state is State.LOADED}
        for model in self.models:
            units = [u for u in self._pump.units(model) if u in loaded]
            if len(units) > self._loaded.get(model, 0):
                self.saturation.restart(model)  # the scheduler clears it when a replica comes in
            self._loaded[model] = len(units)
            endpoints = [url for u in units if (url := self._pump.driver.endpoint(u)) is not None]
            waiting = sum(await asyncio.gather(*(self._queued(url) for url in endpoints))) if endpoints else 0.0
            self._note(model, waiting)

    def _note(self, model: str, waiting: float) -> None:
        saturated = self.saturation.note(model, waiting, self._pump.now())
        if saturated is None:
            return
        if saturated:
            log.info("Model %s: its engines have queued requests for %.0fs (%g waiting now)", model,
                     self.saturation.sustain, waiting)
            self._events.emit(EventKind.SATURATED, model, f"{waiting:g} requests waiting inside its engines")
        else:
            self._events.emit(EventKind.UNSATURATED, model, "no requests waiting inside its engines")
        self._pump.submit(ReplicaPressure(model, saturated))

    async def _queued(self, url: str) -> float:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=min(self.interval, 2.0)))
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
            async with self._session.get(url + "/metrics") as resp:
                if resp.status == 200:
                    return queued(await resp.text())
        return 0.0
