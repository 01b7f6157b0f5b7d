"""The engine side of the runtime: the drivers the router starts models with, and the adapters the
engines hold, kept equal to the router's view.

vLLM's runtime LoRA API lets anyone load or unload an adapter behind the router's back, so each loaded
base's ``GET /v1/models`` is compared with the scheduler's view at startup, every ``sync_interval`` and
whenever a client names a model nobody knows yet: adapters loaded elsewhere are counted as loaded
(``found``), adapters gone are marked so (``gone``), and in endpoint mode adapters the engine or
``adapter_dir`` holds become servable names.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from vllm_model_router.config import ENGINE, RouterConfig
from vllm_model_router.drivers.adapters import LoraDriver, fetch_models
from vllm_model_router.drivers.endpoint import EndpointDriver
from vllm_model_router.drivers.multi import MultiDriver
from vllm_model_router.drivers.process import ProcessDriver
from vllm_model_router.errors import BadGateway
from vllm_model_router.runtime.base import Pump
from vllm_model_router.runtime.catalog import Catalog, Target
from vllm_model_router.scheduler import ModelAdded, ModelExited, ModelFound, ModelSpec, State
from vllm_model_router.state.lifecycle import EventKind, EventLog

log = logging.getLogger("vllm_model_router.runtime")


class AdapterSync:
    def __init__(self, config: RouterConfig, catalog: Catalog, events: EventLog, pump: Pump) -> None:
        self.config = config
        self.catalog = catalog
        self.events = events
        self._pump = pump
        self._control: aiohttp.ClientSession | None = None  # adapter loads/unloads and /v1/models
        self.engine: EndpointDriver | None = None  # endpoint mode: the one running vLLM
        self._multi: MultiDriver | None = None
        self._lora: LoraDriver | None = None
        self._task: asyncio.Task[None] | None = None

    def default_driver(self) -> MultiDriver:
        """Configured processes, the engine (endpoint mode) and adapters, each with its own driver."""
        multi = MultiDriver()
        processes = {n: m for n, m in self.config.units().items() if not m.is_adapter}  # every replica
        if processes:
            multi.add(ProcessDriver(processes), list(processes))
        if self.config.endpoint is not None:
            self.engine = EndpointDriver(self.config.endpoint)
            multi.add(self.engine, [ENGINE])
        self._lora = LoraDriver(self._http, self.catalog.base_of, multi.endpoint, self.catalog.adapter_path)
        multi.add(self._lora, [n for n, m in self.config.models.items() if m.is_adapter])
        self._multi = multi
        return multi

    def _http(self) -> aiohttp.ClientSession:
        if self._control is None or self._control.closed:
            self._control = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300, sock_connect=5))
        return self._control

    async def start(self) -> None:
        """Reconcile now (when there is anything to reconcile), then every ``sync_interval``."""
        if self._bases() or self.config.endpoint_mode:
            await self.sync()
            self._task = asyncio.get_running_loop().create_task(self._sync_loop(), name="adapter-sync")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        self.stop()
        if self._control is not None:
            await self._control.close()

    def _bases(self) -> list[str]:
        return sorted({v.base for v in self._pump.views() if v.base is not None})

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sync_interval)
            try:
                await self.sync()
            except Exception:  # never let the loop die
                log.exception("adapter sync failed")

    async def sync(self) -> None:
        """Compare each loaded base's GET /v1/models with the router's view and settle differences:
        adapters loaded or unloaded behind the router's back are noticed (and counted)."""
        views = {v.name: v for v in self._pump.views()}
        for base in self._bases() or ([ENGINE] if self.config.endpoint_mode else []):
            url = self._pump.driver.endpoint(base)
            if url is None or views[base].state is not State.LOADED:
                continue
            started = self._pump.now()
            try:
                cards = await fetch_models(self._http(), url)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                if base == ENGINE and self.engine is not None:
                    if self.engine.reachable is not False:
                        log.warning("vLLM engine at %s is unreachable: %r", url, e)
                    self.engine.reachable = False
                    self.engine.last_error = repr(e)
                continue
            if base == ENGINE and self.engine is not None:
                if self.engine.reachable is False:
                    log.info("vLLM engine at %s is reachable again", url)
                self.engine.reachable = True
                self.engine.last_error = None
                self.catalog.engine_models = cards.bases
            views = {v.name: v for v in self._pump.views()}
            for name, path in cards.adapters.items():
                if name not in views:
                    if self.catalog.configured(name) is not None:
                        continue  # the engine uses a configured model's name for something else
                    self.add_adapter(name, path, base)
                    views = {v.name: v for v in self._pump.views()}
                v = views[name]
                if v.base == base and v.state in (State.UNLOADED, State.FAILED) and v.since < started:
                    log.info("Adapter %s is loaded on %s outside the router: counting it as loaded", name, base)
                    self.events.emit(EventKind.FOUND, name, "loaded outside the router")
                    self._pump.submit(ModelFound(name))
            for v in self._pump.views():
                if v.base == base and v.state is State.LOADED and v.since < started and v.name not in cards.adapters:
                    self.mark_gone(v.name, f"not in {base}'s /v1/models: unloaded outside the router")

    def is_adapter(self, model: str) -> bool:
        return any(v.name == model and v.base is not None for v in self._pump.views())

    def mark_gone(self, model: str, reason: str) -> None:
        """An adapter the router thought loaded is not (the engine said so)."""
        log.warning("Adapter %s is gone: %s", model, reason)
        self.events.emit(EventKind.GONE, model, reason)
        self._pump.submit(ModelExited(model, reason, failed=False))

    def add_adapter(self, name: str, path: str, base: str) -> None:
        self.catalog.add(name, path, base)
        if self._multi is not None and self._lora is not None:
            self._multi.add(self._lora, [name])
        self._pump.submit(ModelAdded(name, ModelSpec(base=base)))

    async def resolve(self, name: str, *, managed: bool = False) -> Target:
        """What a client's model name means (the catalog's rules); 404 with the available names when
        nothing. An adapter named for the first time is added. For a request, an unknown name is looked
        up on the engine first (it may serve it since the last look); ``managed`` (an operator's
        command): only models the router loads and unloads, as the router knows them now."""
        target = self.catalog.lookup(name, managed=managed)
        if target is None and not managed and self.config.endpoint_mode:
            await self.sync()
            target = self.catalog.lookup(name)
        if target is None:
            if not managed and self.engine is not None and self.engine.reachable is False:
                raise BadGateway(f"cannot reach the vLLM engine at {self.config.endpoint} to look up model "
                                 f"`{name}`: {self.engine.last_error}")
            raise self.catalog.not_found(name)
        if not self._pump.knows(target.model):
            self.add_adapter(target.model, self.catalog.adapter_path(target.model), ENGINE)
        return target
