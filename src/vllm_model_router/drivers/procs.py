"""Process-group bookkeeping: find every live process of a group or session, and make them go away.

vLLM's API server forks ``VLLM::EngineCore`` and worker processes; a SIGKILL of the API server alone
leaves them holding GPU memory. Each model is therefore started in its own session (so its process
group and session id equal the leader's pid) and stopped by signalling the whole group, and "stopped"
means no live (non-zombie) process of that group or session remains in the process table.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessStat:
    """The fields of ``/proc/<pid>/stat`` that tell which group and session a process is in, and which
    process it is (a pid is reused; pid and start time are not)."""

    pid: int
    comm: str
    state: str  # one letter: R, S, D, ... Z (zombie), X (dead)
    ppid: int
    pgrp: int
    session: int
    start_time: int  # clock ticks since boot

    @property
    def alive(self) -> bool:
        """Not a zombie: a zombie has exited and holds nothing but its process-table entry."""
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcessStat | None:
    """The process's stat line, None when there is no such process (or no /proc)."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp session ...; comm may contain spaces and parentheses
    fields = text[text.rfind(")") + 2 :].split()  # fields[0] is field 3 (state)
    if len(fields) < 20:
        return None
    return ProcessStat(pid, text[text.find("(") + 1 : text.rfind(")")], fields[0], int(fields[1]), int(fields[2]),
                       int(fields[3]), int(fields[19]))


def live_processes() -> Iterator[ProcessStat]:
    """Every live (non-zombie) process in /proc (none where there is no /proc)."""
    if not _PROC.is_dir():
        return
    for entry in _PROC.iterdir():
        if entry.name.isdigit() and (stat := read_stat(int(entry.name))) is not None and stat.alive:
            yield stat


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group or session is ``pgid`` (zombies excluded)."""
    return members_of_groups([pgid])


def members_of_groups(pgids: Iterable[int]) -> list[int]:
    """Live processes whose process group or session is one of ``pgids``, in one pass over /proc."""
    wanted = set(pgids)
    if not wanted:
        return []
    if not _PROC.is_dir():  # not Linux: fall back to asking the kernel about each group
        alive = []
        for pgid in wanted:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                continue
            alive.append(pgid)
        return alive
    return [p.pid for p in live_processes() if p.pgrp in wanted or p.session in wanted]


def strays(pgid: int) -> list[int]:
    """Live members of session ``pgid`` that moved to another process group, which ``killpg(pgid)`` does
    not reach (empty where there is no /proc)."""
    if not _PROC.is_dir():
        return []
    return [p.pid for p in live_processes() if p.session == pgid and p.pgrp != pgid]


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` once to every process of the group or session: the group with one ``killpg``, then each
    session member that left the group. A member of the group must not get it a second time: uvicorn (vLLM's
    HTTP server) takes a second SIGTERM as "exit now", skipping its graceful shutdown, and a server whose
    handler is not re-entrant may hang instead of exiting."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for pid in strays(pgid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


async def wait_group_gone(pgid: int, timeout: float, interval: float = 0.05) -> bool:
    """True once no live member of the group/session remains; False if ``timeout`` passed first."""
    deadline = time.monotonic() + timeout
    while True:
        if not group_members(pgid):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


async def terminate_group(pgid: int, stop_timeout: float) -> list[int]:
    """SIGTERM the group, SIGKILL whatever is left after ``stop_timeout``; return the pids that needed
    SIGKILL (empty when the group exited on SIGTERM)."""
    signal_group(pgid, signal.SIGTERM)
    if await wait_group_gone(pgid, stop_timeout):
        return []
    stragglers = group_members(pgid)
    await kill_group(pgid)
    return stragglers


async def kill_group(pgid: int, timeout: float = 10.0) -> bool:
    signal_group(pgid, signal.SIGKILL)
    return await wait_group_gone(pgid, timeout)


def start_time(pid: int) -> int | None:
    """When the process started (field 22 of /proc/<pid>/stat, in clock ticks since boot): with the pid,
    it names one process for good, since a reused pid comes with a later start time. None when there is
    no such live (non-zombie) process."""
    stat = read_stat(pid)
    return stat.start_time if stat is not None and stat.alive else None
