"""``cluster.backend: ray``: the runtime's side of running the engines on a Ray cluster.

- Connects to the cluster (``cluster.address``, or ``RAY_ADDRESS``) in ``cluster.namespace``; with Ray's
  token authentication, the router's environment needs ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` (or
  ``RAY_AUTH_TOKEN_PATH``), which Ray reads itself.
- The cluster's nodes are the scheduler's GPUs (gpu/ray_nodes.py): every alive node's GPUs, each with
  ``cluster.gpu_memory_gb`` (or ``capacity.memory_gb`` where lower) for the models, with the node each
  one is on, so a unit's GPUs are always on one machine,
  and each node's resource names, so a model that asks for ``resources`` goes only where they are.
- The units run in Ray actors (drivers/ray_engine.py) on the node the scheduler chose; a unit that uses
  one GPU only in part reserves that fraction from Ray (its ``memory_gb`` of the GPU's), so several small
  models share a GPU in Ray's books as in the router's. A unit of a model with ``sleep`` reserves only what
  it holds asleep (``sleeping_memory_gb`` of each of its GPUs): Ray cannot shrink an actor's reservation
  when its engine falls asleep, and the scheduler places other units in the room a sleeper leaves.
- Every ``NODE_POLL_S`` the nodes are read again: a node that joined gives room (``Capacity``), one that
  left takes its GPUs off the books (its units' actors die with it, and the driver reports them gone).
  A lost node stays in the admin view and the metrics, as lost.
- A restarted router adopts the actors its predecessor left running (``ModelFound`` on their GPUs).

Ray is imported only here and in the modules above, and only with this backend.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Collection, Mapping
from typing import Any

from vllm_model_router.config import ConfigError, ModelConfig, RouterConfig
from vllm_model_router.config.cluster import RAY_UNIT
from vllm_model_router.drivers.ray_engine import Placement, RayEngineDriver, check_options
from vllm_model_router.gpu.memory import cluster_gpu_budget
from vllm_model_router.gpu.ray_nodes import Change, RayNodes, import_ray, node_views
from vllm_model_router.runtime.base import Pump
from vllm_model_router.scheduler import ModelFound
from vllm_model_router.state.lifecycle import EventKind, EventLog

log = logging.getLogger("vllm_model_router.cluster")
NODE_POLL_S = 2.0
EXIT_LOOK_S = 5.0  # how long a unit's exit waits for the nodes to be read before it is reported anyway


def gpu_share(memory_gb: float, gpu_memory_gb: float) -> float:
    """``memory_gb`` of a GPU of ``gpu_memory_gb`` as the fraction Ray reserves: rounded down to Ray's unit
    (0.0001), never up, so that the shares of models the router fits on one GPU never add up to more than
    the GPU in Ray's books (rounded to the nearest, 5.5 and 74.5 GB of 80 made 1.0001: Ray refused the
    second), and at least that unit, so that it still needs a node with GPUs."""
    return max(RAY_UNIT, round(math.floor(memory_gb / gpu_memory_gb / RAY_UNIT + 1e-6) * RAY_UNIT, 4))


def asleep_share(model: ModelConfig, gpus: int, gpu_memory_gb: float) -> float:
    """What a unit of a model that sleeps reserves from Ray: the GPUs' worth of its residue when asleep
    (on each of its GPUs), never more than the router counts for it, and at least Ray's smallest amount so
    that it still needs a node with GPUs. Ray takes a fraction only below one GPU: above, whole GPUs."""
    held = gpus * min(model.sleeping_memory_gb, model.memory_gb)
    whole = math.floor(held / gpu_memory_gb + 1e-9)
    return float(whole) if whole >= 1 else gpu_share(held, gpu_memory_gb)


def reachable(address: str, timeout: float = 5.0) -> None:
    """Raise OSError when nothing accepts a connection at a ``host:port`` address (``ray://host:port`` too);
    ``auto`` and an address without a port are Ray's to find."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise OSError(f"nothing answers at {host}:{port} ({e.strerror or e})") from e


def refused_resources(models: Mapping[str, ModelConfig]) -> list[str]:
    """The models whose ``resources`` Ray would refuse (an accelerator's amount it does not take, e.g.
    ``neuron_cores: 0.5``), as config problems. Ray checks the options of an actor without a cluster."""
    problems = []
    for name, m in models.items():
        if m.resources:
            try:
                check_options(dict(m.resources))
            except ValueError as e:
                problems.append(f"models.{name}.resources: Ray refuses them: {e}")
    return problems


class RayCluster:
    """The connection, the nodes as GPUs, the driver that runs the units there, and the watch on nodes."""

    def __init__(self, config: RouterConfig) -> None:
        cluster = config.cluster
        self._units: Mapping[str, ModelConfig] = {u: m for u, m in config.units().items() if not m.is_adapter}
        try:
            ray = import_ray()
            if not ray.is_initialized():
                refused = refused_resources(config.models)  # before a load finds out, after a placement wait
                if refused:
                    raise ConfigError(refused)
                reachable(cluster.address)  # Ray would retry an address nothing answers at, silently, for ever
                ray.init(address=cluster.address, namespace=cluster.namespace, log_to_driver=False,
                         logging_level=logging.WARNING)
        except ConfigError:
            raise
        except Exception as e:  # no Ray installed, no cluster there, a token refused: one line, exit 1
            raise ConfigError([f"cluster.address: cannot join the Ray cluster at {cluster.address}: {e}"]) from e
        self._gpu_gb = gpu_gb = cluster.gpu_memory_gb or 1.0  # required with this backend (config/rules.py)
        self.nodes = RayNodes(cluster_gpu_budget(config))  # what the models may reserve on each GPU
        self.change: Change = self.nodes.snapshot()  # at startup, before the event loop serves anything
        self.driver = RayEngineDriver(self._units, self.where, namespace=cluster.namespace)
        self._pump: Pump | None = None
        self._events: EventLog | None = None
        self._task: asyncio.Task[None] | None = None
        self._reporting: set[asyncio.Future[None]] = set()  # reports of units gone, and looks: held till done
        self._looking = asyncio.Lock()  # one look at the nodes at a time (``_look``)
        self._next_look: asyncio.Future[None] | None = None  # one that has not begun yet (``_look_soon``)
        log.info("Ray cluster at %s: %d nodes with GPUs, %d GPUs of %.0f GB", cluster.address,
                 len(set(self.change.nodes.values())), len(self.change.budgets), gpu_gb)

    def topology(self) -> tuple[dict[int, float], dict[int, str], dict[str, Collection[str]]]:
        """The GPUs' budgets and nodes, and the nodes' resource names, now: what the scheduler starts with."""
        return dict(self.change.budgets), dict(self.change.nodes), dict(self.change.resources)

    def where(self, unit: str, gpus: tuple[int, ...]) -> Placement:
        """The node and local GPUs of a placement; a fraction of the GPU when a unit uses one only in part."""
        node, local = self.nodes.local_gpus(gpus)
        model = self._units[unit]
        need, size = model.memory_gb, self._gpu_gb  # Ray's share is of the GPU itself, not of the budget
        if model.sleep_level:
            return Placement(node, local, asleep_share(model, len(local), size))
        return Placement(node, local, gpu_share(need, size) if len(local) == 1 and 0 < need < size else None)

    async def start(self, pump: Pump, events: EventLog) -> None:
        """Adopt what a previous router left running, then watch the nodes."""
        self._pump, self._events = pump, events
        self.driver.set_exit_callback(self._exited)
        for unit, endpoint in (await self.driver.adopt()).items():
            placed = self.driver.info(unit)
            node = str(placed.get("node") or "")
            gpus = self.nodes.global_gpus(node, self._local_of(unit))
            log.info("Adopted model %s left running by a previous router: %s on node %s", unit, endpoint, node)
            events.emit(EventKind.ADOPTED, unit, "left running on the cluster by a previous router process",
                        node=node, endpoint=endpoint)
            pump.submit(ModelFound(unit, gpus))
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="ray-nodes")

    def _exited(self, unit: str, reason: str) -> None:
        """A unit's engine or actor is gone. When its node may be gone too, the nodes are read again first
        (off the event loop: Ray's control store may be slow to answer, or not at all, while requests go
        on), so that the scheduler re-plans the unit's requests on the GPUs that are still there."""
        if self._pump is None:
            return
        if "actor" not in reason.lower():
            self._pump.model_exited(unit, reason)
            return
        self._keep(asyncio.ensure_future(self._after_actor_death(unit, reason)))

    async def _after_actor_death(self, unit: str, reason: str) -> None:
        # the look goes on if it outlasts the wait: what it found is still noted, when it comes (each look
        # is compared with the one before it, so one whose answer were dropped would hide a lost node)
        await asyncio.wait({self._look_soon()}, timeout=EXIT_LOOK_S)
        if self._pump is not None:
            self._pump.model_exited(unit, reason)

    def _look_soon(self) -> asyncio.Future[None]:
        """A look at the nodes that starts from now on: the one waiting for its turn, shared (the units of a
        lost node die together: one look serves them all), or a new one."""
        if self._next_look is None:
            self._next_look = self._keep(asyncio.ensure_future(self._look()))
        return self._next_look

    def _keep(self, task: asyncio.Future[None]) -> asyncio.Future[None]:
        """Hold on to ``task`` until it is done (a stop cancels it)."""
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)
        return task

    async def _look(self) -> None:
        """Read the nodes and note what changed: one look at a time, each noted in the order they ran."""
        async with self._looking:
            self._next_look = None  # this one has begun: who asks from now on needs the next
            try:
                self.note(await self.nodes.poll())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the head may be unreachable a while: the next look tries again
                log.warning("Cannot read the Ray cluster's nodes: %r", e)

    def _local_of(self, unit: str) -> tuple[int, ...]:
        return tuple(self.driver.placement_of(unit).gpus)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(NODE_POLL_S)
            await asyncio.shield(self._look_soon())  # (shared: a stop cancels it through ``_reporting``)

    def note(self, change: Change) -> None:
        """Tell the scheduler about nodes that joined or left, or whose GPUs or resources changed."""
        if not change.changed or self._pump is None or self._events is None:
            return
        self.change = change
        for node in change.joined:
            log.info("Ray node %s joined (%s)", node, self.nodes.address_of(node))
            self._events.emit(EventKind.NODE_JOINED, None, node, node=node)
        for node in change.lost:
            log.warning("Ray node %s was lost: its engines are gone with it", node)
            self._events.emit(EventKind.NODE_LOST, None, node, node=node)
        self._pump.submit(change.capacity())

    def nodes_view(self) -> list[dict[str, Any]]:
        """The nodes with GPUs, alive or lost, for the admin view and the metrics: id, address, GPUs
        (global ids), memory offered and reserved, the units placed there (see ``node_views``)."""
        units = self._pump.views() if self._pump is not None else []
        return node_views(self.nodes.known(), self.nodes.gpu_memory_gb, units)

    def stop(self) -> None:
        """Stop watching the nodes (the runtime's close stops the engines through the driver)."""
        if self._task is not None:
            self._task.cancel()
        for task in list(self._reporting):
            task.cancel()
