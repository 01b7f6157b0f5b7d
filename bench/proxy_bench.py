"""What the router costs: the same fake engine called directly and through the router, in one run.

    python bench/proxy_bench.py [--rounds 3] [--requests 2000] [--large-requests 300] [--seconds 5]
                                [--concurrency 64] [--baseline SRC] [--router-args ...] [--json FILE]

Measures, interleaving direct and routed runs (absolute figures drift between runs on a shared box;
ratios measured side by side do not):
  - added latency p50/p99 at concurrency 1, non-streaming chat completions (a small body);
  - the same with a 200 KB chat body (a long conversation: what parsing the body costs);
  - throughput at concurrency 64, streaming chat completions (20 SSE chunks each), routed / direct;
  - paced streams (200 chunks, 2 ms apart, as an engine sends tokens): each chunk arrives on its own, so
    the router's CPU per relayed chunk, and the chunks one router core could relay per second;
  - the router's own CPU seconds (process time, user + system) per 1,000 requests of each kind, per
    chunk: far steadier than the latencies on a busy box (about ±10% between runs against ±30%).
With ``--baseline OTHER/src`` a second router, run from another source tree, is measured in the same
rounds: a before/after in one run.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HEADERS = {"Content-Type": "application/json"}
BODY = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16})
STREAM_BODY = json.dumps({"model": "bench", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
PACED_CHUNKS = 200
PACED_BODY = json.dumps({"model": "bench", "stream": True, "max_tokens": 400,
                         "messages": [{"role": "user", "content": " ".join(["word"] * 400)}],
                         "fake": {"chunks": PACED_CHUNKS, "chunk_delay": 0.002}})


def large_body(size: int = 200_000) -> str:
    """A chat of about ``size`` bytes: a long conversation with the model named last, as clients send it
    (the router cannot find the model without looking through the whole object)."""
    turn = ("Here is the next part of the document we are discussing, with its numbers (12.5, 3e8), "
            "quotes (\"like this\"), escapes (\\n, \\u00e9) and some unicode: été, 東京. ") * 8
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful reader."}]
    while len(json.dumps(messages)) < size:
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": turn})
    return json.dumps({"messages": messages, "max_tokens": 16, "temperature": 0.2, "model": "bench"})


LARGE_BODY = large_body()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_times(pid: int) -> tuple[float, float]:
    """The process's own user and system CPU seconds, every thread; not its children's (the engine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """The process's own CPU time (user + system), every thread; not its children's (the engine)."""
    return sum(cpu_times(pid))


async def latency(session: aiohttp.ClientSession, url: str, n: int, body: str = BODY) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        async with session.post(url, data=body, headers=HEADERS) as r:
            await r.read()
            assert r.status == 200, r.status
        out.append(time.perf_counter() - t)
    return out


async def throughput(session: aiohttp.ClientSession, url: str, conc: int, seconds: float,
                     body: str = STREAM_BODY) -> tuple[int, int]:
    """(streams done, SSE events received) by ``conc`` clients in ``seconds``."""
    done = 0
    events = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done, events
        while time.perf_counter() < stop:
            async with session.post(url, data=body, headers=HEADERS) as r:
                assert r.status == 200, r.status
                n = (await r.read()).count(b"\n\n")  # not `events += await ...`: that races
            events += n
            done += 1

    await asyncio.gather(*(worker() for _ in range(conc)))
    return done, events


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


def router_config(port: int) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "capacity": {"max_resident": 1},
        "models": {"bench": {"cmd": [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}",
                                     "--served-model-name", "${MODEL}", "--chunks", "20"]}},
    }


