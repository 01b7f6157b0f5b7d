"""The process table, as the tests see it: which processes a test started (by a marker in their
environment, which children inherit, so it finds them whatever happened to their parent), whether a
process is alive, and a check that none outlived the test.

The stat fields come from the router's own reader (``vllm_model_router.drivers.procs``); this module
adds only what the router never needs: environments and command lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_model_router.drivers import procs

from .waiting import wait_until, wait_until_sync

# every model process a test starts carries MARKER_VAR=<the test's marker> in its environment
MARKER_VAR = "VMR_TEST_MARKER"
_PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    """A live process: its stat fields, its command line and its environment."""

    pid: int
    ppid: int
    pgrp: int
    session: int
    state: str
    comm: str
    start_time: int  # clock ticks since boot
    cmdline: str
    environ: dict[str, str]

    def __str__(self) -> str:
        return (f"{self.pid} (ppid {self.ppid}, pgid {self.pgrp}, sid {self.session}, {self.state}) "
                f"{self.comm}: {self.cmdline[:120]}")


def environ(pid: int) -> dict[str, str] | None:
    """The environment the process started with (None when it is gone or not ours to read)."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0"))
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, sep, v in pairs if sep}


def cmdline(pid: int) -> list[str] | None:
    """The process's arguments (None when it is gone)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    args = raw.split(b"\0")
    if args and not args[-1]:  # each argument ends with a NUL (unless the process rewrote its title)
        args.pop()
    return [arg.decode(errors="replace") for arg in args]


def processes(**env: str) -> list[Process]:
    """Live (non-zombie) processes other than this one whose environment has every ``KEY=value`` given,
    by pid."""
    found = []
    for stat in procs.live_processes():
        if stat.pid == os.getpid():
            continue
        environment = environ(stat.pid)
        if environment is None or any(environment.get(k) != v for k, v in env.items()):
            continue
        if (args := cmdline(stat.pid)) is None:
            continue
        found.append(Process(stat.pid, stat.ppid, stat.pgrp, stat.session, stat.state, stat.comm, stat.start_time,
                             " ".join(args), environment))
    return sorted(found, key=lambda p: p.pid)


def marked_processes(marker: str) -> dict[int, str]:
    """Live processes of the test with ``marker``, with their command lines."""
    return {p.pid: p.cmdline for p in processes(**{MARKER_VAR: marker})}


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    stat = procs.read_stat(pid)
    return stat is not None and stat.alive


def state(pid: int) -> str | None:
    """The process's one-letter state (``Z``: a zombie), None when there is no such process."""
    stat = procs.read_stat(pid)
    return stat.state if stat is not None else None


def _kill_left(marker: str) -> dict[int, str]:
    left = marked_processes(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


async def assert_no_processes_left(marker: str, grace: float = 3.0) -> None:
    """Fail (after killing them) if processes of ``marker`` are still alive after ``grace`` seconds."""
    with contextlib.suppress(pytest.fail.Exception):
        await wait_until(lambda: not marked_processes(marker), grace, interval=0.05)
    left = _kill_left(marker)
    assert not left, f"model processes outlived the test: {left}"


def assert_no_processes_left_sync(marker: str, grace: float = 3.0) -> None:
    """:func:`assert_no_processes_left` for synchronous tests."""
    with contextlib.suppress(pytest.fail.Exception):
        wait_until_sync(lambda: not marked_processes(marker), grace, interval=0.05)
    left = _kill_left(marker)
    assert not left, f"model processes outlived the test: {left}"
