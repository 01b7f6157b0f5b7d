"""Two versions of the scheduler against each other on the cluster bench, in one process, event by event.

    python bench/scheduler_ab.py HEAD~3                       # this tree against a commit, 100 nodes, 1/3
    python bench/scheduler_ab.py main --nodes 100 --rate 0.33 0.03 --rounds 3
    python bench/scheduler_ab.py /path/to/other/checkout      # against another working tree

Timing two trees one after the other on a shared machine cannot tell them apart: the box's speed moves by
±30% between minutes, more than most changes to the planner. Here both schedulers get the same events at
the same times (``bench/cluster_scale.py``'s trace, driven by this tree's), each event timed on both,
in alternating order, so the machine's drift lands on both alike. Their effects are asserted equal at
every event (timers aside: a shortcut may ask for a Tick the other would not, see the property tests),
so this also checks that a change of the planner's cost changed no decision on this trace. Ratios are
new / old: under 1 is faster.

The other version (a git revision of this repository, or a directory with ``src/vllm_model_router`` and
``bench/cluster_scale.py``) is copied into a temporary directory with its package renamed, so both
import side by side.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import cluster_scale as cs  # noqa: E402

from vllm_model_router.scheduler import Effect, Event, ModelFound, Scheduler, TimerAt  # noqa: E402
from vllm_model_router.testing.sim import RouterSim, percentile  # noqa: E402

OLD = "vmr_ab_old"  # the other version's package name, side by side with this one's


def copy_other(source: str, into: Path) -> None:
    """The other version's package and cluster bench, from a directory or a git revision, renamed."""
    if Path(source).is_dir():
        tree = Path(source)
        files = {"pkg": tree / "src" / "vllm_model_router", "bench": tree / "bench" / "cluster_scale.py"}
        texts = {str(p.relative_to(files["pkg"])): p.read_text() for p in files["pkg"].rglob("*.py")}
        bench = files["bench"].read_text()
    else:
        listing = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", source,
                                  "src/vllm_model_router"], check=True, capture_output=True, text=True).stdout
        texts = {}
        for name in listing.split():
            if name.endswith(".py"):
                texts[name.removeprefix("src/vllm_model_router/")] = subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{source}:{name}"], check=True, capture_output=True,
                    text=True).stdout
        bench = subprocess.run(["git", "-C", str(ROOT), "show", f"{source}:bench/cluster_scale.py"], check=True,
                               capture_output=True, text=True).stdout
    rename = re.compile(r"\bvllm_model_router\b")
    for rel, text in texts.items():
        path = into / OLD / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rename.sub(OLD, text))
    (into / f"{OLD}_cluster_scale.py").write_text(rename.sub(OLD, bench))


def converter(module: ModuleType) -> Callable[[Event], Any]:
    """This version's event as the other version's (the same dataclass, by name)."""
    def convert(event: Event) -> Any:
        cls = getattr(module, type(event).__name__)
        return cls(**{f.name: getattr(event, f.name) for f in dataclasses.fields(event)})
    return convert


def plain(effects: list[Any]) -> str:
    return repr([e for e in effects if type(e).__name__ != TimerAt.__name__])


def one_round(old_sched: ModuleType, old_bench: ModuleType, nodes: int, rate: float, requests: int,
              new_first: bool) -> tuple[list[float], list[float]]:
    """The per-event process times (µs) of the other version and of this one, over one replay."""
    config, old_config = cs.cluster_config(nodes), old_bench.cluster_config(nodes)
    trace = cs.cluster_trace(nodes, requests, per_gpu=rate)
    warm = cs.prefill(config, nodes)
    convert = converter(old_sched)
    gc.collect()
    gc.freeze()
    old = old_sched.Scheduler(old_config)
    t_old: list[float] = []
    t_new: list[float] = []
    clock = time.process_time_ns

    class Both(Scheduler):
        def handle(self, event: Event, now: float) -> list[Effect]:
            theirs = convert(event)
            for new_turn in ((True, False) if (len(t_new) % 2 == 0) == new_first else (False, True)):
                t = clock()
                if new_turn:
                    out = Scheduler.handle(self, event, now)
                    t_new.append((clock() - t) / 1e3)
                else:
                    other = old.handle(theirs, now)
                    t_old.append((clock() - t) / 1e3)
            if plain(out) != plain(other):
                raise AssertionError(f"event {len(t_new)} at {now}, {event}: this tree {out}, the other {other}")
            return out

    both = Both(config)
    for name, gpus in warm.items():  # adopted servers: not timed
        Scheduler.handle(both, ModelFound(name, gpus), 0.0)
        old.handle(old_sched.ModelFound(name, gpus), 0.0)
    sim = RouterSim(trace, both, cs.LOAD_TIME, cs.STOP_TIME)
    sim.running |= warm.keys()
    sim.up |= warm.keys()
    sim.run()
    gc.unfreeze()
    return t_old, t_new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("other", help="a git revision of this repository, or a directory holding another checkout")
    ap.add_argument("--nodes", type=int, nargs="*", default=[100])
    ap.add_argument("--rate", type=float, nargs="*", default=[cs.RATE], help="requests/s per GPU")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="scheduler-ab-") as tmp:
        copy_other(args.other, Path(tmp))
        sys.path.insert(0, tmp)
        old_sched = importlib.import_module(f"{OLD}.scheduler")
        old_bench = importlib.import_module(f"{OLD}_cluster_scale")
        print(f"this tree against {args.other}: per-event process time, new / old (under 1: faster)\n")
        print("| nodes x GPUs | requests/s per GPU | round | events | p50 old → new | p99 old → new | mean old → new "
              "| p99 ratio | mean ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for nodes in args.nodes:
            for rate in args.rate:
                for r in range(args.rounds):
                    o, n = one_round(old_sched, old_bench, nodes, rate, args.requests, new_first=r % 2 == 0)
                    po, pn, mo, mn = percentile(o, 99), percentile(n, 99), sum(o) / len(o), sum(n) / len(n)
                    print(f"| {nodes:,} x {cs.GPUS_PER_NODE} | {rate:g} | {r + 1} | {len(n):,} "
                          f"| {percentile(o, 50):.0f} → {percentile(n, 50):.0f} µs "
                          f"| {cs.fmt_us(po)} → {cs.fmt_us(pn)} | {mo:.0f} → {mn:.0f} µs "
                          f"| {pn / po:.2f} | {mn / mo:.2f} |", flush=True)


if __name__ == "__main__":
    main()
