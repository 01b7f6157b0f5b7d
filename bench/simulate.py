"""Scheduling quality: request traces replayed through the router's scheduler on a simulated clock.

    python bench/simulate.py [--duration 7200] [--rate 1] [--load-times 2 30] [--max-wait 30] [--json]
    python bench/simulate.py --quick          # 10 minutes of traffic: a smoke test (seconds)
    python bench/simulate.py --sweep          # idle protection settings x load times x rates (~1 min)

Each trace (seeded: Poisson arrivals, a fixed service time per request) is served three ways:
  - router: the router's own pure scheduler (src/vllm_model_router/scheduler), driven by a
    discrete-event loop: loads take --load-time seconds, stops --stop-time, no processes, no sleeping;
  - naive LRU: a plain swapper's policy: strictly in arrival order (head-of-line blocking), LRU evicted on
    every miss;
  - Belady: the offline optimum (MIN) on the trace's sequence of requested models: the fewest loads
    possible when requests are served in arrival order. It is a lower bound for arrival-order service
    only: a scheduler that serves requests for resident models first (batching) can load less.
Waits are arrival -> grant. The goal: router loads <= 1.2x Belady, with p99 waits within the
fairness bound (max_wait, plus the drain, stop and load a forced swap still needs).

--sweep serves every trace under several idle-protection settings (keep_idle x keep_idle_reloads, and
the protection off) at each load time and each rate (--rates), and prints loads / Belady and p99 wait
per trace shape: what the defaults were chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from vllm_model_router.scheduler import SchedulerConfig
from vllm_model_router.testing.sim import (
    DEFAULT_LOAD_TIMEOUT,
    DEFAULT_MAX_WAIT,
    DEFAULT_STOP_TIME,
    Comparison,
    compare,
)
from vllm_model_router.testing.traces import DEFAULT_SERVICE, standard_traces

GOAL_RATIO = 1.2
DEFAULTS = SchedulerConfig({}, 1, None, DEFAULT_LOAD_TIMEOUT, DEFAULT_MAX_WAIT)  # the router's policy defaults


def seconds(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 100:
        return f"{x:.0f} s"
    return f"{x:.1f} s"


def fairness_bound(args: argparse.Namespace, load_time: float) -> float:
    """The longest a request should wait once a swap is forced: max_wait, then its victims drain (one
    service time), stop and the model loads."""
    return float(args.max_wait + args.service + args.stop_time + load_time)


def markdown(rows: list[Comparison], args: argparse.Namespace) -> str:
    lines = [
        "| trace | models | capacity | load time | loads (router / naive LRU / Belady) | router/Belady "
        "| mean wait (router / naive) | p99 wait (router / naive) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in rows:
        lines.append(
            f"| {c.trace} | {c.models} | {c.capacity} | {c.load_time:g} s "
            f"| {c.router.loads} / {c.naive.loads} / {c.belady} | {c.ratio:.2f} "
            f"| {seconds(c.router.mean_wait)} / {seconds(c.naive.mean_wait)} "
            f"| {seconds(c.router.p99_wait)} / {seconds(c.naive.p99_wait)} |"
        )
    return "\n".join(lines)


def sweep(args: argparse.Namespace) -> int:
    """Every trace under each idle-protection setting, load time and rate: loads / Belady and p99 wait."""
    started = time.perf_counter()
    policies: list[tuple[str, float | None, float | None]] = [("off (keep_idle 0)", 0.0, None)]
    for keep in args.sweep_keep_idle:
        for reloads in args.sweep_reloads:
            default = keep == DEFAULTS.keep_idle and reloads == DEFAULTS.keep_idle_reloads
            policies.append((f"{keep:g} s, {reloads:g} reloads{' (default)' if default else ''}", keep, reloads))
    out: list[dict[str, object]] = []
    names: list[str] = []
    lines: list[str] = []
    for rate in args.rates:
        traces = standard_traces(rate=rate, duration=args.duration, service=args.service, seed=args.seed)
        if args.traces:
            traces = [t for t in traces if t.name in args.traces]
        names = [t.name for t in traces]
        for load_time in args.load_times:
            naive: list[str] = []
            for label, keep, reloads in policies:
                rows = [compare(t, load_time, stop_time=args.stop_time, max_wait=args.max_wait,
                                load_timeout=args.load_timeout, keep_idle=keep, keep_idle_reloads=reloads)
                        for t in traces]
                naive = [f"{c.naive.loads / c.belady:.2f}x, {seconds(c.naive.p99_wait)}" for c in rows]
                cells = [f"{c.ratio:.2f}x, {seconds(c.router.p99_wait)}" for c in rows]
                lines.append(f"| {rate:g}/s | {load_time:g} s | {label} | " + " | ".join(cells) + " |")
                out.append({"rate_per_s": rate, "load_time_s": load_time, "keep_idle_s": keep,
                            "keep_idle_reloads": reloads, "rows": [c.as_dict() for c in rows]})
            lines.append(f"| {rate:g}/s | {load_time:g} s | naive LRU | " + " | ".join(naive) + " |")
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"simulation_seconds": round(elapsed, 3), "sweep": out}, indent=2))
        return 0
    print(f"{args.duration / 3600:g} h of traffic per trace, {args.service:g} s service, {args.stop_time:g} s "
          f"stops, max_wait {args.max_wait:g} s, seed {args.seed}; each cell: loads / Belady, p99 wait\n")
    print("| rate | load | keep_idle, keep_idle_reloads | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    print("\n".join(lines))
    print(f"\nSimulated in {elapsed:.1f} s.")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=7200.0, help="seconds of traffic per trace (default 2 h)")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--service", type=float, default=DEFAULT_SERVICE, help="seconds a granted request runs")
    p.add_argument("--load-times", type=float, nargs="+", default=[2.0, 30.0], help="seconds a load takes")
    p.add_argument("--stop-time", type=float, default=DEFAULT_STOP_TIME, help="seconds a stop takes")
    p.add_argument("--max-wait", type=float, default=DEFAULT_MAX_WAIT, help="the scheduler's fairness bound")
    p.add_argument("--keep-idle", type=float, default=None,
                   help="the scheduler's keep_idle (default: the router's; 0: no protection for models in steady use)")
    p.add_argument("--keep-idle-reloads", type=float, default=None,
                   help="the scheduler's keep_idle_reloads (default: the router's)")
    p.add_argument("--sweep", action="store_true", help="sweep the idle protection (see --sweep-* and --rates)")
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.1], help="--sweep: requests per second")
    p.add_argument("--sweep-keep-idle", type=float, nargs="+", default=[60.0], help="--sweep: keep_idle values")
    p.add_argument("--sweep-reloads", type=float, nargs="+", default=[4.0, 6.5, 10.0],
                   help="--sweep: keep_idle_reloads values")
    p.add_argument("--load-timeout", type=float, default=DEFAULT_LOAD_TIMEOUT,
                   help="the scheduler's load_timeout (waiters older than this get 504)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--traces", nargs="+", help="only these trace shapes (zipf bursts alternating uniform rotating)")
    p.add_argument("--quick", action="store_true", help="10 minutes of traffic (a smoke test)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 600.0)

    if args.sweep:
        return sweep(args)
    started = time.perf_counter()
    traces = standard_traces(rate=args.rate, duration=args.duration, service=args.service, seed=args.seed)
    if args.traces:
        unknown = set(args.traces) - {t.name for t in traces}
        if unknown:
            p.error(f"unknown trace shapes: {', '.join(sorted(unknown))}")
        traces = [t for t in traces if t.name in args.traces]
    rows = [
        compare(t, load_time, stop_time=args.stop_time, max_wait=args.max_wait, load_timeout=args.load_timeout,
                keep_idle=args.keep_idle, keep_idle_reloads=args.keep_idle_reloads)
        for load_time in args.load_times
        for t in traces
    ]
    elapsed = time.perf_counter() - started

    settings = {
        "duration_s": args.duration, "rate_per_s": args.rate, "service_s": args.service,
        "stop_time_s": args.stop_time, "max_wait_s": args.max_wait, "load_timeout_s": args.load_timeout,
        "keep_idle_s": DEFAULTS.keep_idle if args.keep_idle is None else args.keep_idle,
        "keep_idle_reloads": DEFAULTS.keep_idle_reloads if args.keep_idle_reloads is None else args.keep_idle_reloads,
        "seed": args.seed,
    }
    if args.json:
        out = {"settings": settings, "simulation_seconds": round(elapsed, 3),
               "rows": [c.as_dict() for c in rows]}
        print(json.dumps(out, indent=2))
        return 0

    print(f"{args.duration / 3600:g} h of traffic at {args.rate:g} request/s, {args.service:g} s service, "
          f"{args.stop_time:g} s stops, max_wait {args.max_wait:g} s, load_timeout {args.load_timeout:g} s, "
          f"keep_idle {settings['keep_idle_s']:g} s, keep_idle_reloads {settings['keep_idle_reloads']:g}, "
          f"seed {args.seed}\n")
    print(markdown(rows, args))
    print("\nBelady = MIN on the sequence of requested models: a lower bound on loads for arrival-order "
          "service only\n(the router serves requests for resident models first, so it can load less).")
    rejected = sum(c.router.rejected for c in rows)
    if rejected:
        print(f"The router rejected {rejected} requests (429 when a model already had max_waiting requests "
              f"waiting, 504 past load_timeout); waits count granted ones.")
    ratio_ok = sum(1 for c in rows if c.ratio <= GOAL_RATIO)
    bound_ok = sum(1 for c in rows if c.router.p99_wait <= fairness_bound(args, c.load_time))
    strict_ok = sum(1 for c in rows if c.router.p99_wait <= args.max_wait)
    print(f"Goal: loads <= {GOAL_RATIO:g}x Belady in {ratio_ok}/{len(rows)} rows; router p99 wait <= max_wait "
          f"({args.max_wait:g} s) in {strict_ok}/{len(rows)}, <= max_wait + service + stop + load in "
          f"{bound_ok}/{len(rows)}.")
    print(f"Simulated {sum(c.requests for c in rows)} requests in {elapsed:.1f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
