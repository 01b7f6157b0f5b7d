"""Runtime LoRA adapter loading, as vLLM's ``--enable-lora`` routes answer it.

``POST /v1/load_lora_adapter`` checks that the adapter folder exists (the router relies on the
404 when it does not), takes ``--lora-load-delay`` seconds and then serves the adapter under its
name; ``POST /v1/unload_lora_adapter`` forgets it. Messages and statuses are vLLM's.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from vllm_model_router.testing.fake_engine.state import EngineState
from vllm_model_router.testing.fake_engine.wire import RequestError, read_json, text_response


class LoraRoutes:
    """Handlers of the two LoRA adapter routes."""

    def __init__(self, state: EngineState) -> None:
        self.state = state

    async def load_lora_adapter(self, request: web.Request) -> web.StreamResponse:
        adapters = self.state.adapters
        try:
            body = await read_json(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise RequestError(400, "BadRequestError", "Both 'lora_name' and 'lora_path' must be provided.")
            if name in adapters and body.get("load_inplace") is not True:
                raise RequestError(400, "BadRequestError", f"The lora adapter '{name}' has already been loaded.")
            if not await asyncio.to_thread(os.path.isdir, path):
                raise RequestError(404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}")
            if self.state.args.lora_load_delay > 0:
                await asyncio.sleep(self.state.args.lora_load_delay)
            adapters[name] = path
            return text_response(self.state.headers, f"Success: LoRA adapter '{name}' added successfully.")
        except RequestError as exc:
            return exc.response(self.state.headers)

    async def unload_lora_adapter(self, request: web.Request) -> web.StreamResponse:
        adapters = self.state.adapters
        try:
            body = await read_json(request)
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise RequestError(400, "BadRequestError", "'lora_name' needs to be provided to unload a LoRA.")
            if name not in adapters:
                raise RequestError(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            del adapters[name]
            return text_response(self.state.headers, f"Success: LoRA adapter '{name}' removed successfully.")
        except RequestError as exc:
            return exc.response(self.state.headers)
