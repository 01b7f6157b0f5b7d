"""The scheduler's planning cost against the size of the cluster, replayed through the simulator.

    python bench/cluster_scale.py                      # 10, 100 and 1,000 nodes of 8 x 80 GB GPUs
    python bench/cluster_scale.py --nodes 100 --requests 50000 --budget 300
    python bench/cluster_scale.py --nodes 100 --profile    # where the time goes (cProfile, top entries)
    python bench/cluster_scale.py --nodes 100 --rate 0.33 0.1 0.03   # the same cluster at lighter loads

Each size is ``nodes`` nodes of 8 GPUs of 80 GB (global GPU ids, 8 per node) and ten models per GPU
(800, 8,000, 80,000) in a seeded mix: most need one GPU and 20, 40 or 70 GB of it; about 10% need 2
GPUs, 3% need 4 and 1% need 8 (70 GB on each, all on one node). ``max_resident`` never binds: GPU
memory does. A Zipf(1.1) trace (seeded, m0 the most popular) arrives at GPUs/3 requests per second
(``--rate``: per GPU), 3 s each, 2 s loads, 1 s stops: about one request in flight per GPU, and about
one in ten for a model that is not resident. That is a cluster in constant swapping: about a hundred
models at 100 nodes wait for a load at any time (the "queued" column: models with waiters that are not
resident, averaged over the events), and every pass plans them; lighter rates show the cost where
swaps keep up.

The cluster starts full, as a router in steady operation finds it: the models in order of popularity,
each placed round-robin on the freest GPUs of the next node with room (three nodes tried, skipped if
none has), handed to the scheduler as ``ModelFound`` (adopted servers). Starting empty instead
(``--cold``), the largest cluster would spend the whole run filling up and never evict. The simulator
(``RouterSim``: ``simulate_router`` always starts empty) is told those models are up, so it checks the
residency contract from the first event.

The process time of every ``Scheduler.handle`` call is recorded. A size whose replay takes more than
``--budget`` seconds of CPU is cut there: its figures cover the events handled until then, and the
table says how far into the trace that was. Belady's count is a rough yardstick only: MIN on the
sequence of models requested so far, one slot per GPU (as if every model took one whole GPU), from the
same warm start (the prefilled models requested first, their loads not counted); it ignores sizes,
multi-GPU models and the router's reordering. The goal it checks: p99 under 1 ms per event at 100
nodes, and p99 growing no faster than the number of nodes.

The trace and the configuration are moved out of the garbage collector's sight (``gc.freeze``) before
the replay: they are the benchmark's data, not the router's, and a full collection walking 100,000
request records would land in whichever event triggered it. The scheduler's own table is not.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import sys
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vllm_model_router.scheduler import (
    Effect,
    Event,
    Grant,
    ModelFound,
    ModelSpec,
    Reject,
    RequestArrived,
    Scheduler,
    SchedulerConfig,
    StartLoad,
    State,
    StopModel,
    Tick,
)
from vllm_model_router.testing.sim import RouterSim, belady_loads, percentile
from vllm_model_router.testing.traces import Trace, zipf_trace

GPUS_PER_NODE = 8
GPU_GB = 80.0
MODELS_PER_GPU = 10
NODES = (10, 100, 1000)
LOAD_TIME, STOP_TIME = 2.0, 1.0
GOAL_P99_US = 1000.0


class OutOfTime(Exception):
    """The replay used up its CPU budget."""


@dataclass(slots=True)
class Record:
    """What ``Timed`` saw: the process time of every call, the event kinds, and what the effects did."""

    deadline: float = float("inf")  # process time at which the replay is cut
    times: list[int] = field(default_factory=list)  # ns per handle call
    kinds: list[str] = field(default_factory=list)
    arrived: dict[int, float] = field(default_factory=dict)  # request -> arrival, until granted
    waits: list[float] = field(default_factory=list)
    requests: int = 0
    loads: int = 0
    stops: int = 0
    rejected: int = 0
    now: float = 0.0  # when the last event other than a Tick happened (simulated)
    queued: int = 0  # models waiting to be brought in, summed over the events (mean: / events)


class Timed(Scheduler):
    """The scheduler, recording the process time of every ``handle`` call; the bookkeeping is outside it."""

    rec = Record()

    def handle(self, event: Event, now: float) -> list[Effect]:
        t = time.process_time_ns()
        out = super().handle(event, now)
        rec = Timed.rec
        rec.times.append(time.process_time_ns() - t)
        rec.kinds.append(type(event).__name__)
        if not isinstance(event, Tick):  # (the last Tick is a timeout long after the trace has drained)
            rec.now = now
        rec.queued += sum(1 for name in self._waiting.firsts() if self._models[name].state is not State.LOADED)
        if isinstance(event, RequestArrived):
            rec.requests += 1
            rec.arrived[event.req_id] = now
        for e in out:
            if isinstance(e, Grant):
                rec.waits.append(now - rec.arrived.pop(e.req_id))
            elif isinstance(e, StartLoad):
                rec.loads += 1
            elif isinstance(e, StopModel):
                rec.stops += 1
            elif isinstance(e, Reject):
                rec.rejected += 1
        if time.process_time() > rec.deadline:
            raise OutOfTime
        return out


def model_mix(n: int, seed: int = 0) -> dict[str, ModelSpec]:
    """``n`` models named like the trace's (m0 the most popular), their sizes drawn independently of rank."""
    rng = random.Random(f"cluster-mix:{seed}")
    specs: dict[str, ModelSpec] = {}
    for i in range(n):
        r = rng.random()
        if r < 0.01:
            spec = ModelSpec(70.0, gpu_count=8)
        elif r < 0.04:
            spec = ModelSpec(70.0, gpu_count=4)
        elif r < 0.14:
            spec = ModelSpec(70.0, gpu_count=2)
        else:
            spec = ModelSpec(rng.choice((20.0, 40.0, 70.0)))
        specs[f"m{i}"] = spec
    return specs


