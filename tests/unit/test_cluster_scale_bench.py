"""bench/cluster_scale.py measures what it says: the cluster it builds has the promised model mix and
starts full without overcommitting a GPU, and a replay times every scheduler call, under the
simulator's residency checks, and stops when its CPU budget runs out."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

from vllm_model_router.scheduler import ModelSpec

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "cluster_scale.py"


def bench() -> ModuleType:
    """The script as a module (registered first: its dataclasses look their module up)."""
    if "cluster_scale" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cluster_scale", SCRIPT)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["cluster_scale"] = module
        spec.loader.exec_module(module)
    return sys.modules["cluster_scale"]


def test_the_model_mix_is_seeded_and_has_the_promised_shares() -> None:
    cs = bench()
    mix = cs.model_mix(20_000)
    assert mix == cs.model_mix(20_000) and mix != cs.model_mix(20_000, seed=1)
    counts = Counter(spec.gpu_count for spec in mix.values())
    assert abs(counts[8] / 20_000 - 0.01) < 0.004
    assert abs(counts[4] / 20_000 - 0.03) < 0.006
    assert abs(counts[2] / 20_000 - 0.10) < 0.01
    assert {spec.memory_gb for spec in mix.values() if spec.gpu_count == 1} == {20.0, 40.0, 70.0}
    assert {spec.memory_gb for spec in mix.values() if spec.gpu_count > 1} == {70.0}


def test_the_cluster_starts_full_without_overcommitting_a_gpu() -> None:
    cs = bench()
    config = cs.cluster_config(3)
    assert len(config.models) == 3 * 8 * 10 and len(config.gpu_memory_gb) == 24
    placed = cs.prefill(config, 3)
    used: dict[int, float] = {}
    for name, gpus in placed.items():
        spec = config.models[name]
        assert isinstance(spec, ModelSpec)
        assert len(gpus) == spec.gpu_count
        assert len({config.gpu_nodes[g] for g in gpus}) == 1  # one node
        for g in gpus:
            used[g] = used.get(g, 0.0) + spec.memory_gb
    assert max(used.values()) <= 80.0
    assert sum(used.values()) > 0.6 * 24 * 80.0
    assert "m0" in placed  # the most popular first


def test_a_replay_times_every_call_and_stops_at_its_budget() -> None:
    cs = bench()
    row = cs.replay(1, 400, budget=120.0)
    assert not row.cut and row.requests == len(cs.cluster_trace(1, 400).requests)  # the whole trace
    assert row.reached_s >= row.trace_s
    assert len(row.times_us) == sum(n for n, _ in row.by_kind.values()) >= 2 * row.requests
    assert row.loads >= 1 and row.p50 <= row.p99 <= max(row.times_us)
    assert 0 < row.queued < len(cs.cluster_config(1).models)  # models waited for a load, not all of them
    lighter = cs.replay(1, 400, budget=120.0, per_gpu=cs.RATE / 10)
    assert lighter.trace_s > 5 * row.trace_s and lighter.queued < row.queued
    cut = cs.replay(1, 400, budget=0.0)
    assert cut.cut and len(cut.times_us) == 1


def test_the_script_prints_its_tables() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--nodes", "1", "2", "--requests", "200", "--budget", "30"],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "| 1 x 8 | 3 | 80 (" in out and "| 2 x 8 | 5 | 160 (" in out  # (8 and 16 GPUs at 1/3 request/s each)
    assert "growth 1 → 2 nodes (2x), whole replays: p99" in out
    assert "first " in out and "events: p50" in out
