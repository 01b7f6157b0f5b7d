"""GPU check for restart recovery, for a machine with an NVIDIA GPU and torch: after a ``kill -9`` of the
router, does the next router free the GPU memory its predecessor's model still holds?

    python bench/restart_gpu_check.py [--gb 4] [--no-gpu]

Runs ``vllm-model-router serve`` (this checkout's ``src``) with one model: a small server that allocates
``--gb`` GiB on the GPU and forks a worker that allocates as much again (like vLLM's EngineCore). The
model is loaded, the router is killed with SIGKILL (its model lives on, holding the memory), and a new
router is started on the same ``state_dir``. It must adopt the group on the GPU it was started on (its
memory counted as the router's, not someone else's); unloading it must give the memory back with no
process of the group left; the model must load again through the new router, and a SIGTERM must free
everything. Prints PASS or
FAIL lines. ``--no-gpu`` runs the same steps with a server that allocates nothing (no torch, no NVML):
the new router then adopts the model instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gpu_alloc_server import SERVER  # noqa: E402  (bench/ is on sys.path when run as a script)

from vllm_model_router.drivers.procs import free_port, read_stat  # noqa: E402


def http(method: str, url: str, timeout: float = 120) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"null")


def wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"router exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return time.monotonic() - started
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("router not up")


def events(url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with urllib.request.urlopen(url + "/admin/events?history=500", timeout=5) as resp:
        resp.fp.raw._sock.settimeout(0.5)  # type: ignore[union-attr]
        try:
            while True:
                line = resp.readline()
                if not line:
                    break
                if line.startswith(b"data: "):
                    out.append(json.loads(line[6:]))
        except (TimeoutError, OSError):
            pass
    return out


def alive(pid: int) -> bool:
    stat = read_stat(pid)
    return stat is not None and stat.alive


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=4.0)
    p.add_argument("--no-gpu", action="store_true")
    args = p.parse_args()
    gb = 0.0 if args.no_gpu else args.gb
    probe = None
    if not args.no_gpu:
        from vllm_model_router.gpu.probe import NvmlProbe

        probe = NvmlProbe.create()
        if probe is None:
            print("RESTART GPU CHECK SKIPPED: no NVIDIA GPU (NVML unavailable)")
            return 0

    def free_gb() -> float:
        return probe.devices()[0].free_gb if probe is not None else 0.0

    work = Path(tempfile.mkdtemp(prefix="restart-gpu-check-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = {
        "listen": {"host": "127.0.0.1", "port": port}, "state_dir": str(work / "state"), "load_timeout": 300,
        "capacity": {"max_resident": 1},
        "models": {"holder": {"cmd": [sys.executable, "-c", SERVER, "${PORT}", str(gb)], "health_path": "/",
                              "stop_timeout": 10, "memory_gb": max(1.0, 2 * gb + 1),
                              **({} if args.no_gpu else {"gpus": [0]})}},
    }
    (work / "router.yaml").write_text(json.dumps(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LOG_LEVEL": "info"}
    results: list[tuple[bool, str]] = []

    def check(ok: bool, what: str) -> None:
        results.append((ok, what))
        print(("PASS " if ok else "FAIL ") + what, flush=True)

    def serve(name: str) -> subprocess.Popen[bytes]:
        log = (work / f"{name}.log").open("wb")
        return subprocess.Popen([sys.executable, "-m", "vllm_model_router", "serve", "--config",
                                 str(work / "router.yaml")], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    first = second = None
    group: list[int] = []
    try:
        baseline = free_gb()
        first = serve("first")
        wait_up(url, first)
        t0 = time.monotonic()
        view = http("POST", url + "/admin/models/holder/load", timeout=300)
        check(view["state"] == "loaded", f"loaded through the first router in {time.monotonic() - t0:.1f}s")
        from vllm_model_router.drivers import procs

        leader = int(view["pid"])
        group = procs.group_members(leader)
        held = baseline - free_gb()
        print(f"  group {sorted(group)} holds {held:.1f} GiB", flush=True)
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(1.0)
        check(all(alive(p) for p in group) and baseline - free_gb() >= held * 0.9,
              f"after kill -9 of the router its model lives on: pids {sorted(group)}, "
              f"{baseline - free_gb():.1f} GiB held")

        t0 = time.monotonic()
        second = serve("second")
        up = wait_up(url, second)
        kinds = {(e["kind"], e["model"]): e for e in events(url)}
        if args.no_gpu:
            check(("adopted", "holder") in kinds and http("GET", url + "/admin/models")["models"][0]["pid"] == leader,
                  f"without GPUs the new router adopted pid {leader} (up in {up:.1f}s)")
        else:
            view = http("GET", url + "/admin/models")
            holder = view["models"][0]
            check(("adopted", "holder") in kinds and holder["pid"] == leader and holder["gpus"] == [0],
                  f"the new router adopted pid {leader} on GPU 0 (up in {up:.1f}s), its placement from the record")
            gpu0 = view["gpus"][0]
            check(gpu0["reserved_gb"] > 0 and gpu0["used_by_others_gb"] < 0.5,
                  f"its memory counts as the router's: reserved {gpu0['reserved_gb']:.1f} GB, used by the router "
                  f"{gpu0['used_by_router_gb']:.1f} GB, by others {gpu0['used_by_others_gb']:.1f} GB")
            t1 = time.monotonic()
            http("POST", url + "/admin/models/holder/unload", timeout=120)
            deadline = time.monotonic() + 30
            while baseline - free_gb() > 0.5 and time.monotonic() < deadline:
                time.sleep(0.1)
            check(not any(alive(p) for p in group) and baseline - free_gb() <= 0.5,
                  f"unloading the adopted model frees its {held:.1f} GiB ({time.monotonic() - t1:.1f}s) and leaves "
                  f"no process of its group")
            view = http("POST", url + "/admin/models/holder/load", timeout=300)
            check(view["state"] == "loaded" and view["pid"] != leader and baseline - free_gb() >= held * 0.9,
                  f"the model loads again through the new router (pid {view['pid']})")
        group = sorted(set(group) | set(procs.group_members(int(http("GET", url + "/admin/models")["models"][0]["pid"]
                                                                     or leader))))
        second.send_signal(signal.SIGTERM)
        code = second.wait(60)
        deadline = time.monotonic() + 30
        while (baseline - free_gb() > 0.5 or any(alive(p) for p in group)) and time.monotonic() < deadline:
            time.sleep(0.1)
        check(code == 0 and not any(alive(p) for p in group) and baseline - free_gb() <= 0.5,
              f"SIGTERM: the router exited {code}, nothing left, {baseline - free_gb():.2f} GiB in use")
        state = work / "state" / "process-groups.json"
        check(not state.exists(), "the state file is empty after a normal stop")
    except Exception as e:  # report, then clean up
        check(False, f"error: {e!r}")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for pid in group:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for name in ("first", "second"):
            path = work / f"{name}.log"
            if path.exists() and not all(ok for ok, _ in results):
                print(f"--- {name}.log\n{path.read_text(errors='replace')[-3000:]}")
    ok = all(ok for ok, _ in results)
    print("RESTART GPU CHECK: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
