"""Where a model may go (``_options``): any one GPU, ``gpu_count`` GPUs of one node, its fixed GPUs, or
nowhere in particular; only nodes that offer the resources it needs. Worked out from the GPUs' budgets
and nodes, and kept until they (or, for several GPUs, the models' places) change."""

from __future__ import annotations

from vllm_model_router.scheduler.records import ModelRecord
from vllm_model_router.scheduler.residency import Residency


class Placement(Residency):
    """The placements a load may take."""

    def _options(self, m: ModelRecord) -> list[tuple[int, ...]]:
        """Where ``m`` may go: its fixed GPUs, any one GPU, ``gpu_count`` GPUs of one node (on each node
        the ones with the most memory free: a tensor-parallel model wants them all to have its share), or
        (no GPUs known, or an adapter) nowhere in particular. On a cluster, only nodes that offer what it
        ``needs`` (none: it cannot be placed), and a cluster with no GPU at all (no node has joined yet, or
        every one was lost) has no place for anything: not "anywhere", as a machine without GPUs."""
        if m.base is not None:
            return [()]
        if not self.budget.gpu_memory_gb:
            return [] if self.config.gpu_nodes is not None else [()]  # a cluster's GPUs: none
        if m.spec.gpus:
            return [m.spec.gpus]
        k = m.spec.gpu_count
        one_gpu, nodes = self._layout(m.spec.needs)
        if k <= 1:
            return one_gpu
        # the same for every model of k GPUs while no model moves (and ``m`` holds nothing): kept, and after
        # moves made again only on the nodes they were on (the log of moves says which)
        budgets = self.budget.gpu_memory_gb
        mine = self._index.counted(m)
        cached = self._option_cache.get((k, m.spec.needs)) if mine is None else None
        if cached is not None and (cached[1] is not self.budget or cached[2] is not nodes
                                   or len(self._moved_on) - cached[0] > max(len(nodes), 64)):
            cached = None
        if cached is not None and cached[0] == len(self._moved_on):
            return cached[4]
        held = self._index.held(None, but=m).gpu_gb
        where = self._gpu_nodes
        per_node = dict(cached[3]) if cached is not None else {}
        again = {where.get(g, "") for g in self._moved_on[cached[0]:]} if cached is not None else nodes.keys()
        for node in again:
            gpus = nodes.get(node, ())
            if len(gpus) >= k:
                freest = sorted(gpus, key=lambda g: (held.get(g, 0.0) - budgets.get(g, 0.0), g))[:k]
                per_node[node] = tuple(sorted(freest))
        options = [per_node[node] for node, gpus in nodes.items() if len(gpus) >= k]
        if mine is None:
            self._option_cache[k, m.spec.needs] = (len(self._moved_on), self.budget, nodes, per_node, options)
        return options

    def _layout(self, needs: frozenset[str] = frozenset()) -> tuple[list[tuple[int, ...]], dict[str, list[int]]]:
        """Every GPU as a one-GPU option, and the GPUs of each node, of the nodes that offer ``needs``: worked
        out again only when the budgets (a new Budget: GpuUsage, Capacity) or the nodes change, not on every
        plan (a cluster has hundreds)."""
        cache = self._layout_cache  # (kept with the very objects it was made from: no id is ever reused)
        if cache is None or cache[0] is not self.budget or cache[1] is not self._gpu_nodes \
                or cache[2] is not self._node_resources:
            cache = self._layout_cache = (self.budget, self._gpu_nodes, self._node_resources, {})
        by_needs = cache[3]
        if needs not in by_needs:
            nodes: dict[str, list[int]] = {}
            for g in sorted(self.budget.gpu_memory_gb):
                node = self._gpu_nodes.get(g, "")
                if needs <= self._node_resources.get(node, frozenset()):
                    nodes.setdefault(node, []).append(g)
            by_needs[needs] = (sorted((g,) for gpus in nodes.values() for g in gpus), nodes)
        return by_needs[needs]

    def _unplaceable(self, m: ModelRecord) -> str:
        """Why ``m`` has no option (``_options`` is empty): what no node has."""
        if not self.budget.gpu_memory_gb:
            return "no node of the cluster has a GPU now (none has joined yet, or every one was lost)"
        if m.spec.needs and not self._layout(m.spec.needs)[1]:
            return f"needs a node with the resources {', '.join(sorted(m.spec.needs))}; no node has them"
        return f"needs {m.spec.gpu_count} GPUs on one machine; no machine has that many"
