"""A request whose upstream failed before anything was sent back (``Unreachable``: it may be planned
again), and one cut loose because its server is gone (``Cut``)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from vllm_model_router.errors import BadGateway


class Unreachable(BadGateway):
    """The upstream failed before the head of its answer: nothing was sent back to the client yet, so the
    request may be tried on another engine. ``connect``: no connection could be made at all (the engine is
    down); otherwise one broke (a stale pooled connection, an engine that died while working on it)."""

    def __init__(self, message: str, connect: bool) -> None:
        super().__init__(message)
        self.connect = connect


class Cut:
    """A request in the hands of a unit's server, cut loose when the router hears that server is gone (its
    engine exited, its node was lost): before the answer's head its task is cancelled (and the request
    planned again: nothing was sent back); after, the upstream response is closed, so that the read in
    progress fails at once (a stream then ends with an error event) instead of waiting on a connection to a
    machine that vanished, which nothing would ever break. The task's cancellations are counted from the
    start, as ``asyncio.timeout`` does: one that comes with the cut's (the client leaving, a shutdown
    cutting requests off) stays a cancellation, and the request is not sent anywhere again."""

    __slots__ = ("_before", "cancelled", "reason", "task", "upstream")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.task = task
        self.upstream: aiohttp.ClientResponse | None = None
        self.reason: str | None = None
        self.cancelled = False  # the cut cancelled the task
        self._before = task.cancelling() if task is not None else 0

    def fire(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self.upstream is not None:
            if not self.upstream.content.is_eof():  # all of it here already: nothing waits on the server
                self.upstream.close()
        elif self.task is not None and not self.task.done():
            self.task.cancel()
            self.cancelled = True

    def caught(self) -> bool:
        """The cancellation just caught is the cut's alone (the request is then planned again): the cut's
        is taken back; with another's beside it, that one stands."""
        if not self.cancelled or self.task is None:
            return False
        self.cancelled = False
        others = self.task.uncancel() - self._before
        return others == 0

    @property
    def why(self) -> str:
        """The first line of why the server is gone ("" while it is not)."""
        return (self.reason or "").partition("\n")[0]

    def unreachable(self, server: str) -> Unreachable:
        return Unreachable(f"{server} is gone: {self.why}", connect=False)

    def lost(self, server: str, error: BaseException) -> BadGateway:
        """What a read that failed before anything was sent back is: cut loose (planned again), or a broken
        connection."""
        if self.reason is not None:
            return self.unreachable(server)
        return BadGateway(f"lost the connection to {server}: {error}")
