"""vLLM's sleep mode: ``/sleep``, ``/wake_up``, ``/is_sleeping`` and ``/collective_rpc``.

vLLM exposes these routes only with ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``. A
sleeping engine refuses inference with 503 and reports less memory. Level 1 offloads the
weights; level 2 discards them, and an engine woken from level 2 answers garbage until
``collective_rpc`` ``reload_weights`` runs, so the router's reload step can be tested. Waking
may be partial (``?tags=weights`` then ``?tags=kv_cache``), as in vLLM.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from vllm_model_router.testing.fake_engine.state import EngineState
from vllm_model_router.testing.fake_engine.wire import RequestError, error_response, json_response, read_json

KNOWN_WAKE_TAGS = ("weights", "kv_cache")


def sleep_state_label(state: EngineState) -> str:
    """The ``sleep_state`` label that vLLM's ``vllm:engine_sleep_state`` gauge sets to 1."""
    if not state.sleeping_tags:
        return "awake"
    if state.sleep_level == 2:
        return "discard_all"
    return "weights_offloaded"


class SleepRoutes:
    """Handlers of the sleep-mode routes."""

    def __init__(self, state: EngineState) -> None:
        self.state = state

    async def sleep(self, request: web.Request) -> web.StreamResponse:
        state, args = self.state, self.state.args
        level_text = request.query.get("level", "1")
        if level_text not in ("1", "2"):
            return error_response(
                state.headers, 400, "BadRequestError", f"Invalid sleep level {level_text!r}: use 1 or 2.", "level"
            )
        level = int(level_text)
        # Refuse inference from the moment the sleep starts.
        state.sleeping_tags = set(KNOWN_WAKE_TAGS)
        state.sleep_level = level
        if args.sleep_delay > 0:
            await asyncio.sleep(args.sleep_delay)
        if level == 2:
            state.weights_valid = False
        state.memory_gb = args.sleeping_memory_gb
        return web.Response(status=200, headers=state.headers)

    async def wake_up(self, request: web.Request) -> web.StreamResponse:
        state, args = self.state, self.state.args
        tags = request.query.getall("tags", [])
        unknown = [t for t in tags if t not in KNOWN_WAKE_TAGS]
        if unknown:
            return error_response(state.headers, 400, "BadRequestError", f"Unknown wake-up tags {unknown}.", "tags")
        if args.wake_delay > 0:
            await asyncio.sleep(args.wake_delay)
        if args.fail_wake:
            return error_response(
                state.headers, 500, "InternalServerError", "wake up failed (simulated by --fail-wake)"
            )
        state.sleeping_tags -= set(tags or KNOWN_WAKE_TAGS)
        if not state.sleeping_tags:
            state.sleep_level = 0
            state.memory_gb = args.memory_gb
        return web.Response(status=200, headers=state.headers)

    async def is_sleeping(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.headers, {"is_sleeping": bool(self.state.sleeping_tags)})

    async def collective_rpc(self, request: web.Request) -> web.StreamResponse:
        """Only ``reload_weights`` has an effect; every other method answers ``{"results": [null]}``."""
        state = self.state
        try:
            body = await read_json(request)
        except RequestError as exc:
            return exc.response(state.headers)
        method = body.get("method")
        if not isinstance(method, str) or not method:
            return error_response(state.headers, 400, "BadRequestError", "'method' must be provided.", "method")
        if method == "reload_weights":
            if "weights" in state.sleeping_tags:
                return error_response(
                    state.headers, 500, "InternalServerError", "cannot reload weights while the weights are asleep"
                )
            if state.args.wake_delay > 0:
                await asyncio.sleep(state.args.wake_delay)
            state.weights_valid = True
        return json_response(state.headers, {"results": [None]})
