"""Fixtures: routers (in this event loop, or as a real process) in front of fake-engine subprocesses.

Each test gets its own marker; every model process carries it, and a router fixture fails the test when
one of them is still alive after the router has shut down.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from .resilience_support import Served, served_router
from .support import Router, RouterProcess, in_process_router, router_process

StartRouter = Callable[..., Awaitable[Router]]
StartRouterProcess = Callable[..., Awaitable[RouterProcess]]
ServeRouter = Callable[..., Awaitable[Served]]


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture
async def start_router(marker: str) -> AsyncIterator[StartRouter]:
    """``await start_router(models, **settings)``: a router in this event loop, shut down after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(models: Mapping[str, Mapping[str, Any]], **settings: Any) -> Router:
            return await stack.enter_async_context(in_process_router(models, marker, **settings))

        yield start


@pytest.fixture
async def start_router_process(marker: str, tmp_path: Path) -> AsyncIterator[StartRouterProcess]:
    """``await start_router_process(models, **settings)``: ``vllm-model-router serve`` as a process."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(models: Mapping[str, Mapping[str, Any]], **settings: Any) -> RouterProcess:
            return await stack.enter_async_context(router_process(tmp_path, models, marker, **settings))

        yield start


@pytest.fixture
async def serve_router(marker: str) -> AsyncIterator[ServeRouter]:
    """``await serve_router(models, **settings)``: the router served as ``serve`` serves it (server.py's
    site: connection limit, client timeouts), in this event loop, shut down after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(models: Mapping[str, Mapping[str, Any]], **settings: Any) -> Served:
            return await stack.enter_async_context(served_router(models, marker, **settings))

        yield start
