"""GPU check, for a machine with an NVIDIA GPU and torch: does stopping a model really free its memory?

    python bench/gpu_check.py [--gb 4]

Starts two "models" through the router's own process driver. Each is a small server that allocates
``--gb`` GiB on the GPU and forks a worker that allocates as much again (like vLLM's EngineCore, which
outlives a kill of the API server). The driver stops the first one; NVML must then show its processes
gone and its memory back, while the second one's memory is untouched. Prints one line: PASS or FAIL.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gpu_alloc_server import SERVER  # (bench/ is on sys.path when run as a script)

from vllm_model_router.config import ModelConfig
from vllm_model_router.drivers import procs
from vllm_model_router.drivers.process import ProcessDriver
from vllm_model_router.gpu.probe import NvmlProbe


async def main(gb: float) -> str:
    probe = NvmlProbe.create()
    if probe is None:
        return "GPU CHECK SKIPPED: no NVIDIA GPU (NVML unavailable)"
    models = {
        name: ModelConfig(name=name, cmd=(sys.executable, "-c", SERVER, "${PORT}", str(gb)), stop_timeout=10.0)
        for name in ("first", "second")
    }
    driver = ProcessDriver(models)
    try:
        before = probe.devices()[0].free_gb
        await driver.start("first", (0,))
        await driver.start("second", (0,))
        first_pids, second_pids = set(driver.pids("first")), set(driver.pids("second"))
        first_leader, second_leader = driver.info("first")["pid"], driver.info("second")["pid"]
        loaded = probe.devices()[0]
        listed = {p.pid: p.used_gb for p in probe.processes(0)}
        taken = before - loaded.free_gb
        t0 = time.monotonic()
        await driver.stop("first")
        stop_s = time.monotonic() - t0
        # memory must come back (bounded): NVML can lag the process exit a little
        deadline = time.monotonic() + 30
        while True:
            after = probe.devices()[0]
            after_listed = {p.pid: p.used_gb for p in probe.processes(0)}
            freed = after.free_gb - loaded.free_gb
            if (freed >= 2 * gb * 0.9 and not first_pids & set(after_listed)) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        release_s = time.monotonic() - t0
        left_behind = procs.group_members(first_leader)
        second_alive = set(procs.group_members(second_leader)) == second_pids
        second_held = sum(after_listed.get(p, 0.0) for p in second_pids)
        ok = (freed >= 2 * gb * 0.9 and not left_behind and not first_pids & set(after_listed) and second_alive
              and after.free_gb < before - 2 * gb * 0.9)
        detail = (f"took {taken:.1f} GiB for 2 models x 2 processes x {gb:g} GiB (NVML listed "
                  f"{len(set(listed) & (first_pids | second_pids))} of their pids); stopped 'first' "
                  f"(pids {sorted(first_pids)}) in {stop_s:.2f}s, {freed:.1f} GiB back after {release_s:.2f}s, "
                  f"its pids on the GPU after: {sorted(first_pids & set(after_listed))}, left in the process "
                  f"table: {left_behind}; 'second' still holds {second_held:.1f} GiB by NVML's list, "
                  f"{before - after.free_gb:.1f} GiB by free memory")
        return ("GPU CHECK PASS: " if ok else "GPU CHECK FAIL: ") + detail
    finally:
        await driver.close()


async def router_check(fraction: float) -> str:
    """The runtime end to end on the real GPU: two models that cannot share it (each process of each takes
    ``fraction`` of the budget / 2), placement and eviction by measured memory, release proven before
    the next start."""
    from vllm_model_router.config import build_config
    from vllm_model_router.runtime.pump import Runtime

    probe = NvmlProbe.create()
    if probe is None:
        return "ROUTER GPU CHECK SKIPPED: no NVIDIA GPU"
    total = probe.devices()[0].total_gb
    per_process = total * 0.95 * fraction / 2
    need = per_process * 2 + 1.5  # two processes, plus their CUDA contexts
    models = {n: {"cmd": [sys.executable, "-c", SERVER, "${PORT}", f"{per_process:.2f}"], "memory_gb": round(need, 1),
                  "stop_timeout": 10} for n in ("a", "b")}
    cfg = build_config({"capacity": {"max_resident": 2, "release_timeout": 30}, "models": models}, env={})
    runtime = Runtime(cfg)
    try:
        t0 = time.monotonic()
        await runtime.load("a")
        view_a = runtime.gpus.view()[0]
        await runtime.load("b")  # does not fit next to a: a is evicted, its memory proven free first
        took = time.monotonic() - t0
        events = [(e.kind, e.model) for e in runtime.events.recent()]
        states = {v.name: v.state.value for v in runtime.views()}
        view_b = runtime.gpus.view()[0]
        order_ok = events.index(("unloaded", "a")) < events.index(("load_started", "b"))
        ok = (states == {"a": "unloaded", "b": "loaded"} and order_ok
              and not any(k == "memory_not_released" for k, _ in events)
              and view_b["used_by_others_gb"] < 1.0 and view_a["reserved_gb"] == round(need, 1))
        return (("ROUTER GPU CHECK PASS: " if ok else "ROUTER GPU CHECK FAIL: ")
                 + f"budget {view_a['budget_gb']:.1f} GB; a reserved {view_a['reserved_gb']:.1f} GB "
                 f"(used by the router {view_a['used_by_router_gb']:.1f}, free {view_a['free_gb']:.1f}); "
                 f"b evicted a and started after its memory was back ({took:.1f}s for both loads); "
                 f"after: used by router {view_b['used_by_router_gb']:.1f} GB, "
                 f"others {view_b['used_by_others_gb']:.1f} GB; "
                 f"states {states}; events {[k + ':' + (m or '') for k, m in events]}")
    finally:
        await runtime.close()


async def both(gb: float, fraction: float) -> list[str]:
    return [await main(gb), await router_check(fraction)]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=4.0, help="GiB each process allocates (default 4)")
    p.add_argument("--router-fraction", type=float, default=0.6,
                   help="share of the GPU budget each model of the router check takes (default 0.6)")
    lines = asyncio.run(both(p.parse_args().gb, p.parse_args().router_fraction))
    print("\n".join(lines))
    raise SystemExit(0 if not any("FAIL" in line for line in lines) else 1)
