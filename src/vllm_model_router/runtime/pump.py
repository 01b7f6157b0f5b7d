"""The event pump: the async shell around the pure scheduler, the only place that owns it and carries
out its effects.

Everything runs on one event loop thread, and ``submit`` feeds an event to the scheduler and executes
the resulting effects without awaiting in between, so no decision is ever taken from a stale snapshot.
Effects that need time (a load, a stop, a sleep, a wake) run as tasks and report back with events.
Events raised while effects are being executed (a task finishing synchronously, a cancelled waiter) are
queued and handled after the current batch, in order: the scheduler never sees re-entrant calls.

A request is a lease: ``acquire`` waits for the scheduler's Grant, ``release`` (always called in a
``finally``) returns the in-flight slot, so a client that disconnects can never pin a model forever.

The parts that feed the pump from outside (adapters.py, history.py, gpu_monitor.py, recovery.py) use only
its public side (``submit``, ``views``, ``now``...; see base.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from typing import Any

from vllm_model_router.config import ConfigError, RouterConfig
from vllm_model_router.config.specs import scheduler_specs
from vllm_model_router.drivers.base import Driver
from vllm_model_router.errors import (
    BadGateway,
    GatewayTimeout,
    ModelUnavailable,
    RouterError,
    ServiceUnavailable,
    TooManyRequests,
)
from vllm_model_router.gpu.probe import GpuProbe, NvmlProbe
from vllm_model_router.runtime.adapters import AdapterSync
from vllm_model_router.runtime.catalog import Catalog
from vllm_model_router.runtime.gpu_monitor import GpuMonitor
from vllm_model_router.runtime.history import UsageRecorder
from vllm_model_router.runtime.pressure import PressureWatch
from vllm_model_router.runtime.tasks import ModelTasks
from vllm_model_router.scheduler import (
    AdminUnload,
    Effect,
    Event,
    Grant,
    ModelExited,
    ModelView,
    Preload,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    SetPinned,
    SetReplicas,
    SleepModel,
    StartLoad,
    State,
    StopModel,
    Tick,
    TimerAt,
    WakeModel,
)
from vllm_model_router.state.lifecycle import EventKind, EventLog

log = logging.getLogger("vllm_model_router.runtime")


AUTO = "auto"


def shutting_down(what: str = "") -> ServiceUnavailable:
    """The error for requests the router turns away or cuts off because it is shutting down."""
    prefix = f"{what}: " if what else ""
    return ServiceUnavailable(f"{prefix}the router is shutting down; retry shortly", headers={"Retry-After": "1"})


def _rejection(status: int, message: str, retry_after: float | None) -> RouterError:
    """The error a rejected request is answered with."""
    if status == 504:
        return GatewayTimeout(message)
    if status == 502:
        return BadGateway(message)
    if status == 429:
        return TooManyRequests(message, headers={"Retry-After": str(math.ceil(retry_after or 1))})
    return ModelUnavailable(message)


class Runtime:
    """The event pump, and the owner of the parts around it: the catalog of names, the adapter sync
    (``adapters``), the usage history (``history``), the GPU monitor (``gpus``), the tasks that carry out
    slow effects, and the lifecycle event log (``events``)."""

    def __init__(self, config: RouterConfig, driver: Driver | None = None,
                 probe: GpuProbe | str | None = AUTO,
                 topology: tuple[Mapping[int, float], Mapping[int, str], Mapping[str, Collection[str]]] | None = None,
                 ) -> None:
        """``topology``: the GPUs of a cluster (budgets, and the node each is on) instead of this machine's,
        and the resource names each node offers."""
        if config.cluster.backend != "local" and driver is None:
            # never quietly start every engine on this machine when the config says a cluster
            raise ConfigError([f"cluster.backend: {config.cluster.backend!r} needs the cluster's driver"])
        self.config = config
        self._loop = asyncio.get_running_loop()
        self.gpus = GpuMonitor(config, NvmlProbe.create() if isinstance(probe, str) else probe, self)
        self.events = EventLog()
        self.catalog = Catalog(config)
        self.adapters = AdapterSync(config, self.catalog, self.events, self)
        self.driver: Driver = driver if driver is not None else self.adapters.default_driver()
        self.history = UsageRecorder(config, self.events, self)
        self.pressure = PressureWatch(config, self, self.events)
        self._scheduler = Scheduler(
            SchedulerConfig(
                models=scheduler_specs(config, self.gpus.needs, self.gpus.weights),
                host_memory_gb=config.host_memory_gb,
                host_overflow=config.host_overflow,
                keep_idle=config.keep_idle,
                keep_idle_reloads=config.keep_idle_reloads,
                max_waiting_total=config.max_waiting,
                last_used=self.history.last_used(self._loop.time()),
                gpu_memory_gb=topology[0] if topology is not None else self.gpus.budgets,
                gpu_nodes=topology[1] if topology is not None else None,
                node_resources=topology[2] if topology is not None else None,
                max_resident=config.max_resident,
                memory_gb=config.memory_gb,
                load_timeout=config.load_timeout,
                max_wait=config.max_wait,
            ),
            now=self._loop.time(),
        )
        self._ids = itertools.count(1)
        self._futures: dict[int, asyncio.Future[str]] = {}
        self._units: dict[int, str] = {}  # request -> the unit (replica) it was granted on
        self._tasks = ModelTasks(config, self.gpus, self.events, self)
        self._pending: deque[Event] = deque()
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._watchers: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._exit_watch: dict[str, set[Callable[[str], None]]] = {}  # unit -> requests in its server's hands
        self._closing = False
        self.started_wall = time.time()
        # the cluster's nodes with GPUs (cluster.backend ray: node, address, GPUs); none on one machine
        self.nodes: Callable[[], list[dict[str, Any]]] = list
        self.driver.set_exit_callback(self.model_exited)
        for name, m in config.models.items():
            if m.pinned:
                self.submit(SetPinned(name, True))

    async def start(self) -> None:
        """Background work: preload what the config (or, with ``restore``, the last run) asks for; watch
        the GPUs; predictive preloading; reconcile adapters with the engines, now and periodically."""
        first = [n for n, m in self.config.models.items() if m.preload is True]
        first += [n for n in self.history.to_restore() if n not in first]
        for name in first:  # in config order, while capacity allows (a Preload never evicts)
            self.submit(Preload(name))
        for name, m in self.config.models.items():  # the replicas models keep, now that recovery adopted its
            if m.replicas.min and m.copies > 1:     # share: kept ones still missing are brought in
                self.submit(SetReplicas(name, m.replicas.min, trim=False))
            elif m.replicas.min:  # one copy, kept: like preload and pinned
                self.submit(Preload(name))
        self.pressure.start()
        self.gpus.start()
        self.history.start()
        await self.adapters.start()

    # ------------------------------------------------------------ what the parts and the HTTP layer read
    @property
    def closing(self) -> bool:
        return self._closing

    def now(self) -> float:
        return self._loop.time()

    def wall_time(self, loop_time: float | None) -> float | None:
        """A time on the event loop's clock (the scheduler's) as Unix time, for humans."""
        return None if loop_time is None else time.time() - (self._loop.time() - loop_time)

    def views(self) -> list[ModelView]:
        return self._scheduler.view()

    def state_of(self, model: str) -> State:
        return self._scheduler.state_of(model)

    def knows(self, model: str) -> bool:
        return self._scheduler.knows(model)

    def resident(self) -> list[str]:
        return self._scheduler.resident()

    def units(self, model: str) -> list[str]:
        """``model``'s units (its replicas: ``chat``, ``chat@1``...; a model without replicas: itself)."""
        return self._scheduler.units(model)

    # ------------------------------------------------------------ requests and operators
    async def acquire(self, model: str, affinity: int | None = None, eligible: frozenset[str] | None = None) -> int:
        """Wait until ``model`` is resident and this request holds an in-flight slot on it (on one of its
        replicas: ``unit_of`` says which). ``affinity``: a hash of the prompt's start; ``eligible``: the units that
        may take it (see RequestArrived)."""
        if self._closing:
            raise shutting_down()
        req_id = next(self._ids)
        self.history.record_request(model)
        fut: asyncio.Future[str] = self._loop.create_future()
        self._futures[req_id] = fut
        self.submit(RequestArrived(req_id, model, affinity, eligible))
        try:
            await fut
        except asyncio.CancelledError:
            # the client went away while waiting (or was granted in the same instant): give it back
            self._futures.pop(req_id, None)
            self._units.pop(req_id, None)
            self.submit(RequestCancelled(req_id))
            raise
        except BaseException:
            self._futures.pop(req_id, None)
            self._units.pop(req_id, None)
            raise
        return req_id

    def unit_of(self, req_id: int) -> str:
        """The unit (replica) a granted request holds its slot on: where it is to be sent."""
        return self._units[req_id]

    def release(self, req_id: int) -> None:
        self._futures.pop(req_id, None)
        self._units.pop(req_id, None)
        self.submit(RequestFinished(req_id))

    async def load(self, model: str) -> None:
        """Make a model resident (operator's request) without sending it anything."""
        self.release(await self.acquire(model))

    async def unload(self, model: str, force: bool = False) -> None:
        """Unload a model (all its replicas); gracefully waits for its in-flight requests unless ``force``."""
        self.submit(AdminUnload(model, force))
        units = self.units(model)
        await self.wait_for(lambda: all(self._scheduler.state_of(u) not in (State.LOADED, State.UNLOADING)
                                        for u in units))

    async def gone(self, unit: str, within: float = 10.0) -> bool:
        """A request's connection to ``unit`` broke before it answered: whether its server is gone (a
        cluster node lost with it), in which case the scheduler is given ``within`` seconds to hear it, so
        that the request can be planned again elsewhere. Drivers that cannot tell say no."""
        alive = getattr(self.driver, "alive", None)
        if alive is None or await alive(unit):
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait_for(lambda: self._scheduler.state_of(unit) is not State.LOADED), within)
        return self._scheduler.state_of(unit) is not State.LOADED

    def set_replicas(self, model: str, replicas: int) -> None:
        """Keep ``replicas`` copies of ``model`` (within its replicas.min and max): pinned and brought in
        when they fit; resident ones beyond stop once idle."""
        self.events.emit(EventKind.SCALED, model, "operator", replicas=replicas)
        self.submit(SetReplicas(model, replicas))

    def set_pinned(self, model: str, pinned: bool) -> None:
        """A pinned model is never evicted (an operator may still unload it); it counts against capacity."""
        self.events.emit(EventKind.PINNED if pinned else EventKind.UNPINNED, model, "operator")
        self.submit(SetPinned(model, pinned))

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        if predicate():
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        self._watchers.append((predicate, fut))
        try:
            await fut
        finally:
            self._watchers = [(p, f) for p, f in self._watchers if f is not fut]

    # -------------------------------------------------------- event pump
    def submit(self, event: Event) -> None:
        """Hand ``event`` to the scheduler and carry out its effects (queued when already pumping)."""
        self._pending.append(event)
        if self._busy:
            return
        self._busy = True
        try:
            while self._pending:
                ev = self._pending.popleft()
                now = self._loop.time()
                if isinstance(ev, Tick) and ev.due is not None:
                    now = max(now, ev.due)
                for effect in self._scheduler.handle(ev, now):
                    self._execute(effect)
            for predicate, fut in list(self._watchers):
                if not fut.done() and predicate():
                    fut.set_result(None)
        finally:
            self._busy = False

    def _execute(self, effect: Effect) -> None:
        match effect:
            case Grant(req_id, unit):
                fut = self._futures.get(req_id)
                if fut is None or fut.done():
                    self._pending.append(RequestFinished(req_id))  # its client is gone already
                else:
                    self._units[req_id] = unit
                    fut.set_result(unit)
            case Reject(req_id, model, status, message, retry_after):
                fut = self._futures.pop(req_id, None)
                if status == 504:
                    log.warning("Timed out waiting for model to load: %s (request %d)", model, req_id)
                self.events.emit(EventKind.REJECTED, model, message, status=status)
                if fut is not None and not fut.done():
                    fut.set_exception(_rejection(status, message, retry_after))
            case StartLoad(model, gpus):
                adapter = self.catalog.adapter_path(model) if self.adapters.is_adapter(model) else None
                log.info("Loading model %s as served name %s", adapter or model, model)
                self.events.emit(EventKind.LOAD_STARTED, model, "requested")
                self._tasks.load(model, gpus)
            case StopModel(model, reason, detail, force):
                log.info("Unloading model %s (%s)", model, detail)
                self.events.emit(EventKind.UNLOADING, model, detail, cause=reason, force=force)
                self._tasks.stop(model, force)
            case SleepModel(model, level, reason, detail):
                log.info("Putting model %s to sleep (level %d): %s", model, level, detail)
                self.events.emit(EventKind.SLEEP_STARTED, model, detail, cause=reason, level=level)
                self._tasks.sleep(model, level)
            case WakeModel(model, level):
                log.info("Waking model %s (sleeping at level %d)", model, level)
                self.events.emit(EventKind.WAKE_STARTED, model, "requested", level=level)
                self._tasks.wake(model, level)
            case TimerAt(when):
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_at(when, self.submit, Tick(when))
            case _:
                raise TypeError(f"unknown effect {effect!r}")

    def model_exited(self, model: str, reason: str) -> None:
        """A model's server went away by itself (the driver reaped what was left of it): the requests in its
        hands are cut loose (``watch_exit``), then the scheduler hears it."""
        self.events.emit(EventKind.EXITED, model, reason)
        for fire in list(self._exit_watch.pop(model, ())):
            fire(reason)
        self.submit(ModelExited(model, reason))

    def watch_exit(self, unit: str, fire: Callable[[str], None]) -> Callable[[], None]:
        """Have ``fire(reason)`` called if ``unit``'s server exits before the returned function is called."""
        watching = self._exit_watch.setdefault(unit, set())
        watching.add(fire)

        def done() -> None:
            watching.discard(fire)
            if not watching and self._exit_watch.get(unit) is watching:
                del self._exit_watch[unit]
        return done

    # ----------------------------------------------------------- shutdown
    def stop_accepting(self) -> None:
        """Shutdown has begun: requests waiting for a model, and every request from now on, get a 503;
        requests in flight go on (the server gives them ``shutdown_grace``)."""
        self._closing = True
        for req_id, fut in list(self._futures.items()):
            if not fut.done():  # still waiting: granted ones are in flight
                fut.set_exception(shutting_down())
                self._futures.pop(req_id, None)
                self.submit(RequestCancelled(req_id))

    async def close(self) -> None:
        """Answer every waiter, stop every model, leave no child process behind."""
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        self.adapters.stop()
        self.pressure.stop()
        self.history.stop()
        self.gpus.stop()
        for req_id, fut in list(self._futures.items()):
            if not fut.done():
                fut.set_exception(shutting_down())
            self._futures.pop(req_id, None)
        await self._tasks.cancel_all()
        await self.driver.close()
        await self.adapters.close()
        await self.pressure.close()
        self.history.close()
