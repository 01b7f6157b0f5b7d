"""GPU memory accounting with a fake NVML probe whose memory follows the real model processes.

Each fake-engine process "holds" ``SIM_NEED_GB`` on every GPU of its ``CUDA_VISIBLE_DEVICES`` (read
from the process table) while it lives, and for ``linger`` seconds after it died (or for ever), the
way a stopped vLLM can hold its memory. Processes of the test's marker that set ``SIM_FOREIGN_GB`` play
someone else's job on the GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import MARKER_VAR, engine, environ, free_port, processes, router_data, wait_healthy, wait_until
from vllm_model_router.gpu.probe import GpuMemory, GpuProcess

from .conftest import StartRouter

TOTAL = 80.0


class SimProbe:
    def __init__(self, marker: str, gpus: int = 2, linger: float = 0.0) -> None:
        self.marker = marker
        self.count = gpus
        self.linger = linger  # seconds a dead process's memory stays in use (inf: for ever)
        self._last_seen: dict[int, tuple[float, tuple[int, ...], float]] = {}

    def _live(self) -> dict[int, tuple[tuple[int, ...], float]]:
        found: dict[int, tuple[tuple[int, ...], float]] = {}
        for p in processes(**{MARKER_VAR: self.marker}):
            env = p.environ
            if "SIM_FOREIGN_GB" in env:
                found[p.pid] = ((0,), float(env["SIM_FOREIGN_GB"]))
            elif "SIM_NEED_GB" in env and "CUDA_VISIBLE_DEVICES" in env:
                gpus = tuple(int(g) for g in env["CUDA_VISIBLE_DEVICES"].split(","))
                found[p.pid] = (gpus, float(env["SIM_NEED_GB"]))
        return found

    def _holders(self) -> dict[int, tuple[tuple[int, ...], float]]:
        now = time.monotonic()
        live = self._live()
        for pid, (gpus, gb) in live.items():
            self._last_seen[pid] = (now, gpus, gb)
        held = dict(live)
        for pid, (seen, gpus, gb) in self._last_seen.items():
            if pid not in live and now - seen < self.linger:
                held[pid] = (gpus, gb)
        return held

    def devices(self) -> list[GpuMemory]:
        held = self._holders()
        out = []
        for i in range(self.count):
            used = sum(gb for gpus, gb in held.values() if i in gpus)
            out.append(GpuMemory(i, f"Sim GPU {i}", TOTAL, used, max(0.0, TOTAL - used)))
        return out

    def processes(self, index: int) -> list[GpuProcess]:
        return [GpuProcess(pid, gb) for pid, (gpus, gb) in sorted(self._holders().items()) if index in gpus]


def gpu_model(need: float, *args: str, **settings: object) -> dict[str, object]:
    m = engine(*args, **settings)
    m["memory_gb"] = need
    m["env"] = {"SIM_NEED_GB": str(need)}
    return m


async def test_models_are_placed_per_gpu_and_started_there(start_router: StartRouter, marker: str) -> None:
    probe = SimProbe(marker)
    r = await start_router({"a": gpu_model(50), "b": gpu_model(50), "c": gpu_model(25),
                            "tp": gpu_model(20, gpus=[0, 1])}, probe=probe, capacity={"max_resident": 4})
    for name in ("a", "b", "c"):
        assert (await r.chat(name)).status == 200
    views = await r.models()
    assert views["a"]["gpus"] == [0] and views["b"]["gpus"] == [1]
    assert views["c"]["gpus"] == [0]  # best fit: 30 GB left on both, the first wins
    assert (environ(views["b"]["pid"]) or {})["CUDA_VISIBLE_DEVICES"] == "1"
    assert views["a"]["memory_source"] == "memory_gb (declared)"
    gpus = {g["index"]: g for g in (await r.get("/admin/models")).json()["gpus"]}
    assert gpus[0]["reserved_gb"] == 75 and gpus[1]["reserved_gb"] == 50
    metrics = (await r.get("/metrics")).body.decode()
    assert 'router_gpu_memory_reserved_bytes{gpu="0",name="Sim GPU 0"} 8.05306368e+10' in metrics  # 75 GiB
    assert 'router_gpu_memory_free_bytes{gpu="1",name="Sim GPU 1"} 3.221225472e+10' in metrics  # 30 GiB
    assert gpus[0]["budget_gb"] == pytest.approx(TOTAL * 0.95) and gpus[0]["used_by_others_gb"] == 0
    assert gpus[0]["free_gb"] == TOTAL - 75
    # a model on two GPUs needs 20 GB on both: GPU 1 has room, GPU 0 (a + c = 75 of 76) does not; a is
    # the least recently used model there, and only it goes (b, on GPU 1, would free nothing useful)
    assert (await r.chat("tp")).status == 200
    views = await r.models()
    assert views["tp"]["gpus"] == [0, 1] and (environ(views["tp"]["pid"]) or {})["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert {n for n, v in views.items() if v["state"] == "loaded"} == {"b", "c", "tp"}
    gpus = {g["index"]: g for g in (await r.get("/admin/models")).json()["gpus"]}
    assert gpus[0]["reserved_gb"] == 45 and gpus[1]["reserved_gb"] == 70


async def test_capacity_memory_gb_is_each_gpus_budget_and_models_on_two_gpus_both_stay(
    start_router: StartRouter, marker: str
) -> None:
    # 50 GB on each of two GPUs with a budget of 70 each: both fit, and both stay (read as one pool of 70,
    # the idle one was stopped after every load, a swap per request)
    r = await start_router({"a": gpu_model(50), "b": gpu_model(50)}, probe=SimProbe(marker),
                           capacity={"max_resident": 4, "memory_gb": 70})
    for name in ("a", "b", "a", "b"):
        assert (await r.chat(name)).status == 200
    views = await r.models()
    assert {n: (v["state"], v["gpus"], v["loads"]) for n, v in views.items()} == {
        "a": ("loaded", [0], 1), "b": ("loaded", [1], 1)}
    assert "over_capacity" not in [e.get("data", {}).get("reason") for e in await r.events()]


async def test_memory_held_by_others_is_named_instead_of_crashing_the_engine(
    start_router: StartRouter, marker: str
) -> None:
    probe = SimProbe(marker, gpus=1)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, MARKER_VAR: marker, "SIM_FOREIGN_GB": "60"})
    try:
        r = await start_router({"m": gpu_model(36)}, probe=probe)
        reply = await r.chat("m")
        assert reply.status == 503
        message = reply.error["message"]
        assert "GPU 0 has 20.0 GB free" in message and "needs 36.0 GB" in message
        assert f"pid {other.pid}" in message and "60.0 GB" in message
        view = (await r.get("/admin/models")).json()
        assert view["gpus"][0]["used_by_others_gb"] == 60
        assert view["gpus"][0]["others"][0]["pid"] == other.pid
        assert (await r.model("m"))["state"] == "failed"
        other.kill()
        other.wait()
        assert (await r.chat("m")).status == 200  # the next request tries again, and now it fits
    finally:
        other.kill()
        other.wait()


async def test_next_start_waits_until_the_stopped_models_memory_is_back(
    start_router: StartRouter, marker: str
) -> None:
    probe = SimProbe(marker, gpus=1, linger=1.0)
    r = await start_router({"a": gpu_model(60), "b": gpu_model(60)}, probe=probe,
                           capacity={"max_resident": 2, "release_timeout": 10})
    assert (await r.chat("a")).status == 200
    stopped = time.monotonic()
    reply = await r.chat("b")
    assert reply.status == 200, reply.body
    assert time.monotonic() - stopped >= 1.0  # a's memory lingered for a second: b waited for it
    events = [e.kind for e in r.runtime.events.recent() if e.model in ("a", "b")]
    assert "memory_not_released" not in events
    assert events.index("unloaded") < events.index("load_started", events.index("unloading"))


async def test_memory_never_released_is_reported_and_stragglers_killed(
    start_router: StartRouter, marker: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_model_router")
    probe = SimProbe(marker, gpus=1, linger=float("inf"))
    r = await start_router({"a": gpu_model(60), "b": gpu_model(10)}, probe=probe,
                           capacity={"max_resident": 1, "release_timeout": 0.5})
    assert (await r.chat("a")).status == 200
    reply = await r.chat("b")  # a is evicted; its memory never comes back, yet b fits in what is left
    assert reply.status == 200, reply.body
    reports = [e for e in r.runtime.events.recent() if e.kind == "memory_not_released"]
    assert len(reports) == 1 and reports[0].model == "a" and "GPU memory not released" in reports[0].reason
    assert "GPU memory not released" in caplog.text


def test_check_config_says_where_each_figure_came_from(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "capacity: {memory_gb: 80}\n"
        "models:\n"
        "  a: {cmd: 'vllm serve a --port ${PORT} --gpu-memory-utilization 0.45'}\n"
        "  b: {cmd: 'vllm serve b --port ${PORT}', memory_gb: 20}\n"
        "  c: {cmd: 'vllm serve c --port ${PORT}'}\n"
    )
    out = subprocess.run([sys.executable, "-m", "vllm_model_router", "check-config", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    assert "a: 36.0 GB from --gpu-memory-utilization 0.45 x capacity.memory_gb 80 GB (no GPU detected)" in out
    assert "b: 20.0 GB from memory_gb (declared)" in out
    assert "c: 0.0 GB from not declared" in out


async def test_without_a_gpu_the_router_says_so_once_and_works(
    start_router: StartRouter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_model_router")
    from vllm_model_router.runtime.pump import AUTO

    r = await start_router({"m": engine()}, probe=AUTO)
    assert (await r.chat("m")).status == 200
    assert caplog.text.count("accounting memory from declarations only") == 1
    assert (await r.get("/admin/models")).json()["gpus"] == []
    await asyncio.sleep(0)


async def test_placement_avoids_a_gpu_that_others_are_filling(start_router: StartRouter, marker: str) -> None:
    probe = SimProbe(marker, gpus=2)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, MARKER_VAR: marker, "SIM_FOREIGN_GB": "60"})  # on GPU 0
    try:
        await wait_until(lambda: probe.devices()[0].used_gb == 60, what="the other job on GPU 0")
        r = await start_router({"m": gpu_model(36)}, probe=probe)
        assert (await r.chat("m")).status == 200  # GPU 0 has 20 GB left: it goes to GPU 1 instead
        assert (await r.model("m"))["gpus"] == [1]
    finally:
        other.kill()
        other.wait()


async def test_a_server_adopted_after_a_restart_keeps_its_gpu(
    start_router: StartRouter, marker: str, tmp_path: Path
) -> None:
    """A previous router process died and left model m running on GPU 1: the new one adopts it there,
    counting its memory as its own (not as someone else's)."""
    from vllm_model_router.config import build_config
    from vllm_model_router.drivers import procs
    from vllm_model_router.runtime.recovery import STATE_FILE, config_hash

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    models = {"m": gpu_model(36)}
    cfg = build_config(router_data(models, marker, state_dir=str(state_dir)), env={}).models["m"]
    port = free_port()
    left = subprocess.Popen(cfg.argv(port), env={**os.environ, **cfg.env, "CUDA_VISIBLE_DEVICES": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        probe = SimProbe(marker, gpus=2)
        await wait_until(lambda: probe.devices()[1].used_gb == 36, what="the left-over server on GPU 1")
        record = {"model": "m", "pid": left.pid, "start_time": procs.start_time(left.pid), "port": port,
                  "config_hash": config_hash(cfg, port, (1,)), "gpus": [1], "started_at": 0}
        (state_dir / STATE_FILE).write_text(json.dumps({"version": 1, "groups": [record]}))
        await wait_healthy(f"http://127.0.0.1:{port}/health", what="the left-over server", exited=left.poll)
        r = await start_router(models, probe=probe, state_dir=str(state_dir))
        view = await r.model("m")
        assert (view["state"], view["pid"], view["gpus"]) == ("loaded", left.pid, [1])
        gpus = {g["index"]: g for g in (await r.get("/admin/models")).json()["gpus"]}
        assert gpus[1]["reserved_gb"] == 36 and gpus[1]["used_by_router_gb"] == 36
        assert gpus[1]["used_by_others_gb"] == 0
        assert (await r.chat("m")).headers["x-fake-engine-pid"] == str(left.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(left.pid, 9)
        left.wait()
