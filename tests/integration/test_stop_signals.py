"""Stopping a model signals each of its processes once: the process group with one ``killpg``, and only
the session members that left the group one by one. A server asked twice may not shut down gracefully
(uvicorn, vLLM's HTTP server, takes a second SIGTERM as "exit now")."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import textwrap
from pathlib import Path

from tests.harness import MARKER_VAR, alive, engine, wait_until
from vllm_model_router.drivers import procs

from .conftest import StartRouter

# A session leader with a child in its group and a child that moved to a group of its own; each writes
# "<pid> <SIGNAME>" to the file in argv[1] for every SIGTERM it receives and exits 0.3 s later.
_FAMILY = textwrap.dedent("""
    import asyncio, os, signal, sys

    def count(path):
        with open(path, "a") as f:
            f.write(f"{os.getpid()} SIGTERM\\n")

    async def main(path, own_group):
        if own_group:
            os.setpgid(0, 0)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, lambda: (count(path), stop.set()))
        with open(path + ".ready", "a") as f:
            f.write(f"{os.getpid()} {os.getpgid(0)}\\n")
        await stop.wait()
        await asyncio.sleep(0.3)

    path, role = sys.argv[1], sys.argv[2]
    if role == "leader":
        for r in ("member", "stray"):
            os.spawnv(os.P_NOWAIT, sys.executable, [sys.executable, sys.argv[0], path, r])
    asyncio.run(main(path, role == "stray"))
""")


def terms_by_pid(path: Path) -> collections.Counter[int]:
    lines = path.read_text().split() if path.exists() else []
    return collections.Counter(int(pid) for pid, name in zip(lines[::2], lines[1::2], strict=True)
                               if name == "SIGTERM")


def process_groups(path: Path) -> dict[int, int]:
    """pid -> process group, as the processes of ``_FAMILY`` reported them."""
    lines = path.read_text().splitlines() if path.exists() else []
    return {int(pid): int(pgid) for pid, pgid in (ln.split() for ln in lines)}


async def test_each_stop_sends_the_server_exactly_one_sigterm(start_router: StartRouter, tmp_path: Path) -> None:
    signals = tmp_path / "signals"
    slow_exit = ("--shutdown-delay", "0.3", "--signal-log", str(signals))
    r = await start_router({"a": engine(*slow_exit, stop_timeout=5), "b": engine(*slow_exit, stop_timeout=5)},
                           capacity={"max_resident": 1})
    seen: collections.Counter[int] = collections.Counter()
    for _ in range(3):
        assert (await r.chat("a")).status == 200
        pid = (await r.model("a"))["pid"]
        assert (await r.post("/admin/models/a/unload")).status == 200  # stopped on request
        assert not alive(pid)
        assert (await r.chat("a")).status == 200
        pid = (await r.model("a"))["pid"]
        assert (await r.chat("b")).status == 200  # a is evicted to make room for b
        assert not alive(pid)
        seen = terms_by_pid(signals)
        assert seen and set(seen.values()) == {1}, f"SIGTERMs per server pid: {dict(seen)}"
    assert len(seen) == 8  # a: 3 unloads and 3 evictions; b: 2 evictions
    view = await r.model("a")
    assert view["state"] == "unloaded" and not view.get("last_error")


async def test_a_session_member_that_left_the_group_gets_the_signal_once_too(tmp_path: Path, marker: str) -> None:
    signals = tmp_path / "signals"
    script = tmp_path / "family.py"
    script.write_text(_FAMILY)
    leader = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(signals), "leader", start_new_session=True,
        env={**os.environ, MARKER_VAR: marker})
    try:
        ready = Path(f"{signals}.ready")
        await wait_until(lambda: len(process_groups(ready)) == 3, what="3 processes up")
        groups = process_groups(ready)
        stray = next(pid for pid, pgid in groups.items() if pgid == pid != leader.pid)
        member = next(pid for pid, pgid in groups.items() if pgid == leader.pid != pid)
        assert sorted(procs.group_members(leader.pid)) == sorted(groups)

        procs.signal_group(leader.pid, signal.SIGTERM)
        assert await procs.wait_group_gone(leader.pid, 5)
        assert terms_by_pid(signals) == {leader.pid: 1, member: 1, stray: 1}
    finally:
        if leader.returncode is None:
            await procs.kill_group(leader.pid)
        await leader.wait()
