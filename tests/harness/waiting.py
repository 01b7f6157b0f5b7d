"""Waiting for a condition instead of sleeping for a while: a test that sleeps is slow when the machine
is fast and flaky when it is slow; one that polls a condition is neither."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import pytest

T = TypeVar("T")

INTERVAL = 0.02  # seconds between two looks


@overload
async def wait_until(predicate: Callable[[], Awaitable[T | None]], timeout: float = ..., what: str = ...,
                     interval: float = ...) -> T: ...


@overload
async def wait_until(predicate: Callable[[], T | None], timeout: float = ..., what: str = ...,
                     interval: float = ...) -> T: ...


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
                     interval: float = INTERVAL) -> Any:
    """Poll ``predicate`` (plain or async) until it returns something truthy, and return that; fail the test
    after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        await asyncio.sleep(interval)


def wait_until_sync(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
                    interval: float = INTERVAL) -> T:
    """:func:`wait_until` for synchronous tests (the thread blocks between two looks)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        time.sleep(interval)
    return result
