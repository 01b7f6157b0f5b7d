"""Ports, health checks and raw HTTP.

``free_port`` is the router's own (the process driver picks its models' ports with it). A health check
is one GET with a short timeout, asked the same way of a router, a fake engine or LiteLLM, from a
synchronous or an async test. Raw HTTP sends bytes as they are, for requests no well-behaved client
would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from vllm_model_router.drivers.procs import free_port

from .waiting import wait_until, wait_until_sync

__all__ = ["RawReply", "araw_request", "assert_envelope", "free_port", "http_status", "raw_request",
           "wait_healthy", "wait_healthy_sync"]

# no proxy from the environment: every server a test talks to is on this machine
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The status a GET of ``url`` is answered with; None when nothing answers (yet)."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        with e:
            return e.code
    except (OSError, http.client.HTTPException):
        return None


class _Exited(Exception):
    pass


@dataclass
class _Readiness:
    """One look at a starting server: whether it answers as expected (raises _Exited once it is gone)."""

    accept: Container[int] | None  # None: any answer at all
    exited: Callable[[], int | None] | None

    def check(self, status: int | None) -> bool:
        if self.exited is not None and (code := self.exited()) is not None:
            raise _Exited(f"exited with {code}")
        return status is not None and (self.accept is None or status in self.accept)


@contextlib.contextmanager
def _failing_with_log(url: str, what: str, timeout: float, log: Callable[[], str] | None) -> Iterator[None]:
    """The test fails with the server's log when it exits or is not healthy in time."""
    try:
        yield
    except (_Exited, pytest.fail.Exception) as e:
        why = str(e) if isinstance(e, _Exited) else f"not healthy at {url} within {timeout}s"
        pytest.fail(f"{what} {why}:\n{log() if log is not None else ''}")


def wait_healthy_sync(url: str, *, what: str = "server", timeout: float = 20.0, accept: Container[int] | None = (200,),
                      exited: Callable[[], int | None] | None = None, log: Callable[[], str] | None = None) -> int:
    """Until a GET of ``url`` is answered with a status in ``accept`` (None: any); return that status. The
    test fails at once if ``exited()`` says the server is gone, or after ``timeout``; either way with
    ``log()``."""
    ready = _Readiness(accept, exited)
    status: int | None = None

    def answered() -> bool:
        nonlocal status
        status = http_status(url)
        return ready.check(status)

    with _failing_with_log(url, what, timeout, log):
        wait_until_sync(answered, timeout, interval=0.05)
    assert status is not None
    return status


async def wait_healthy(url: str, *, what: str = "server", timeout: float = 20.0,
                       accept: Container[int] | None = (200,), exited: Callable[[], int | None] | None = None,
                       log: Callable[[], str] | None = None) -> int:
    """:func:`wait_healthy_sync` from async code (the GET runs in a thread: a router in this event loop
    keeps serving meanwhile)."""
    ready = _Readiness(accept, exited)
    status: int | None = None

    async def answered() -> bool:
        nonlocal status
        status = await asyncio.to_thread(http_status, url)
        return ready.check(status)

    with _failing_with_log(url, what, timeout, log):
        await wait_until(answered, timeout, interval=0.05)
    assert status is not None
    return status


# ------------------------------------------------------------------------------------------ raw HTTP
@dataclass
class RawReply:
    status: int | None  # None: the connection closed without an answer
    head: str
    body: bytes
    closed: bool  # the server closed the connection after the answer
    elapsed: float

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        for line in self.head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == name.lower():
                return v.strip()
        return None


def parse_reply(data: bytes, closed: bool, elapsed: float) -> RawReply:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        return RawReply(None, head.decode("latin-1"), b"", closed, elapsed)
    text = head.decode("latin-1")
    status = int(text.split(" ", 2)[1])
    reply = RawReply(status, text, body, closed, elapsed)
    length = reply.header("Content-Length")
    if length is not None:
        reply.body = body[: int(length)]
    return reply


def raw_request(port: int, data: bytes, timeout: float = 5.0, then_wait: float | None = None) -> RawReply:
    """Send ``data`` as is on a new connection; read until the server closes it, or the answer (by its
    Content-Length) is complete and ``then_wait`` more seconds passed (None: do not wait for the close)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        buf = b""
        closed = False
        deadline = started + timeout
        while time.monotonic() < deadline:
            reply = parse_reply(buf, False, 0)
            if reply.status is not None and reply.header("Content-Length") is not None:
                head_len = buf.index(b"\r\n\r\n") + 4
                if len(buf) - head_len >= int(reply.header("Content-Length") or 0):
                    if then_wait is None:
                        break
                    s.settimeout(then_wait)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
    return parse_reply(buf, closed, time.monotonic() - started)


async def araw_request(port: int, data: bytes, timeout: float = 5.0, then_wait: float | None = None) -> RawReply:
    """:func:`raw_request` from async code (in a thread, so that an in-process router keeps running)."""
    return await asyncio.to_thread(raw_request, port, data, timeout, then_wait)


def assert_envelope(body: bytes) -> dict[str, Any]:
    """The OpenAI error envelope's content, checking its shape on the way."""
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    err: dict[str, Any] = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    return err
