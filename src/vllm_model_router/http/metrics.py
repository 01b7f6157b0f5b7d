"""Prometheus metrics at ``GET /metrics``, one registry per router application.

Three sources, each used for what it knows best:

- the lifecycle event log (a listener): loads, load durations, evictions (labelled by the scheduler's
  ``StopReason``, never by parsing the words), unexpected exits;
- the proxy (``RequestObserver``): per request its model, endpoint, status, time to first byte and
  the time it waited for a load;
- the scheduler's view, read at scrape time by a custom collector: state, in flight, waiting,
  residency and memory. Gauges are never stored, so they can never drift from the truth.

The registry is per application (not prometheus_client's global one), so several routers can live in
one process (tests) without clashing.

Names follow Prometheus' conventions (https://prometheus.io/docs/practices/naming/), so that dashboards
and recording rules need no unit juggling: base units only (``_seconds``, ``_bytes``; memory is GiB
inside the router and multiplied out here), counters end in ``_total``. ``promtool check metrics`` is
run over a live router's exposition in the tests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from vllm_model_router.gpu.probe import GIB
from vllm_model_router.http.admin import by_model
from vllm_model_router.runtime.pump import Runtime
from vllm_model_router.scheduler import State, StopReason
from vllm_model_router.state.lifecycle import EventKind, LifecycleEvent

# Time to first byte, wait and load times span milliseconds (a loaded model) to many minutes (a cold
# 70B model), so the buckets do too.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200)
LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800)



def eviction_label(cause: str) -> str:
    """A stop's cause (a ``StopReason`` value) → the ``reason`` label; "other" for a stop without one."""
    try:
        return StopReason(cause).value
    except ValueError:
        return "other"


