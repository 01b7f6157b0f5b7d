"""The router in front of real vLLM servers (CPU build, tiny random-weight models) and behind real
clients: the official ``openai`` SDK and a LiteLLM proxy. Covered: a first request starting vLLM,
streaming, completions, embeddings, a LoRA adapter loaded into its running base, LRU eviction with
capacity 1 leaving no engine process behind, an evicted model coming back, and a model that fails
to load (503 with vLLM's own error) while the router stays healthy.

One router with capacity 1 serves the whole module; the tests run in file order so that each vLLM
start is shared by as many tests as possible, but each test makes the requests it relies on, so any
one of them also passes alone (``pytest -m e2e tests/e2e -k NAME``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.harness import Process

from .support import (
    LITELLM_KEY,
    LOAD_TIMEOUT_S,
    LiteLLM,
    Reply,
    Router,
    http,
    live_processes,
    model_processes,
    session_processes,
    vllm_engines_since,
)

pytestmark = pytest.mark.e2e

A, B, EMBED, BROKEN = "tiny-chat-a", "tiny-chat-b", "tiny-embed", "broken-model"
LORA = "tiny-chat-a-lora"  # a LoRA adapter on A
LORA2 = "tiny-chat-a-lora-2"  # a second one (A takes one adapter at a time)
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello! How are you today?"}]


def chat(router: Router, model: str, **extra: Any) -> Reply:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, **extra}
    t0 = time.monotonic()
    reply = router.post("/v1/chat/completions", body)
    print(f"chat {model}: {reply.status} in {time.monotonic() - t0:.1f}s")
    return reply


def assert_answered(reply: Reply, router: Router, model: str) -> dict[str, Any]:
    assert reply.status == 200, f"{reply.status} {reply.text}\n--- router log:\n{router.log()}"
    body: dict[str, Any] = reply.json()
    assert body["model"] == model
    # a real vLLM answered, not a stand-in
    assert str(body.get("system_fingerprint", "")).startswith("vllm-"), body
    return body


def engine_processes(procs: list[Process]) -> tuple[list[Process], list[Process]]:
    """(EngineCore, Worker) processes among ``procs``; vLLM retitles them with setproctitle (the kernel
    keeps 15 characters of the name: ``VLLM::EngineCor``)."""
    cores = [p for p in procs if p.cmdline.startswith("VLLM::EngineCore") or p.comm.startswith("VLLM::EngineCor")]
    workers = [p for p in procs if p.cmdline.startswith("VLLM::Worker") or p.comm.startswith("VLLM::Worker")]
    return cores, workers


def openai_client(base_url: str, api_key: str = "unused") -> OpenAI:
    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=LOAD_TIMEOUT_S + 60)


def stream_chat(client: OpenAI, model: str, max_tokens: int = 16) -> list[str]:
    """Content pieces of a streamed chat completion, one per chunk that carried content.

    (Arrival times are not checked: on two cores vLLM's own API server falls behind its engine and
    sends most chunks in one burst at the end, with or without the router in between.)"""
    pieces: list[str] = []
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0, stream=True
    )
    with stream:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    return pieces


def test_broken_model_fails_with_vllm_error_and_router_stays_healthy(router: Router) -> None:
    reply = chat(router, BROKEN)
    assert reply.status == 503, f"{reply.status} {reply.text}\n--- router log:\n{router.log()}"
    error = reply.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    # vLLM's own last words are in the message: the config field it refused
    assert "hidden_size" in error["message"] and "not-a-number" in error["message"], error["message"]
    assert router.status(BROKEN) == "failed"
    assert not model_processes(BROKEN)

    assert router.get("/health", timeout=10).status == 200
    assert_answered(chat(router, A), router, A)
    assert router.get("/health", timeout=10).status == 200


def test_first_request_starts_real_vllm_and_streams_through_openai_sdk(router: Router) -> None:
    body = assert_answered(chat(router, A), router, A)
    plain = body["choices"][0]["message"]["content"]
    assert plain

    cards = {c["id"]: c for c in router.get("/v1/models", timeout=10).json()["data"]}
    assert {A, B, EMBED, BROKEN} <= set(cards)
    assert cards[A]["status"] == "loaded"

    info = router.admin(A)
    assert info["state"] == "loaded" and info["pid"] and info["port"]
    procs = model_processes(A)
    cores, workers = engine_processes(procs)
    assert any(p.pid == info["pid"] for p in procs), procs
    assert cores and workers, "expected VLLM::EngineCore and VLLM::Worker processes:\n" + "\n".join(map(str, procs))

    with openai_client(router.url + "/v1") as client:
        pieces = stream_chat(client, A, max_tokens=12)
    assert len(pieces) >= 4, pieces
    # greedy decoding: the streamed answer is the same text as the plain one
    assert "".join(pieces) == plain


def test_lora_adapter_is_loaded_into_its_base(router: Router) -> None:
    base_answer = assert_answered(chat(router, A), router, A)["choices"][0]["message"]["content"]
    a_pid = router.admin(A)["pid"]

    body = assert_answered(chat(router, LORA), router, LORA)
    lora_answer = body["choices"][0]["message"]["content"]
    assert lora_answer and lora_answer != base_answer  # the adapter's weights were applied
    assert router.status(LORA) == "loaded"
    assert router.admin(A)["pid"] == a_pid  # loaded into the running base, no restart
    # the base still answers as itself beside its adapter
    again = assert_answered(chat(router, A), router, A)["choices"][0]["message"]["content"]
    assert again == base_answer


def test_adapters_are_evicted_and_an_out_of_band_unload_is_noticed(router: Router) -> None:
    assert_answered(chat(router, LORA), router, LORA)
    a_pid = router.admin(A)["pid"]
    # A takes one adapter at a time: the second one evicts the first, on the same running vLLM
    assert_answered(chat(router, LORA2), router, LORA2)
    assert router.status(LORA) == "unloaded" and router.status(LORA2) == "loaded"
    assert router.admin(A)["pid"] == a_pid
    # unloaded behind the router's back, straight on vLLM
    port = router.admin(A)["port"]
    gone = http("POST", f"http://127.0.0.1:{port}/v1/unload_lora_adapter", {"lora_name": LORA2}, timeout=60)
    assert gone.status == 200, gone.text
    # the router finds out (vLLM's 404, or its periodic sync), loads it again, and the client never sees it
    assert_answered(chat(router, LORA2), router, LORA2)
    assert router.admin(LORA2)["out_of_band"] >= 1
    assert router.admin(A)["pid"] == a_pid


def test_litellm_proxy_forwards_chat_and_stream_through_router(router: Router, litellm: LiteLLM) -> None:
    assert_answered(chat(router, A), router, A)
    used_before = router.admin(A)["last_used"]

    with openai_client(litellm.url + "/v1", api_key=LITELLM_KEY) as client:
        completion = client.chat.completions.create(
            model=A, messages=MESSAGES, max_tokens=12, temperature=0
        )
        pieces = stream_chat(client, A, max_tokens=12)
    content = completion.choices[0].message.content
    assert content, completion
    assert len(pieces) >= 4, pieces
    assert "".join(pieces) == content
    # both went through the router to the same vLLM
    info = router.admin(A)
    assert info["last_used"] > used_before
    assert info["in_flight"] == 0


def test_capacity_one_request_for_b_evicts_a_without_orphans(router: Router) -> None:
    assert_answered(chat(router, A), router, A)
    a_procs = model_processes(A)
    cores, workers = engine_processes(a_procs)
    assert cores and workers, a_procs

    assert_answered(chat(router, B), router, B)

    # No process of A's vLLM is left, found by its environment tag and its session (not by the PID the
    # router started), so a re-parented VLLM::EngineCore or VLLM::Worker would be caught too.
    assert model_processes(A) == [], "A's processes outlived its eviction"
    a_sessions = {p.session for p in a_procs}
    left = session_processes(a_sessions) + [p for p in live_processes() if p.pid in {q.pid for q in a_procs}]
    assert not left, "A's processes outlived its eviction:\n" + "\n".join(map(str, left))
    b_procs = model_processes(B)
    strays = [p for p in vllm_engines_since() if p.pid not in {q.pid for q in b_procs}]
    assert not strays, "vLLM engine processes besides B's:\n" + "\n".join(map(str, strays))
    assert router.status(A) == "unloaded"
    assert router.status(LORA) == "unloaded"  # an adapter goes with its base
    assert router.admin(A)["pid"] is None
    assert router.status(B) == "loaded"
    b_cores, b_workers = engine_processes(b_procs)
    assert len(b_cores) == 1 and len(b_workers) == 1, b_procs


def test_evicted_model_comes_back(router: Router) -> None:
    if router.status(A) != "unloaded":
        assert_answered(chat(router, B), router, B)  # evicts A
    assert router.status(A) == "unloaded"
    loads_before = router.admin(A)["loads"]

    body = assert_answered(chat(router, A), router, A)
    assert body["choices"][0]["message"]["content"]
    info = router.admin(A)
    assert info["state"] == "loaded"
    assert info["loads"] == loads_before + 1
    assert router.status(B) == "unloaded"
    assert model_processes(B) == []


def test_completions_and_embeddings(router: Router) -> None:
    reply = router.post("/v1/completions", {"model": A, "prompt": "The quick brown", "max_tokens": 8,
                                            "temperature": 0})
    body = assert_answered(reply, router, A)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"]
    assert body["usage"]["completion_tokens"] == 8
    # vLLM serves tokenize at its root: the router forwards /v1/tokenize there; its management routes
    # (here the adapter loader) are never reachable by clients, whatever the spelling
    reply = router.post("/v1/tokenize", {"model": A, "prompt": "The quick brown"})
    assert reply.status == 200, f"{reply.status} {reply.text}"
    assert reply.json()["count"] == len(reply.json()["tokens"]) > 0
    for path in ("/v1/load_lora_adapter", "/v1/../reset_prefix_cache"):
        reply = router.post(path, {"model": A, "lora_name": "x", "lora_path": "/etc"})
        assert reply.status == 404 and reply.json()["error"]["code"] == "unknown_route", reply.text

    reply = router.post("/v1/embeddings", {"model": EMBED, "input": ["hello world", "the sea"]})
    assert reply.status == 200, f"{reply.status} {reply.text}\n--- router log:\n{router.log()}"
    data = reply.json()["data"]
    assert [d["index"] for d in data] == [0, 1]
    first, second = (d["embedding"] for d in data)
    assert len(first) == len(second) == 128  # the model's hidden size
    assert all(math.isfinite(x) for x in first + second)
    assert first != second

    with openai_client(router.url + "/v1") as client:
        result = client.embeddings.create(model=EMBED, input="one, two, three")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 128
    assert router.status(EMBED) == "loaded"
    assert router.status(A) == "unloaded"

