"""What leases cost when worker processes ask one scheduler process for them over a Unix socket.

    python bench/worker_leases.py [--seconds 3] [--concurrency 64] [--models 4]

The design of docs/benchmarks.md ("On a machine with more cores"): worker processes relay their own
connections and ask one scheduler process for a lease per request (acquire → grant, release), nothing per
chunk. No HTTP here, the coordination alone: a scheduler process (uvloop, a Unix socket in a temp dir,
the router's real ``Scheduler`` with ``--models`` models resident, so a lease is its fast path) and N = 1,
2, 4 workers, each running C "requests" that only acquire, wait for the grant and release, at C = 1
(round-trip latency) and C = ``--concurrency``, and once with batching off. The baseline is what today's
single-process router pays: ``Scheduler.handle`` called directly, alone and with the pump's future.

CPU is user + system from /proc, per process, over a window after a warm-up; leases are grants received
in that window. Messages are fixed 12-byte ``struct`` frames (op, unit index, request id): the fixed size
is the length prefix, a whole read decodes in one ``iter_unpack`` call, and model names travel as indexes
into the table both sides read from one configuration (the last table compares length-prefixed msgpack).
Batching: the answers to all a read brings go out in one write per connection, and a worker sends what
its requests queued in one loop turn in one write; ``batch off`` writes every message on its own.
"""
# Longer than 400 lines because it is four programs the parent starts as itself (the scheduler process, a
# worker, the in-process baseline, and the parent that times them), sharing one wire format.

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vllm_model_router.scheduler import (
    Event,
    Grant,
    LoadDone,
    Reject,
    RequestArrived,
    RequestCancelled,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
    StartLoad,
    Tick,
    TimerAt,
)

FRAME = struct.Struct("<BxHQ")  # op, unit index, request id
ACQUIRE, RELEASE, GRANT, REJECT = 1, 2, 3, 4
OWNER_SHIFT = 40  # a worker's request ids are (its index << 40) + n: unique across workers
SAMPLE = 16  # the scheduler process times one ``handle`` call in 16 (reading the CPU clock is a system call)


def names(models: int) -> list[str]:
    return [f"m{i}" for i in range(models)]


def make_scheduler(models: int) -> Scheduler:
    """The router's scheduler with every model resident (loaded through one request each, then idle)."""
    table = names(models)
    s = Scheduler(SchedulerConfig(models=dict.fromkeys(table, 0.0), max_resident=models, memory_gb=None,
                                  load_timeout=300.0, max_wait=30.0))
    for i, name in enumerate(table):
        assert StartLoad(name) in s.handle(RequestArrived(i, name), 0.0)
        assert s.handle(LoadDone(name, True), 0.0) == [Grant(i, name)]
        s.handle(RequestFinished(i), 0.0)
    return s


class Framed(asyncio.Protocol):
    """Either end of a connection: frames in (a read may end inside one), frames out."""

    def __init__(self) -> None:
        self.buf = bytearray()  # the start of a frame a read cut off
        self.out = bytearray()  # frames queued for one write (batching)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def frames(self, data: bytes) -> bytes:
        """The whole frames received so far."""
        buf = self.buf
        if not buf and len(data) % FRAME.size == 0:
            return data
        buf += data
        n = len(buf) - len(buf) % FRAME.size
        whole = bytes(buf[:n])
        del buf[:n]
        return whole

    def flush(self) -> None:
        if self.out and self.transport is not None:
            self.transport.write(self.out)
            self.out = bytearray()


# ---------------------------------------------------------------- the scheduler process
def clock_cost_ns(n: int = 20_000) -> float:
    """What reading the CPU clock adds to an interval timed with it (subtracted from ``handle``'s time)."""
    clock = time.process_time_ns
    total = 0
    for _ in range(n):
        t = clock()
        total += clock() - t
    return total / n


class SchedulerServer:
    """The scheduler's shell: events from the workers in, grants back to whoever asked."""

    def __init__(self, models: int, batch: bool) -> None:
        self.loop = asyncio.get_running_loop()
        self.s = make_scheduler(models)
        self.table = names(models)
        self.index = {n: i for i, n in enumerate(self.table)}
        self.batch = batch
        self.waiting: dict[int, Conn] = {}  # request id -> the connection its grant goes to
        self.dirty: list[Conn] = []  # connections with answers queued (batching)
        self.timer: asyncio.TimerHandle | None = None
        self.reads = self.messages = self.other = 0
        self.events = self.sampled = self.handle_ns = 0  # handle's own CPU time, on one event in SAMPLE
        self.clock_ns = clock_cost_ns()

    def feed(self, event: Event) -> None:
        self.events += 1
        if self.events % SAMPLE:
            effects = self.s.handle(event, self.loop.time())
        else:
            t = time.process_time_ns()
            effects = self.s.handle(event, self.loop.time())
            self.handle_ns += time.process_time_ns() - t
            self.sampled += 1
        for e in effects:
            if isinstance(e, Grant | Reject):
                conn = self.waiting.pop(e.req_id, None)
                if conn is not None:
                    conn.send(GRANT if isinstance(e, Grant) else REJECT, self.index[e.model], e.req_id)
            elif isinstance(e, TimerAt):
                if self.timer is not None:
                    self.timer.cancel()
                self.timer = self.loop.call_at(e.when, self.feed, Tick(e.when))
            else:
                self.other += 1  # a load, stop or sleep: none expected with every model resident

    def flush(self) -> None:
        for conn in self.dirty:
            conn.flush()
        self.dirty.clear()


