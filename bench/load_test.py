"""Load under swapping: many requests over more models than fit, checking the residency contract throughout.

    python bench/load_test.py [--requests 1000] [--concurrency 64] [--models 4] [--capacity 2]
                              [--startup-delay 1] [--seed 1] [--json]

The router runs in this process (as ``serve`` runs it: server.py's site) in front of fake engines that take
``--startup-delay`` seconds to start; ``--concurrency`` clients send ``--requests`` requests, half of them
streaming, each for a model picked at random. Checked while it runs:

- failed: any answer that is not a complete 200 (a stream must end with ``[DONE]``);
- lost: a request that got no answer at all;
- capacity violations: at any sample (every 2 ms, and at every lifecycle event) more models holding
  capacity (loading, loaded or stopping) than ``--capacity``, or more live engine processes than that in
  the process table (sampled every 50 ms);
- busy evictions: a model stopped (lifecycle event ``unloading``) while requests were in flight on it.

Reported: requests, wall time, loads, evictions, latency p50/p99 (end to end, load waits included).
``tests/integration/test_load.py`` runs a reduced version of it in the fast suite.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from vllm_model_router.config import build_config
from vllm_model_router.drivers import procs
from vllm_model_router.http.app import RUNTIME, build_app
from vllm_model_router.http.server import make_runner, start_site
from vllm_model_router.runtime.pump import Runtime
from vllm_model_router.state.lifecycle import LifecycleEvent

MARKER_VAR = "VMR_LOAD_MARKER"
HOLDING = ("loading", "loaded", "unloading")


@dataclass
class Report:
    requests: int
    concurrency: int
    models: int
    capacity: int
    startup_delay: float
    wall_s: float = 0.0
    ok: int = 0
    failed: int = 0
    lost: int = 0
    streams: int = 0
    loads: int = 0
    evictions: int = 0
    capacity_violations: int = 0
    process_violations: int = 0
    busy_evictions: int = 0
    max_resident_seen: int = 0
    max_processes_seen: int = 0
    samples: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    errors: list[str] = field(default_factory=list)


def engine_pids(marker: str) -> set[int]:
    """Live fake-engine processes of this run (by the marker in their environment)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found: set[int] = set()
    for stat in procs.live_processes():
        try:
            if needle in Path(f"/proc/{stat.pid}/environ").read_bytes().split(b"\0"):
                found.add(stat.pid)
        except OSError:
            continue
    return found


def model_config(n_models: int, capacity: int, startup_delay: float, marker: str) -> dict[str, Any]:
    fake = [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}", "--served-model-name",
            "${MODEL}", "--startup-delay", str(startup_delay)]
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "capacity": {"max_resident": capacity},
        "load_timeout": 300,
        "state_dir": False,
        "models": {f"m{i}": {"cmd": fake, "stop_timeout": 5, "env": {MARKER_VAR: marker}} for i in range(n_models)},
    }


class Watch:
    """Checks the residency contract at every lifecycle event and by sampling."""

    def __init__(self, runtime: Runtime, report: Report, marker: str) -> None:
        self.runtime = runtime
        self.report = report
        self.marker = marker
        runtime.events.add_listener(self.on_event)

    def check_views(self, when: str) -> None:
        views = self.runtime.views()
        holding = [v.name for v in views if v.state.value in HOLDING]
        self.report.samples += 1
        self.report.max_resident_seen = max(self.report.max_resident_seen, len(holding))
        if len(holding) > self.report.capacity:
            self.report.capacity_violations += 1
            self.report.errors.append(f"{when}: {holding} hold capacity")

    def on_event(self, event: LifecycleEvent) -> None:  # runs inside the runtime's event batch
        if event.kind == "load_started":
            self.report.loads += 1
        if event.kind == "unloading":
            self.report.evictions += 1
            busy = [v for v in self.runtime.views() if v.name == event.model and v.in_flight]
            if busy:
                self.report.busy_evictions += 1
                self.report.errors.append(f"{event.model} stopped with {busy[0].in_flight} requests in flight")
        self.check_views(f"event {event.kind} {event.model}")

    async def sample(self, stop: asyncio.Event) -> None:
        tick = 0
        while not stop.is_set():
            self.check_views("sample")
            if tick % 25 == 0:  # the process table is dearer to read: every 50 ms
                alive = len(engine_pids(self.marker))
                self.report.max_processes_seen = max(self.report.max_processes_seen, alive)
                # a stopped engine's process may linger a moment after "unloaded"; a server is one process
                if alive > self.report.capacity:
                    self.report.process_violations += 1
                    self.report.errors.append(f"{alive} engine processes alive")
            tick += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.002)


