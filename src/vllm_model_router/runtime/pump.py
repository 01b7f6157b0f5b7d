"""The async shell around the pure scheduler: the only place that owns it and carries out its effects.

Everything runs on one event loop thread, and ``_submit`` feeds an event to the scheduler and executes
the resulting effects without awaiting in between, so no decision is ever taken from a stale snapshot.
Effects that need time (a load, a stop) run as tasks and report back with events. Events raised while
effects are being executed (a task finishing synchronously, a cancelled waiter) are queued and handled
after the current batch, in order: the scheduler never sees re-entrant calls.

A request is a lease: ``acquire`` waits for the scheduler's Grant, ``release`` (always called in a
``finally``) returns the in-flight slot, so a client that disconnects can never pin a model forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from vllm_model_router.config import ENGINE, ConfigError, RouterConfig
from vllm_model_router.drivers import procs
from vllm_model_router.drivers.adapters import LoraDriver, fetch_models
from vllm_model_router.drivers.base import Driver, LoadError
from vllm_model_router.drivers.endpoint import EndpointDriver
from vllm_model_router.drivers.multi import MultiDriver
from vllm_model_router.drivers.process import ProcessDriver
from vllm_model_router.errors import (
    BadGateway,
    GatewayTimeout,
    ModelNotFound,
    ModelUnavailable,
    RouterError,
    ServiceUnavailable,
    TooManyRequests,
)
from vllm_model_router.gpu.memory import MemoryNeed, check_fit, gpu_budgets, resolve_needs, weights_need
from vllm_model_router.gpu.probe import GpuProbe, NvmlProbe
from vllm_model_router.gpu.watch import GpuWatch
from vllm_model_router.runtime.catalog import Catalog, Target
from vllm_model_router.scheduler import (
    AdminUnload,
    Effect,
    Event,
    GpuUsage,
    Grant,
    LoadDone,
    ModelAdded,
    ModelExited,
    ModelFound,
    ModelSpec,
    ModelView,
    Preload,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    SetPinned,
    SleepDone,
    SleepModel,
    StartLoad,
    State,
    StopDone,
    StopModel,
    Tick,
    WakeAt,
    WakeDone,
    WakeModel,
)
from vllm_model_router.state.lifecycle import EventLog, LifecycleEvent
from vllm_model_router.state.predict import ranked_models
from vllm_model_router.state.store import Store

log = logging.getLogger("vllm_model_router.runtime")


AUTO = "auto"


def scheduler_specs(
    config: RouterConfig, needs: dict[str, MemoryNeed], weights: dict[str, MemoryNeed] | None = None
) -> dict[str, ModelSpec | float]:
    """The scheduler's view of the configured models (endpoint mode: the engine plus its adapters)."""
    specs: dict[str, ModelSpec | float] = {}
    if config.endpoint_mode:
        specs[ENGINE] = ModelSpec(external=True, max_adapters=config.max_resident)
    for name, m in config.models.items():
        if m.is_adapter:
            specs[name] = ModelSpec(base=m.base or ENGINE)
        else:
            specs[name] = ModelSpec(
                memory_gb=needs[name].gb, max_adapters=m.max_adapters, gpus=m.gpus, sleep_level=m.sleep_level,
                sleeping_gb=min(m.sleeping_memory_gb, needs[name].gb),
                weights_gb=weights[name].gb if weights and name in weights else 0.0,
                ttl=m.ttl if m.ttl is not None else config.default_ttl, priority=m.priority,
                max_waiting=m.max_waiting,
            )
    # bases before their adapters, whatever the config order
    return dict(sorted(specs.items(), key=lambda kv: isinstance(kv[1], ModelSpec) and kv[1].base is not None))


def shutting_down(what: str = "") -> ServiceUnavailable:
    """The error for requests the router turns away or cuts off because it is shutting down."""
    prefix = f"{what}: " if what else ""
    return ServiceUnavailable(f"{prefix}the router is shutting down; retry shortly", headers={"Retry-After": "1"})