def cluster_config(nodes: int, seed: int = 0) -> SchedulerConfig:
    gpus = nodes * GPUS_PER_NODE
    models = model_mix(gpus * MODELS_PER_GPU, seed)
    return SchedulerConfig(
        models=models,
        max_resident=len(models),  # never binds: memory does
        memory_gb=None,
        load_timeout=20 * 60.0,
        max_wait=30.0,
        gpu_memory_gb=dict.fromkeys(range(gpus), GPU_GB),
        gpu_nodes={g: f"node{g // GPUS_PER_NODE}" for g in range(gpus)},
    )


RATE = 1 / 3  # requests per second per GPU


def cluster_trace(nodes: int, requests: int, seed: int = 0, per_gpu: float = RATE) -> Trace:
    gpus = nodes * GPUS_PER_NODE
    rate = gpus * per_gpu
    # capacity is what the simulator holds residency to: max_resident (GPU memory binds first)
    return zipf_trace(models=gpus * MODELS_PER_GPU, capacity=gpus * MODELS_PER_GPU, rate=rate,
                      duration=requests / rate, service=3.0, exponent=1.1, seed=seed)


def prefill(config: SchedulerConfig, nodes: int) -> dict[str, tuple[int, ...]]:
    """Popular models first, each on the freest GPUs of the next node (round-robin) that has room, trying
    three nodes; a model that fits on none of them is skipped (a later, smaller one may fit)."""
    free = [GPU_GB] * (nodes * GPUS_PER_NODE)
    placed: dict[str, tuple[int, ...]] = {}
    cursor = 0
    for name, spec in config.models.items():
        assert isinstance(spec, ModelSpec)
        for attempt in range(3):
            node = (cursor + attempt) % nodes
            freest = sorted(range(node * GPUS_PER_NODE, (node + 1) * GPUS_PER_NODE), key=lambda g: -free[g])
            gpus = tuple(sorted(freest[:spec.gpu_count]))
            if all(free[g] >= spec.memory_gb for g in gpus):
                for g in gpus:
                    free[g] -= spec.memory_gb
                placed[name] = gpus
                cursor = node + 1
                break
    return placed


