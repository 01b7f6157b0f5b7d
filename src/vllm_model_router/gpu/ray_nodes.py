"""The cluster's GPUs as Ray reports them, in the scheduler's terms: global GPU ids, a memory budget per
GPU, and the node each GPU is on.

The scheduler places a unit on global GPU ids (``SchedulerConfig.gpu_memory_gb`` / ``gpu_nodes``); Ray
knows nodes and how many GPUs each has. The ids must stay stable for as long as the router runs: a
node's GPUs get the next free ids the first time the node is seen and keep them, and the ids of a node
that left are never handed to another, so a unit placed on GPU 5 can never silently land on another
machine's GPU 5 after a node comes and goes. A node that comes back under the same Ray node id gets its
old ids back.

Ray counts GPUs, not memory: each GPU's budget is the configured ``gpu_memory_gb`` (``cluster_gpu_budget``: or
``capacity.memory_gb`` where lower).

Each node's resource names (those Ray reports with a positive amount: ``GPU``, ``accelerator_type:H100``,
custom ones) go with its GPUs, so that the scheduler places a model that asks for ``resources`` only on a
node that has them; how much of a resource is left is Ray's to enforce. A node that was lost stays known
(its ids are never reused anyway), so the admin view and the metrics can still show it, as lost.

Ray is imported lazily, only by :meth:`RayNodes.snapshot` and :meth:`RayNodes.poll`: importing this
module (and running the local backend) never needs the ``ray`` extra.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from vllm_model_router.scheduler import Capacity, ModelView

LOST_LISTED = 16  # lost nodes still shown (the latest): replaced pods are new nodes, and would pile up


class RayUnavailable(RuntimeError):
    """The Ray backend was asked for but the ``ray`` package is not installed."""


def import_ray() -> ModuleType:
    """``ray``, imported on first use (through importlib, so that type checking does not need Ray either)."""
    try:
        return importlib.import_module("ray")
    except ImportError as e:
        raise RayUnavailable(
            "the Ray backend needs the ray package: pip install 'vllm-model-router[ray]'") from e


@dataclass(frozen=True)
class Change:
    """What one look at the cluster found: the nodes that joined and left since the previous look, and
    the GPUs of the nodes alive now, ready for the scheduler's ``Capacity``."""

    joined: tuple[str, ...]  # node ids alive now and not at the previous look (first seen or back)
    lost: tuple[str, ...]  # node ids alive at the previous look and dead or gone now
    budgets: dict[int, float]  # global GPU id -> memory budget (GB), alive nodes only
    nodes: dict[int, str]  # global GPU id -> node id, alive nodes only
    resources: dict[str, frozenset[str]]  # node id -> the resource names it offers, alive nodes only
    reshaped: bool = False  # an alive node's GPUs or resource names are not those of the previous look

    @property
    def changed(self) -> bool:
        """Whether the scheduler must hear of it (a ``Capacity``)."""
        return bool(self.joined or self.lost or self.reshaped)

    def capacity(self) -> Capacity:
        """What the scheduler is told: every field, every time (a Capacity replaces the previous one)."""
        return Capacity(tuple(sorted(self.budgets.items())), tuple(sorted(self.nodes.items())),
                        tuple(sorted(self.resources.items())))


@dataclass(frozen=True)
class NodeRecord:
    """A node with GPUs as the router knows it: alive now, or lost (then with its GPUs and resource names
    of when it was last seen alive)."""

    node: str
    address: str
    alive: bool
    gpus: tuple[int, ...]  # global ids
    resources: frozenset[str]


def _names(resources: Mapping[str, Any] | None) -> frozenset[str]:
    """The resources a node offers at all: the names Ray reports with a positive amount."""
    offered = set()
    for name, amount in (resources or {}).items():
        try:
            if float(amount) > 0:
                offered.add(str(name))
        except (TypeError, ValueError):
            continue
    return frozenset(offered)


