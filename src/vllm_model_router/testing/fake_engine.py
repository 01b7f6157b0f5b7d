"""Fake vLLM-compatible OpenAI server: a TEST AND DEMO TOOL, not an inference engine.

It loads no model and runs no neural network. It answers the subset of the vLLM 0.32
OpenAI-compatible HTTP API that the router relies on (``/health``, ``/v1/models``,
``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, runtime LoRA adapter
loading, sleep mode, ``/metrics``) with deterministic canned text derived from the request,
so that the router can be tested, demonstrated and benchmarked without a GPU or model weights.

It also reproduces the process-level behaviours of a real vLLM server that a supervisor must
cope with: a startup delay during which the port refuses connections, startup failures,
crashes in the middle of a stream, a server that ignores SIGTERM, a shutdown that takes time
(``--shutdown-delay``; ``--signal-log`` records each signal it receives), and an engine child
process that survives a SIGKILL of the API server. ``GET /fake/state`` exposes counters for test
assertions.

Run it with ``vllm-model-router fake-engine --port 8001 --served-model-name demo`` or
``python -m vllm_model_router.testing.fake_engine --port 8001 --served-model-name demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

PROG = "vllm-model-router fake-engine"
LOG_PREFIX = "fake-engine:"
EMBEDDING_DIM = 8
SNIPPET_CHARS = 60
KNOWN_WAKE_TAGS = ("weights", "kv_cache")

# The child emulates vLLM's EngineCore process: it only sleeps. It resets SIGTERM/SIGINT so
# that it does not inherit an "ignored" disposition from a parent started with --ignore-sigterm.
_CHILD_CODE = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "while True:\n"
    "    time.sleep(3600)\n"
)


def _log(line: str) -> None:
    """Print one log line to stdout and flush it; never fail if stdout is gone."""
    try:
        print(line, flush=True)
    except (OSError, ValueError):
        pass


def _dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


class _RequestError(Exception):
    """An OpenAI-style error to answer with an error envelope."""

    def __init__(self, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.err_type = err_type
        self.message = message
        self.param = param


@dataclass(slots=True)
class _Inference:
    body: dict[str, Any]
    model: str
    chunks: int
    chunk_delay: float
    delay: float
    max_tokens: int | None
    stream: bool
    include_usage: bool


def _non_negative_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _content_text(content: Any) -> str:
    """Text of a chat message content: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _split_pieces(words: list[str], n: int) -> list[str]:
    """Split the words into exactly n pieces whose concatenation is the space-joined text."""
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    total = len(tokens)
    return ["".join(tokens[i * total // n : (i + 1) * total // n]) for i in range(n)]


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 2**31 - 1.0 for i in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


class FakeEngine:
    """State and HTTP handlers of one fake engine."""

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
        self.in_flight = 0
        self.requests_while_sleeping = 0
        self._next_id = 0
        self._exit_scheduled = False
        # sleep mode
        self.sleep_mode = bool(args.enable_sleep_mode) and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
        self.sleeping_tags: set[str] = set()
        self.sleep_level = 0
        self.weights_valid = True
        self.memory_gb: float = args.memory_gb
        self.headers = {"x-fake-engine": self.primary, "x-fake-engine-pid": str(self.pid)}
        self.sse_headers = {
            **self.headers,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        }
        self._routes: dict[str, set[str]] = {}

    # ------------------------------------------------------------------ helpers

    def _json(self, payload: Any, status: int = 200) -> web.Response:
        return web.Response(body=_dumps(payload), status=status, content_type="application/json", headers=self.headers)

    def _error(self, status: int, err_type: str, message: str, param: str | None = None) -> web.Response:
        envelope = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
        return self._json(envelope, status)

    def _text(self, text: str, status: int = 200) -> web.Response:
        return web.Response(text=text, status=status, content_type="text/plain", headers=self.headers)

    @staticmethod
    def _not_found() -> web.Response:
        return web.Response(body=b'{"detail":"Not Found"}', status=404, content_type="application/json")

    def _new_id(self, prefix: str) -> str:
        self._next_id += 1
        return f"{prefix}-fake{self.pid}x{self._next_id}"

    @staticmethod
    async def _read_json(request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise _RequestError(400, "BadRequestError", f"Invalid JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise _RequestError(400, "BadRequestError", "The request body must be a JSON object.")
        return body

    def terminate_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def _exit_now(self, reason: str, terminate_child: bool) -> None:
        _log(f"ERROR {LOG_PREFIX} {reason}")
        if terminate_child:
            self.terminate_child()
        os._exit(1)

    def _count_served(self) -> None:
        self.requests_served += 1
        limit = self.args.fail_after_requests
        if limit is not None and self.requests_served >= limit and not self._exit_scheduled:
            self._exit_scheduled = True
            # Leave the event loop a moment to flush the response that is being sent.
            asyncio.get_running_loop().call_later(
                0.05, self._exit_now, f"exiting after {limit} requests (--fail-after-requests)", True
            )

    def record_signal(self, sig: signal.Signals) -> None:
        """Append ``<pid> <SIGNAME>`` to the --signal-log file: a supervisor must signal a server once (uvicorn,
        vLLM's HTTP server, takes a second SIGTERM as "exit now, skip the graceful shutdown")."""
        path = self.args.signal_log
        if path is None:
            return
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(f"{self.pid} {sig.name}\n")
        except OSError as exc:
            _log(f"WARNING {LOG_PREFIX} cannot write the signal log {path}: {exc}")

    def spawn_child(self) -> None:
        self.child = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE, "fake-engine-worker", "--port", str(self.port), self.primary],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _log(f"INFO {LOG_PREFIX} started engine worker process pid {self.child.pid} (fake-engine-worker)")

    # --------------------------------------------------------------- inference

    def _parse_inference(self, body: dict[str, Any]) -> _Inference:
        model = body.get("model")
        if model is None:
            model = self.primary
        if not isinstance(model, str):
            raise _RequestError(400, "BadRequestError", "'model' must be a string.", "model")
        if model not in self.served_names and model not in self.adapters:
            raise _RequestError(404, "NotFoundError", f"The model `{model}` does not exist.", "model")
        chunks: int = self.args.chunks
        chunk_delay: float = self.args.chunk_delay
        delay = 0.0
        fake = body.get("fake")
        if fake is not None:
            if not isinstance(fake, dict):
                raise _RequestError(400, "BadRequestError", "'fake' must be an object.", "fake")
            if "chunks" in fake:
                if not _positive_int(fake["chunks"]):
                    raise _RequestError(400, "BadRequestError", "fake.chunks must be an integer >= 1.", "fake")
                chunks = fake["chunks"]
            if "chunk_delay" in fake:
                if not _non_negative_number(fake["chunk_delay"]):
                    raise _RequestError(400, "BadRequestError", "fake.chunk_delay must be >= 0.", "fake")
                chunk_delay = float(fake["chunk_delay"])
            if "delay" in fake:
                if not _non_negative_number(fake["delay"]):
                    raise _RequestError(400, "BadRequestError", "fake.delay must be >= 0.", "fake")
                delay = float(fake["delay"])
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and not _positive_int(max_tokens):
            raise _RequestError(
                400, "BadRequestError", f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens"
            )
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return _Inference(body, model, chunks, chunk_delay, delay, max_tokens, stream, include_usage)

    def _reply(self, model: str, prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
        if self.weights_valid:
            snippet = " ".join(prompt.split())[:SNIPPET_CHARS]
            text = f"fake reply from {model} to: {snippet}"
        else:
            text = "GARBAGE: weights were discarded by sleep level 2 and not reloaded"
        words = text.split()
        if max_tokens is not None and len(words) > max_tokens:
            return words[:max_tokens], "length"
        return words, "stop"

    async def _begin(self, request: web.Request) -> _Inference:
        """Common start of an inference request: counters, sleep check, body validation."""
        self.requests_total += 1
        if self.sleeping_tags:
            self.requests_while_sleeping += 1
            raise _RequestError(503, "ServiceUnavailableError", "engine is sleeping")
        inference = self._parse_inference(await self._read_json(request))
        if inference.delay > 0:
            await asyncio.sleep(inference.delay)
        return inference

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            inf = await self._begin(request)
            messages = inf.body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _RequestError(400, "BadRequestError", "'messages' must be a non-empty list.", "messages")
            texts = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
            last_user = next(
                (
                    _content_text(m.get("content"))
                    for m in reversed(messages)
                    if isinstance(m, dict) and m.get("role") == "user"
                ),
                texts[-1] if texts else "",
            )
            prompt_tokens = max(1, sum(len(t.split()) for t in texts))
            words, finish = self._reply(inf.model, last_user, inf.max_tokens)
            if inf.stream:
                return await self._stream(request, inf, words, finish, prompt_tokens, chat=True)
            content = " ".join(words)
            payload = {
                "id": self._new_id("chatcmpl"),
                "object": "chat.completion",
                "created": int(time.time()),
                "model": inf.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                ],
                "usage": self._usage(prompt_tokens, len(words)),
                "prompt_logprobs": None,
            }
            self._count_served()
            return self._json(payload)
        except _RequestError as exc:
            return self._error(exc.status, exc.err_type, exc.message, exc.param)
        finally:
            self.in_flight -= 1

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            inf = await self._begin(request)
            prompt = inf.body.get("prompt")
            if isinstance(prompt, list) and prompt:
                prompt = prompt[0]
            if isinstance(prompt, list):
                prompt = f"{len(prompt)} token ids"
            if not isinstance(prompt, str):
                raise _RequestError(400, "BadRequestError", "'prompt' must be a string or a list.", "prompt")
            prompt_tokens = max(1, len(prompt.split()))
            words, finish = self._reply(inf.model, prompt, inf.max_tokens)
            if inf.stream:
                return await self._stream(request, inf, words, finish, prompt_tokens, chat=False)
            payload = {
                "id": self._new_id("cmpl"),
                "object": "text_completion",
                "created": int(time.time()),
                "model": inf.model,
                "choices": [
                    {
                        "index": 0,
                        "text": " ".join(words),
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                    }
                ],
                "usage": self._usage(prompt_tokens, len(words)),
            }
            self._count_served()
            return self._json(payload)
        except _RequestError as exc:
            return self._error(exc.status, exc.err_type, exc.message, exc.param)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }

    async def _stream(
        self,
        request: web.Request,
        inf: _Inference,
        words: list[str],
        finish: str,
        prompt_tokens: int,
        *,
        chat: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=self.sse_headers)
        await response.prepare(request)
        exit_after: int | None = self.args.exit_mid_stream
        if exit_after == 0:
            self._exit_now("simulated crash before the first chunk (--exit-mid-stream 0)", False)
        ident = self._new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        pieces = _split_pieces(words, inf.chunks)
        last = len(pieces) - 1
        try:
            for i, piece in enumerate(pieces):
                if i and inf.chunk_delay > 0:
                    await asyncio.sleep(inf.chunk_delay)
                choice: dict[str, Any]
                if chat:
                    delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                    choice = {"index": 0, "delta": delta, "logprobs": None}
                else:
                    choice = {"index": 0, "text": piece, "logprobs": None}
                choice["finish_reason"] = finish if i == last else None
                if i == last:
                    choice["stop_reason"] = None
                chunk = {"id": ident, "object": obj, "created": created, "model": inf.model, "choices": [choice]}
                await response.write(b"data: " + _dumps(chunk) + b"\n\n")
                if exit_after is not None and i + 1 == exit_after:
                    self._exit_now(f"simulated crash after {exit_after} chunks (--exit-mid-stream)", False)
            if inf.include_usage:
                usage_chunk = {
                    "id": ident,
                    "object": obj,
                    "created": created,
                    "model": inf.model,
                    "choices": [],
                    "usage": self._usage(prompt_tokens, len(words)),
                }
                await response.write(b"data: " + _dumps(usage_chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            return response  # the client went away
        self._count_served()
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            inf = await self._begin(request)
            raw = inf.body.get("input")
            inputs: list[str]
            if isinstance(raw, str):
                inputs = [raw]
            elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
                inputs = list(raw)
            elif isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
                inputs = [repr(raw)]
            elif isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
                inputs = [repr(x) for x in raw]
            else:
                raise _RequestError(400, "BadRequestError", "'input' must be a string or a non-empty list.", "input")
            encoding = inf.body.get("encoding_format") or "float"
            if encoding not in ("float", "base64"):
                raise _RequestError(
                    400, "BadRequestError", f"Unsupported encoding_format {encoding!r}.", "encoding_format"
                )
            data = []
            for index, text in enumerate(inputs):
                vector = _embedding(text)
                value: Any = vector
                if encoding == "base64":
                    value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                data.append({"object": "embedding", "index": index, "embedding": value})
            prompt_tokens = sum(max(1, len(t.split())) for t in inputs)
            payload = {
                "id": self._new_id("embd"),
                "object": "list",
                "created": int(time.time()),
                "model": inf.model,
                "data": data,
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "total_tokens": prompt_tokens,
                    "completion_tokens": 0,
                    "prompt_tokens_details": None,
                },
            }
            self._count_served()
            return self._json(payload)
        except _RequestError as exc:
            return self._error(exc.status, exc.err_type, exc.message, exc.param)
        finally:
            self.in_flight -= 1

    # ------------------------------------------------------------- other routes

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=self.args.health_status)

    async def models(self, request: web.Request) -> web.StreamResponse:
        permission = [
            {
                "id": f"modelperm-fake{self.pid}",
                "object": "model_permission",
                "created": self.created,
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
                "created": self.created,
                "owned_by": "vllm",
                "root": self.root,
                "parent": None,
                "max_model_len": self.args.max_model_len,
                "permission": permission,
            }
            for name in self.served_names
        ]
        cards.extend(
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": path,
                "parent": self.primary,
                "max_model_len": None,
                "permission": permission,
            }
            for name, path in self.adapters.items()
        )
        return self._json({"object": "list", "data": cards})

    async def load_lora_adapter(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise _RequestError(400, "BadRequestError", "Both 'lora_name' and 'lora_path' must be provided.")
            if name in self.adapters and body.get("load_inplace") is not True:
                raise _RequestError(400, "BadRequestError", f"The lora adapter '{name}' has already been loaded.")
            if not await asyncio.to_thread(os.path.isdir, path):
                raise _RequestError(404, "NotFoundError", f"Loading lora {name} failed: No adapter found for {path}")
            if self.args.lora_load_delay > 0:
                await asyncio.sleep(self.args.lora_load_delay)
            self.adapters[name] = path
            return self._text(f"Success: LoRA adapter '{name}' added successfully.")
        except _RequestError as exc:
            return self._error(exc.status, exc.err_type, exc.message, exc.param)

    async def unload_lora_adapter(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise _RequestError(400, "BadRequestError", "'lora_name' needs to be provided to unload a LoRA.")
            if name not in self.adapters:
                raise _RequestError(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            del self.adapters[name]
            return self._text(f"Success: LoRA adapter '{name}' removed successfully.")
        except _RequestError as exc:
            return self._error(exc.status, exc.err_type, exc.message, exc.param)

    async def sleep(self, request: web.Request) -> web.StreamResponse:
        level_text = request.query.get("level", "1")
        if level_text not in ("1", "2"):
            return self._error(400, "BadRequestError", f"Invalid sleep level {level_text!r}: use 1 or 2.", "level")
        level = int(level_text)
        # Refuse inference from the moment the sleep starts.
        self.sleeping_tags = set(KNOWN_WAKE_TAGS)
        self.sleep_level = level
        if self.args.sleep_delay > 0:
            await asyncio.sleep(self.args.sleep_delay)
        if level == 2:
            self.weights_valid = False
        self.memory_gb = self.args.sleeping_memory_gb
        return web.Response(status=200, headers=self.headers)

    async def wake_up(self, request: web.Request) -> web.StreamResponse:
        tags = request.query.getall("tags", [])
        unknown = [t for t in tags if t not in KNOWN_WAKE_TAGS]
        if unknown:
            return self._error(400, "BadRequestError", f"Unknown wake-up tags {unknown}.", "tags")
        if self.args.wake_delay > 0:
            await asyncio.sleep(self.args.wake_delay)
        if self.args.fail_wake:
            return self._error(500, "InternalServerError", "wake up failed (simulated by --fail-wake)")
        self.sleeping_tags -= set(tags or KNOWN_WAKE_TAGS)
        if not self.sleeping_tags:
            self.sleep_level = 0
            self.memory_gb = self.args.memory_gb
        return web.Response(status=200, headers=self.headers)

    async def is_sleeping(self, request: web.Request) -> web.StreamResponse:
        return self._json({"is_sleeping": bool(self.sleeping_tags)})

    async def collective_rpc(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await self._read_json(request)
        except _RequestError as exc:
            return self._error(exc.status, exc.err_type, exc.message, exc.param)
        method = body.get("method")
        if not isinstance(method, str) or not method:
            return self._error(400, "BadRequestError", "'method' must be provided.", "method")
        if method == "reload_weights":
            if "weights" in self.sleeping_tags:
                return self._error(500, "InternalServerError", "cannot reload weights while the weights are asleep")
            if self.args.wake_delay > 0:
                await asyncio.sleep(self.args.wake_delay)
            self.weights_valid = True
        return self._json({"results": [None]})

    def state_payload(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "port": self.port,
            "served_names": self.served_names,
            "root": self.root,
            "requests_total": self.requests_total,
            "requests_served": self.requests_served,
            "in_flight": self.in_flight,
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

    async def fake_state(self, request: web.Request) -> web.StreamResponse:
        return self._json(self.state_payload())

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        labels = f'engine="0",model_name="{self.primary}"'
        if not self.sleeping_tags:
            sleep_state = "awake"
        elif self.sleep_level == 2:
            sleep_state = "discard_all"
        else:
            sleep_state = "weights_offloaded"
        lines = [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} {float(self.in_flight)}",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} 0.0",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} 0.0",
            "# HELP vllm:engine_sleep_state Engine sleep state.",
            "# TYPE vllm:engine_sleep_state gauge",
        ]
        for state in ("awake", "weights_offloaded", "discard_all"):
            value = 1.0 if state == sleep_state else 0.0
            lines.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} {value}')
        lines += [
            "# HELP vllm:request_success_total Count of successfully processed requests.",
            "# TYPE vllm:request_success_total counter",
            f"vllm:request_success_total{{{labels}}} {float(self.requests_served)}",
        ]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8", headers=self.headers
        )

    async def fallback(self, request: web.Request) -> web.StreamResponse:
        """FastAPI-style answers for unknown routes and wrong methods."""
        methods = self._routes.get(request.path)
        if methods is not None and request.method not in methods:
            return web.Response(body=b'{"detail":"Method Not Allowed"}', status=405, content_type="application/json")
        return self._not_found()

    # ---------------------------------------------------------------- app setup

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
            ("GET", "/health", self.health),
            ("GET", "/v1/models", self.models),
            ("POST", "/v1/chat/completions", self.chat_completions),
            ("POST", "/v1/completions", self.completions),
            ("GET", "/fake/state", self.fake_state),
            ("GET", "/metrics", self.metrics),
        ]
        if not self.args.no_embeddings:
            routes.append(("POST", "/v1/embeddings", self.embeddings))
        if self.args.enable_lora:
            routes.append(("POST", "/v1/load_lora_adapter", self.load_lora_adapter))
            routes.append(("POST", "/v1/unload_lora_adapter", self.unload_lora_adapter))
        if self.sleep_mode:
            routes += [
                ("POST", "/sleep", self.sleep),
                ("POST", "/wake_up", self.wake_up),
                ("GET", "/is_sleeping", self.is_sleeping),
                ("POST", "/collective_rpc", self.collective_rpc),
            ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler)
            self._routes.setdefault(path, set()).add(method)
        app.router.add_route("*", "/{tail:.*}", self.fallback)
        return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "FAKE vLLM-compatible OpenAI server. This is a TEST AND DEMO TOOL, NOT an inference "
            "engine: it loads no model and answers deterministic canned text. It mimics the vLLM "
            "0.32 HTTP API and process behaviour (startup delay, failures, sleep mode, runtime "
            "LoRA adapters) so the router can be tested and demonstrated without a GPU."
        ),
        epilog=(
            'A request body may carry "fake": {"chunks": N, "chunk_delay": S, "delay": S} to override the '
            "stream pace or to hold the request in flight for S seconds. GET /fake/state returns counters "
            "(requests, in-flight, requests refused while sleeping, adapters, memory) for test assertions."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="port to bind")
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        action="extend",
        metavar="NAME",
        help="model name(s) served; repeatable; the first is the primary (default: --model)",
    )
    parser.add_argument("--model", help='model path reported as "root" in /v1/models (default: first served name)')
    parser.add_argument(
        "--max-model-len", type=int, default=2048, metavar="N", help="max_model_len reported (default 2048)"
    )
    parser.add_argument(
        "--startup-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds before the port is bound (connections are refused meanwhile)",
    )
    parser.add_argument("--chunks", type=int, default=8, metavar="N", help="SSE chunks per stream (default 8)")
    parser.add_argument(
        "--chunk-delay", type=float, default=0.0, metavar="S", help="seconds between SSE chunks (default 0)"
    )
    parser.add_argument("--access-log", action="store_true", help="log every request to stdout")
    failures = parser.add_argument_group("failure injection")
    failures.add_argument(
        "--exit-during-startup", action="store_true", help="log errors and exit 1 during startup, before binding"
    )
    failures.add_argument(
        "--exit-mid-stream", type=int, metavar="K", help="on a streaming request, hard-exit after K chunks"
    )
    failures.add_argument(
        "--ignore-sigterm", action="store_true", help="ignore SIGTERM and SIGINT (only SIGKILL stops it)"
    )
    failures.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds the graceful shutdown takes after SIGTERM/SIGINT (default 0)",
    )
    failures.add_argument(
        "--signal-log",
        metavar="FILE",
        help="append '<pid> <SIGNAME>' to FILE for every SIGTERM/SIGINT received",
    )
    failures.add_argument(
        "--spawn-child",
        action="store_true",
        help="start a 'fake-engine-worker' child in the same process group that survives a SIGKILL of this process",
    )
    failures.add_argument(
        "--health-status", type=int, default=200, metavar="CODE", help="status code of GET /health (default 200)"
    )
    failures.add_argument(
        "--fail-after-requests", type=int, metavar="N", help="exit with status 1 after N inference requests served"
    )
    features = parser.add_argument_group("model features")
    features.add_argument(
        "--no-embeddings", action="store_true", help='POST /v1/embeddings answers 404 {"detail":"Not Found"}'
    )
    features.add_argument("--enable-lora", action="store_true", help="expose runtime LoRA load/unload routes")
    features.add_argument(
        "--lora-modules", nargs="+", action="extend", metavar="NAME=PATH", help="LoRA adapters loaded at startup"
    )
    features.add_argument(
        "--max-loras", type=int, default=4, metavar="N", help="accepted for compatibility (default 4)"
    )
    features.add_argument("--max-cpu-loras", type=int, metavar="N", help="accepted for compatibility")
    features.add_argument(
        "--lora-load-delay", type=float, default=0.0, metavar="S", help="seconds a LoRA load takes (default 0)"
    )
    features.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        metavar="U",
        help="accepted for compatibility (default 0.9)",
    )
    sleep = parser.add_argument_group("sleep mode (needs --enable-sleep-mode and env VLLM_SERVER_DEV_MODE=1)")
    sleep.add_argument("--enable-sleep-mode", action="store_true", help="expose /sleep, /wake_up, ...")
    sleep.add_argument("--sleep-delay", type=float, default=0.05, metavar="S", help="seconds /sleep takes")
    sleep.add_argument("--wake-delay", type=float, default=0.05, metavar="S", help="seconds /wake_up takes")
    sleep.add_argument("--fail-wake", action="store_true", help="/wake_up answers 500 and the engine stays asleep")
    sleep.add_argument(
        "--memory-gb", type=float, default=1.0, metavar="GB", help="memory reported while awake (default 1.0)"
    )
    sleep.add_argument(
        "--sleeping-memory-gb", type=float, default=0.1, metavar="GB", help="memory reported while asleep (default 0.1)"
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.served_model_name:
        if not args.model:
            parser.error("give --served-model-name NAME (or --model PATH)")
        args.served_model_name = [args.model]
    if args.chunks < 1:
        parser.error("--chunks must be >= 1")
    for option in ("startup_delay", "chunk_delay", "sleep_delay", "wake_delay", "lora_load_delay", "shutdown_delay"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be >= 0")
    if args.exit_mid_stream is not None and args.exit_mid_stream < 0:
        parser.error("--exit-mid-stream must be >= 0")
    if args.fail_after_requests is not None and args.fail_after_requests < 1:
        parser.error("--fail-after-requests must be >= 1")
    for spec in args.lora_modules or []:
        if "=" not in spec:
            parser.error(f"--lora-modules expects NAME=PATH, got {spec!r}")
    return args


async def _wait_startup(engine: FakeEngine, stop: asyncio.Event) -> str:
    """Emulate model loading; returns "ready", "stopped" or "failed"."""
    args = engine.args
    loop = asyncio.get_running_loop()
    start = loop.time()
    target = args.startup_delay / 2 if args.exit_during_startup else args.startup_delay
    while (remaining := start + target - loop.time()) > 0:
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(remaining, 1.0))
            return "stopped"
        except TimeoutError:
            elapsed = loop.time() - start
            if elapsed < target:
                _log(f"INFO {LOG_PREFIX} loading model weights ... ({elapsed:.1f}/{args.startup_delay:.1f} s)")
    if args.exit_during_startup:
        _log(f"ERROR {LOG_PREFIX} failed to load model: simulated failure (--exit-during-startup)")
        _log(f"ERROR {LOG_PREFIX} EngineCore failed to start.")
        _log(f"ERROR {LOG_PREFIX} RuntimeError: Engine core initialization failed. See root cause above.")
        return "failed"
    return "ready"


async def _serve(args: argparse.Namespace) -> int:
    engine = FakeEngine(args)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        engine.record_signal(sig)
        stop.set()

    if not args.ignore_sigterm:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
    _log(
        f"INFO {LOG_PREFIX} FAKE vLLM-compatible engine (test and demo tool, not an inference engine), pid {engine.pid}"
    )
    _log(
        f"INFO {LOG_PREFIX} loading model {engine.root} as {', '.join(engine.served_names)} "
        f"(startup delay {args.startup_delay:g} s)"
    )
    if args.enable_sleep_mode and not engine.sleep_mode:
        _log(f"WARNING {LOG_PREFIX} --enable-sleep-mode without VLLM_SERVER_DEV_MODE=1: sleep routes disabled")
    if args.spawn_child:
        engine.spawn_child()
    outcome = await _wait_startup(engine, stop)
    if outcome != "ready":
        engine.terminate_child()
        return 1 if outcome == "failed" else 0

    access_log: logging.Logger | None = None
    if args.access_log:
        access_log = logging.getLogger("aiohttp.access")
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("INFO:     %(message)s"))
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)
        access_log.propagate = False
    runner = web.AppRunner(
        engine.make_app(),
        access_log=access_log,
        access_log_format='%a "%r" %s',
        shutdown_timeout=0.3,
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    try:
        await site.start()
    except OSError as exc:
        _log(f"ERROR:    [Errno {exc.errno}] error while attempting to bind on address ({args.host}, {args.port})")
        await runner.cleanup()
        engine.terminate_child()
        return 1
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            engine.port = int(address[1])
            break
    _log(f"INFO:     Started server process [{engine.pid}]")
    _log("INFO:     Waiting for application startup.")
    _log("INFO:     Application startup complete.")
    _log(f"INFO:     Uvicorn running on http://{args.host}:{engine.port} (Press CTRL+C to quit)")
    await stop.wait()
    _log("INFO:     Shutting down")
    if args.shutdown_delay:
        await asyncio.sleep(args.shutdown_delay)
    await runner.cleanup()
    engine.terminate_child()
    _log(f"INFO:     Finished server process [{engine.pid}]")
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run the fake engine until SIGTERM/SIGINT; returns the process exit status."""
    args = parse_args(argv)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())
