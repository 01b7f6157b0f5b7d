"""A simulated multi-node Ray cluster on this machine, for tests of the Ray backend.

``ray.cluster_utils.Cluster`` runs each "node" as its own raylet in this process tree; ``num_gpus`` is
pure accounting, so two nodes of two GPUs need no GPU. Everything stays on loopback: with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (read by Ray when it is imported) every node, the control store
and the workers use 127.0.0.1 instead of the machine's interface address. Ray's files (sockets, logs,
the "current cluster" address file) go to a directory of the cluster's own (``RAY_TMPDIR``), so a test
never meets, nor leaves behind, another Ray on the machine.

Every process the cluster starts carries the test's marker (``MARKER_VAR``) in its environment, like the
router's model processes: after the shutdown the test fails, after killing them by pid, if any is alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from vllm_model_router.drivers import procs

from .processes import MARKER_VAR, assert_no_processes_left_sync, marked_processes

LOOPBACK_VAR = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def import_ray() -> ModuleType:
    """``ray``, set up for loopback; skips the calling test (module) when the ``ray`` extra is missing."""
    os.environ[LOOPBACK_VAR] = "0"  # before the first ``import ray``: Ray reads it at import
    ray = pytest.importorskip(
        "ray", reason="the ray extra is not installed (pip install -e '.[ray]'); the Ray backend is optional")
    from ray._private import ray_constants

    # when something imported Ray earlier without the variable, the constant is read at each use
    ray_constants.ENABLE_RAY_CLUSTER = False
    return ray


@dataclass
class RayCluster:
    """A running simulated cluster with the driver (this process) connected to it."""

    ray: ModuleType
    cluster: Any  # ray.cluster_utils.Cluster
    marker: str
    started: dict[int, int | None] = field(default_factory=dict)  # pid -> start time: the cluster's processes

    def add_node(self, **args: Any) -> Any:
        """Start one more node (``num_gpus=2``...) and wait until it has registered; returns Ray's Node."""
        node = self.cluster.add_node(**{"num_cpus": 1, **args})
        self.cluster.wait_for_nodes()
        self._remember(node)
        return node

    def remove_node(self, node: Any) -> None:
        """Stop a node's processes, as if its machine went away."""
        self.cluster.remove_node(node)

    @staticmethod
    def node_id(node: Any) -> str:
        """The node's id as ``ray.nodes()`` reports it (``NodeID``)."""
        return str(node.node_id)

    def _remember(self, node: Any) -> None:
        for infos in node.all_processes.values():
            self.started.update((info.process.pid, procs.start_time(info.process.pid)) for info in infos)

    def still_running(self) -> list[int]:
        """The cluster's processes still alive (the same processes: a pid reused since does not count)."""
        return sorted(pid for pid, since in self.started.items()
                      if since is not None and procs.start_time(pid) == since)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def ray_cluster(marker: str, head_cpus: int = 1) -> Iterator[RayCluster]:
    """A cluster with a CPU-only head node, the driver connected; nodes are added by the test.

    On exit: the driver disconnects, every node stops, and the test fails if a process of the cluster
    outlived it (those are killed by pid first, never by name).
    """
    ray = import_ray()
    from ray.cluster_utils import Cluster

    # a head node installs its own SIGTERM handler in this process (to stop its processes): put ours back
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    temp_dir = tempfile.mkdtemp(prefix="vmr-ray-")  # short: Ray's unix socket paths must stay < 108 bytes
    with _environment(RAY_TMPDIR=temp_dir, **{MARKER_VAR: marker, LOOPBACK_VAR: "0"}):
        cluster = None
        handle = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "num_gpus": 0})
            handle = RayCluster(ray, cluster, marker)
            handle._remember(cluster.head_node)
            # the final check finds the cluster's processes by the marker: make sure they carry it
            assert set(handle.started) <= set(marked_processes(marker)), "Ray's processes lack the test's marker"
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
            yield handle
        finally:
            try:
                ray.shutdown()
                if cluster is not None:
                    cluster.shutdown()
            finally:
                try:
                    # by the pids the cluster reported (whatever became of their environment), then by marker
                    left = handle.still_running() if handle else []
                    for pid in left:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    assert_no_processes_left_sync(marker, grace=10.0)
                    assert not left, f"Ray processes outlived the cluster: {left}"
                finally:
                    shutil.rmtree(temp_dir, ignore_errors=True)
                    for number, handler in handlers.items():
                        signal.signal(number, handler)