def _gpu_count(resources: Mapping[str, Any] | None) -> int:
    # Ray reports whole GPUs per node as a float ("GPU": 2.0); a node without GPUs has no "GPU" key
    try:
        return max(0, int(float((resources or {}).get("GPU", 0) or 0)))
    except (TypeError, ValueError):
        return 0


class RayNodes:
    """The stable mapping from Ray's nodes to global GPU ids, updated by each look at ``ray.nodes()``.

    Nodes without GPUs (a CPU-only head) are tracked (joined, lost, address) but contribute no GPUs.
    """

    def __init__(self, gpu_memory_gb: float) -> None:
        if gpu_memory_gb <= 0:
            raise ValueError(f"gpu_memory_gb must be positive, got {gpu_memory_gb}")
        self.gpu_memory_gb = float(gpu_memory_gb)
        self._ids: dict[str, list[int]] = {}  # node id -> every global id it ever had, in local order
        self._count: dict[str, int] = {}  # node id -> how many GPUs it has now (the first of its ids)
        self._owner: dict[int, str] = {}  # global id -> node id, never forgotten (ids are never reused)
        self._address: dict[str, str] = {}  # node id -> last NodeManagerAddress seen
        self._resources: dict[str, frozenset[str]] = {}  # node id -> resource names when last seen alive
        self._alive: set[str] = set()
        self._lost: dict[str, int] = {}  # node id -> when it was lost (a count of losses): the latest listed
        self._losses = 0
        self._shape: tuple[dict[int, str], dict[str, frozenset[str]]] = ({}, {})  # the previous look's
        self._next = 0
        self._lock = threading.Lock()  # poll() reads in a worker thread; two looks must not interleave

    def read(self, nodes: Iterable[Mapping[str, Any]]) -> Change:
        """Take what ``ray.nodes()`` returns (dicts with ``NodeID``, ``Alive``, ``Resources``,
        ``NodeManagerAddress``) and return what changed since the previous call.

        A node missing from the list counts as dead, like one reported with ``Alive: False`` (Ray drops
        dead nodes from the list after a while). A dead node's entry has no resources: its GPU count and
        resource names are kept from when it was alive.
        """
        with self._lock:
            alive_now: dict[str, int] = {}
            for entry in nodes:
                node_id = str(entry.get("NodeID") or "")
                if not node_id:
                    continue
                if address := entry.get("NodeManagerAddress"):
                    self._address[node_id] = str(address)
                if entry.get("Alive"):
                    alive_now[node_id] = _gpu_count(entry.get("Resources"))
                    self._resources[node_id] = _names(entry.get("Resources"))
            for node_id in sorted(alive_now):  # a stable order when several nodes join in one look
                self._assign(node_id, alive_now[node_id])
            joined = tuple(sorted(set(alive_now) - self._alive))
            lost = tuple(sorted(self._alive - set(alive_now)))
            for node_id in lost:
                self._losses += 1
                self._lost[node_id] = self._losses
            for node_id in joined:
                self._lost.pop(node_id, None)
            self._alive = set(alive_now)
            nodes_now = {g: n for n in sorted(self._alive) for g in self._ids[n][:self._count[n]]}
            offers = {n: self._resources[n] for n in sorted(self._alive)}
            reshaped = (nodes_now, offers) != self._shape
            self._shape = (nodes_now, offers)
            return Change(joined, lost, {g: self.gpu_memory_gb for g in nodes_now}, nodes_now, offers, reshaped)

    def _assign(self, node_id: str, count: int) -> None:
        """Give ``node_id`` ids for ``count`` GPUs: the ones it had, then fresh ones if it has more now."""
        ids = self._ids.setdefault(node_id, [])
        while len(ids) < count:
            ids.append(self._next)
            self._owner[self._next] = node_id
            self._next += 1
        self._count[node_id] = count

    def alive(self, node_id: str) -> bool:
        """Whether the node was alive at the last look."""
        return node_id in self._alive

    def known(self) -> list[NodeRecord]:
        """The nodes with GPUs: the alive ones and the latest ``LOST_LISTED`` lost ones, by GPU id."""
        with self._lock:
            lost = sorted(self._lost, key=self._lost.__getitem__)[-LOST_LISTED:]
            records = [NodeRecord(n, self._address.get(n, ""), n in self._alive,
                                  tuple(self._ids[n][:self._count[n]]), self._resources.get(n, frozenset()))
                       for n in (*self._alive, *lost) if self._count.get(n)]
        return sorted(records, key=lambda r: r.gpus)

    def address_of(self, node_id: str) -> str:
        """The node's IP address (Ray's ``NodeManagerAddress``), also for a node that has left."""
        try:
            return self._address[node_id]
        except KeyError:
            raise KeyError(f"unknown Ray node {node_id!r}") from None

    def node_of(self, gpu_id: int) -> str:
        """The node that GPU ``gpu_id`` is (or was) on."""
        try:
            return self._owner[gpu_id]
        except KeyError:
            raise KeyError(f"GPU {gpu_id} is on no known Ray node") from None

    def local_gpus(self, gpu_ids: Iterable[int]) -> tuple[str, tuple[int, ...]]:
        """Translate a placement on global ids back to one node: ``(node id, local GPU indices)``.

        A placement is always on one node (the scheduler keeps a unit's GPUs together); ids on several
        nodes, or ids no node has, are a bug upstream and raise ``ValueError``. The node may have left
        since: ids are never reused, so the answer is still the machine the unit was on.
        """
        ids = tuple(gpu_ids)
        if not ids:
            raise ValueError("a placement needs at least one GPU")
        unknown = [g for g in ids if g not in self._owner]
        if unknown:
            raise ValueError(f"GPUs {unknown} are on no known Ray node")
        owners = {self._owner[g] for g in ids}
        if len(owners) > 1:
            raise ValueError(f"GPUs {list(ids)} are on several nodes: {sorted(owners)}")
        node_id = owners.pop()
        local = self._ids[node_id]
        return node_id, tuple(local.index(g) for g in ids)

    def global_gpus(self, node_id: str, local: Iterable[int]) -> tuple[int, ...]:
        """The global ids of a node's GPUs by their local indices (what an adopted engine reports)."""
        ids = self._ids.get(node_id, [])
        return tuple(ids[i] for i in local if 0 <= i < len(ids))

    def snapshot(self) -> Change:
        """Look at the cluster now (``ray.nodes()``) and :meth:`read` it.

        Blocking: ``ray.nodes()`` is a call to Ray's control store and can take a while when the cluster
        is busy or the head is unreachable. The event loop must not call this directly: use :meth:`poll`
        (which runs it in a thread). Needs a connected driver (``ray.init``).
        """
        return self.read(import_ray().nodes())

    async def poll(self) -> Change:
        """:meth:`snapshot` in a worker thread, so the event loop keeps serving while Ray answers."""
        return await asyncio.to_thread(self.snapshot)


def node_views(nodes: Iterable[NodeRecord], gpu_memory_gb: float, units: Iterable[ModelView]) -> list[dict[str, Any]]:
    """Per node, for the admin view and the metrics: whether it is alive, its GPUs (global ids), the memory
    it offers (its GPUs' budgets; none once lost), the memory the units placed there reserve (``memory_gb``
    on each of their GPUs on it, as the scheduler accounts them) and those units.

    From the scheduler's view of the units rather than the driver's: that is what placement decides on,
    and a unit whose node was just lost stays listed there until the scheduler hears it is gone.
    """
    placed = [v for v in units if v.resident and v.gpus]
    out = []
    for n in nodes:
        mine = set(n.gpus)
        here = [(v, sum(1 for g in v.gpus if g in mine)) for v in placed]
        here = [(v, count) for v, count in here if count]
        out.append({
            "node": n.node, "address": n.address, "alive": n.alive, "gpus": list(n.gpus),
            "gpu_memory_gb": gpu_memory_gb * len(n.gpus) if n.alive else 0.0,
            "reserved_gb": math.fsum(v.memory_gb * count for v, count in here),
            "units": sorted(v.name for v, _ in here),
            "resources": sorted(n.resources),
        })
    return out
