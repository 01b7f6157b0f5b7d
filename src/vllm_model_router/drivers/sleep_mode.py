"""vLLM's sleep mode, spoken to an engine through its own HTTP management routes.

One protocol for every driver that runs engines: process.py (a server on this machine) and ray_engine.py
(a server on a node of a Ray cluster) differ only in where the engine listens, so each hands these
functions a :data:`Call` bound to its engine's address, and the steps, their order and their checks are
written once:

- sleep: ``POST /sleep?level=N``;
- wake from level 1: ``POST /wake_up``; from level 2 (the weights were dropped): ``POST
  /wake_up?tags=weights`` (their memory back), ``POST /collective_rpc`` ``reload_weights``, then ``POST
  /wake_up?tags=kv_cache``, so the KV cache is allocated only once the weights are in place;
- then ``GET /is_sleeping`` must answer ``false``: an engine that answered its wake-up but still sleeps
  would refuse every request sent to it;
- then, unless the model says ``warmup: false``, a 1-token completion: the first request after a wake is
  several times slower without it. Its failure is logged, not raised (the engine is awake and serves).

Every path and body here comes from the configuration (the sleep level, the served model name), never from
a client request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from vllm_model_router.drivers.base import LoadError

log = logging.getLogger("vllm_model_router.sleep")

# (method, path, JSON body or None, timeout in seconds) -> the answer's text; raises LoadError unless 200
Call = Callable[[str, str, Any, float], Awaitable[str]]

SLEEP_TIMEOUT_S = 600.0  # moving the weights of a large model to host RAM, or reloading them, takes a while
CHECK_TIMEOUT_S = 30.0  # a question (is it asleep?)
WARMUP_TIMEOUT_S = 120.0
LEVELS = (1, 2)


def http_call(session: Callable[[], aiohttp.ClientSession], base: str) -> Call:
    """A :data:`Call` to the engine at ``base`` (``http://host:port``) through ``session()``: any other
    answer than 200, a refused connection or a timeout is a LoadError naming the route."""

    async def call(method: str, path: str, body: Any, timeout: float) -> str:
        try:
            async with session().request(method, base + path, json=body,
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise LoadError(f"{method} {path} answered {resp.status}: {text.strip()[:500]}")
                return text
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise LoadError(f"{method} {path} failed: {e!r}") from e

    return call


def _level(level: int) -> int:
    if level not in LEVELS:  # the scheduler only ever asks for 1 or 2: anything else is a bug, not a route
        raise LoadError(f"sleep level must be 1 or 2, got {level!r}")
    return level


async def sleep(call: Call, level: int) -> None:
    """Put the engine to sleep at ``level``."""
    await call("POST", f"/sleep?level={_level(level)}", None, SLEEP_TIMEOUT_S)


async def awake(call: Call) -> bool:
    """Whether the engine says it is awake (``/is_sleeping`` answers false); False when it cannot say."""
    return _says_awake(await call("GET", "/is_sleeping", None, CHECK_TIMEOUT_S))


def _says_awake(text: str) -> bool:
    try:
        answer = json.loads(text)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("is_sleeping") is False


async def wake(call: Call, served: str, level: int, warmup: bool = True) -> None:
    """Wake the engine that was put to sleep at ``level`` and check that it is awake; with ``warmup``, send
    it a 1-token completion for ``served`` (the name its server answers to: a replica's server serves its
    model's name, not the unit's)."""
    if _level(level) == 2:  # the weights were dropped: bring their memory back, reload them, then the KV cache
        await call("POST", "/wake_up?tags=weights", None, SLEEP_TIMEOUT_S)
        await call("POST", "/collective_rpc", {"method": "reload_weights"}, SLEEP_TIMEOUT_S)
        await call("POST", "/wake_up?tags=kv_cache", None, SLEEP_TIMEOUT_S)
    else:
        await call("POST", "/wake_up", None, SLEEP_TIMEOUT_S)
    text = await call("GET", "/is_sleeping", None, CHECK_TIMEOUT_S)
    if not _says_awake(text):
        raise LoadError(f"{served} does not report being awake after wake_up: {text.strip()[:200]}")
    if warmup:
        try:
            await call("POST", "/v1/completions", {"model": served, "prompt": "Hi", "max_tokens": 1},
                       WARMUP_TIMEOUT_S)
        except LoadError as e:
            log.warning("Warm-up of %s after its wake failed (serving anyway): %s", served, e)