async def one(session: aiohttp.ClientSession, url: str, model: str, stream: bool, rng: random.Random
              ) -> tuple[bool, float, str]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello there"}]}
    if stream:
        body.update(stream=True, fake={"chunks": 4, "chunk_delay": 0.01})
    else:
        body["fake"] = {"delay": round(rng.uniform(0, 0.05), 3)}
    started = time.monotonic()
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            raw = await resp.read()
            elapsed = time.monotonic() - started
            if resp.status != 200:
                return False, elapsed, f"{model}: {resp.status} {raw[:200]!r}"
            if stream:
                if not raw.rstrip().endswith(b"data: [DONE]") or b'"error"' in raw:
                    return False, elapsed, f"{model}: incomplete stream {raw[-200:]!r}"
            elif not json.loads(raw).get("choices"):
                return False, elapsed, f"{model}: no choices in {raw[:200]!r}"
            return True, elapsed, ""
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return False, time.monotonic() - started, f"{model}: {e!r}"


async def run(requests: int = 1000, concurrency: int = 64, n_models: int = 4, capacity: int = 2,
              startup_delay: float = 1.0, seed: int = 1) -> Report:
    report = Report(requests, concurrency, n_models, capacity, startup_delay)
    marker = uuid.uuid4().hex
    config = build_config(model_config(n_models, capacity, startup_delay, marker), env={}, source="<load test>")
    runner = make_runner(build_app(config, probe=None), config, shutdown_grace=5)
    await runner.setup()
    stop = asyncio.Event()
    try:
        site = await start_site(runner, config, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{site.port}"
        watch = Watch(runner.app[RUNTIME], report, marker)
        sampler = asyncio.create_task(watch.sample(stop))
        rng = random.Random(seed)
        work = [(f"m{rng.randrange(n_models)}", rng.random() < 0.5) for _ in range(requests)]
        report.streams = sum(1 for _, s in work if s)
        queue: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        latencies: list[float] = []

        async def client(session: aiohttp.ClientSession) -> None:
            while True:
                try:
                    model, stream = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                ok, elapsed, error = await one(session, url, model, stream, rng)
                latencies.append(elapsed)
                if ok:
                    report.ok += 1
                else:
                    report.failed += 1
                    report.errors.append(error)

        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
            started = time.monotonic()
            await asyncio.gather(*(client(s) for _ in range(concurrency)))
            report.wall_s = time.monotonic() - started
        stop.set()
        await sampler
        report.lost = requests - report.ok - report.failed
        if latencies:
            ordered = sorted(latencies)
            report.p50_ms = statistics.median(ordered) * 1000
            report.p99_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
            report.max_ms = ordered[-1] * 1000
    finally:
        stop.set()
        await runner.cleanup()
        deadline = time.monotonic() + 10
        while engine_pids(marker) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = engine_pids(marker)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        if left:
            report.errors.append(f"engine processes outlived the router: {sorted(left)}")
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--capacity", type=int, default=2)
    p.add_argument("--startup-delay", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args()
    report = asyncio.run(run(args.requests, args.concurrency, args.models, args.capacity, args.startup_delay,
                             args.seed))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
        print(f"requests {report.requests} ({report.streams} streaming) over {report.models} models, capacity "
              f"{report.capacity}, concurrency {report.concurrency}, engine startup {report.startup_delay:g}s")
        print(f"wall {report.wall_s:.1f}s  ok {report.ok}  failed {report.failed}  lost {report.lost}")
        print(f"loads {report.loads}  evictions {report.evictions}  busy evictions {report.busy_evictions}")
        print(f"capacity violations {report.capacity_violations} (max resident seen {report.max_resident_seen}, "
              f"{report.samples} samples)  process violations {report.process_violations} "
              f"(max engine processes seen {report.max_processes_seen})")
        print(f"latency p50 {report.p50_ms:.0f} ms  p99 {report.p99_ms:.0f} ms  max {report.max_ms:.0f} ms")
        for e in report.errors[:20]:
            print(f"  ! {e}")
    bad = report.failed or report.lost or report.capacity_violations or report.process_violations \
        or report.busy_evictions or report.errors
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
