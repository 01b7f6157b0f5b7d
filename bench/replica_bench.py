"""What replicas buy: throughput and latency of one model served by 1, 2 and 3 copies, in one run.

    python bench/replica_bench.py [--replicas 1 2 3] [--requests 300] [--concurrency 24] [--rounds 1]
                                  [--max-num-seqs 4] [--service-time 0.2] [--no-autoscale] [--json FILE]

Each engine is the fake engine with a bounded batch (``--max-num-seqs`` requests at once, each held
``--service-time`` seconds; the rest queue inside it, as in vLLM), so one copy serves at most
max_num_seqs / service_time requests a second and more copies are the only way to serve more. For each
N the router runs ``replicas: {min: N, max: N}``: N warm copies, all loaded before the clock starts.
The same number of non-streaming chat requests is sent at the same client concurrency each time, and
each figure is also given as a ratio to the 1-copy run of the same round (absolute figures drift on a
shared box; ratios measured side by side do not). A last run starts with one warm copy of
``{min: 1, max: max(N)}`` and lets the router add copies as the burst needs them (``target_in_flight`` =
the engines' batch size), to show what starting them costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

BODY = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def units(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The units of ``chat`` in GET /admin/models (its ``replicas``; a single copy: the entry itself)."""
    entry = next(m for m in models if m["name"] == "chat")
    replicas: list[dict[str, Any]] = entry.get("replicas") or [entry]
    return replicas


async def loaded_units(s: aiohttp.ClientSession, base: str) -> list[dict[str, Any]]:
    async with s.get(base + "/admin/models") as r:
        return [u for u in units((await r.json())["models"]) if u["state"] == "loaded"]


async def wait_loaded(s: aiohttp.ClientSession, base: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(await loaded_units(s, base)) >= n:
                return
        except (aiohttp.ClientError, OSError):
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{n} copies not loaded after {timeout}s")


async def burst(s: aiohttp.ClientSession, url: str, n: int, conc: int) -> tuple[float, list[float]]:
    """``n`` requests, ``conc`` at a time (closed loop): wall seconds and each request's latency."""
    latencies: list[float] = []
    todo = iter(range(n))
    data = json.dumps(BODY)
    headers = {"Content-Type": "application/json"}

    async def worker() -> None:
        for _ in todo:
            t = time.perf_counter()
            async with s.post(url, data=data, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
            latencies.append(time.perf_counter() - t)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return time.perf_counter() - started, latencies


async def measure(args: argparse.Namespace, replicas: dict[str, Any], warm: int) -> dict[str, Any]:
    """One router with ``replicas``; wait for ``warm`` loaded copies, then the burst."""
    port = free_port()
    engine = [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}",
              "--served-model-name", "${MODEL}", "--max-num-seqs", str(args.max_num_seqs),
              "--service-time", str(args.service_time)]
    cfg = {"listen": {"host": "127.0.0.1", "port": port}, "load_timeout": 60,
           "capacity": {"max_resident": replicas["max"]},
           "models": {"chat": {"cmd": engine, "stop_timeout": 2, "replicas": replicas}}}
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "router.yaml"
        config.write_text(json.dumps({**cfg, "state_dir": str(Path(tmp) / "state")}))  # JSON is YAML
        router = subprocess.Popen([sys.executable, "-m", "vllm_model_router", "serve", "--config", str(config),
                                   "--log-level", "warning"], start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=120)) as s:
                await wait_loaded(s, base, 0)  # the router answers
                async with s.post(base + "/admin/models/chat/load") as r:  # the first copy, whatever min says
                    assert r.status == 200, await r.text()
                await wait_loaded(s, base, warm)  # and the other warm copies (min) are up
                await burst(s, base + "/v1/chat/completions", warm * args.max_num_seqs, warm * args.max_num_seqs)
                wall, lat = await burst(s, base + "/v1/chat/completions", args.requests, args.concurrency)
                reached = len(await loaded_units(s, base))
        finally:
            router.terminate()
            router.wait(30)
    return {"replicas": replicas, "throughput_rps": args.requests / wall, "wall_s": wall,
            "p50_ms": statistics.median(lat) * 1e3, "p99_ms": pct(lat, 0.99) * 1e3, "copies_at_end": reached}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    per_copy = args.max_num_seqs / args.service_time
    rounds: list[dict[str, dict[str, Any]]] = []
    top = max(args.replicas)
    for i in range(args.rounds):
        row: dict[str, dict[str, Any]] = {}
        for n in args.replicas:
            row[str(n)] = await measure(args, {"min": n, "max": n}, n)
        if args.autoscale and top > 1:
            row["auto"] = await measure(args, {"min": 1, "max": top, "target_in_flight": args.max_num_seqs,
                                               "idle": "60s"}, 1)
        base = row[str(min(args.replicas))]
        for r in row.values():
            r["throughput_ratio"] = r["throughput_rps"] / base["throughput_rps"]
            r["p50_ratio"] = r["p50_ms"] / base["p50_ms"]
            r["p99_ratio"] = r["p99_ms"] / base["p99_ms"]
            r["of_ideal"] = r["throughput_rps"] / (per_copy * r["copies_at_end"])
        rounds.append(row)
        print(f"round {i + 1}: " + ", ".join(f"{k}: {v['throughput_rps']:.1f}/s ({v['throughput_ratio']:.2f}x)"
                                            for k, v in row.items()), flush=True)
    keys = ("throughput_rps", "throughput_ratio", "p50_ms", "p50_ratio", "p99_ms", "p99_ratio", "of_ideal",
            "copies_at_end", "wall_s")
    median = {k: {f: statistics.median(r[k][f] for r in rounds) for f in keys} for k in rounds[0]}
    return {"settings": {"requests": args.requests, "concurrency": args.concurrency,
                         "max_num_seqs": args.max_num_seqs, "service_time": args.service_time,
                         "ideal_rps_per_copy": per_copy},
            "rounds": rounds, "median": median}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3], help="copies to measure (first: baseline)")
    p.add_argument("--requests", type=int, default=300, help="requests per run")
    p.add_argument("--concurrency", type=int, default=24, help="clients at once (closed loop)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=4, help="each engine's batch size")
    p.add_argument("--service-time", type=float, default=0.2, help="seconds a request holds its place in a batch")
    p.add_argument("--no-autoscale", dest="autoscale", action="store_false",
                   help="skip the run that starts with one copy and lets the router add more")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    args.replicas = sorted(set(args.replicas))
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; median of {args.rounds} round(s); {args.requests} requests at "
          f"concurrency {args.concurrency}; engines: --max-num-seqs {args.max_num_seqs} --service-time "
          f"{args.service_time} (at most {result['settings']['ideal_rps_per_copy']:.0f} requests/s per copy)")
    print(f"{'copies':>10} | {'req/s':>7} | {'ratio':>6} | {'of ideal':>8} | {'p50 ms':>7} | {'ratio':>6} | "
          f"{'p99 ms':>7} | {'ratio':>6}")
    for name, m in result["median"].items():
        label = f"1->{m['copies_at_end']:.0f} auto" if name == "auto" else name
        print(f"{label:>10} | {m['throughput_rps']:7.1f} | {m['throughput_ratio']:5.2f}x | {m['of_ideal']:8.0%} | "
              f"{m['p50_ms']:7.0f} | {m['p50_ratio']:5.2f}x | {m['p99_ms']:7.0f} | {m['p99_ratio']:5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