@dataclass(frozen=True, slots=True)
class Row:
    nodes: int
    rate: float  # requests per second per GPU
    models: int
    prefilled: int
    requests: int  # arrivals replayed
    trace_s: float  # how long the trace is (simulated)
    reached_s: float  # how far the replay got (simulated)
    cut: bool
    cpu_s: float
    times_us: list[float]
    loads: int
    stops: int
    rejected: int
    p99_wait: float
    belady: int
    by_kind: dict[str, tuple[int, float]]  # event kind -> (how many, p99 µs)
    queued: float  # models waiting to be brought in, mean over the events

    @property
    def p50(self) -> float:
        return percentile(self.times_us, 50)

    @property
    def p99(self) -> float:
        return percentile(self.times_us, 99)

    @property
    def mean(self) -> float:
        return sum(self.times_us) / len(self.times_us) if self.times_us else 0.0


def replay(nodes: int, requests: int, budget: float, cold: bool = False, profile: int = 0,
           per_gpu: float = RATE) -> Row:
    config = cluster_config(nodes)
    trace = cluster_trace(nodes, requests, per_gpu=per_gpu)
    warm = {} if cold else prefill(config, nodes)
    gc.collect()
    gc.freeze()
    scheduler = Timed(config)
    for name, gpus in warm.items():  # adopted servers: not timed
        Scheduler.handle(scheduler, ModelFound(name, gpus), 0.0)
    sim = RouterSim(trace, scheduler, LOAD_TIME, STOP_TIME)
    sim.running |= warm.keys()
    sim.up |= warm.keys()
    rec = Timed.rec = Record()
    prof = cProfile.Profile() if profile else None
    start = time.process_time()
    rec.deadline = start + budget
    cut = False
    if prof:
        prof.enable()
    try:
        sim.run()
    except OutOfTime:
        cut = True
    if prof:
        prof.disable()
    cpu = time.process_time() - start
    gc.unfreeze()
    by_kind: dict[str, list[float]] = {}
    times = [ns / 1e3 for ns in rec.times]
    for kind, us in zip(rec.kinds, times, strict=True):
        by_kind.setdefault(kind, []).append(us)
    # Belady from the same warm start: the prefilled models requested first, in reverse order of
    # popularity (the most popular last, so that it is the last evicted), their loads free
    seq = [*reversed(list(warm)), *(r.model for r in trace.requests[:rec.requests])]
    belady = belady_loads(seq, nodes * GPUS_PER_NODE) - len(warm)
    if prof:
        print(f"\nprofile, {nodes:,} nodes ({len(times):,} events):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(profile)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(profile)
    return Row(nodes, per_gpu, len(config.models), len(warm), rec.requests, trace.requests[-1].at, rec.now, cut, cpu,
               times, rec.loads, rec.stops, rec.rejected, percentile(rec.waits, 99), belady,
               {k: (len(v), percentile(v, 99)) for k, v in sorted(by_kind.items())},
               rec.queued / len(times) if times else 0.0)


def fmt_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    return f"{us / 1e3:.1f} ms" if us >= 1e3 else f"{us:.0f} µs"


def report(rows: list[Row]) -> None:
    print("| nodes x GPUs | requests/s | models (resident at start) | requests replayed | events | queued "
          "| p50 / event | p99 / event | mean | max | loads | evictions | Belady, 1 GPU each (rough) | rejected "
          "| p99 wait |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        replayed = f"{r.requests:,} ({r.reached_s:.1f} of {r.trace_s:.0f} s{', cut' if r.cut else ''})"
        print(f"| {r.nodes:,} x {GPUS_PER_NODE} | {r.rate * r.nodes * GPUS_PER_NODE:,.0f} "
              f"| {r.models:,} ({r.prefilled:,}) | {replayed} | {len(r.times_us):,} | {r.queued:.0f} "
              f"| {fmt_us(r.p50)} | {fmt_us(r.p99)} | {fmt_us(r.mean)} | {fmt_us(max(r.times_us, default=0))} "
              f"| {r.loads:,} | {r.stops:,} | {r.belady:,} | {r.rejected:,} | {r.p99_wait:.1f} s |")
    print()
    kinds = sorted({k for r in rows for k in r.by_kind})
    print("| nodes | requests/s | " + " | ".join(f"{k}: n, p99" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for r in rows:
        cells = [f"{r.by_kind[k][0]:,}, {fmt_us(r.by_kind[k][1])}" if k in r.by_kind else "" for k in kinds]
        print(f"| {r.nodes:,} | {r.rate * r.nodes * GPUS_PER_NODE:,.0f} | " + " | ".join(cells) + " |")
    print()
    for rate in dict.fromkeys(r.rate for r in rows):
        growth([r for r in rows if r.rate == rate])
    for r in rows:
        if r.nodes == 100 and r.times_us:
            print(f"goal p99 < {fmt_us(GOAL_P99_US)} per event at 100 nodes, {r.rate:g} requests/s per GPU: "
                  f"{'met' if r.p99 < GOAL_P99_US else 'missed'} ({fmt_us(r.p99)})")


def growth(rows: list[Row]) -> None:
    """How the cost grows with the nodes, between rows of one request rate per GPU."""
    for a, b in pairwise(rows):
        if a.times_us and b.times_us:
            print(f"growth {a.nodes:,} → {b.nodes:,} nodes ({b.nodes / a.nodes:g}x), whole replays: p99 "
                  f"{b.p99 / a.p99:.1f}x, p50 {b.p50 / a.p50:.1f}x, mean {b.mean / a.mean:.1f}x")
    # the replays are cut at different points of their traces (a small cluster gets further, into a
    # longer queue): the same number of first events of each compares like with like
    n = min((len(r.times_us) for r in rows), default=0)
    if len(rows) > 1 and n:
        print(f"\n| nodes | first {n:,} events: p50 | p99 | mean |")
        print("|---|---|---|---|")
        for r in rows:
            w = r.times_us[:n]
            print(f"| {r.nodes:,} | {fmt_us(percentile(w, 50))} | {fmt_us(percentile(w, 99))} "
                  f"| {fmt_us(sum(w) / n)} |")
        for a, b in pairwise(rows):
            wa, wb = a.times_us[:n], b.times_us[:n]
            print(f"growth {a.nodes:,} → {b.nodes:,} nodes, first {n:,} events: p99 "
                  f"{percentile(wb, 99) / percentile(wa, 99):.1f}x, p50 {percentile(wb, 50) / percentile(wa, 50):.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, nargs="*", default=list(NODES))
    ap.add_argument("--requests", type=int, default=10_000, help="requests in each trace (default 10,000)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="CPU seconds per cluster size; the replay is cut there (default 60)")
    ap.add_argument("--rate", type=float, nargs="*", default=[RATE],
                    help=f"requests per second per GPU, one replay each (default {RATE:.2f})")
    ap.add_argument("--cold", action="store_true", help="start with nothing resident")
    ap.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N",
                    help="replay under cProfile and print its top N entries")
    args = ap.parse_args()
    rows = []
    for rate in args.rate:
        for nodes in args.nodes:
            rows.append(replay(nodes, args.requests, args.budget, args.cold, args.profile, rate))
            print(f"{nodes:,} nodes, {rate:g} requests/s per GPU: {len(rows[-1].times_us):,} events, "
                  f"{rows[-1].cpu_s:.1f} s CPU", file=sys.stderr, flush=True)
    report(rows)


if __name__ == "__main__":
    main()
