"""Router restarts with real ``serve`` processes: after a ``kill -9`` the next router adopts the healthy,
unchanged model servers its predecessor left and stops every other process of theirs (never a process
that merely reuses a recorded pid); SIGTERM lets requests in flight finish within ``shutdown_grace``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness import (
    MARKER_VAR,
    Router,
    alive,
    assert_no_processes_left,
    chat_body,
    engine,
    free_port,
    launch_router,
    wait_until,
)
from vllm_model_router.drivers import procs
from vllm_model_router.runtime.recovery import LOCK_FILE, STATE_FILE, StateFile


def serve(workdir: Path, models: dict[str, dict[str, Any]], marker: str, name: str, port: int,
          state_dir: Path, **top: Any) -> contextlib.AbstractAsyncContextManager[Router]:
    """``vllm-model-router serve`` on ``port``; SIGTERM on exit if it still runs (processes of the models
    are the test's business: a test kills a router on purpose to leave them to the next one)."""
    return launch_router(models, marker, "process", workdir=workdir, name=name, port=port, leave_processes=True,
                         state_dir=str(state_dir), **top)


async def kill9(router: Router) -> None:
    router.proc.kill()
    await router.proc.wait()


def recorded(state_dir: Path) -> list[dict[str, Any]]:
    path = state_dir / STATE_FILE
    groups: list[dict[str, Any]] = json.loads(path.read_text())["groups"] if path.exists() else []
    return groups


async def sleeper(marker: str) -> asyncio.subprocess.Process:
    """An unrelated process in its own session (carrying the marker, so that it is cleaned up)."""
    return await asyncio.create_subprocess_exec("sleep", "60", env={**os.environ, MARKER_VAR: marker},
                                                start_new_session=True)


def test_state_file_is_locked_by_one_router_and_written_atomically(tmp_path: Path) -> None:
    first = StateFile.acquire(tmp_path / "state")
    assert first is not None
    assert StateFile.acquire(tmp_path / "state") is None  # a second router: no recovery for it
    assert (tmp_path / "state" / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert first.read() == []
    (tmp_path / "state" / STATE_FILE).write_text("{not json")
    assert first.read() == []  # a damaged file is reported, not fatal
    first.release()
    again = StateFile.acquire(tmp_path / "state")
    assert again is not None
    again.release()
    assert oct((tmp_path / "state").stat().st_mode & 0o777) == "0o700"


async def test_a_killed_router_is_replaced_by_one_that_adopts_its_models(tmp_path: Path, marker: str) -> None:
    state_dir = tmp_path / "state"
    models, port = {"a": engine(), "b": engine()}, free_port()
    try:
        async with serve(tmp_path, models, marker, "first", port, state_dir, capacity={"max_resident": 2}) as r:
            assert (await r.post("/admin/models/a/load")).status == 200
            assert (await r.post("/admin/models/b/load")).status == 200
            before = {n: (v["pid"], v["port"]) for n, v in (await r.models()).items()}
            groups = recorded(state_dir)
            assert {(g["model"], g["pid"], g["port"]) for g in groups} == {(n, *before[n]) for n in ("a", "b")}
            assert all(g["start_time"] == procs.start_time(g["pid"]) for g in groups)
            await kill9(r)
        assert all(alive(pid) for pid, _ in before.values())  # what a crash leaves behind

        async with serve(tmp_path, models, marker, "second", port, state_dir, capacity={"max_resident": 2}) as r:
            views = await r.models()
            for name in ("a", "b"):
                assert views[name]["state"] == "loaded"
                assert (views[name]["pid"], views[name]["port"]) == before[name]
            reply = await r.chat("a")  # served at once by the same server: no load
            assert reply.status == 200 and int(reply.headers["x-fake-engine-pid"]) == before["a"][0]
            stream = await r.stream(chat_body("b", stream=True))
            assert stream.status == 200 and stream.events[-1].data == "[DONE]"
            kinds = [(e["kind"], e["model"]) for e in await r.events()]
            assert ("adopted", "a") in kinds and ("adopted", "b") in kinds
            assert not [k for k in kinds if k[0] in ("load_started", "orphan_stopped")]
            logs = (await r.get("/admin/models/a/logs")).json()["lines"]
            assert any("adopted after a router restart" in ln and "following its output" in ln for ln in logs)
            assert {g["pid"] for g in recorded(state_dir)} == {pid for pid, _ in before.values()}

            # an adopted server that dies is noticed (it is not our child: by polling) and reloaded on demand
            os.kill(before["a"][0], signal.SIGKILL)
            view = await r.wait_state("a", "failed", timeout=5)
            assert "adopted process" in view["last_error"]
            again = await r.chat("a")
            assert again.status == 200 and int(again.headers["x-fake-engine-pid"]) != before["a"][0]
            r.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(r.proc.wait(), 15) == 0
        assert not alive(before["b"][0])  # a normal shutdown stops adopted models too
        assert recorded(state_dir) == []
    finally:
        await assert_no_processes_left(marker)


# a server behind a shell wrapper that prints a line every 0.2 s: a shell dies of SIGPIPE when its output
# is a pipe whose reader (the router that started it) is gone
TICKER = ("sh", "-c", '"$0" -m vllm_model_router.testing.fake_engine --port "$1" --served-model-name "$2" & '
          'while kill -0 $! 2>/dev/null; do echo "tick $(date +%s%N)"; sleep 0.2; done',
          sys.executable, "${PORT}", "${MODEL}")


def ticks(lines: list[str]) -> list[int]:
    """The times (ns since the epoch) of the TICKER lines among ``lines``."""
    return [int(ln.split()[1]) for ln in lines if ln.startswith("tick ")]


async def test_an_adopted_server_keeps_writing_its_output_and_the_new_router_follows_it(
        tmp_path: Path, marker: str) -> None:
    state_dir = tmp_path / "state"
    models, port = {"a": {"cmd": list(TICKER), "stop_timeout": 1}}, free_port()
    try:
        async with serve(tmp_path, models, marker, "first", port, state_dir) as r:
            assert (await r.post("/admin/models/a/load")).status == 200
            pid = (await r.model("a"))["pid"]
            await kill9(r)
        restarted = time.time_ns()

        async with serve(tmp_path, models, marker, "second", port, state_dir) as r:
            view = await r.model("a")
            assert (view["state"], view["pid"]) == ("loaded", pid), view
            up = time.time_ns()

            async def printed_since_up() -> bool:
                lines = (await r.get("/admin/models/a/logs?lines=200")).json()["lines"]
                return sum(t > up for t in ticks(lines)) >= 5

            # it goes on printing (a line every 0.2 s), now with the second router reading
            await wait_until(printed_since_up, timeout=10, what="5 lines printed under the second router")
            assert alive(pid)
            assert (await r.chat("a")).status == 200
            view = await r.model("a")
            assert (view["state"], view["pid"], view["last_error"]) == ("loaded", pid, None), view
            lines = (await r.get("/admin/models/a/logs?lines=200")).json()["lines"]
            assert any(t < restarted for t in ticks(lines))  # what it printed before, from its file
            assert sum(t > restarted for t in ticks(lines)) >= 5, lines
            assert any("adopted after a router restart" in ln and "a.log" in ln for ln in lines)
            assert "tick " in (state_dir / "logs" / "a.log").read_text()
            r.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(r.proc.wait(), 15) == 0
        assert not alive(pid)
    finally:
        await assert_no_processes_left(marker)


async def test_what_cannot_be_adopted_is_stopped_and_a_reused_pid_is_left_alone(tmp_path: Path, marker: str) -> None:
    state_dir = tmp_path / "state"
    port = free_port()
    models = {"a": engine(), "b": engine(), "c": engine("--spawn-child"), "d": engine()}
    unrelated, orphan = await sleeper(marker), await sleeper(marker)
    try:
        async with serve(tmp_path, models, marker, "first", port, state_dir, capacity={"max_resident": 4}) as r:
            for name in models:
                assert (await r.post(f"/admin/models/{name}/load")).status == 200
            pids = {n: v["pid"] for n, v in (await r.models()).items()}
            worker = (await r.engine_state("c"))["child_pid"]
            await kill9(r)
        os.kill(pids["c"], signal.SIGKILL)  # c's server dies too; its worker (EngineCore, say) lives on
        await wait_until(lambda: not alive(pids["c"]), what="c's server gone")
        assert alive(worker)

        # a record whose pid now names another process (other start time), one of a model no longer configured
        state = json.loads((state_dir / STATE_FILE).read_text())
        template = state["groups"][0]
        start_unrelated, start_orphan = procs.start_time(unrelated.pid), procs.start_time(orphan.pid)
        assert start_unrelated is not None and start_orphan is not None
        state["groups"] += [
            {**template, "model": "a", "pid": unrelated.pid, "start_time": start_unrelated - 1, "started_at": 0},
            {**template, "model": "retired", "pid": orphan.pid, "start_time": start_orphan},
        ]
        (state_dir / STATE_FILE).write_text(json.dumps(state))

        changed = dict(models, b=engine("--chunks", "3"), d=engine(health_path="/nope"))
        async with serve(tmp_path, changed, marker, "second", port, state_dir, capacity={"max_resident": 4}) as r:
            views = await r.models()
            assert views["a"]["state"] == "loaded" and views["a"]["pid"] == pids["a"]
            for name in ("b", "c", "d"):
                assert views[name]["state"] == "unloaded", name
            assert not alive(pids["b"]) and not alive(pids["d"]) and not alive(worker)
            assert alive(unrelated.pid)  # never touched
            assert not alive(orphan.pid)
            stopped = {e["model"]: e["reason"] for e in await r.events() if e["kind"] == "orphan_stopped"}
            assert "command or environment changed" in stopped["b"]
            assert "gone but processes" in stopped["c"] and str(worker) in stopped["c"]
            assert "health check answered 404" in stopped["d"]
            assert "no longer configured" in stopped["retired"]
            reply = await r.chat("b")  # b loads afresh with its new command
            assert reply.status == 200 and int(reply.headers["x-fake-engine-pid"]) != pids["b"]
            log = r.log()
            assert "Stopping the process group" in log and "Adopted model a" in log
    finally:
        for p in (unrelated, orphan):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
        await assert_no_processes_left(marker)


async def test_sigterm_lets_requests_in_flight_finish_within_shutdown_grace(tmp_path: Path, marker: str) -> None:
    try:
        async with serve(tmp_path, {"a": engine()}, marker, "graceful", free_port(), tmp_path / "state",
                         shutdown_grace=5) as r:
            assert (await r.chat("a")).status == 200
            slow = asyncio.create_task(r.chat("a", fake={"delay": 1.0}))
            stream = asyncio.create_task(r.stream(chat_body("a", stream=True, fake={"chunks": 5, "chunk_delay": 0.25})))
            await r.wait_model("a", lambda v: v["in_flight"] == 2, what="two in flight")
            started = time.monotonic()
            r.proc.send_signal(signal.SIGTERM)
            reply, sse = await asyncio.gather(slow, stream)
            assert reply.status == 200 and reply.json()["choices"]
            assert sse.status == 200 and sse.events[-1].data == "[DONE]" and len(sse.payloads()) == 5
            assert await asyncio.wait_for(r.proc.wait(), 15) == 0
            assert 0.8 <= time.monotonic() - started < 5
            assert "shutdown complete" in r.log()

        # a request longer than the grace period gets a 503 when it ends, and the router still exits
        async with serve(tmp_path, {"a": engine()}, marker, "impatient", free_port(), tmp_path / "state",
                         shutdown_grace=0.5) as r:
            assert (await r.chat("a")).status == 200
            endless = asyncio.create_task(r.chat("a", fake={"delay": 30}))
            await r.wait_model("a", lambda v: v["in_flight"] == 1, what="in flight")
            started = time.monotonic()
            r.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(r.proc.wait(), 15) == 0
            assert time.monotonic() - started < 4
            cut = await endless
            assert cut.status == 503 and "shutting down" in cut.error["message"]
    finally:
        await assert_no_processes_left(marker)