class _SchedulerCollector(Collector):
    """Gauges read from the scheduler's view at scrape time."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterable[Metric]:
        views = self.runtime.views()
        cfg = self.runtime.config
        # ``model`` is the model clients name; ``replica`` says which of its copies (0 without replicas)
        state = GaugeMetricFamily("router_model_state", "1 for the replica's current state, 0 for the others",
                                  labels=["model", "replica", "state"])
        in_flight = GaugeMetricFamily("router_in_flight", "Requests being served by the replica",
                                      labels=["model", "replica"])
        waiting = GaugeMetricFamily("router_waiting", "Requests waiting for the model to be loaded",
                                    labels=["model"])
        pinned = GaugeMetricFamily("router_model_pinned", "1 when the model is pinned (never evicted)",
                                   labels=["model"])
        replicas = GaugeMetricFamily("router_replicas", "Replicas of the model that are resident",
                                     labels=["model"])
        for v in views:
            model, replica = v.group or v.name, str(v.replica)
            for s in State:
                state.add_metric([model, replica, s.value], 1.0 if v.state is s else 0.0)
            in_flight.add_metric([model, replica], v.in_flight)
            if v.replica == 0:  # a model's waiters and its pin are on its first unit
                waiting.add_metric([model], v.waiting)
                pinned.add_metric([model], 1.0 if v.pinned else 0.0)
        for model, units in by_model(views).items():
            replicas.add_metric([model], sum(1 for v in units if v.resident))
        resident = [v for v in views if v.resident]
        yield state
        yield in_flight
        yield waiting
        yield pinned
        yield replicas
        yield GaugeMetricFamily("router_models_resident",
                                "Models resident: loading, loaded, waking, falling asleep or still stopping",
                                value=len(resident))
        yield GaugeMetricFamily("router_max_resident", "Configured capacity.max_resident", value=cfg.max_resident)
        nodes = self.runtime.nodes()  # a cluster's nodes with GPUs, alive or lost; none on one machine
        if nodes or cfg.cluster.backend != "local":
            alive = [n for n in nodes if n["alive"]]
            yield GaugeMetricFamily("router_nodes", "Nodes of the cluster with GPUs, alive at the last look",
                                    value=len(alive))
            yield GaugeMetricFamily("router_cluster_gpus", "GPUs of the cluster's alive nodes",
                                    value=sum(len(n["gpus"]) for n in alive))
            yield from self._per_node(nodes)
        # memory in bytes, Prometheus' base unit (the configuration and the admin API speak GiB, "GB")
        yield GaugeMetricFamily("router_memory_reserved_bytes", "Declared memory_gb of the resident models, in bytes",
                                value=math.fsum(v.memory_gb for v in resident) * GIB)
        if cfg.memory_gb is not None:
            yield GaugeMetricFamily("router_memory_budget_bytes", "Configured capacity.memory_gb, in bytes",
                                    value=cfg.memory_gb * GIB)
        gpus = self.runtime.gpus.view()
        if gpus:
            families = {
                key: GaugeMetricFamily(f"router_gpu_memory_{key}_bytes", doc, labels=["gpu", "name"])
                for key, doc in (
                    ("total", "GPU memory in total (NVML), in bytes"),
                    ("budget", "GPU memory the resident models may reserve, in bytes"),
                    ("reserved", "GPU memory reserved by the models the router holds resident, in bytes"),
                    ("used_by_router", "GPU memory used by processes the router started (NVML), in bytes"),
                    ("used_by_others", "GPU memory used by processes the router did not start (NVML), in bytes"),
                    ("free", "GPU memory free (NVML), in bytes"),
                )
            }
            for g in gpus:
                for key, family in families.items():
                    family.add_metric([str(g["index"]), g["name"]], g[f"{key}_gb"] * GIB)
            yield from families.values()

    @staticmethod
    def _per_node(nodes: list[dict[str, Any]]) -> Iterator[Metric]:
        """Per node of the cluster (label ``node``: Ray's node id), in base units. A lost node stays, with
        ``router_node_up`` 0 and nothing offered (so sums over nodes are the cluster's alive capacity)."""
        families = {
            key: GaugeMetricFamily(f"router_node_{key}", doc, labels=["node"])
            for key, doc in (
                ("up", "1 while the node is alive, 0 once it is lost"),
                ("gpus", "GPUs the node offers (0 once lost)"),
                ("gpu_memory_bytes", "GPU memory the node offers: its GPUs' budgets (0 once lost)"),
                ("gpu_memory_reserved_bytes", "GPU memory reserved by the units placed on the node"),
                ("units", "Units (models, replicas) placed on the node"),
            )
        }
        for n in nodes:
            values = {"up": 1.0 if n["alive"] else 0.0, "gpus": len(n["gpus"]) if n["alive"] else 0,
                      "gpu_memory_bytes": n["gpu_memory_gb"] * GIB, "gpu_memory_reserved_bytes": n["reserved_gb"] * GIB,
                      "units": len(n["units"])}
            for key, family in families.items():
                family.add_metric([n["node"]], values[key])
        yield from families.values()


class RouterMetrics:
    """Every metric of one router; also its ``RequestObserver`` (see proxy.py)."""

    def __init__(self, runtime: Runtime) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("router_requests", "Requests proxied under /v1, by final status",
                                ["model", "endpoint", "status"], registry=r)
        self.request_seconds = Histogram(
            "router_request_seconds", "Time to first byte through the router (load wait included)",
            ["model", "endpoint"], buckets=REQUEST_BUCKETS, registry=r)
        self.wait_seconds = Histogram("router_wait_seconds", "Time a request waited for its model to be servable",
                                      ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.loads = Counter("router_model_loads", "Model loads by result (success or failure)",
                             ["model", "result"], registry=r)
        self.load_seconds = Histogram("router_model_load_seconds", "Duration of successful model loads",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("router_model_evictions", "Models stopped by the router, by reason",
                                 ["model", "reason"], registry=r)
        self.exits = Counter("router_model_exits", "Loaded models whose server exited by itself",
                             ["model"], registry=r)
        self.sleeps = Counter("router_model_sleeps", "Models put to sleep to make room, by sleep level and result",
                              ["model", "level", "result"], registry=r)
        self.sleep_seconds = Histogram("router_model_sleep_seconds", "Duration of successful sleeps",
                                       ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.wakes = Counter("router_model_wakes", "Sleeping models woken on demand, by result",
                             ["model", "result"], registry=r)
        self.wake_seconds = Histogram("router_model_wake_seconds", "Duration of successful wakes (warm-up included)",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        r.register(_SchedulerCollector(runtime))
        # labelled children, looked up once (``labels()`` validates and locks on every call)
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._wait_children: dict[str, Histogram] = {}
        runtime.events.add_listener(self.on_event)

    # ------------------------------------------------------------ lifecycle events
    def on_event(self, event: LifecycleEvent) -> None:
        model = event.model or ""
        if event.kind is EventKind.LOADED:
            self.loads.labels(model, "success").inc()
            seconds = event.data.get("seconds")
            if isinstance(seconds, int | float):
                self.load_seconds.labels(model).observe(seconds)
        elif event.kind is EventKind.LOAD_FAILED:
            self.loads.labels(model, "failure").inc()
        elif event.kind is EventKind.UNLOADING:
            self.evictions.labels(model, eviction_label(event.cause)).inc()
        elif event.kind is EventKind.EXITED:
            self.exits.labels(model).inc()
        elif event.kind in (EventKind.SLEPT, EventKind.SLEEP_FAILED):
            ok = event.kind is EventKind.SLEPT
            self.sleeps.labels(model, str(event.data.get("level", "")), "success" if ok else "failure").inc()
            seconds = event.data.get("seconds")
            if ok and isinstance(seconds, int | float):
                self.sleep_seconds.labels(model).observe(seconds)
        elif event.kind in (EventKind.WOKEN, EventKind.WAKE_FAILED):
            ok = event.kind is EventKind.WOKEN
            self.wakes.labels(model, "success" if ok else "failure").inc()
            seconds = event.data.get("seconds")
            if ok and isinstance(seconds, int | float):
                self.wake_seconds.labels(model).observe(seconds)

    # ------------------------------------------------------------ RequestObserver
    def waited(self, model: str, seconds: float) -> None:
        child = self._wait_children.get(model)
        if child is None:
            child = self._wait_children[model] = self.wait_seconds.labels(model)
        child.observe(seconds)

    def request_done(self, model: str, route: str, status: int, first_byte_seconds: float) -> None:
        endpoint = route  # a forwarded route (routes.py) or "other": never a client's raw path
        key = (model, endpoint, status)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(model, endpoint, str(status)),
                                                       self.request_seconds.labels(model, endpoint))
        children[0].inc()
        children[1].observe(first_byte_seconds)

    # ------------------------------------------------------------ exposition
    def render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


METRICS: web.AppKey[RouterMetrics] = web.AppKey("metrics", RouterMetrics)


async def metrics_handler(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def families(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of a text exposition; a small helper for tests and tools."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            yield s.name, dict(s.labels), s.value
