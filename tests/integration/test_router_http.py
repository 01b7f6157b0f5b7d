"""The router's HTTP surface through real HTTP, against fake-engine subprocesses: the OpenAI routes
(forwarding, aliases, streaming), the admin API and every error envelope.

One router serves the whole module (its models stay resident between tests), so these tests only
look at what does not depend on residency history.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from tests.harness import CHAT, Router, alive, chat_body, echo_model, engine, launch_router

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODELS = {
    "alpha": engine("--chunks", "5", "--enable-lora", memory_gb=2, aliases=["alpha-alias", "a"]),
    "gamma": engine(memory_gb=1),  # never requested in this module: stays unloaded
    # answers with what it received, to check forwarding byte for byte
    "echo": echo_model(aliases=["echo-alias"]),
}
CARD_STATUSES = {"unloaded", "loading", "loaded", "unloading", "failed"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def router() -> AsyncIterator[Router]:
    async with launch_router(
        MODELS, uuid.uuid4().hex, capacity={"max_resident": 3},
        limits={"max_body_mb": 0.05, "extra_forward_paths": ["/v1/some/new/endpoint"]}
    ) as r:
        yield r


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alpha(router: Router) -> dict[str, Any]:
    """alpha made resident (by the operator's load); its admin view."""
    reply = await router.post("/admin/models/alpha/load")
    assert reply.status == 200, reply.body
    view: dict[str, Any] = reply.json()
    assert view["state"] == "loaded"
    return view


def assert_incremental(times: list[float], chunks: int, chunk_delay: float) -> None:
    """Chunks were forwarded as they were produced, not buffered until the end."""
    assert len(times) >= chunks
    span = times[chunks - 1] - times[0]
    assert span >= (chunks - 1) * chunk_delay * 0.75, times
    gaps = [b - a for a, b in itertools.pairwise(times[:chunks])]
    # buffering would deliver them together; allow one gap squeezed by a scheduling hiccup
    assert sum(g >= chunk_delay * 0.5 for g in gaps) >= len(gaps) - 1, gaps


# --------------------------------------------------------------------------------------- basics
async def test_health(router: Router) -> None:
    reply = await router.get("/health")
    assert reply.status == 200
    assert reply.body == b"OK"


async def test_v1_models_lists_every_model_and_alias_with_its_status(router: Router, alpha: dict[str, Any]) -> None:
    reply = await router.get("/v1/models")
    assert reply.status == 200
    payload = reply.json()
    assert payload["object"] == "list"
    cards = {c["id"]: c for c in payload["data"]}
    assert list(cards) == ["alpha", "alpha-alias", "a", "gamma", "echo", "echo-alias"]
    for card in cards.values():
        assert card["object"] == "model"
        assert isinstance(card["created"], int)
        assert isinstance(card["owned_by"], str)
        assert card["status"] in CARD_STATUSES
    assert cards["alpha"]["status"] == cards["alpha-alias"]["status"] == cards["a"]["status"] == "loaded"
    assert cards["alpha-alias"]["root"] == cards["a"]["root"] == "alpha"
    assert cards["gamma"]["status"] == "unloaded"


# ------------------------------------------------------------------------------------ forwarding
async def test_chat_completion_is_forwarded_and_answered_with_upstream_status_and_headers(
    router: Router, alpha: dict[str, Any]
) -> None:
    before = await router.engine_state("alpha")
    reply = await router.chat("alpha", "what is the answer", max_tokens=3)
    assert reply.status == 200
    payload = reply.json()
    assert payload["object"] == "chat.completion"
    assert payload["model"] == "alpha"
    # the engine saw the body's fields: it answered this prompt and honoured max_tokens
    assert payload["choices"][0]["message"]["content"] == "fake reply from"
    assert payload["choices"][0]["finish_reason"] == "length"
    # upstream headers come back (minus hop-by-hop ones, which the router sets itself)
    assert reply.headers["x-fake-engine"] == "alpha"
    assert reply.headers["x-fake-engine-pid"] == str(alpha["pid"])
    assert reply.headers["Content-Type"].startswith("application/json")
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    after = await router.engine_state("alpha")
    assert after["requests_total"] == before["requests_total"] + 1

    # an upstream error status and body come back as they are
    bad = await router.post(CHAT, {"model": "alpha", "messages": []})
    assert bad.status == 400
    assert bad.json()["error"]["message"] == "'messages' must be a non-empty list."
    assert bad.headers["x-fake-engine"] == "alpha"


async def test_alias_is_rewritten_to_the_model_name(router: Router, alpha: dict[str, Any]) -> None:
    # the engine serves only "alpha": it would answer 404 for an alias it never heard of
    for name in ("alpha-alias", "a"):
        reply = await router.chat(name, "via an alias")
        assert reply.status == 200, reply.body
        payload = reply.json()
        assert payload["model"] == "alpha"
        assert payload["choices"][0]["message"]["content"] == "fake reply from alpha to: via an alias"
    completion = await router.post("/v1/completions", {"model": "a", "prompt": "once upon"})
    assert completion.status == 200
    assert completion.json()["choices"][0]["text"] == "fake reply from alpha to: once upon"


async def test_completions_and_embeddings(router: Router, alpha: dict[str, Any]) -> None:
    completion = await router.post("/v1/completions", {"model": "alpha", "prompt": "once upon a time"})
    assert completion.status == 200
    assert completion.json()["object"] == "text_completion"
    assert completion.json()["choices"][0]["text"] == "fake reply from alpha to: once upon a time"
    emb = await router.post("/v1/embeddings", {"model": "alpha", "input": ["hello", "world"]})
    assert emb.status == 200
    payload = emb.json()
    assert payload["object"] == "list" and payload["model"] == "alpha"
    assert [d["index"] for d in payload["data"]] == [0, 1]
    assert len(payload["data"][0]["embedding"]) == 8


async def test_engine_management_routes_are_not_forwarded(router: Router, alpha: dict[str, Any],
                                                         tmp_path: Path) -> None:
    # vLLM's adapter routes are the router's to call: a client gets a 404 and the engine is untouched
    body = {"model": "alpha", "lora_name": "evil", "lora_path": str(tmp_path)}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/whatever/a/client/sent"):
        reply = await router.post(path, body)
        assert reply.status == 404, (path, reply.body)
        assert reply.error["code"] == "unknown_route"
    assert (await router.engine_state("alpha"))["adapters"] == []
    # an inference route the engine does not serve: FastAPI's {"detail": "Not Found"} becomes an OpenAI 404
    missing = await router.post("/v1/responses", {"model": "alpha", "input": "x"})
    assert missing.status == 404
    err = missing.error
    assert err["code"] == "endpoint_not_supported" and "alpha" in err["message"]


async def test_an_operators_extra_route_is_forwarded(router: Router) -> None:
    reply = await router.post("/v1/some/new/endpoint", {"model": "echo"})
    assert reply.status == 200 and reply.json()["path_qs"] == "/v1/some/new/endpoint"
    assert (await router.post("/v1/some/other/endpoint", {"model": "echo"})).status == 404


async def test_body_is_forwarded_byte_for_byte_with_path_query_and_end_to_end_headers(router: Router) -> None:
    raw = b'{ "model" : "echo",\n  "z": 1, "a": "caf\\u00e9", "n": 1.50, "nested": {"k": [1, 2]} }'
    reply = await router.post(
        "/v1/some/new/endpoint?x=1&y=two", data=raw,
        headers={"X-Custom": "kept", "Authorization": "Bearer router-key", "x-api-key": "router-key"},
    )
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["method"] == "POST"
    assert seen["path_qs"] == "/v1/some/new/endpoint?x=1&y=two"
    assert base64.b64decode(seen["body_b64"]) == raw
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["x-custom"] == "kept"
    assert headers["content-type"] == "application/json"
    assert "authorization" not in headers and "x-api-key" not in headers  # credentials are for the router
    # the upstream's own headers come back, its hop-by-hop ones do not
    assert reply.headers["x-echo"] == "yes"
    assert "Keep-Alive" not in reply.headers

    status = await router.post(CHAT, data=raw, headers={"x-echo-status": "418"})
    assert status.status == 418
    assert base64.b64decode(status.json()["body_b64"]) == raw


async def test_alias_is_rewritten_and_nothing_else_changes(router: Router) -> None:
    body = {"model": "echo-alias", "messages": [{"role": "user", "content": "caf\u00e9"}], "n": 1.5, "z": None}
    reply = await router.post(CHAT, body)
    assert reply.status == 200
    assert json.loads(base64.b64decode(reply.json()["body_b64"])) == {**body, "model": "echo"}


# ------------------------------------------------------------------------------------- streaming
async def test_stream_chunks_are_forwarded_as_they_arrive(router: Router, alpha: dict[str, Any]) -> None:
    body = chat_body("alpha", "tell me a story", stream=True, fake={"chunks": 5, "chunk_delay": 0.2})
    sse = await router.stream(body)
    assert sse.status == 200
    assert sse.headers["Content-Type"].startswith("text/event-stream")
    assert sse.headers["x-fake-engine"] == "alpha"
    assert sse.events[-1].data == "[DONE]"
    chunks = sse.payloads()
    assert len(chunks) == 5
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "fake reply from alpha to: tell me a story"
    times = [e.arrived for e in sse.events]
    assert times[4] - times[0] >= 0.6  # the first chunk came well before the last
    assert_incremental(times, 5, 0.2)
    assert (await router.model("alpha"))["in_flight"] == 0


async def test_openai_sdk_streams_and_calls_through_the_router(router: Router, alpha: dict[str, Any]) -> None:
    async with AsyncOpenAI(base_url=router.url + "/v1", api_key="sk-test", max_retries=0, timeout=30) as client:
        stream = await client.chat.completions.create(
            model="alpha-alias",
            messages=[{"role": "user", "content": "stream please"}],
            stream=True,
            extra_body={"fake": {"chunks": 5, "chunk_delay": 0.2}},
        )
        times: list[float] = []
        text = ""
        async for chunk in stream:
            times.append(time.monotonic())
            assert chunk.model == "alpha"
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
        assert text == "fake reply from alpha to: stream please"
        assert_incremental(times, 5, 0.2)

        completion = await client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert completion.choices[0].message.content == "fake reply"
        embedding = await client.embeddings.create(model="a", input="hello")
        assert len(embedding.data[0].embedding) == 8
        listed = {m.id: (m.model_extra or {}).get("status") async for m in client.models.list()}
        assert listed["alpha"] == "loaded" and listed["gamma"] == "unloaded"
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        assert missing.value.code == "model_not_found" and "`nope`" in missing.value.message


# ---------------------------------------------------------------------------------------- errors
async def test_unknown_model_is_404_listing_the_available_names(router: Router) -> None:
    reply = await router.chat("nope")
    assert reply.status == 404
    err = reply.error
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "`nope`" in err["message"]
    assert "alpha" in err["message"] and "gamma" in err["message"]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"\xff\xfe{}", None),  # not UTF-8
        (b"[1, 2]", None),
        (b'"alpha"', None),
        (b'{"messages": []}', "model"),
        (b'{"model": 5, "messages": []}', "model"),
        (b'{"model": null}', "model"),
        (b'{"model": ["alpha"]}', "model"),
    ],
)
async def test_invalid_body_is_400(router: Router, raw: bytes, param: str | None) -> None:
    reply = await router.post(CHAT, data=raw)
    assert reply.status == 400, reply.body
    err = reply.error
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


