"""The one fake engine's state, shared by its route groups.

Names served, adapters loaded, sleep state, the worker child and the counters that
``GET /fake/state`` and ``/metrics`` report. The route modules read and change it; nothing
here answers HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from typing import Any

from vllm_model_router.testing.fake_engine import process
from vllm_model_router.testing.fake_engine.batch import Batch


class EngineState:
    """Everything one fake engine process remembers between requests."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pid = os.getpid()
        self.served_names: list[str] = list(args.served_model_name)
        self.primary = self.served_names[0]
        self.root: str = args.model or self.primary
        self.created = int(time.time())
        self.adapters: dict[str, str] = {}
        for spec in args.lora_modules or []:
            name, _, path = spec.partition("=")
            self.adapters[name] = path or name
        self.child: subprocess.Popen[bytes] | None = None
        self.port: int = args.port
        # counters
        self.requests_total = 0
        self.requests_served = 0
        self.in_flight = 0  # inference requests being handled, queued or running
        self.batch = Batch(args.max_num_seqs)
        self.requests_while_sleeping = 0
        self._next_id = 0
        self._exit_scheduled = False
        # sleep mode: vLLM exposes its routes only in dev mode
        self.sleep_mode = bool(args.enable_sleep_mode) and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.sleeping_tags: set[str] = set()
        self.sleep_level = 0
        self.weights_valid = True
        self.memory_gb: float = args.memory_gb
        # on every answer but FastAPI's own 404/405 and /health, so that tests can tell engines apart
        self.headers = {"x-fake-engine": self.primary, "x-fake-engine-pid": str(self.pid)}

    def new_id(self, prefix: str) -> str:
        """A response id unique within this process, e.g. ``chatcmpl-fake123x4``."""
        self._next_id += 1
        return f"{prefix}-fake{self.pid}x{self._next_id}"

    def knows_model(self, model: str) -> bool:
        return model in self.served_names or model in self.adapters

    def count_served(self) -> None:
        """Count one inference request answered in full; exit after --fail-after-requests of them."""
        self.requests_served += 1
        limit = self.args.fail_after_requests
        if limit is not None and self.requests_served >= limit and not self._exit_scheduled:
            self._exit_scheduled = True
            # Leave the event loop a moment to flush the response that is being sent.
            asyncio.get_running_loop().call_later(
                0.05, process.exit_now, f"exiting after {limit} requests (--fail-after-requests)", self.child
            )

    def spawn_child(self) -> None:
        self.child = process.spawn_child(self.port, self.primary)

    def terminate_child(self) -> None:
        process.terminate_child(self.child)

    def snapshot(self) -> dict[str, Any]:
        """The counters and state that ``GET /fake/state`` returns for test assertions."""
        return {
            "pid": self.pid,
            "port": self.port,
            "served_names": self.served_names,
            "root": self.root,
            "requests_total": self.requests_total,
            "requests_served": self.requests_served,
            "in_flight": self.in_flight,
            "running": self.batch.running,
            "waiting": self.batch.waiting,
            "requests_while_sleeping": self.requests_while_sleeping,
            "sleeping": bool(self.sleeping_tags),
            "sleeping_tags": sorted(self.sleeping_tags),
            "sleep_level": self.sleep_level,
            "weights_valid": self.weights_valid,
            "adapters": list(self.adapters),
            "adapter_paths": dict(self.adapters),
            "memory_gb": self.memory_gb,
            "child_pid": self.child.pid if self.child is not None else None,
        }
