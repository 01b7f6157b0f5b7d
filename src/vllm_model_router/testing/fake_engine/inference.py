"""The inference routes: chat completions, text completions and embeddings, in vLLM's shapes.

No model runs. A completion answers ``fake reply from <model> to: <start of the prompt>`` (or
garbage after a level-2 sleep whose weights were not reloaded, as vLLM would), cut at
``max_tokens`` words, streamed as Server-Sent Events in ``--chunks`` pieces when asked. An
embedding is a unit vector derived from a hash of the input. So every answer is deterministic,
and a test can predict it byte for byte.

A request body may carry ``"fake": {"chunks": N, "chunk_delay": S, "delay": S}`` to change the
stream's pace or to hold the request in flight, which tests use to create load.

``--max-num-seqs`` and ``--service-time`` model a saturated engine: at most K requests run at once,
each holding its slot for S seconds before its answer (the first chunk, when streamed), and the rest
wait inside the engine in arrival order (see ``batch``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from vllm_model_router.testing.fake_engine import process
from vllm_model_router.testing.fake_engine.state import EngineState
from vllm_model_router.testing.fake_engine.wire import RequestError, dumps, json_response, read_json

EMBEDDING_DIM = 8
SNIPPET_CHARS = 60


@dataclass(slots=True)
class _Inference:
    """A validated inference request."""

    body: dict[str, Any]
    model: str
    chunks: int
    chunk_delay: float
    delay: float
    max_tokens: int | None
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, "BadRequestError", message, param)


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


def _chat_prompt(body: dict[str, Any]) -> tuple[str, int]:
    """The last user message (what the reply quotes) and the prompt's token count (its words)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list.", "messages")
    texts = [_content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    last_user = next(
        (
            _content_text(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        texts[-1] if texts else "",
    )
    return last_user, max(1, sum(len(t.split()) for t in texts))


def _text_prompt(body: dict[str, Any]) -> tuple[str, int]:
    """The prompt (the first of a batch; token ids described by their count) and its token count."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = f"{len(prompt)} token ids"
    if not isinstance(prompt, str):
        raise _bad("'prompt' must be a string or a list.", "prompt")
    return prompt, max(1, len(prompt.split()))


@dataclass(frozen=True, slots=True)
class _Kind:
    """What differs between a chat completion and a text completion; the rest is shared."""

    id_prefix: str
    object: str
    chunk_object: str
    prompt: Callable[[dict[str, Any]], tuple[str, int]]
    # the choice's content field(s): for the whole answer, and for the i-th streamed piece
    whole: Callable[[str], dict[str, Any]]
    piece: Callable[[str, int], dict[str, Any]]
    # keys after "usage" in a non-streamed answer
    trailer: Mapping[str, Any] = field(default_factory=dict)


CHAT = _Kind(
    id_prefix="chatcmpl",
    object="chat.completion",
    chunk_object="chat.completion.chunk",
    prompt=_chat_prompt,
    whole=lambda text: {"message": {"role": "assistant", "content": text, "tool_calls": []}},
    piece=lambda text, i: {"delta": {"role": "assistant", "content": text} if i == 0 else {"content": text}},
    trailer={"prompt_logprobs": None},
)
TEXT = _Kind(
    id_prefix="cmpl",
    object="text_completion",
    chunk_object="text_completion",
    prompt=_text_prompt,
    whole=lambda text: {"text": text},
    piece=lambda text, i: {"text": text},
)


def _split_pieces(words: list[str], n: int) -> list[str]:
    """Split the words into exactly n pieces whose concatenation is the space-joined text."""
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    total = len(tokens)
    return ["".join(tokens[i * total // n : (i + 1) * total // n]) for i in range(n)]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [int.from_bytes(digest[4 * i : 4 * i + 4], "big") / 2**31 - 1.0 for i in range(EMBEDDING_DIM)]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [round(v / norm, 6) for v in raw]


def _embedding_inputs(raw: Any) -> list[str]:
    """The texts to embed: strings as given, token-id lists by their repr."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        return list(raw)
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        return [repr(raw)]
    if isinstance(raw, list) and raw and all(isinstance(x, list) for x in raw):
        return [repr(x) for x in raw]
    raise _bad("'input' must be a string or a non-empty list.", "input")


def _embedding_request(body: dict[str, Any]) -> tuple[list[str], str]:
    """The texts to embed and the encoding asked for, or a 400 :class:`RequestError`."""
    inputs = _embedding_inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _bad(f"Unsupported encoding_format {encoding!r}.", "encoding_format")
    return inputs, encoding


# raises a RequestError for a body that the engine would refuse before queueing it
_Check = Callable[[dict[str, Any]], object]
_Answer = Callable[[web.Request, _Inference], Awaitable[web.StreamResponse]]


class InferenceRoutes:
    """Handlers of ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/embeddings``."""

    def __init__(self, state: EngineState) -> None:
        self.state = state
        self.sse_headers = {**state.headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        service_time: float = self.state.args.service_time
        return await self._handle(request, CHAT.prompt, lambda req, inf: self._complete(req, inf, CHAT), service_time)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        service_time: float = self.state.args.service_time
        return await self._handle(request, TEXT.prompt, lambda req, inf: self._complete(req, inf, TEXT), service_time)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, _embedding_request, self._embed, 0.0)

    # ------------------------------------------------------------------ common

    async def _handle(
        self, request: web.Request, check: _Check, answer: _Answer, service_time: float
    ) -> web.StreamResponse:
        """Count the request in flight, refuse it while asleep, validate it, then run it in the batch.

        Only a valid request enters the batch (vLLM rejects the others before its engine sees them,
        so a 400 never waits behind a full batch): it waits for a slot (``--max-num-seqs``), then
        holds it through its "fake.delay", the ``--service-time`` and the whole answer, streamed or not.
        """
        state = self.state
        state.in_flight += 1
        try:
            state.requests_total += 1
            if state.sleeping_tags:
                state.requests_while_sleeping += 1
                raise RequestError(503, "ServiceUnavailableError", "engine is sleeping")
            inference = self._parse(await read_json(request))
            check(inference.body)
            async with state.batch.slot():
                if inference.delay + service_time > 0:
                    await asyncio.sleep(inference.delay + service_time)
                return await answer(request, inference)
        except RequestError as exc:
            return exc.response(state.headers)
        finally:
            state.in_flight -= 1

    def _parse(self, body: dict[str, Any]) -> _Inference:
        model = body.get("model")
        if model is None:
            model = self.state.primary
        if not isinstance(model, str):
            raise _bad("'model' must be a string.", "model")
        if not self.state.knows_model(model):
            raise RequestError(404, "NotFoundError", f"The model `{model}` does not exist.", "model")
        chunks: int = self.state.args.chunks
        chunk_delay: float = self.state.args.chunk_delay
        delay = 0.0
        fake = body.get("fake")
        if fake is not None:
            if not isinstance(fake, dict):
                raise _bad("'fake' must be an object.", "fake")
            if "chunks" in fake:
                if not _positive_int(fake["chunks"]):
                    raise _bad("fake.chunks must be an integer >= 1.", "fake")
                chunks = fake["chunks"]
            if "chunk_delay" in fake:
                if not _non_negative_number(fake["chunk_delay"]):
                    raise _bad("fake.chunk_delay must be >= 0.", "fake")
                chunk_delay = float(fake["chunk_delay"])
            if "delay" in fake:
                if not _non_negative_number(fake["delay"]):
                    raise _bad("fake.delay must be >= 0.", "fake")
                delay = float(fake["delay"])
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and not _positive_int(max_tokens):
            raise _bad(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        stream = body.get("stream") is True
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return _Inference(body, model, chunks, chunk_delay, delay, max_tokens, stream, include_usage)

    def _reply(self, model: str, prompt: str, max_tokens: int | None) -> tuple[list[str], str]:
        """The answer's words and its finish reason ("length" when cut at max_tokens)."""
        if self.state.weights_valid:
            snippet = " ".join(prompt.split())[:SNIPPET_CHARS]
            text = f"fake reply from {model} to: {snippet}"
        else:
            text = "GARBAGE: weights were discarded by sleep level 2 and not reloaded"
        words = text.split()
        if max_tokens is not None and len(words) > max_tokens:
            return words[:max_tokens], "length"
        return words, "stop"

    # ------------------------------------------------------------- completions

    async def _complete(self, request: web.Request, inf: _Inference, kind: _Kind) -> web.StreamResponse:
        prompt, prompt_tokens = kind.prompt(inf.body)
        words, finish = self._reply(inf.model, prompt, inf.max_tokens)
        if inf.stream:
            return await self._stream(request, inf, kind, words, finish, prompt_tokens)
        whole = kind.whole(" ".join(words))
        choice = {"index": 0, **whole, "logprobs": None, "finish_reason": finish, "stop_reason": None}
        payload = {
            "id": self.state.new_id(kind.id_prefix),
            "object": kind.object,
            "created": int(time.time()),
            "model": inf.model,
            "choices": [choice],
            "usage": _usage(prompt_tokens, len(words)),
            **kind.trailer,
        }
        self.state.count_served()
        return json_response(self.state.headers, payload)

    async def _stream(
        self, request: web.Request, inf: _Inference, kind: _Kind, words: list[str], finish: str, prompt_tokens: int
    ) -> web.StreamResponse:
        """Send the answer as SSE chunks, then the usage chunk if asked, then ``[DONE]``.

        ``--exit-mid-stream K`` hard-exits after K chunks, to test how the router handles a cut stream.
        """
        response = web.StreamResponse(headers=self.sse_headers)
        await response.prepare(request)
        exit_after: int | None = self.state.args.exit_mid_stream
        if exit_after == 0:
            process.exit_now("simulated crash before the first chunk (--exit-mid-stream 0)")
        ident = self.state.new_id(kind.id_prefix)
        created = int(time.time())
        pieces = _split_pieces(words, inf.chunks)
        last = len(pieces) - 1
        try:
            for i, piece in enumerate(pieces):
                if i and inf.chunk_delay > 0:
                    await asyncio.sleep(inf.chunk_delay)
                choice: dict[str, Any] = {"index": 0, **kind.piece(piece, i), "logprobs": None}
                choice["finish_reason"] = finish if i == last else None
                if i == last:
                    choice["stop_reason"] = None
                chunk = {
                    "id": ident,
                    "object": kind.chunk_object,
                    "created": created,
                    "model": inf.model,
                    "choices": [choice],
                }
                await response.write(b"data: " + dumps(chunk) + b"\n\n")
                if exit_after is not None and i + 1 == exit_after:
                    process.exit_now(f"simulated crash after {exit_after} chunks (--exit-mid-stream)")
            if inf.include_usage:
                usage_chunk = {
                    "id": ident,
                    "object": kind.chunk_object,
                    "created": created,
                    "model": inf.model,
                    "choices": [],
                    "usage": _usage(prompt_tokens, len(words)),
                }
                await response.write(b"data: " + dumps(usage_chunk) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            return response  # the client went away
        self.state.count_served()
        return response

    # -------------------------------------------------------------- embeddings

    async def _embed(self, request: web.Request, inf: _Inference) -> web.StreamResponse:
        inputs, encoding = _embedding_request(inf.body)
        data = []
        for index, text in enumerate(inputs):
            vector = _embedding(text)
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        prompt_tokens = sum(max(1, len(t.split())) for t in inputs)
        payload = {
            "id": self.state.new_id("embd"),
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
        self.state.count_served()
        return json_response(self.state.headers, payload)
