"""The engine's batch: at most ``--max-num-seqs`` requests run at once, the rest wait in FIFO order.

A saturated vLLM engine does not refuse requests: it queues them inside the engine and reports
them as ``vllm:num_requests_waiting`` while ``vllm:num_requests_running`` stays at the batch
size. The router's scaling decisions read exactly those gauges, and a benchmark can only show
replicas adding throughput if one engine's throughput is bounded, so the fake engine models the
batch limit rather than answering any number of requests at once.

Slots are handed over directly from a finishing request to the oldest waiter, so a newcomer can
never overtake the queue. A waiter that is cancelled (its client went away) leaves the queue and,
if a slot was handed to it at that very moment, passes the slot on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator


class Batch:
    """Counts running requests against a limit (``None``: no limit) and queues the rest."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.running = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests queued now (a waiter cancelled a moment ago but not yet resumed is not counted)."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body of the ``async with``, queueing for it if the batch is full."""
        await self._acquire()
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.limit is None or (self.running < self.limit and not self._waiters):
            self.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # the slot arrived just as the client left: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self) -> None:
        """Hand the slot to the oldest live waiter (``running`` unchanged), or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