class Router:
    """One router under test (with its own fake engine): this tree's, or another source tree's
    (``--baseline SRC``: the same bench, interleaved, against the code in SRC)."""

    def __init__(self, name: str, src: str | None, extra: list[str]) -> None:
        self.name = name
        self.port = free_port()
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            json.dump(router_config(self.port), f)  # JSON is YAML
        self.config = f.name
        env = dict(os.environ)
        if src is not None:
            paths = [str(Path(src).resolve()), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        cmd = [sys.executable, "-m", "vllm_model_router", "serve", "--config", f.name, "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd + extra, start_new_session=True, env=env)
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def start(self, s: aiohttp.ClientSession) -> str:
        """Wait for it, load the model; the engine's own URL."""
        await wait_health(f"http://127.0.0.1:{self.port}/health")
        async with s.post(f"http://127.0.0.1:{self.port}/admin/models/bench/load") as r:
            info = await r.json()
            assert r.status == 200, info
        return f"http://127.0.0.1:{info['port']}/v1/chat/completions"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        os.unlink(self.config)


async def run(args: argparse.Namespace, on_start: Callable[[int], None] = lambda pid: None) -> dict[str, Any]:
    """The interleaved rounds; ``on_start(pid)`` is called once the router serves (to attach a profiler)."""
    routers = [Router("", None, list(args.router_args))]
    if args.baseline:
        routers.append(Router("baseline_", args.baseline, list(args.router_args)))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            engines = [await r.start(s) for r in routers]
            direct = engines[0]
            for url in (direct, *(r.url for r in routers)):  # warm-up every path
                await latency(s, url, 200)
                await latency(s, url, 20, LARGE_BODY)
            on_start(routers[0].pid)
            rounds: list[dict[str, float]] = []
            for i in range(args.rounds):
                row = await one_round(s, args, direct, routers)
                rounds.append(row)
                print(f"round {i + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    finally:
        for r in routers:
            r.stop()
    summary = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    return {"rounds": rounds, "median": summary}


async def one_round(s: aiohttp.ClientSession, args: argparse.Namespace, direct: str,
                    routers: list[Router]) -> dict[str, float]:
    row: dict[str, float] = {}
    d_lat = await latency(s, direct, args.requests)
    row["direct_p50_ms"] = statistics.median(d_lat) * 1e3
    for r in routers:
        c0 = cpu_seconds(r.pid)
        r_lat = await latency(s, r.url, args.requests)
        row[r.name + "router_cpu_s_per_1k_plain"] = (cpu_seconds(r.pid) - c0) / args.requests * 1000
        row[r.name + "added_p50_ms"] = (statistics.median(r_lat) - statistics.median(d_lat)) * 1e3
        row[r.name + "added_p99_ms"] = (pct(r_lat, 0.99) - pct(d_lat, 0.99)) * 1e3
    d_big = await latency(s, direct, args.large_requests, LARGE_BODY)
    row["large_direct_p50_ms"] = statistics.median(d_big) * 1e3
    for r in routers:
        c0 = cpu_seconds(r.pid)
        r_big = await latency(s, r.url, args.large_requests, LARGE_BODY)
        row[r.name + "router_cpu_s_per_1k_large"] = (cpu_seconds(r.pid) - c0) / args.large_requests * 1000
        row[r.name + "large_added_p50_ms"] = (statistics.median(r_big) - statistics.median(d_big)) * 1e3
    d_n, _ = await throughput(s, direct, args.concurrency, args.seconds)
    row["direct_stream_rps"] = d_n / args.seconds
    for r in routers:
        c0 = cpu_seconds(r.pid)
        r_n, r_events = await throughput(s, r.url, args.concurrency, args.seconds)
        row[r.name + "router_cpu_s_per_1k_stream"] = (cpu_seconds(r.pid) - c0) / max(r_n, 1) * 1000
        row[r.name + "stream_ratio"] = r_n / d_n
        row[r.name + "events_per_stream"] = r_events / max(r_n, 1)
    for r in routers:
        c0 = cpu_seconds(r.pid)
        t0 = time.perf_counter()
        _, p_events = await throughput(s, r.url, args.concurrency, args.seconds, PACED_BODY)
        c_paced = cpu_seconds(r.pid) - c0
        row[r.name + "router_cpu_us_per_paced_chunk"] = c_paced / max(p_events, 1) * 1e6
        row[r.name + "paced_chunks_per_s"] = p_events / (time.perf_counter() - t0)
        row[r.name + "paced_chunks_per_router_cpu_s"] = p_events / max(c_paced, 1e-9)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=2000, help="sequential requests per latency run")
    p.add_argument("--large-requests", type=int, default=300, help="sequential 200 KB requests per run")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--baseline", metavar="SRC", help="also run a router from this source tree (its src/ directory), "
                   "interleaved: before/after in one run")
    p.add_argument("--router-args", nargs=argparse.REMAINDER, default=[], help="more arguments for `serve`")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    try:
        import uvloop

        result = uvloop.run(run(args))
    except ImportError:
        result = asyncio.run(run(args))
    report(args, result["median"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def report(args: argparse.Namespace, m: dict[str, float]) -> None:
    load = os.getloadavg()
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d')}, load average {load[0]:.2f}; median of {args.rounds} interleaved rounds")
    print(f"  direct p50: {m['direct_p50_ms']:.3f} ms; with a {len(LARGE_BODY) // 1000} KB chat body "
          f"{m['large_direct_p50_ms']:.3f} ms; {m['direct_stream_rps']:.0f} streams/s at c={args.concurrency}")
    for name, label in (("", "this tree"), ("baseline_", "baseline")):
        if name + "added_p50_ms" not in m:
            continue
        print(f"  {label}:")
        print(f"    added latency, c=1 non-streaming: p50 {m[name + 'added_p50_ms']:+.3f} ms, "
              f"p99 {m[name + 'added_p99_ms']:+.3f} ms; 200 KB chat body: p50 {m[name + 'large_added_p50_ms']:+.3f} ms")
        print(f"    streaming throughput, c={args.concurrency}: routed/direct = {m[name + 'stream_ratio']:.2f}x")
        print(f"    router CPU: {m[name + 'router_cpu_s_per_1k_plain']:.3f} s per 1k plain requests, "
              f"{m[name + 'router_cpu_s_per_1k_large']:.3f} s per 1k 200 KB requests, "
              f"{m[name + 'router_cpu_s_per_1k_stream']:.3f} s per 1k streams "
              f"({m[name + 'events_per_stream']:.0f} SSE events each)")
        print(f"    paced streams: {m[name + 'router_cpu_us_per_paced_chunk']:.1f} µs router CPU per chunk, "
              f"{m[name + 'paced_chunks_per_router_cpu_s']:.0f} chunks per router CPU second "
              f"({m[name + 'paced_chunks_per_s']:.0f} chunks/s relayed here)")


if __name__ == "__main__":
    raise SystemExit(main())