class Conn(Framed):
    """One worker's connection. What it holds is given back if it goes away (a worker that dies)."""

    def __init__(self, server: SchedulerServer) -> None:
        super().__init__()
        self.server = server
        self.held: set[int] = set()

    def data_received(self, data: bytes) -> None:
        server = self.server
        server.reads += 1
        for op, unit, rid in FRAME.iter_unpack(self.frames(data)):
            server.messages += 1
            if op == ACQUIRE:
                self.held.add(rid)
                server.waiting[rid] = self
                server.feed(RequestArrived(rid, server.table[unit]))
            else:
                self.held.discard(rid)
                server.feed(RequestFinished(rid))
        server.flush()

    def send(self, op: int, unit: int, rid: int) -> None:
        assert self.transport is not None
        if self.server.batch:
            if not self.out:
                self.server.dirty.append(self)
            self.out += FRAME.pack(op, unit, rid)
        else:
            self.transport.write(FRAME.pack(op, unit, rid))

    def connection_lost(self, exc: Exception | None) -> None:
        for rid in self.held:
            self.server.waiting.pop(rid, None)
            self.server.feed(RequestCancelled(rid))
        self.held.clear()
        self.server.flush()  # grants its cancellations freed for others


async def serve(sock: str, models: int, batch: bool) -> None:
    server = SchedulerServer(models, batch)
    stop = asyncio.Event()
    server.loop.add_signal_handler(signal.SIGTERM, stop.set)
    srv = await server.loop.create_unix_server(lambda: Conn(server), sock)
    await stop.wait()
    srv.close()
    print(json.dumps({"reads": server.reads, "messages": server.messages, "other_effects": server.other,
                      "handle_us": (server.handle_ns / max(1, server.sampled) - server.clock_ns) / 1e3}),
          flush=True)


# ---------------------------------------------------------------- a worker process
class Link(Framed):
    """A worker's side of the socket: acquire waits for the grant, release is sent and forgotten."""

    def __init__(self, owner: int, batch: bool) -> None:
        super().__init__()
        self.loop = asyncio.get_running_loop()
        self.ids = itertools.count(owner << OWNER_SHIFT)
        self.futures: dict[int, asyncio.Future[int]] = {}
        self.batch = batch

    def data_received(self, data: bytes) -> None:
        for op, unit, rid in FRAME.iter_unpack(self.frames(data)):
            fut = self.futures.pop(rid)
            fut.set_result(unit if op == GRANT else -1)

    def send(self, op: int, unit: int, rid: int) -> None:
        assert self.transport is not None
        if not self.batch:
            return self.transport.write(FRAME.pack(op, unit, rid))
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out += FRAME.pack(op, unit, rid)

    async def acquire(self, unit: int) -> int:
        rid = next(self.ids)
        fut: asyncio.Future[int] = self.loop.create_future()
        self.futures[rid] = fut
        self.send(ACQUIRE, unit, rid)
        if await fut < 0:
            raise RuntimeError("rejected")
        return rid

    def release(self, rid: int) -> None:
        self.send(RELEASE, 0, rid)


async def work(sock: str, owner: int, concurrency: int, models: int, start: float, until: float,
               batch: bool) -> None:
    loop = asyncio.get_running_loop()
    link = Link(owner, batch)
    await loop.create_unix_connection(lambda: link, sock)
    connected = time.monotonic()
    lat: list[int] = []

    async def client(k: int) -> None:
        unit = (owner + k) % models
        while True:
            t0 = time.perf_counter_ns()
            rid = await link.acquire(unit)
            t1 = time.perf_counter_ns()
            link.release(rid)
            now = time.monotonic()
            if now >= until:
                return
            if now >= start:
                lat.append(t1 - t0)

    await asyncio.gather(*(client(k) for k in range(concurrency)))
    print(json.dumps({"leases": len(lat), "late": connected > start, "lat_ns": lat}), flush=True)


