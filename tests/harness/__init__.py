"""What the tests share: a router launcher (``routers``), model entries for it (``models``), the process
table (``processes``), ports, health checks and raw HTTP (``net``), a server-sent events parser (``sse``)
and waiting for a condition instead of sleeping (``waiting``).

Everything a test needs is importable from here: ``from tests.harness import engine, wait_until``.
"""

from __future__ import annotations

from . import sse
from .models import CHAT, ECHO, FAKE_ENGINE, STALL, chat_body, echo_model, engine, stall_model
from .net import (
    RawReply,
    araw_request,
    assert_envelope,
    free_port,
    http_status,
    raw_request,
    wait_healthy,
    wait_healthy_sync,
)
from .processes import (
    MARKER_VAR,
    Process,
    alive,
    assert_no_processes_left,
    assert_no_processes_left_sync,
    cmdline,
    environ,
    marked_processes,
    processes,
    state,
)
from .routers import (
    How,
    Reply,
    Router,
    Stream,
    launch_router,
    router_data,
    threaded_router,
)
from .waiting import wait_until, wait_until_sync

__all__ = [
    "CHAT", "ECHO", "FAKE_ENGINE", "MARKER_VAR", "STALL", "How", "Process", "RawReply", "Reply",
    "Router", "Stream", "alive", "araw_request", "assert_envelope", "assert_no_processes_left",
    "assert_no_processes_left_sync", "chat_body", "cmdline", "echo_model", "engine", "environ", "free_port",
    "http_status", "launch_router", "marked_processes", "processes", "raw_request", "router_data",
    "sse", "stall_model", "state", "threaded_router", "wait_healthy", "wait_healthy_sync", "wait_until",
    "wait_until_sync",
]