async def test_body_over_max_body_mb_is_413(router: Router) -> None:
    body = chat_body("gamma", "x" * 60_000)  # limits.max_body_mb is 0.05
    reply = await router.post(CHAT, body)
    assert reply.status == 413
    assert reply.error["type"] == "invalid_request_error"
    assert (await router.model("gamma"))["state"] == "unloaded"  # nothing was loaded for it


async def test_unknown_routes_and_methods_get_the_envelope(router: Router) -> None:
    for method, path, status in [
        ("GET", "/nope", 404),
        ("POST", "/admin/models/alpha/explode", 404),
        ("GET", CHAT, 405),
        ("GET", "/admin/models/alpha/load", 405),
    ]:
        reply = await router.request(method, path)
        assert reply.status == status, (method, path, reply.body)
        assert reply.error["code"] == status
    for method, path in [("POST", "/admin/models/nope/load"), ("POST", "/admin/models/nope/unload"),
                         ("GET", "/admin/models/nope/logs")]:
        reply = await router.request(method, path)
        assert reply.status == 404
        assert reply.error["code"] == "model_not_found"


# ----------------------------------------------------------------------------------------- admin
async def test_admin_models_view(router: Router, alpha: dict[str, Any]) -> None:
    reply = await router.get("/admin/models")
    assert reply.status == 200
    payload = reply.json()
    assert payload["capacity"]["max_resident"] == 3
    assert "alpha" in payload["capacity"]["resident"]
    views = {m["name"]: m for m in payload["models"]}
    assert list(views) == ["alpha", "gamma", "echo"]
    keys = {"state", "since", "last_used", "in_flight", "waiting", "memory_gb", "pid", "port", "loads", "last_error"}
    for view in views.values():
        assert keys <= set(view), view
    a, g = views["alpha"], views["gamma"]
    assert a["state"] == "loaded" and a["loads"] == 1 and a["last_error"] is None
    assert a["memory_gb"] == 2 and a["aliases"] == ["alpha-alias", "a"]
    assert isinstance(a["pid"], int) and alive(a["pid"]) and isinstance(a["port"], int)
    assert isinstance(a["since"], float) and isinstance(a["last_used"], float)
    assert (a["in_flight"], a["waiting"]) == (0, 0)
    assert g["state"] == "unloaded" and g["pid"] is None and g["port"] is None and g["last_used"] is None
    assert g["loads"] == 0 and g["memory_gb"] == 1

    # a request in flight shows up, and last_used moves when it ends
    task = asyncio.create_task(router.chat("alpha", fake={"delay": 0.5}))
    view = await router.wait_model("alpha", lambda v: v["in_flight"] == 1, what="in_flight 1")
    assert view["waiting"] == 0
    assert (await task).status == 200
    after = await router.model("alpha")
    assert after["in_flight"] == 0
    assert after["last_used"] > a["last_used"]
    assert after["pid"] == a["pid"]  # served by the same process: no reload


async def test_admin_logs_returns_the_last_lines_the_model_printed(router: Router, alpha: dict[str, Any]) -> None:
    reply = await router.get("/admin/models/alpha/logs")
    assert reply.status == 200
    payload = reply.json()
    assert payload["model"] == "alpha"
    lines = payload["lines"]
    assert any("FAKE vLLM-compatible engine" in ln for ln in lines)
    assert any(f"Uvicorn running on http://127.0.0.1:{alpha['port']}" in ln for ln in lines)
    last = (await router.get("/admin/models/alpha/logs?lines=2")).json()["lines"]
    assert last == lines[-2:]
    assert (await router.get("/admin/models/a/logs?lines=0")).json() == {"model": "alpha", "lines": []}
    assert (await router.get("/admin/models/gamma/logs")).json() == {"model": "gamma", "lines": []}
    bad = await router.get("/admin/models/alpha/logs?lines=many")
    assert bad.status == 400 and bad.error["param"] == "lines"