# ---------------------------------------------------------------- the in-process baseline
async def inprocess(models: int, start: float, until: float, pump: bool) -> None:
    """One process, as the router is today: the lease is a call. ``pump``: with what pump.acquire and
    release do around it (a future per lease, a dict from id to future, the grant setting it)."""
    s = make_scheduler(models)
    table = names(models)
    loop = asyncio.get_running_loop()
    futures: dict[int, asyncio.Future[str]] = {}
    n = done = 0
    while True:
        for _ in range(1000):
            rid = n = n + 1
            model = table[rid % models]
            if pump:
                fut: asyncio.Future[str] = loop.create_future()
                futures[rid] = fut
                for e in s.handle(RequestArrived(rid, model), loop.time()):
                    if isinstance(e, Grant):
                        futures.pop(e.req_id).set_result(e.model)
                await fut
            else:
                s.handle(RequestArrived(rid, model), 0.0)
            s.handle(RequestFinished(rid), loop.time() if pump else 0.0)
        now = time.monotonic()
        if now >= until:
            break
        if now >= start:
            done += 1000
        await asyncio.sleep(0)
    print(json.dumps({"leases": done, "late": False, "lat_ns": []}), flush=True)


# ---------------------------------------------------------------- the parent: start, measure, tear down
def cpu_seconds(pid: int) -> tuple[float, float]:
    """A process's own CPU time, user and system, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@dataclass
class Row:
    label: str
    leases: int
    wall: float
    sched_cpu: tuple[float, float]  # user, system seconds (0 for the in-process rows)
    worker_cpu: tuple[float, float]  # user, system seconds, all workers (in-process: the one process)
    lat_ns: list[int]
    per_read: float  # messages per read at the scheduler (0: no scheduler)
    handle_us: float  # the scheduler process's ``handle`` per lease (two events), CPU µs


def pct(xs: list[int], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] / 1e3 if xs else float("nan")


def run_case(label: str, tmp: Path, specs: list[dict[str, Any]], seconds: float, models: int,
             batch: bool, with_scheduler: bool) -> Row:
    me = [sys.executable, str(Path(__file__).resolve()), "child"]
    sock = str(tmp / f"s{time.monotonic_ns()}.sock")
    procs: list[subprocess.Popen[str]] = []
    sched: subprocess.Popen[str] | None = None
    try:
        if with_scheduler:
            cmd = [*me, json.dumps({"role": "scheduler", "sock": sock, "models": models, "batch": batch})]
            sched = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if time.monotonic() > deadline or sched.poll() is not None:
                    raise RuntimeError("the scheduler process did not start")
                time.sleep(0.02)
        start = time.monotonic() + 1.5  # Python's start-up and a warm-up
        until = start + seconds
        common = {"sock": sock, "start": start, "until": until, "models": models, "batch": batch}
        procs = [subprocess.Popen([*me, json.dumps({**spec, **common})], stdout=subprocess.PIPE, text=True)
                 for spec in specs]
        pids = [p.pid for p in procs] + ([sched.pid] if sched else [])
        time.sleep(max(0.0, start - time.monotonic()))
        t0, c0 = time.monotonic(), {pid: cpu_seconds(pid) for pid in pids}
        time.sleep(max(0.0, until - time.monotonic()))
        t1, c1 = time.monotonic(), {pid: cpu_seconds(pid) for pid in pids}
        outs = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
        if any(o["late"] for o in outs):
            print(f"warning: {label}: a worker connected after the window began", file=sys.stderr)
        per_read = handle_us = 0.0
        if sched is not None:
            sched.send_signal(signal.SIGTERM)
            stats = json.loads(sched.communicate(timeout=30)[0])
            per_read = stats["messages"] / max(1, stats["reads"])
            handle_us = 2 * stats["handle_us"]
            if stats["other_effects"]:
                print(f"warning: {label}: {stats['other_effects']} loads or stops", file=sys.stderr)
        spent = {pid: (c1[pid][0] - c0[pid][0], c1[pid][1] - c0[pid][1]) for pid in pids}
        workers = (sum(spent[p.pid][0] for p in procs), sum(spent[p.pid][1] for p in procs))
        return Row(label, sum(o["leases"] for o in outs), t1 - t0, spent[sched.pid] if sched else (0.0, 0.0),
                   workers, [x for o in outs for x in o["lat_ns"]], per_read, handle_us)
    finally:
        for p in [*procs, *([sched] if sched else [])]:
            if p.poll() is None:
                p.kill()
            p.wait()


def codecs(n: int = 100_000) -> list[tuple[str, float]]:
    """µs per message, encode + decode, for a batch of ``n`` acquire messages: struct against msgpack."""
    msgs = [(ACQUIRE, i % 4, (1 << OWNER_SHIFT) + i) for i in range(n)]
    t = time.process_time()
    assert list(FRAME.iter_unpack(b"".join([FRAME.pack(*m) for m in msgs]))) == msgs
    by_struct = time.process_time() - t
    enc, dec, size = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(tuple[int, int, int]), struct.Struct("<I")
    t = time.process_time()
    data = memoryview(b"".join([size.pack(len(body)) + body for body in map(enc.encode, msgs)]))
    out, pos = [], 0
    while pos < len(data):
        (length,) = size.unpack_from(data, pos)
        out.append(dec.decode(data[pos + 4:pos + 4 + length]))
        pos += 4 + length
    assert out == msgs
    by_msgpack = time.process_time() - t
    return [("struct, fixed 12-byte frames", 1e6 * by_struct / n),
            ("msgpack (msgspec), 4-byte length prefix", 1e6 * by_msgpack / n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="measured window of each case")
    ap.add_argument("--concurrency", type=int, default=64, help="requests per worker in the throughput cases")
    ap.add_argument("--models", type=int, default=4)
    args = ap.parse_args()
    c, m = args.concurrency, args.models

    def workers(n: int, conc: int) -> list[dict[str, Any]]:
        return [{"role": "worker", "owner": i + 1, "concurrency": conc} for i in range(n)]

    cases: list[tuple[str, list[dict[str, Any]], bool, bool]] = [
        ("in process, `Scheduler.handle` alone", [{"role": "inproc", "pump": False}], True, False),
        ("in process, with the pump's future per lease", [{"role": "inproc", "pump": True}], True, False),
    ]
    cases += [(f"{n} worker{'s' if n > 1 else ''}, C = 1", workers(n, 1), True, True) for n in (1, 2, 4)]
    cases += [(f"{n} worker{'s' if n > 1 else ''}, C = {c}", workers(n, c), True, True) for n in (1, 2, 4)]
    cases += [(f"{n} worker{'s' if n > 1 else ''}, C = {c}, batch off", workers(n, c), False, True) for n in (1, 4)]
    load0 = Path("/proc/loadavg").read_text().split()[:3]
    rows = []
    with tempfile.TemporaryDirectory(prefix="leases-") as tmp:
        for label, specs, batch, with_scheduler in cases:
            rows.append(run_case(label, Path(tmp), specs, args.seconds, m, batch, with_scheduler))
            print(f"  {label}: {rows[-1].leases:,} leases", file=sys.stderr, flush=True)
    load1 = Path("/proc/loadavg").read_text().split()[:3]
    print(f"{os.cpu_count()} cores, load average {' '.join(load0)} before, {' '.join(load1)} after; "
          f"{m} models resident, {args.seconds:g} s per case\n")
    print("| case | leases/s | scheduler CPU per lease (user + system) | of which `handle` | "
          "leases/s per scheduler core | worker CPU per lease (user + system) | scheduler busy | messages per read | "
          "acquire→grant p50 / p99 |")
    print("|---|---|---|---|---|---|---|---|---|")

    def per_lease(cpu: tuple[float, float], n: int) -> str:
        return f"{1e6 * sum(cpu) / n:.1f} µs ({1e6 * cpu[0] / n:.1f} + {1e6 * cpu[1] / n:.1f})"

    for r in rows:
        n = max(1, r.leases)
        split = bool(r.per_read)  # a scheduler process, workers apart
        sched = per_lease(r.sched_cpu, n) if split else "-"
        core = f"{n / max(1e-9, sum(r.sched_cpu)):,.0f}" if split else f"{n / max(1e-9, sum(r.worker_cpu)):,.0f}"
        busy = f"{100 * sum(r.sched_cpu) / r.wall:.0f}%" if split else "-"
        reads = f"{r.per_read:.1f}" if split else "-"
        handle = f"{r.handle_us:.1f} µs" if split else "-"
        lat = f"{pct(r.lat_ns, 0.5):.0f} / {pct(r.lat_ns, 0.99):.0f} µs" if r.lat_ns and split else "-"
        print(f"| {r.label} | {r.leases / r.wall:,.0f} | {sched} | {handle} | {core} | {per_lease(r.worker_cpu, n)} | "
              f"{busy} | {reads} | {lat} |")
    print("\n| codec (in process, 100,000 acquires) | encode + decode per message |")
    print("|---|---|")
    for name, us in codecs():
        print(f"| {name} | {us:.2f} µs |")


def child(spec: dict[str, Any]) -> None:
    """A process of the run, its settings as JSON on the command line: the scheduler, a worker, the baseline."""
    coro: Coroutine[None, None, None]
    if spec["role"] == "scheduler":
        coro = serve(spec["sock"], spec["models"], spec["batch"])
    elif spec["role"] == "worker":
        coro = work(spec["sock"], spec["owner"], spec["concurrency"], spec["models"], spec["start"], spec["until"],
                    spec["batch"])
    else:
        coro = inprocess(spec["models"], spec["start"], spec["until"], spec["pump"])
    uvloop.run(coro)


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(json.loads(sys.argv[2]))
    else:
        main()
