"""Cluster driver: each unit's engine runs on a node of a Ray cluster, in an actor of its own.

- A unit (``chat``, ``chat@1``) is a detached actor named after it, in this driver's namespace: it outlives
  the router, so a restarted router finds it again (``adopt``), and two live copies of one unit cannot
  exist (the second creation fails on the name). It reserves the GPUs it was placed on from Ray
  (``num_gpus``: their number, or the fraction the placement gives when small models share a GPU), pinned to
  the chosen node (hard node affinity: a unit never runs anywhere but where the router accounted for it).
- The actor (ray_actor.py) starts the engine with the local ProcessDriver, so readiness, logs and stopping
  are those of a local engine; its endpoint is ``http://<node address>:<port>``.
- Where a unit goes is the caller's decision: ``where(unit, gpus)`` gives the node and the node's own GPU
  indices (the engine's CUDA_VISIBLE_DEVICES); Ray's own GPU ids are only its accounting.
- A unit is gone when its engine exited on its own (the actor says so) or its actor died (its node was
  lost): the exit callback is called once the actor is killed. Its processes are on another machine: ``pids``
  is empty, and ``logs`` are the lines fetched from the actor, every ``LOG_POLL_S``.
- Sleep mode is the local one (sleep_mode.py), spoken straight to the engine at its endpoint, not through
  Ray: the actor, its engine process and its GPUs stay, only the engine's memory changes. Ray cannot shrink
  an actor's reservation, so a unit of a model that sleeps reserves only what it holds asleep
  (runtime/cluster.py). A restarted router does not adopt an engine that is asleep: nothing would wake
  it (as restart recovery on one machine).
- Ray calls that block (a name lookup, a kill) run in a thread; results are awaited, never waited for.
- ``ray.init`` is the caller's: this driver uses the connection it finds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import aiohttp
import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from vllm_model_router.config import ModelConfig
from vllm_model_router.config.cluster import RAY_UNIT
from vllm_model_router.drivers import sleep_mode
from vllm_model_router.drivers.base import ExitCallback, LoadError
from vllm_model_router.drivers.process import LOG_LINES
from vllm_model_router.drivers.ray_actor import EngineActor

log = logging.getLogger("vllm_model_router.ray")
NAMESPACE = "vllm-model-router"
LOG_POLL_S = 1.0  # how often a running unit's new output lines are fetched
CALL_TIMEOUT_S = 5.0  # a quick question to an actor (its status, its new lines)
STOP_GRACE_S = 10.0  # beyond the unit's stop_timeout, for the actor's stop to answer
GONE_TIMEOUT_S = 15.0  # for a killed actor's name (and its resources) to be released
UNKNOWN_STOP_S = 30.0  # the stop_timeout of an engine whose unit the config no longer has
_ENGINE_ACTOR = ray.remote(EngineActor)


class Placement(NamedTuple):
    """Where a unit runs: a Ray node, the node's GPU indices it uses, and what it reserves from Ray (the
    number of ``gpus`` unless a fraction is given: units sharing a GPU)."""

    node_id: str
    gpus: tuple[int, ...] = ()
    num_gpus: float | None = None


Where = Callable[[str, tuple[int, ...]], "Placement | tuple[str, tuple[int, ...]]"]


@dataclass
class _Unit:
    name: str
    actor: Any  # its Ray actor handle
    namespace: str
    placement: Placement
    placed: dict[str, Any] | None = None  # where the actor runs, once it answered
    status: dict[str, Any] = field(default_factory=dict)
    endpoint: str | None = None
    seen: int = 0  # output lines of the actor's already fetched
    stopping: bool = False
    fetching: asyncio.Lock = field(default_factory=asyncio.Lock)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class RayEngineDriver:
    def __init__(self, models: Mapping[str, ModelConfig], where: Where, namespace: str = NAMESPACE,
                 resources: Mapping[str, float] | None = None, placement_timeout: float = 60.0) -> None:
        self._models = models
        self._where = where
        self._namespace = namespace
        self._resources = dict(resources or {})
        self._placement_timeout = placement_timeout
        self._units: dict[str, _Unit] = {}
        self._logs: dict[str, deque[str]] = {name: deque(maxlen=LOG_LINES) for name in models}
        self._on_exit: ExitCallback = lambda unit, reason: None
        self._session: aiohttp.ClientSession | None = None  # sleep mode's calls to the engines

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    def manages(self, unit: str) -> bool:
        return unit in self._models

    # ------------------------------------------------------------------ start
    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        cfg = self._models[model]
        if model in self._units:
            raise LoadError(f"{model} is already running on the cluster")
        if not ray.is_initialized():
            raise LoadError("not connected to a Ray cluster")
        where = self._where(model, gpus)
        placement = where if isinstance(where, Placement) else Placement(*where)
        num_gpus = float(len(placement.gpus)) if placement.num_gpus is None else placement.num_gpus
        self._note(model, f"--- starting on node {placement.node_id} (GPUs {list(placement.gpus)}, "
                          f"{num_gpus:g} reserved from Ray)")
        # no CPUs: what places a unit is its GPUs (and the resources asked for), never Ray's CPU count
        options = {"name": model, "namespace": self._namespace, "lifetime": "detached", "max_restarts": 0,
                   "num_cpus": 0, "num_gpus": num_gpus, "resources": dict(cfg.resources) or self._resources,
                   "scheduling_strategy": NodeAffinitySchedulingStrategy(placement.node_id, soft=False)}
        creating = asyncio.ensure_future(asyncio.to_thread(_create_actor, options, model, cfg))
        try:
            actor = await asyncio.shield(creating)
        except asyncio.CancelledError:  # it may still come into being: it must not stay
            with contextlib.suppress(Exception):
                await asyncio.shield(self._teardown(_Unit(model, await creating, self._namespace, placement)))
            raise
        except ValueError as e:  # the name is taken (ActorAlreadyExistsError)
            raise LoadError(f"{model} already has a Ray actor in namespace {self._namespace!r} (a running "
                            f"engine of it, or one being stopped): {_brief(e)}") from e
        except RayError as e:
            raise LoadError(f"cannot create its Ray actor: {_brief(e)}") from e
        unit = _Unit(model, actor, self._namespace, placement)
        self._units[model] = unit
        try:
            await self._bring_up(unit, cfg, num_gpus)
        except BaseException:  # failed or cancelled (a stop during the load): leave nothing running
            await asyncio.shield(self._teardown(unit))
            raise
        log.info("Model %s ready at %s on node %s", model, unit.endpoint, placement.node_id)

    async def _bring_up(self, unit: _Unit, cfg: ModelConfig, num_gpus: float) -> None:
        node = unit.placement.node_id
        try:
            unit.placed = await asyncio.wait_for(_awaited(unit.actor.place.remote()), self._placement_timeout)
        except TimeoutError:
            wanted = dict(cfg.resources) or self._resources
            lacks = f"{num_gpus:g} free GPU(s)" + (f" or the resources {wanted}" if wanted else "")
            raise LoadError(f"Ray did not start its actor on node {node} within {self._placement_timeout:g}s: "
                            f"the node lacks {lacks} (another unit may hold them), or it is gone") from None
        except RayError as e:
            raise LoadError(f"its Ray actor could not be started on node {node}: {_brief(e)}") from e
        try:
            answer = await unit.actor.start.remote(unit.placement.gpus)
        except RayError as e:
            raise LoadError(f"its Ray actor on node {node} died while loading: {_brief(e)}", 502) from e
        finally:
            with contextlib.suppress(RayError, TimeoutError):
                await self._fetch_lines(unit)
        if "error" in answer:
            raise LoadError(str(answer["error"]), int(answer.get("status", 503)))
        self._serving(unit, answer)

    def _serving(self, unit: _Unit, status: dict[str, Any]) -> None:
        unit.status, unit.placed, unit.endpoint = status, status, str(status["endpoint"])
        unit.tasks = [asyncio.create_task(self._watch(unit), name=f"ray-watch:{unit.name}"),
                      asyncio.create_task(self._follow(unit), name=f"ray-logs:{unit.name}")]

    # ------------------------------------------------------------------- stop
    async def stop(self, model: str, force: bool = False) -> None:
        unit = self._units.get(model)
        if unit is None:
            return
        await self._teardown(unit, force)
        self._note(model, "--- stopped")

    async def _teardown(self, unit: _Unit, force: bool = False) -> None:
        """Stop the engine through its actor (its process group, as a local one), then kill the actor and
        wait until Ray has released its name and resources. An actor that is gone already, or was never
        placed, is just killed: its engine, if any, dies with it."""
        unit.stopping = True
        for task in unit.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        if unit.placed is not None:
            cfg = self._models.get(unit.name)
            timeout = (cfg.stop_timeout if cfg is not None else UNKNOWN_STOP_S) + STOP_GRACE_S
            with contextlib.suppress(RayError, TimeoutError):
                await asyncio.wait_for(_awaited(unit.actor.stop.remote(force)), timeout)
            with contextlib.suppress(RayError, TimeoutError):
                await self._fetch_lines(unit)
            with contextlib.suppress(RayError, TimeoutError):  # its log directory on the node goes too
                await asyncio.wait_for(_awaited(unit.actor.close.remote()), CALL_TIMEOUT_S)
        with contextlib.suppress(RayError, ValueError):
            await asyncio.to_thread(ray.kill, unit.actor, no_restart=True)
        if not await self._released(unit):
            log.warning("The Ray actor of %s (namespace %s) still holds its name %.0fs after it was killed",
                        unit.name, unit.namespace, GONE_TIMEOUT_S)
        if self._units.get(unit.name) is unit:
            del self._units[unit.name]

    async def _released(self, unit: _Unit) -> bool:
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while await asyncio.to_thread(_actor_named, unit.name, unit.namespace) is not None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(m) for m in list(self._units)), return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # ------------------------------------------------------------- watching
    async def _watch(self, unit: _Unit) -> None:
        """Until the engine exits on its own (the actor answers why) or the actor dies (its node was lost,
        or it crashed): then kill the actor and say so."""
        where = f"node {unit.placement.node_id} ({(unit.placed or {}).get('host', '?')})"
        try:
            reason = f"engine on {where}: {await unit.actor.wait_exit.remote()}"
        except RayError as e:
            reason = f"its Ray actor on {where} died: {_brief(e)}"
        if unit.stopping:
            return
        log.error("Model %s exited unexpectedly: %s", unit.name, reason)
        await self._teardown(unit, force=True)
        self._note(unit.name, f"--- exited: {reason.splitlines()[0]}")
        self._on_exit(unit.name, reason)

    async def _follow(self, unit: _Unit) -> None:
        while True:
            await asyncio.sleep(LOG_POLL_S)
            with contextlib.suppress(RayError, TimeoutError):
                await self._fetch_lines(unit)

    async def _fetch_lines(self, unit: _Unit) -> None:
        async with unit.fetching:  # the follower and a stop may both ask: each line is taken once
            count, lines = await asyncio.wait_for(_awaited(unit.actor.lines_since.remote(unit.seen)),
                                                  CALL_TIMEOUT_S)
            if count - unit.seen > len(lines):
                self._note(unit.name, f"--- {count - unit.seen - len(lines)} lines of output not fetched in time")
            unit.seen = count
        mlog = logging.getLogger(f"vllm_model_router.model.{unit.name}")
        for line in lines:
            self._logs.setdefault(unit.name, deque(maxlen=LOG_LINES)).append(line)
            mlog.info("[%s] %s", unit.name, line)

    def _note(self, unit: str, line: str) -> None:
        self._logs.setdefault(unit, deque(maxlen=LOG_LINES)).append(line)

    # ----------------------------------------------------------------- adopt
    async def adopt(self, namespace: str | None = None) -> dict[str, str]:
        """Take over the engines a previous router left running: every unit of this driver that has a live
        actor in ``namespace`` (this driver's by default) whose engine answers. An actor of one of its units
        that does not answer, or has no engine serving, is killed: nothing else would release its GPUs and
        its name. An engine actor of a unit the config no longer has (a model removed, a replica beyond its
        count) is stopped too: its GPUs would stay taken in Ray's books and free in the router's. Other
        programs' actors are left alone. Returns unit -> endpoint."""
        if not ray.is_initialized():
            raise LoadError("not connected to a Ray cluster")
        ns = namespace or self._namespace
        adopted: dict[str, str] = {}
        unconfigured: list[_Unit] = []
        for name in await asyncio.to_thread(_named_actors, ns):
            if name in self._units:
                continue
            actor = await asyncio.to_thread(_actor_named, name, ns)
            if actor is None:
                continue
            if name not in self._models:
                unconfigured.append(_Unit(name, actor, ns, Placement("")))
                continue
            unit = _Unit(name, actor, ns, Placement(""))
            try:
                status = await asyncio.wait_for(_awaited(actor.status.remote()), CALL_TIMEOUT_S)
            except (RayError, TimeoutError, AttributeError) as e:
                log.warning("Ray actor of %s does not answer (%s): killing it", name, _brief(e))
                await self._teardown(unit, force=True)
                continue
            unit.placed = status
            if not status.get("endpoint"):
                log.warning("Ray actor of %s has no engine serving: stopping it", name)
                await self._teardown(unit, force=True)
                continue
            if self._models[name].sleep_level and not await self._says_awake(str(status["endpoint"])):
                log.warning("Ray actor of %s has its engine asleep (or it does not say it is awake): stopping it",
                            name)
                await self._teardown(unit, force=True)
                continue
            unit.placement = Placement(str(status["node"]), tuple(status["gpus"]),
                                       float(status.get("resources", {}).get("GPU", 0.0)))
            self._units[name] = unit
            self._note(name, f"--- adopted after a router restart: Ray actor on node {unit.placement.node_id}, "
                             f"{status['endpoint']}")
            self._serving(unit, status)
            adopted[name] = str(status["endpoint"])
            log.info("Model %s adopted: %s on node %s", name, adopted[name], unit.placement.node_id)
        for failed in await asyncio.gather(*(self._stop_unconfigured(u) for u in unconfigured), return_exceptions=True):
            if isinstance(failed, Exception):  # (each stop may take its stop_timeout: side by side)
                log.warning("Cannot stop an engine of no configured unit: %r", failed)
        return adopted

    async def _stop_unconfigured(self, unit: _Unit) -> None:
        """An actor of a name the config does not have: stopped if it is an engine's (it answers as one)."""
        if not callable(getattr(unit.actor, "wait_exit", None)):  # not an EngineActor: another program's
            log.warning("Ray actor %r in namespace %r is not the router's: left alone", unit.name, unit.namespace)
            return
        with contextlib.suppress(RayError, TimeoutError):
            unit.placed = await asyncio.wait_for(_awaited(unit.actor.status.remote()), CALL_TIMEOUT_S)
        log.warning("Ray actor %s/%s runs an engine of no configured unit: stopping it", unit.namespace, unit.name)
        await self._teardown(unit)

    async def alive(self, model: str) -> bool:
        """Whether the unit's actor still answers with its engine serving (a request's connection to it
        broke: its node may be gone, which the watcher will report)."""
        unit = self._units.get(model)
        if unit is None or unit.stopping:
            return False
        try:
            status = await asyncio.wait_for(_awaited(unit.actor.status.remote()), CALL_TIMEOUT_S)
        except (RayError, TimeoutError):
            return False
        return bool(status.get("endpoint"))

    # ------------------------------------------------------------------ views
    def placement_of(self, model: str) -> Placement:
        """Where a running unit is (an adopted one: as its actor reported)."""
        unit = self._units.get(model)
        return unit.placement if unit is not None else Placement("")

    def endpoint(self, model: str) -> str | None:
        unit = self._units.get(model)
        return unit.endpoint if unit is not None and not unit.stopping else None

    def info(self, model: str) -> dict[str, Any]:
        """No local pid: the engine is another machine's process (``remote_pid`` says which)."""
        unit = self._units.get(model)
        if unit is None:
            return {"pid": None, "port": None}
        placed = unit.placed or {}
        return {"pid": None, "port": unit.status.get("port"), "node": unit.placement.node_id,
                "host": placed.get("host"), "remote_pid": unit.status.get("pid"),
                "ray_actor": f"{unit.namespace}/{unit.name}", "ray_resources": placed.get("resources", {})}

    def logs(self, model: str, lines: int) -> list[str]:
        buf = self._logs.get(model)
        return list(buf)[-lines:] if buf is not None and lines > 0 else []

    def pids(self, model: str) -> list[int]:
        return []

    # ------------------------------------------------------------ sleep mode
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        return self._session

    def _engine(self, model: str) -> sleep_mode.Call:
        """Calls to the unit's engine on its node, for the sleep-mode protocol (sleep_mode.py)."""
        endpoint = self.endpoint(model)
        if endpoint is None:
            raise LoadError(f"{model} is not running on the cluster")
        return sleep_mode.http_call(self._http, endpoint)

    async def sleep(self, model: str, level: int) -> None:
        self._note(model, f"--- sleep level {level}")
        await sleep_mode.sleep(self._engine(model), level)

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        self._note(model, f"--- wake up (from level {level})")
        await sleep_mode.wake(self._engine(model), self._models[model].name, level, warmup)

    async def _says_awake(self, endpoint: str) -> bool:
        try:
            return await sleep_mode.awake(sleep_mode.http_call(self._http, endpoint))
        except LoadError:
            return False


# --------------------------------------------------------------------------------------- Ray calls
def _create_actor(options: dict[str, Any], unit: str, config: ModelConfig) -> Any:
    """Register the named actor (a call to Ray's control store: blocking). Options Ray refuses raise
    ``LoadError`` (a ``ValueError`` there is the name being taken)."""
    try:
        actor_class = _ENGINE_ACTOR.options(**options)
    except ValueError as e:
        raise LoadError(f"Ray refuses the options of its actor: {e}") from e
    return actor_class.remote(unit, config)


def check_options(resources: dict[str, float]) -> None:
    """Raise ``ValueError`` when Ray would refuse an actor that asks for ``resources`` (no cluster needed)."""
    _ENGINE_ACTOR.options(num_cpus=0, num_gpus=RAY_UNIT, resources=resources)


def _actor_named(name: str, namespace: str) -> Any:
    """The live actor called ``name`` in ``namespace``, None when there is none (blocking)."""
    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def _named_actors(namespace: str) -> list[str]:
    """The names of the live named actors of ``namespace`` (blocking)."""
    found = ray.util.list_named_actors(all_namespaces=True)
    return [str(a["name"]) for a in found if a.get("namespace") == namespace]


async def _awaited(ref: Any) -> Any:
    """Await a Ray object reference (asyncio.wait_for wants a coroutine or a future)."""
    return await ref


def _brief(error: BaseException) -> str:
    """A Ray error without its details (the actor's id, pid, namespace; a remote traceback): its sentences,
    and what follows "because" ("The actor died because its node has died ... received SIGTERM")."""
    lines = str(error).strip().splitlines()
    kept = [ln.strip() for i, ln in enumerate(lines)
            if ln.strip() and (not ln[0].isspace() or (i > 0 and "because" in lines[i - 1]))]
    return " ".join(kept[:4])[:400] or type(error).__name__