class Runtime:
    def __init__(self, config: RouterConfig, driver: Driver | None = None,
                 probe: GpuProbe | str | None = AUTO) -> None:
        self.config = config
        self.probe: GpuProbe | None = NvmlProbe.create() if probe == AUTO else probe  # type: ignore[assignment]
        devices = self.probe.devices() if self.probe is not None else []
        if self.probe is None:
            log.info("No NVIDIA GPU found (NVML unavailable): accounting memory from declarations only")
        else:
            log.info("GPUs: %s", ", ".join(f"{d.index}: {d.name} {d.total_gb:.1f} GB" for d in devices))
        self.needs = resolve_needs(config, devices)
        self.weights = {n: weights_need(m, self.needs[n]) for n, m in config.models.items() if m.sleep_level}
        self.gpu_budgets = gpu_budgets(config, devices)
        problems = check_fit(config, devices, self.needs)
        if problems:
            raise ConfigError(problems)
        self.catalog = Catalog(config)
        self._control: aiohttp.ClientSession | None = None  # load/unload/sync calls to engines
        self.endpoint_driver: EndpointDriver | None = None
        self._lora: LoraDriver | None = None
        self.driver: Driver = driver if driver is not None else self._default_driver()
        self._loop = asyncio.get_running_loop()
        self._sync_task: asyncio.Task[None] | None = None
        self.gpuwatch = (
            GpuWatch(self.probe, config.release_timeout, self._our_pids) if self.probe is not None else None
        )
        self._loop = asyncio.get_running_loop()
        self._store_lock: int | None = None
        self.store = self._open_store()
        restored = self.store.last_used()
        loop_now, wall_now = self._loop.time(), time.time()
        self.scheduler = Scheduler(
            SchedulerConfig(
                models=scheduler_specs(config, self.needs, self.weights),
                host_memory_gb=config.host_memory_gb,
                host_overflow=config.host_overflow,
                keep_idle=config.keep_idle,
                max_waiting_total=config.max_waiting_total,
                last_used={n: loop_now - (wall_now - at) for n, at in restored.items() if at <= wall_now},
                gpu_memory_gb=self.gpu_budgets,
                max_resident=config.max_resident,
                memory_gb=config.memory_gb,
                load_timeout=config.load_timeout,
                max_wait=config.max_wait,
            ),
            now=self._loop.time(),
        )
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[str]] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pending: deque[Event] = deque()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = 0.0
        self._watchers: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._closing = False
        self.started_wall = time.time()
        self.events = EventLog()
        self.events.add_listener(self._remember)
        self._preload_task: asyncio.Task[None] | None = None
        self._gpu_task: asyncio.Task[None] | None = None
        self._foreign: dict[int, float] = {}
        self.driver.set_exit_callback(self._model_exited)
        for name, m in config.models.items():
            if m.pinned:
                self._submit(SetPinned(name, True))

    def _default_driver(self) -> MultiDriver:
        multi = MultiDriver()
        processes = {n: m for n, m in self.config.models.items() if not m.is_adapter}
        if processes:
            multi.add(ProcessDriver(processes), list(processes))
        if self.config.endpoint is not None:
            self.endpoint_driver = EndpointDriver(self.config.endpoint)
            multi.add(self.endpoint_driver, [ENGINE])
        self._lora = LoraDriver(self._http, self.catalog.base_of, multi.endpoint, self.catalog.adapter_path)
        multi.add(self._lora, [n for n, m in self.config.models.items() if m.is_adapter])
        self._multi = multi
        return multi

    def _http(self) -> aiohttp.ClientSession:
        if self._control is None or self._control.closed:
            self._control = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300, sock_connect=5))
        return self._control

    # ------------------------------------------------------- adapters, sync
    async def start(self) -> None:
        """Background work: preload what the config (or the last run) asks for; reconcile the router's view
        of adapters with the engines', now and periodically; predictive preloading."""
        first = [n for n, m in self.config.models.items() if m.preload is True]
        if self.config.restore:
            first += [n for n in self.store.resident() if n in self.config.models and n not in first]
        for name in first:  # in config order, while capacity allows (a Preload never evicts)
            self._submit(Preload(name))
        if self.gpuwatch is not None:
            self._note_foreign_usage()
            self._gpu_task = self._loop.create_task(self._gpu_loop(), name="gpu-usage")
        if self.config.preload_predicted or any(m.preload == "predicted" for m in self.config.models.values()):
            self._preload_task = self._loop.create_task(self._predict_loop(), name="predictive-preload")
        if self._adapter_bases() or self.config.endpoint_mode:
            await self.sync()
            self._sync_task = self._loop.create_task(self._sync_loop(), name="adapter-sync")

    def _adapter_bases(self) -> list[str]:
        return sorted({v.base for v in self.views() if v.base is not None})

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
        views = {v.name: v for v in self.views()}
        for base in self._adapter_bases() or ([ENGINE] if self.config.endpoint_mode else []):
            url = self.driver.endpoint(base)
            if url is None or views[base].state is not State.LOADED:
                continue
            started = self._loop.time()
            try:
                cards = await fetch_models(self._http(), url)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                if base == ENGINE and self.endpoint_driver is not None:
                    if self.endpoint_driver.reachable is not False:
                        log.warning("vLLM engine at %s is unreachable: %r", url, e)
                    self.endpoint_driver.reachable = False
                    self.endpoint_driver.last_error = repr(e)
                continue
            if base == ENGINE and self.endpoint_driver is not None:
                if self.endpoint_driver.reachable is False:
                    log.info("vLLM engine at %s is reachable again", url)
                self.endpoint_driver.reachable = True
                self.endpoint_driver.last_error = None
                self.catalog.engine_models = cards.bases
            views = {v.name: v for v in self.views()}
            for name, path in cards.adapters.items():
                if name not in views:
                    if self.config.resolve(name) is not None:
                        continue  # the engine uses a configured model's name for something else
                    self.add_adapter(name, path, base)
                    views = {v.name: v for v in self.views()}
                v = views[name]
                if v.base == base and v.state in (State.UNLOADED, State.FAILED) and v.since < started:
                    log.info("Adapter %s is loaded on %s outside the router: counting it as loaded", name, base)
                    self.events.emit("found", name, "loaded outside the router")
                    self._submit(ModelFound(name))
            for v in self.views():
                if v.base == base and v.state is State.LOADED and v.since < started and v.name not in cards.adapters:
                    self.mark_gone(v.name, f"not in {base}'s /v1/models: unloaded outside the router")

    def is_adapter(self, model: str) -> bool:
        return any(v.name == model and v.base is not None for v in self.views())

    def mark_gone(self, model: str, reason: str) -> None:
        """An adapter the router thought loaded is not (the engine said so)."""
        log.warning("Adapter %s is gone: %s", model, reason)
        self.events.emit("gone", model, reason)
        self._submit(ModelExited(model, reason, failed=False))

    def add_adapter(self, name: str, path: str, base: str) -> None:
        self.catalog.dynamic[name] = (path, base)
        if isinstance(self.driver, MultiDriver) and self._lora is not None:
            self.driver.add(self._lora, [name])
        self._submit(ModelAdded(name, ModelSpec(base=base)))

    async def resolve(self, name: str) -> Target:
        """What a client's model name means; 404 with the available names when nothing."""
        target = self.catalog.lookup(name)
        if target is None and self.config.endpoint_mode:
            await self.sync()  # the engine may serve it since the last look
            target = self.catalog.lookup(name)
        if target is None:
            if self.config.endpoint_mode and self.endpoint_driver and self.endpoint_driver.reachable is False:
                raise BadGateway(f"cannot reach the vLLM engine at {self.config.endpoint} to look up model "
                                 f"`{name}`: {self.endpoint_driver.last_error}")
            raise ModelNotFound(name, self.catalog.available())
        if not self.scheduler.knows(target.model):
            self.add_adapter(target.model, self.catalog.adapter_path(target.model), ENGINE)
        return target

    # ------------------------------------------------------- usage history
    def _open_store(self) -> Store:
        """The usage history in ``state_dir/state.db``, owned by one router at a time (a second router on the
        same state_dir keeps its history in memory, so the two never mix their LRU orders)."""
        if not self.config.state_dir:
            return Store.open(":memory:")
        directory = Path(self.config.state_dir).expanduser()
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(directory / "state.db.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("Usage history not persisted: cannot use %s (%s)", directory, e)
            return Store.open(":memory:")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.warning("Usage history not persisted: another router uses %s", directory)
            return Store.open(":memory:")
        self._store_lock = fd
        try:
            return Store.open(directory / "state.db")
        except Exception as e:  # a broken file must not stop the router
            log.warning("Usage history not persisted: %s", e)
            return Store.open(":memory:")

    def _remember(self, event: LifecycleEvent) -> None:
        """Usage history for restarts and predictions: loads, and what is resident (not while shutting
        down: ``restore`` brings back what was resident before the stop)."""
        if event.model is None or self.store.closed:
            return
        if event.kind in ("loaded", "load_failed"):
            seconds = event.data.get("seconds")
            self.store.record_load(event.model, float(seconds) if isinstance(seconds, int | float) else 0.0,
                                   event.kind == "loaded", event.time)
        if event.kind in ("loaded", "unloaded", "slept", "woken", "exited") and not self._closing:
            self.store.set_resident(self.scheduler.resident())

    def predicted_candidates(self) -> list[str]:
        eligible = {n for n, m in self.config.models.items()
                    if not m.is_adapter and (self.config.preload_predicted or m.preload == "predicted")}
        return [n for n in ranked_models(self.store.histories(), time.time()) if n in eligible]

    PREDICT_INTERVAL = 5.0  # seconds between two looks for an idle moment with free capacity

    async def _predict_loop(self) -> None:
        """When the router is idle and has room, load the model most likely to be requested next."""
        while True:
            await asyncio.sleep(self.PREDICT_INTERVAL)
            try:
                views = self.views()
                busy = any(v.in_flight or v.waiting or v.state in (State.LOADING, State.UNLOADING, State.WAKING)
                           for v in views)
                if busy:
                    continue
                states = {v.name: v.state for v in views}
                for name in self.predicted_candidates():
                    if states.get(name) in (State.UNLOADED, State.FAILED, State.SLEEPING):
                        log.info("Preloading model %s: most likely to be requested next", name)
                        self.events.emit("preload", name, "predicted from usage history")
                        self._submit(Preload(name))  # only if it fits without evicting anything
                        break
                    if states.get(name) is State.LOADED:
                        continue
            except Exception:
                log.exception("predictive preload failed")

    GPU_INTERVAL = 2.0  # seconds between two looks at what other processes hold on the GPUs

    def _reserved_gb(self) -> dict[int, float]:
        reserved: dict[int, float] = {g: 0.0 for g in self.gpu_budgets or {}}
        for v in self.views():
            if v.state in (State.LOADING, State.LOADED, State.UNLOADING, State.FALLING_ASLEEP, State.WAKING):
                for g in v.gpus:
                    reserved[g] = reserved.get(g, 0.0) + v.memory_gb
        return reserved

    def _note_foreign_usage(self) -> None:
        """Tell the scheduler what others hold on each GPU (changes under half a GB are ignored)."""
        if self.gpuwatch is None:
            return
        foreign = {g: round(gb * 2) / 2 for g, gb in self.gpuwatch.foreign_gb(self._reserved_gb()).items()}
        if foreign != self._foreign:
            self._foreign = foreign
            self._submit(GpuUsage(tuple(sorted(foreign.items()))))

    async def _gpu_loop(self) -> None:
        while True:
            await asyncio.sleep(self.GPU_INTERVAL)
            try:
                self._note_foreign_usage()
            except Exception:  # NVML hiccups must not end the loop
                log.exception("reading GPU usage failed")

    def _model_exited(self, model: str, reason: str) -> None:
        self.events.emit("exited", model, reason)
        self._submit(ModelExited(model, reason))

    # ------------------------------------------------------------ requests
    async def acquire(self, model: str) -> int:
        """Wait until ``model`` is resident and this request holds an in-flight slot on it."""
        if self._closing:
            raise shutting_down()
        req_id = next(self._ids)
        self.store.record_request(model, time.time())
        fut: asyncio.Future[str] = self._loop.create_future()
        self._futures[req_id] = fut
        self._submit(RequestArrived(req_id, model))
        try:
            await fut
        except asyncio.CancelledError:
            # the client went away while waiting (or was granted in the same instant): give it back
            self._futures.pop(req_id, None)
            self._submit(RequestCancelled(req_id))
            raise
        except BaseException:
            self._futures.pop(req_id, None)
            raise
        return req_id

    def release(self, req_id: int) -> None:
        self._futures.pop(req_id, None)
        self._submit(RequestFinished(req_id))

    async def load(self, model: str) -> None:
        """Make a model resident (operator's request) without sending it anything."""
        self.release(await self.acquire(model))

    async def unload(self, model: str, force: bool = False) -> None:
        """Unload a model; gracefully waits for its in-flight requests unless ``force``."""
        self._submit(AdminUnload(model, force))
        await self.wait_for(lambda: self.scheduler.state_of(model) not in (State.LOADED, State.UNLOADING))

    def set_pinned(self, model: str, pinned: bool) -> None:
        """A pinned model is never evicted (an operator may still unload it); it counts against capacity."""
        self.events.emit("pinned" if pinned else "unpinned", model, "operator")
        self._submit(SetPinned(model, pinned))

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._watchers.append((predicate, fut))
        try:
            await fut
        finally:
            self._watchers = [(p, f) for p, f in self._watchers if f is not fut]

    def views(self) -> list[ModelView]:
        return self.scheduler.view()

    # -------------------------------------------------------- event pump
    def _submit(self, event: Event) -> None:
        self._pending.append(event)
        if self._busy:
            return
        self._busy = True
        try:
            while self._pending:
                ev = self._pending.popleft()
                now = self._loop.time()
                if isinstance(ev, Tick):
                    now = max(now, self._timer_when)
                for effect in self.scheduler.handle(ev, now):
                    self._execute(effect)
            for predicate, fut in list(self._watchers):
                if not fut.done() and predicate():
                    fut.set_result(None)
        finally:
            self._busy = False

    def _execute(self, effect: Effect) -> None:
        match effect:
            case Grant(req_id, model):
                fut = self._futures.get(req_id)
                if fut is None or fut.done():
                    self._pending.append(RequestFinished(req_id))  # its client is gone already
                else:
                    fut.set_result(model)
            case Reject(req_id, model, status, message, retry_after):
                fut = self._futures.pop(req_id, None)
                if status == 504:
                    log.warning("Timed out waiting for model to load: %s (request %d)", model, req_id)
                self.events.emit("rejected", model, message, status=status)
                if fut is not None and not fut.done():
                    err: RouterError = (
                        GatewayTimeout(message) if status == 504
                        else BadGateway(message) if status == 502
                        else TooManyRequests(message, headers={"Retry-After": str(math.ceil(retry_after or 1))})
                        if status == 429
                        else ModelUnavailable(message)
                    )
                    fut.set_exception(err)
            case StartLoad(model, gpus):
                adapter = self.catalog.adapter_path(model) if self.is_adapter(model) else None
                log.info("Loading model %s as served name %s", adapter or model, model)
                self.events.emit("load_started", model, "requested")
                self._spawn(model, self._load(model, gpus))
            case StopModel(model, reason, force):
                log.info("Unloading model %s (%s)", model, reason)
                self.events.emit("unloading", model, reason, force=force)
                previous = self._tasks.get(model)
                self._spawn(model, self._stop(model, force, previous))
            case SleepModel(model, level, reason):
                log.info("Putting model %s to sleep (level %d): %s", model, level, reason)
                self.events.emit("sleep_started", model, reason, level=level)
                self._spawn(model, self._sleep(model, level))
            case WakeModel(model, level):
                log.info("Waking model %s (sleeping at level %d)", model, level)
                self.events.emit("wake_started", model, "requested", level=level)
                self._spawn(model, self._wake(model, level))
            case WakeAt(when):
                if self._timer is not None:
                    self._timer.cancel()
                self._timer_when = when
                self._timer = self._loop.call_at(when, self._submit, Tick())
            case _:
                raise TypeError(f"unknown effect {effect!r}")

    def _spawn(self, model: str, coro: Any) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro, name=f"{model}")
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
            if self.gpuwatch is not None and model in self.needs:
                await self.gpuwatch.ensure_free(model, gpus, self.needs[model].gb)
            await self.driver.start(model, gpus)
        except LoadError as e:
            log.error("Failed to load model %s: %s", model, e)
            self.events.emit("load_failed", model, str(e), seconds=time.monotonic() - started)
            self._submit(LoadDone(model, False, str(e), e.status))
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a driver bug must still answer the waiters
            log.exception("Failed to load model %s", model)
            self.events.emit("load_failed", model, f"internal error: {e!r}", seconds=time.monotonic() - started)
            self._submit(LoadDone(model, False, f"internal error: {e!r}"))
            return
        seconds = time.monotonic() - started
        log.info("Model %s loaded in %.2fs", model, seconds)
        self.events.emit("loaded", model, "ready", seconds=seconds)
        self._submit(LoadDone(model, True))

    async def _sleep(self, model: str, level: int) -> None:
        started = time.monotonic()
        try:
            await self.driver.sleep(model, level)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("Could not put model %s to sleep: %s", model, e)
            self.events.emit("sleep_failed", model, str(e), level=level)
            self._submit(SleepDone(model, False, str(e)))
            return
        seconds = time.monotonic() - started
        log.info("Model %s is asleep (level %d) after %.2fs", model, level, seconds)
        self.events.emit("slept", model, f"level {level}", level=level, seconds=seconds)
        self._submit(SleepDone(model, True))

    async def _wake(self, model: str, level: int) -> None:
        started = time.monotonic()
        cfg = self.config.models.get(model)
        try:
            await self.driver.wake(model, level, warmup=cfg.warmup if cfg else False)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("Failed to wake model %s: %s (falling back to a cold start)", model, e)
            self.events.emit("wake_failed", model, str(e), seconds=time.monotonic() - started)
            self._submit(WakeDone(model, False, str(e)))
            return
        seconds = time.monotonic() - started
        log.info("Model %s is awake after %.2fs", model, seconds)
        self.events.emit("woken", model, f"level {level}", level=level, seconds=seconds)
        self._submit(WakeDone(model, True))

    async def _stop(self, model: str, force: bool, previous: asyncio.Task[None] | None) -> None:
        pids = set(self.driver.pids(model))
        gpus = next((v.gpus for v in self.views() if v.name == model), ())
        watch = self.gpuwatch if gpus and model in self.needs else None
        free_before = watch.free_gb(gpus) if watch is not None else {}
        if previous is not None and not previous.done():
            previous.cancel()  # a load in progress: its cleanup reaps the process
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous
        try:
            await self.driver.stop(model, force)
        except Exception:
            log.exception("error while stopping %s", model)
        pids |= set(self.driver.pids(model))  # (none, normally: the driver waited for the group to go)
        if watch is not None:
            report = await watch.wait_released(model, gpus, pids, self.needs[model].gb, free_before)
            if report is not None:
                self.events.emit("memory_not_released", model, report)
        log.info("Model %s unloaded", model)
        self.events.emit("unloaded", model, "stopped")
        self._submit(StopDone(model))

    def _our_pids(self) -> set[int]:
        """Every live process of every model the router started (one pass over the process table, not
        one per model: this runs every GPU_INTERVAL on the event loop)."""
        leaders = [pid for v in self.views() if not v.external
                   if isinstance(pid := self.driver.info(v.name).get("pid"), int)]
        return set(procs.members_of_groups(leaders))

    def gpu_view(self) -> list[dict[str, Any]]:
        """Per GPU: total, budget, reserved by resident models, used by others, free (empty without GPUs)."""
        if self.gpuwatch is None or self.gpu_budgets is None:
            return []
        return self.gpuwatch.view(self.gpu_budgets, self._reserved_gb())

    # ----------------------------------------------------------- shutdown
    def stop_accepting(self) -> None:
        """Shutdown has begun: requests waiting for a model, and every request from now on, get a 503;
        requests in flight go on (the server gives them ``shutdown_grace``)."""
        self._closing = True
        for req_id, fut in list(self._futures.items()):
            if not fut.done():  # still waiting: granted ones are in flight
                fut.set_exception(shutting_down())
                self._futures.pop(req_id, None)
                self._submit(RequestCancelled(req_id))

    async def close(self) -> None:
        """Answer every waiter, stop every model, leave no child process behind."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._sync_task is not None:
            self._sync_task.cancel()
        if self._preload_task is not None:
            self._preload_task.cancel()
        if self._gpu_task is not None:
            self._gpu_task.cancel()
        for req_id, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_exception(shutting_down())
            self._futures.pop(req_id, None)
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.driver.close()
        if self._control is not None:
            await self._control.close()
        self.store.close()
        if self._store_lock is not None:
            os.close(self._store_lock)  # releases the flock
            self._store_lock = None
