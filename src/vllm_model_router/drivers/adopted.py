"""A model server process this router did not start itself: one a previous router process started,
adopted after a restart (recovery.py). It is not our child, so it cannot be waited for: its liveness
is polled in /proc, by pid *and* start time, so that a reused pid is never taken for it.
"""

from __future__ import annotations

import asyncio

from vllm_model_router.drivers import procs

POLL_S = 0.25


class AdoptedProcess:
    """Stands in for ``asyncio.subprocess.Process`` where the process driver needs one (its output is
    followed in its log file, as that of any server the driver starts)."""

    def __init__(self, pid: int, start_time: int | None) -> None:
        self.pid = pid
        self.start_time = start_time if start_time is not None else procs.start_time(pid)
        self._gone = False

    def alive(self) -> bool:
        if not self._gone and (self.start_time is None or procs.start_time(self.pid) != self.start_time):
            self._gone = True
        return not self._gone

    @property
    def returncode(self) -> int | None:
        """None while it runs; -1 once it is gone (the exit status of another's child is unknown)."""
        return None if self.alive() else -1

    async def wait(self) -> int:
        while self.alive():  # noqa: ASYNC110 - not our child: nothing to wait on but the process table
            await asyncio.sleep(POLL_S)
        return -1
