"""Fast swaps through sleep mode: the same alternating trace with and without the sleep tier, in one run.

    python bench/sleep_bench.py [--switches 10] [--scale 0.1]

Two models, capacity 1, requests alternating between them, so every request is a switch. Engines are
the router's fake engine with start and wake times taken from vLLM's published figures (level 1,
Oct 2025): Qwen3-0.6B cold start 21 s / wake 0.1 s, a 30B model 47 s / 2.9 s; multiplied by --scale
so the run takes seconds. The time spent switching is each request's latency minus the engine's own
answer time (measured on a warm engine). Goal: at least 10x less time spent switching with sleep.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vllm_model_router.config import build_config
from vllm_model_router.http.app import build_app

PROFILES = {"Qwen3-0.6B": (21.0, 0.1), "30B": (47.0, 2.9)}  # (cold start s, wake s)
BODY = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def run_trace(sleep: bool, cold: float, wake: float, switches: int) -> dict[str, Any]:
    fake = [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}", "--served-model-name",
            "${MODEL}", "--startup-delay", f"{cold:.3f}", "--wake-delay", f"{wake:.3f}", "--sleep-delay", "0.01"]
    models = {n: {"cmd": [*fake, *(["--enable-sleep-mode"] if sleep else [])], "memory_gb": 30, "sleep": sleep,
                  "stop_timeout": 5} for n in ("a", "b")}
    cfg = build_config({"listen": {"host": "127.0.0.1", "port": 0}, "capacity": {"max_resident": 1, "memory_gb": 40},
                        "models": models}, env={})
    runner = web.AppRunner(build_app(cfg, probe=None), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession() as s:
            async def ask(model: str) -> float:
                t = time.perf_counter()
                async with s.post(url, json={**BODY, "model": model}) as r:
                    await r.read()
                    assert r.status == 200, r.status
                return time.perf_counter() - t

            await ask("a")
            await ask("b")  # both have been started once: from here on every request is a switch
            warm = statistics.median([await ask("b") for _ in range(20)])  # the engine's own answer time
            latencies = [await ask("ab"[i % 2]) for i in range(switches)]
    finally:
        await runner.cleanup()
    switching = sum(max(0.0, x - warm) for x in latencies)
    return {"switching_s": switching, "per_switch_s": switching / switches, "warm_s": warm}


async def main(switches: int, scale: float) -> int:
    print(f"{switches} switches per run, engine timings x {scale:g}")
    print("| profile | cold start / wake (scaled) | switching without sleep | with sleep | ratio |")
    print("|---|---|---|---|---|")
    ratios = []
    for name, (cold, wake) in PROFILES.items():
        without = await run_trace(False, cold * scale, wake * scale, switches)
        with_sleep = await run_trace(True, cold * scale, wake * scale, switches)
        ratio = without["switching_s"] / max(with_sleep["switching_s"], 1e-9)
        ratios.append(ratio)
        print(f"| {name} | {cold * scale:.2f} s / {wake * scale:.3f} s | {without['switching_s']:.2f} s "
              f"({without['per_switch_s']:.2f} s each) | {with_sleep['switching_s']:.2f} s "
              f"({with_sleep['per_switch_s']:.3f} s each) | {ratio:.1f}x |", flush=True)
    print(f"goal: >= 10x less time switching; {'met' if min(ratios) >= 10 else 'NOT met'} "
          f"(lowest {min(ratios):.1f}x)")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--switches", type=int, default=10)
    p.add_argument("--scale", type=float, default=0.1)
    a = p.parse_args()
    raise SystemExit(asyncio.run(main(a.switches, a.scale)))
