"""Fixtures: routers (in this event loop, served as ``serve`` serves them, or as a real process) in front of
fake-engine subprocesses, all started by ``tests.harness.launch_router``.

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

from tests.harness import How, Router, launch_router

StartRouter = Callable[..., Awaitable[Router]]
StartRouterProcess = StartRouter
ServeRouter = StartRouter


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@contextlib.asynccontextmanager
async def _starter(marker: str, how: How, **fixed: Any) -> AsyncIterator[StartRouter]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(models: Mapping[str, Mapping[str, Any]], **settings: Any) -> Router:
            return await stack.enter_async_context(launch_router(models, marker, how, **fixed, **settings))

        yield start


@pytest.fixture
async def start_router(marker: str) -> AsyncIterator[StartRouter]:
    """``await start_router(models, **settings)``: a router in this event loop, shut down after the test."""
    async with _starter(marker, "app") as start:
        yield start


@pytest.fixture
async def serve_router(marker: str) -> AsyncIterator[ServeRouter]:
    """``await serve_router(models, **settings)``: the router served as ``serve`` serves it (server.py's
    site: connection limit, client timeouts), in this event loop, shut down after the test."""
    async with _starter(marker, "served") as start:
        yield start


@pytest.fixture
async def start_router_process(marker: str, tmp_path: Path) -> AsyncIterator[StartRouterProcess]:
    """``await start_router_process(models, **settings)``: ``vllm-model-router serve`` as a process."""
    async with _starter(marker, "process", workdir=tmp_path) as start:
        yield start
