"""What the router costs: the same fake engine called directly and through the router, in one run.

    python bench/proxy_bench.py [--rounds 3] [--requests 2000] [--seconds 5] [--concurrency 64]

Measures, interleaving direct and routed runs (absolute figures drift between runs on a shared box;
ratios measured side by side do not):
  - added latency p50/p99 at concurrency 1, non-streaming chat completions;
  - throughput at concurrency 64, streaming chat completions (20 SSE chunks each), routed / direct;
  - the router's own CPU seconds per 1,000 requests (independent of how loaded the box is).
Three processes share the machine: this load generator, the router and the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16})
STREAM_BODY = json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(session: aiohttp.ClientSession, url: str, n: int) -> list[float]:
    out = []
    headers = {"Content-Type": "application/json"}
    for _ in range(n):
        t = time.perf_counter()
        async with session.post(url, data=BODY, headers=headers) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t)
    return out


async def throughput(session: aiohttp.ClientSession, url: str, conc: int, seconds: float) -> tuple[int, int]:
    done = 0
    chunks = 0
    stop = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def worker() -> None:
        nonlocal done, chunks
        while time.perf_counter() < stop:
            async with session.post(url, data=STREAM_BODY, headers=headers) as r:
                assert r.status == 200, r.status
                async for _ in r.content.iter_any():
                    chunks += 1
            done += 1

    await asyncio.gather(*(worker() for _ in range(conc)))
    return done, chunks


async def wait_health(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} not healthy after {timeout}s")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    cfg = {
        "listen": {"host": "127.0.0.1", "port": port},
        "capacity": {"max_resident": 1},
        "models": {"bench": {"cmd": [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}",
                                     "--served-model-name", "${MODEL}", "--chunks", "20"]}},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(cfg, f)  # JSON is YAML
    router = subprocess.Popen([sys.executable, "-m", "vllm_model_router", "serve", "--config", f.name,
                               "--log-level", "warning"], start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_health(base + "/health")
        conn = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.post(base + "/admin/models/bench/load") as r:
                info = await r.json()
                assert r.status == 200, info
            direct = f"http://127.0.0.1:{info['port']}/v1/chat/completions"
            routed = base + "/v1/chat/completions"
            await latency(s, direct, 200)  # warm-up both paths
            await latency(s, routed, 200)
            rounds: list[dict[str, float]] = []
            for i in range(args.rounds):
                d_lat = await latency(s, direct, args.requests)
                c0 = cpu_seconds(router.pid)
                r_lat = await latency(s, routed, args.requests)
                c_lat = cpu_seconds(router.pid) - c0
                d_n, _ = await throughput(s, direct, args.concurrency, args.seconds)
                c0 = cpu_seconds(router.pid)
                r_n, _ = await throughput(s, routed, args.concurrency, args.seconds)
                c_tp = cpu_seconds(router.pid) - c0
                row = {
                    "direct_p50_ms": statistics.median(d_lat) * 1e3,
                    "routed_p50_ms": statistics.median(r_lat) * 1e3,
                    "added_p50_ms": (statistics.median(r_lat) - statistics.median(d_lat)) * 1e3,
                    "added_p99_ms": (pct(r_lat, 0.99) - pct(d_lat, 0.99)) * 1e3,
                    "direct_stream_rps": d_n / args.seconds,
                    "routed_stream_rps": r_n / args.seconds,
                    "stream_ratio": r_n / d_n,
                    "router_cpu_s_per_1k_plain": c_lat / args.requests * 1000,
                    "router_cpu_s_per_1k_stream": c_tp / max(r_n, 1) * 1000,
                }
                rounds.append(row)
                print(f"round {i + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    finally:
        router.terminate()
        router.wait(30)
        os.unlink(f.name)
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"rounds": rounds, "median": summary}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per latency run")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    m = result["median"]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}; median of {args.rounds} interleaved rounds")
    print(f"  added latency, c=1 non-streaming: p50 {m['added_p50_ms']:+.3f} ms (goal <= 0.5), "
          f"p99 {m['added_p99_ms']:+.3f} ms  [direct p50 {m['direct_p50_ms']:.3f} ms]")
    print(f"  streaming throughput, c={args.concurrency}: routed/direct = {m['stream_ratio']:.2f}x (goal >= 0.9) "
          f"[{m['routed_stream_rps']:.0f} vs {m['direct_stream_rps']:.0f} streams/s]")
    print(f"  router CPU: {m['router_cpu_s_per_1k_plain']:.3f} s per 1k plain requests, "
          f"{m['router_cpu_s_per_1k_stream']:.3f} s per 1k streams")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
