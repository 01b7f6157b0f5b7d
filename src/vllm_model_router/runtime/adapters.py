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
from vllm_model_router.config.specs import adapter_specs
from vllm_model_router.drivers.adapters import LoraDriver, fetch_models
from vllm_model_router.drivers.endpoint import EndpointDriver
from vllm_model_router.drivers.multi import MultiDriver
from vllm_model_router.drivers.process import ProcessDriver
from vllm_model_router.errors import BadGateway
from vllm_model_router.runtime.base import Pump
from vllm_model_router.runtime.catalog import Catalog, Target
from vllm_model_router.scheduler import ModelAdded, ModelExited, ModelFound, ModelSpec, State, replica_name
from vllm_model_router.scheduler.events import split_unit
from vllm_model_router.state.lifecycle import EventKind, EventLog

log = logging.getLogger("vllm_model_router.runtime")


class AdapterSync:
    def __init__(self, config: RouterConfig, catalog: Catalog, events: EventLog, pump: Pump) -> None:
        self.config = config
        self.catalog = catalog
        self.events = events
        self._pump = pump
        self._control: aiohttp.ClientSession | None = None  # adapter loads/unloads and /v1/models
        self.engine: EndpointDriver | None = None  # endpoint mode: the first engine
        self.engines: dict[str, EndpointDriver] = {}  # endpoint mode: every engine, by its scheduler name
        self.serves: dict[str, list[str]] = {}  # engine -> its own models, as its /v1/models said last
        self._misnamed: set[str] = set()  # adapters found with a replica-like name (warned about once)
        self._multi: MultiDriver | None = None
        self._lora: LoraDriver | None = None
        self._task: asyncio.Task[None] | None = None

    def default_driver(self) -> MultiDriver:
        """Configured processes, the engine (endpoint mode) and adapters, each with its own driver."""
        multi = MultiDriver()
        processes = {n: m for n, m in self.config.units().items() if not m.is_adapter}  # every replica
        if processes:
            multi.add(ProcessDriver(processes), list(processes))
        for engine, url in zip(self.config.engine_units(), self.config.endpoints, strict=True):
            self.engines[engine] = EndpointDriver(url)
            multi.add(self.engines[engine], [engine])
        self.engine = self.engines.get(ENGINE)
        self._lora = LoraDriver(self._http, self._base_of, multi.endpoint, lambda unit: self.catalog.adapter_path(
            split_unit(unit)[0]), lambda unit: split_unit(unit)[0], self.unreachable)
        multi.add(self._lora, [u for n, m in self.config.models.items() if m.is_adapter
                               for u in self._units_of_adapter(n, m.base)])
        self._multi = multi
        return multi

    def _base_of(self, unit: str) -> str:
        """The unit an adapter's copy runs on: in endpoint mode, copy ``i`` on engine ``i``."""
        model, i = split_unit(unit)
        base = self.catalog.base_of(model)
        return replica_name(base, i) if base == ENGINE else base

    def _units_of_adapter(self, name: str, base: str | None) -> list[str]:
        """An adapter's units: one per engine in endpoint mode, else the adapter itself."""
        return list(adapter_specs(name, self.config.engine_units())) if base in (None, ENGINE) and \
            self.config.endpoint_mode else [name]

    @property
    def multi_engine(self) -> bool:
        return len(self.engines) > 1

    @property
    def reachable(self) -> bool | None:
        """Endpoint mode: whether any engine answers (None: not checked yet)."""
        states = [e.reachable for e in self.engines.values()]
        return True if any(states) else None if None in states else False

    def eligible(self, name: str) -> frozenset[str] | None:
        """The engines that serve ``name`` themselves, when there are several and some do not (None: any)."""
        if not self.multi_engine:
            return None
        serving = frozenset(e for e, models in self.serves.items() if name in models)
        return serving if serving and len(serving) < len(self.engines) else None

    def engine_of(self, unit: str) -> str | None:
        """The engine a unit runs on (itself, for an engine), in endpoint mode; None otherwise."""
        if unit in self.engines:
            return unit
        base = next((v.base for v in self._pump.views() if v.name == unit), None)
        return base if base in self.engines else None

    def unreachable(self, engine: str, error: str) -> None:
        """A request could not reach ``engine``: with several engines it is marked down at once (the next
        sync brings it back when it answers)."""
        driver = self.engines.get(engine)
        if driver is None:
            return
        if driver.reachable is not False:
            log.warning("vLLM engine at %s is unreachable: %s", driver.url, error)
            self.events.emit(EventKind.ENGINE_DOWN, engine, error, url=driver.url)
        driver.reachable = False
        driver.last_error = error
        driver.down_since = self._pump.now()
        if self.multi_engine:
            self._pump.submit(ModelExited(engine, f"unreachable: {error}"))

    async def confirm_down(self, engine: str, error: str) -> None:
        """A request's connection to ``engine`` broke: it is marked down if its ``/health`` does not answer
        either (a stale pooled connection is no reason to route around an engine)."""
        driver = self.engines.get(engine)
        if driver is None:
            return
        try:
            async with self._http().get(driver.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status == 200:
                    return
        except (aiohttp.ClientError, OSError, TimeoutError):
            pass
        self.unreachable(engine, error)

    def _reachable_again(self, engine: str, asked: float) -> None:
        """``engine`` answered a fetch begun at ``asked`` (one begun before it was found down proves
        nothing)."""
        driver = self.engines[engine]
        if driver.reachable is False and driver.down_since is not None and driver.down_since > asked:
            return
        if driver.reachable is False:
            log.info("vLLM engine at %s is reachable again", driver.url)
            self.events.emit(EventKind.ENGINE_UP, engine, "answers again", url=driver.url)
            if self.multi_engine:
                self._pump.submit(ModelFound(engine))
        driver.reachable = True
        driver.last_error = None

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
        # every engine, up or down (one that is down is watched for its return); a managed base when loaded
        for base in [*self.engines, *(b for b in self._bases() if b not in self.engines)]:
            url = self._pump.driver.endpoint(base)
            if url is None or (base not in self.engines and views[base].state is not State.LOADED):
                continue
            started = self._pump.now()
            try:
                cards = await fetch_models(self._http(), url)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                self.unreachable(base, repr(e))
                continue
            if base in self.engines:
                self._reachable_again(base, started)
                self.serves[base] = cards.bases
                self.catalog.engine_models = list(dict.fromkeys(m for ms in self.serves.values() for m in ms))
            replica = split_unit(base)[1] if base in self.engines else 0
            views = {v.name: v for v in self._pump.views()}
            for adapter, path in cards.adapters.items():
                if split_unit(adapter)[1]:  # named like a replica (x@2): the router could not tell them apart
                    if adapter not in self._misnamed:
                        self._misnamed.add(adapter)
                        log.warning("Adapter %s on %s is ignored: names ending in @<number> are the router's "
                                    "names for replicas", adapter, base)
                    continue
                if adapter not in views:
                    if self.catalog.configured(adapter) is not None:
                        continue  # the engine uses a configured model's name for something else
                    self.add_adapter(adapter, path, split_unit(base)[0] if base in self.engines else base)
                    views = {v.name: v for v in self._pump.views()}
                name = replica_name(adapter, replica)  # its copy on this engine
                if name not in views:
                    continue
                v = views[name]
                if v.base == base and v.state in (State.UNLOADED, State.FAILED) and v.since < started:
                    log.info("Adapter %s is loaded on %s outside the router: counting it as loaded", name, base)
                    self.events.emit(EventKind.FOUND, name, "loaded outside the router")
                    self._pump.submit(ModelFound(name))
            for v in self._pump.views():
                if v.base == base and v.state is State.LOADED and v.since < started and \
                        split_unit(v.name)[0] not in cards.adapters:
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
        specs = adapter_specs(name, self.config.engine_units()) if base == ENGINE and self.engines else \
            {name: ModelSpec(base=base)}
        if self._multi is not None and self._lora is not None:
            self._multi.add(self._lora, list(specs))
        for unit, spec in specs.items():
            self._pump.submit(ModelAdded(unit, spec))

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
            # an engine that is down might serve it (of several, only one that has never said what it serves)
            unknown = [d for e, d in self.engines.items()
                       if d.reachable is False and (not self.multi_engine or e not in self.serves)]
            if not managed and unknown:
                urls = ", ".join(d.url for d in unknown)
                raise BadGateway(f"cannot reach the vLLM engine at {urls} to look up model `{name}`: "
                                 f"{unknown[0].last_error}")
            raise self.catalog.not_found(name)
        if not self._pump.knows(target.model):
            self.add_adapter(target.model, self.catalog.adapter_path(target.model), ENGINE)
        return target
