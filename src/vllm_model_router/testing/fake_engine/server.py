"""The fake engine's HTTP app and its life as a server, from model load to shutdown.

``make_app`` puts the route groups together (inference, LoRA, sleep mode, each enabled by the
same flags as in vLLM) with the routes every engine has (``/health``, ``/v1/models``,
``/metrics``, ``/fake/state``) and FastAPI's 404/405 answers. ``serve`` runs it with the
startup, log lines and shutdown of vLLM's uvicorn server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from vllm_model_router.testing.fake_engine import process
from vllm_model_router.testing.fake_engine.inference import InferenceRoutes
from vllm_model_router.testing.fake_engine.lora import LoraRoutes
from vllm_model_router.testing.fake_engine.process import LOG_PREFIX, log
from vllm_model_router.testing.fake_engine.sleep import SleepRoutes, sleep_state_label
from vllm_model_router.testing.fake_engine.state import EngineState
from vllm_model_router.testing.fake_engine.wire import json_response, method_not_allowed, not_found

Handler = Callable[[web.Request], Any]


class FakeEngine:
    """The routes every engine has, and the app that puts all route groups together."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self._methods: dict[str, set[str]] = {}

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=self.state.args.health_status)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """The served names, then the loaded adapters (with the primary name as parent), as vLLM lists them."""
        state = self.state
        permission = [
            {
                "id": f"modelperm-fake{state.pid}",
                "object": "model_permission",
                "created": state.created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ]
        cards: list[dict[str, Any]] = [
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "vllm",
                "root": state.root,
                "parent": None,
                "max_model_len": state.args.max_model_len,
                "permission": permission,
            }
            for name in state.served_names
        ]
        cards.extend(
            {
                "id": name,
                "object": "model",
                "created": state.created,
                "owned_by": "vllm",
                "root": path,
                "parent": state.primary,
                "max_model_len": None,
                "permission": permission,
            }
            for name, path in state.adapters.items()
        )
        return json_response(state.headers, {"object": "list", "data": cards})

    async def fake_state(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.state.headers, self.state.snapshot())

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """The few vLLM gauges and counters the router reads, in Prometheus text format."""
        state = self.state
        labels = f'engine="0",model_name="{state.primary}"'
        sleep_state = sleep_state_label(state)
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(state.batch.running)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} {float(state.batch.waiting)}",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} 0.0",
            "# HELP vllm:engine_sleep_state Engine sleep state.",
            "# TYPE vllm:engine_sleep_state gauge",
        ]
        for label in ("awake", "weights_offloaded", "discard_all"):
            value = 1.0 if label == sleep_state else 0.0
            lines.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{label}"}} {value}')
        lines += [
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f"vllm:request_success_total{{{labels}}} {float(state.requests_served)}",
        ]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8", headers=state.headers
        )

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """FastAPI-style answers for unknown routes and wrong methods."""
        methods = self._methods.get(request.path)
        if methods is not None and request.method not in methods:
            return method_not_allowed()
        return not_found()

    def make_app(self) -> web.Application:
        args = self.state.args
        inference = InferenceRoutes(self.state)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/health", self.health),
            ("GET", "/v1/models", self.models),
            ("POST", "/v1/chat/completions", inference.chat_completions),
            ("POST", "/v1/completions", inference.completions),
            ("GET", "/fake/state", self.fake_state),
            ("GET", "/metrics", self.metrics),
        ]
        if not args.no_embeddings:
            routes.append(("POST", "/v1/embeddings", inference.embeddings))
        if args.enable_lora:
            lora = LoraRoutes(self.state)
            routes.append(("POST", "/v1/load_lora_adapter", lora.load_lora_adapter))
            routes.append(("POST", "/v1/unload_lora_adapter", lora.unload_lora_adapter))
        if self.state.sleep_mode:
            sleep = SleepRoutes(self.state)
            routes += [
                ("POST", "/sleep", sleep.sleep),
                ("POST", "/wake_up", sleep.wake_up),
                ("GET", "/is_sleeping", sleep.is_sleeping),
                ("POST", "/collective_rpc", sleep.collective_rpc),
            ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            self._methods.setdefault(path, set()).add(method)
        app.router.add_route("*", "/{tail:.*}", self.fallback)
        return app


def _access_logger() -> logging.Logger:
    """aiohttp's access log on stdout, in uvicorn's ``INFO:     ...`` shape."""
    access_log = logging.getLogger("aiohttp.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("INFO:     %(message)s"))
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    return access_log


async def serve(args: argparse.Namespace) -> int:
    """Load (pretend), bind, serve until SIGTERM/SIGINT, shut down; returns the exit status."""
    state = EngineState(args)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        process.record_signal(args.signal_log, state.pid, sig)
        stop.set()

    if not args.ignore_sigterm:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
    log(f"INFO {LOG_PREFIX} FAKE vLLM-compatible engine (test and demo tool, not an inference engine), pid {state.pid}")
    log(
        f"INFO {LOG_PREFIX} loading model {state.root} as {', '.join(state.served_names)} "
        f"(startup delay {args.startup_delay:g} s)"
    )
    if args.enable_sleep_mode and not state.sleep_mode:
        log(f"WARNING {LOG_PREFIX} --enable-sleep-mode without VLLM_SERVER_DEV_MODE=1: sleep routes disabled")
    if args.spawn_child:
        state.spawn_child()
    outcome = await process.wait_startup(args, stop)
    if outcome != "ready":
        state.terminate_child()
        return 1 if outcome == "failed" else 0

    runner = web.AppRunner(
        FakeEngine(state).make_app(),
        access_log=_access_logger() if args.access_log else None,
        access_log_format='%a "%r" %s',
        # vLLM aborts a request whose client went away (its routes are wrapped in with_cancellation),
        # which frees its batch slot or takes it out of the queue
        handler_cancellation=True,
        shutdown_timeout=0.3,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        log(f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address ({args.host}, {args.port})")
        await runner.cleanup()
        state.terminate_child()
        return 1
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            state.port = int(address[1])
            break
    log(f"INFO:     Started server process [{state.pid}]")
    log("INFO:     Waiting for application startup.")
    log("INFO:     Application startup complete.")
    log(f"INFO:     Uvicorn running on http://{args.host}:{state.port} (Press CTRL+C to quit)")
    await stop.wait()
    log("INFO:     Shutting down")
    if args.shutdown_delay:
        await asyncio.sleep(args.shutdown_delay)
    await runner.cleanup()
    state.terminate_child()
    log(f"INFO:     Finished server process [{state.pid}]")
    return 0
