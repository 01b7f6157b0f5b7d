"""Where the router's CPU goes per proxied request: a sampling profile under the proxy bench's load.

    pip install py-spy    # not a dependency of the router: a profiler, used only here
    python bench/proxy_profile.py [--seconds 8] [--scenario plain large stream] [--keep DIR]
    python bench/proxy_profile.py --micro     # the router's own stages alone, timed in process

Starts the router with the bench's fake engine (bench/proxy_bench.py), attaches py-spy to the router
process for each scenario (plain: small chat requests at concurrency 1; large: 200 KB chat bodies at
concurrency 1; stream: 20-chunk streams at concurrency 64; paced: 200-chunk streams, 2 ms apart, per chunk
relayed), and sorts every sample into one stage of the
request's path by the innermost frame that names one. Shares of the samples are turned into
microseconds with the router's CPU time per request measured over the same window. py-spy samples a
thread while it runs or waits for a CPU outside ``epoll``, so on a busy box the shares lean a little
towards the system calls (a ``write`` to a loopback socket does the receiver's TCP work too).

``--micro`` times the router's own per-request stages one by one, in this process (CPU time, no
sampling, no other process involved): reading the model from a small and a 200 KB body (the standard
library's ``json.loads``, as before, and ``json_model``), with the prompt-prefix key a model with replicas
needs too, the metrics observer, the usage history and the header copies.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as bench

# (stage, substrings of a frame "function (module)"): the innermost frame that matches one decides
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("socket writes (kernel: loopback TCP)", ("StreamWriter._writelines", "StreamWriter._write ")),
    ("usage history", ("record_request",)),
    ("metrics", ("RouterMetrics.", "prometheus_client", "_Track")),
    ("model extraction (body → model)", ("parse_json", "parse_form_model", "prefix_key", "json/decoder",
                                         "json/__init__", "find_model", "request_body")),
    ("scheduler acquire/release", ("Runtime.acquire", "Runtime.release", "Runtime.submit", "Runtime._execute",
                                   "Runtime.unit_of", "Runtime.units", "scheduler/", "Catalog.", "AdapterSync.",
                                   "Adapters.", "runtime/")),
    ("header copy", ("upstream_headers", "downstream_headers", "forward_headers", "response_headers")),
    ("response relay (engine → client)", ("finish_response", "StreamResponse.", "Response.", "Proxy._stream",
                                          "ClientResponse.read", "ClientResponse.release", "StreamReader.",
                                          "ResponseHandler.data_received", "HttpResponseParser", "web_response",
                                          "relay")),
    ("upstream request (client → engine)", ("ClientSession.", "ClientRequest.", "BaseConnector.", "TCPConnector.",
                                            "ClientResponse.start", "client_reqrep", "connector.py", "client.py",
                                            "_BaseRequestContextManager", "Upstream")),
    ("request body read", ("BaseRequest.read", "BaseRequest.post")),
    ("proxy's own logic", ("Proxy.", "proxy_post")),
    ("server: parse, dispatch, middlewares", ("RequestHandler.", "web_protocol", "web_app", "web_urldispatcher",
                                              "openai_errors", "_in_envelope", "check (vllm", "HttpRequestParser",
                                              "web_request", "http_parser", "multidict")),
    ("event loop: epoll, socket reads, tasks (uvloop)", ("Runner.run", "asyncio/", "uvloop", "<none>")),
]
OTHER = "other"


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for stage, needles in STAGES:
            if any(n in frame for n in needles):
                return stage
    return "event loop: epoll, socket reads, tasks (uvloop)" if not frames else OTHER


def breakdown(raw: Path) -> tuple[int, collections.Counter[str]]:
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = [f for f in stack.split(";") if f]
        counts[stage_of(frames)] += int(n)
        total += int(n)
    return total, counts


async def load(session: aiohttp.ClientSession, url: str, scenario: str, seconds: float) -> int:
    done = 0
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        if scenario == "plain":
            await bench.latency(session, url, 100)
            done += 100
        elif scenario == "large":
            await bench.latency(session, url, 10, bench.LARGE_BODY)
            done += 10
        elif scenario == "paced":
            _, events = await bench.throughput(session, url, 64, 1.0, bench.PACED_BODY)
            done += events
        else:
            n, _ = await bench.throughput(session, url, 64, 1.0)
            done += n
    return done


def user_system(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def run(args: argparse.Namespace, spy: str, out: Path) -> None:
    port = bench.free_port()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(bench.router_config(port), f)
    router = subprocess.Popen([sys.executable, "-m", "vllm_model_router", "serve", "--config", f.name,
                               "--log-level", "warning"], start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        await bench.wait_health(base + "/health")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            async with s.post(base + "/admin/models/bench/load") as r:
                assert r.status == 200, await r.text()
            url = base + "/v1/chat/completions"
            await bench.latency(s, url, 300)
            await bench.latency(s, url, 20, bench.LARGE_BODY)
            for scenario in args.scenario:
                raw = out / f"{scenario}.txt"
                prof = subprocess.Popen([spy, "record", "-p", str(router.pid), "-r", "500", "-d", str(args.seconds + 1),
                                         "-f", "raw", "--nolineno", "-o", str(raw)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.sleep(0.5)
                u0, s0 = user_system(router.pid)
                n = await load(s, url, scenario, args.seconds)
                u1, s1 = user_system(router.pid)
                cpu_us = (u1 - u0 + s1 - s0) / n * 1e6
                prof.wait()
                total, counts = breakdown(raw)
                unit = "chunk" if scenario == "paced" else "request"
                user, system = (u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6
                print(f"\n{scenario}: {n} {unit}s, router CPU {cpu_us:.1f} µs per {unit} (user {user:.1f}, "
                      f"system {system:.1f}), {total} samples")
                for stage, c in counts.most_common():
                    print(f"  {stage:48s} {c / total * 100:5.1f}%  {c / total * cpu_us:7.1f} µs")
    finally:
        router.terminate()
        router.wait(60)
        os.unlink(f.name)


def micro() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from vllm_model_router.http.affinity import body_prefix_key, prefix_key
    from vllm_model_router.http.headers import downstream_headers, upstream_headers
    from vllm_model_router.http.request_body import json_model, parse_json
    from vllm_model_router.state.store import Store

    def per_call(f: Callable[[], object], n: int) -> float:
        """The least CPU time per call of five runs (the others met a busy machine)."""
        runs = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(n):
                f()
            runs.append((time.process_time() - start) / n * 1e6)
        return min(runs)

    small, large = bench.BODY.encode(), bench.LARGE_BODY.encode()
    store = Store.open(":memory:")
    headers = CIMultiDictProxy(CIMultiDict([("Host", "127.0.0.1:8000"), ("User-Agent", "Python/3.11 aiohttp/3.14"),
                                            ("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate"),
                                            ("Content-Type", "application/json"), ("Content-Length", "80")]))
    observer = _observer()
    stages: list[tuple[str, Callable[[], object], int]] = [
        ("model, small body: json.loads (before)", lambda: parse_json(small), 20000),
        ("model, small body: json_model (now)", lambda: json_model(small), 20000),
        (f"model, {len(large) // 1000} KB body: json.loads (before)", lambda: parse_json(large), 100),
        (f"model, {len(large) // 1000} KB body: json_model (now)", lambda: json_model(large), 300),
        ("model + prompt key, 200 KB, replicas: before", lambda: prefix_key(parse_json(large)[0]), 100),
        ("model + prompt key, 200 KB, replicas: now", lambda: (json_model(large), body_prefix_key(large)), 300),
        ("metrics: waited + request_done", lambda: (observer.waited("bench", 1e-5),
                                                    observer.request_done("bench", "chat", 200, 1e-3)), 20000),
        ("usage history: record_request", lambda: store.record_request("bench", time.time()), 20000),
        ("header copies: upstream + downstream", lambda: (upstream_headers(headers), downstream_headers(headers)),
         20000),
    ]
    for name, f, n in stages:
        f()
        print(f"  {name:48s} {per_call(f, n):8.1f} µs")


def _observer() -> Any:
    """A RouterMetrics on a stand-in runtime (the observer needs only its event log)."""
    from vllm_model_router.http.metrics import RouterMetrics

    class _Events:
        def add_listener(self, listener: object) -> None:
            pass

    class _Runtime:
        events = _Events()

    return RouterMetrics(_Runtime())  # type: ignore[arg-type]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=8, help="load per scenario")
    p.add_argument("--scenario", nargs="+", choices=("plain", "large", "stream", "paced"),
                   default=["plain", "large", "stream", "paced"])
    p.add_argument("--keep", help="keep py-spy's raw stacks in this directory")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    p.add_argument("--micro", action="store_true", help="time the router's own stages in process, then stop")
    args = p.parse_args()
    if args.micro:
        micro()
        return 0
    out = Path(args.keep or tempfile.mkdtemp(prefix="proxy-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        import uvloop

        uvloop.run(run(args, args.py_spy, out))
    except ImportError:
        asyncio.run(run(args, args.py_spy, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
