"""Scheduler cost against the size of the model zoo, replayed through the simulator.

    python bench/scheduler_scale.py                 # 8/3, 80/30, 400/150 and 1,600/600 models/slots
    python bench/scheduler_scale.py --sizes 400:150 --requests 2000

Each row is a Zipf(1.1) trace (seeded) over ``models`` models with ``slots`` resident at once, requests
arriving at slots/3 per second, 3 s each, 2 s loads: the router's scheduler decides every request on the
simulator's clock. "CPU per request" is the process time of the whole replay divided by the requests,
"scheduler" the share spent inside ``Scheduler.handle`` (the rest is the simulator). The last table is
the fast path alone: a request for a loaded model and its end, with nobody waiting, at 8 and 1,600
models: it should not depend on the zoo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vllm_model_router.scheduler import (
    Effect,
    Event,
    LoadDone,
    RequestArrived,
    RequestFinished,
    Scheduler,
    SchedulerConfig,
)
from vllm_model_router.testing.sim import simulate_router
from vllm_model_router.testing.traces import zipf_trace

SIZES = ((8, 3), (80, 30), (400, 150), (1600, 600))


class Timed(Scheduler):
    """The scheduler, adding up the process time spent deciding."""

    spent = 0.0

    def handle(self, event: Event, now: float) -> list[Effect]:
        t = time.process_time()
        try:
            return super().handle(event, now)
        finally:
            Timed.spent += time.process_time() - t


def replay(models: int, slots: int, requests: int) -> tuple[int, float, float]:
    """Requests replayed, and CPU milliseconds per request: all of it, and the scheduler's share."""
    rate = slots / 3
    trace = zipf_trace(models=models, capacity=slots, rate=rate, duration=requests / rate, service=3.0,
                       exponent=1.1, seed=0)
    Timed.spent = 0.0
    t = time.process_time()
    simulate_router(trace, 2.0, make_scheduler=Timed)
    total = time.process_time() - t
    n = len(trace.requests)
    return n, 1e3 * total / n, 1e3 * Timed.spent / n


def fast_path(models: int, rounds: int) -> float:
    """Microseconds per request (its arrival and its end) on a loaded model, nobody waiting."""
    s = Scheduler(SchedulerConfig(models=dict.fromkeys((f"m{i}" for i in range(models)), 0.0),
                                  max_resident=1, memory_gb=None, load_timeout=300.0, max_wait=30.0))
    s.handle(RequestArrived(0, "m0"), 0.0)
    s.handle(LoadDone("m0", True), 1.0)
    s.handle(RequestFinished(0), 1.0)
    t = time.process_time()
    for r in range(1, rounds + 1):
        s.handle(RequestArrived(r, "m0"), 2.0)
        s.handle(RequestFinished(r), 2.0)
    return 1e6 * (time.process_time() - t) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", default=[f"{m}:{s}" for m, s in SIZES], help="models:slots")
    ap.add_argument("--requests", type=int, default=6000)
    args = ap.parse_args()
    print("| models / slots | requests | CPU per request | of which scheduler |")
    print("|---|---|---|---|")
    for size in args.sizes:
        models, slots = (int(x) for x in size.split(":"))
        n, total, sched = replay(models, slots, args.requests)
        print(f"| {models:,} / {slots:,} | {n:,} | {total:.3f} ms | {sched:.3f} ms |", flush=True)
    print()
    print("| models | fast path per request |")
    print("|---|---|")
    for models in (8, 1600):
        print(f"| {models:,} | {fast_path(models, 20_000):.1f} µs |", flush=True)


if __name__ == "__main__":
    main()
