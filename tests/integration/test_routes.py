"""What a client may reach through the router: only the inference routes, each under its one canonical
spelling. The hostile paths are sent over raw sockets, since an HTTP client would normalise them."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.harness import CHAT, Router, araw_request, assert_envelope, chat_body, echo_model, engine, launch_router
from tests.unit.test_routes import form
from vllm_model_router.routes import INFERENCE_ROUTES

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODELS = {
    # an engine with vLLM's management routes switched on: sleep mode (dev mode) and runtime LoRA
    "a": engine("--enable-sleep-mode", "--enable-lora", env={"VLLM_SERVER_DEV_MODE": "1"}),
    "echo": echo_model(aliases=["echo-alias"]),
}
HOSTILE = [
    "/v1/../sleep",
    "/v1/%2e%2e/wake_up",
    "/v1/%2E%2E/sleep",
    "/v1/..%2fwake_up",
    "/v1/..%2Fsleep",
    "/v1/../collective_rpc",
    "/v1/chat/completions/../../sleep",
    "/v1//..//..//sleep",
    "/v1/./../reset_prefix_cache",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/v1/%6coad_lora_adapter",
    "/v1/chat/../load_lora_adapter",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served() -> AsyncIterator[Router]:
    async with launch_router(MODELS, uuid.uuid4().hex, "served", capacity={"max_resident": 2}) as r:
        yield r


def post(path: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


@pytest.mark.parametrize("path", HOSTILE)
async def test_no_spelling_of_a_path_reaches_an_engines_management_routes(served: Router, path: str) -> None:
    assert (await served.chat("a")).status == 200  # resident, so a forwarded request would reach it
    body = json.dumps({"model": "a", "lora_name": "evil", "lora_path": "/etc", "level": 1}).encode()
    reply = await araw_request(served.port, post(path, body))
    assert reply.status == 404, (path, reply.head, reply.body)
    assert assert_envelope(reply.body)["code"] == "unknown_route"
    state = await served.engine_state("a")
    assert state["sleeping_tags"] == [] and state["adapters"] == [], state
    assert (await served.chat("a")).status == 200
    assert (await served.model("a"))["state"] == "loaded"


async def test_metrics_label_only_forwarded_routes(served: Router) -> None:
    for path in HOSTILE[:4]:
        await araw_request(served.port, post(path, b'{"model": "a"}'))
    metrics = await served.get("/metrics")
    endpoints = {line.split('endpoint="', 1)[1].split('"', 1)[0]
                 for line in metrics.body.decode().splitlines()
                 if line.startswith("router_requests_total{")}
    assert endpoints <= {*INFERENCE_ROUTES, "other"}, endpoints
    assert "other" in endpoints


async def test_a_path_that_normalises_to_a_route_is_forwarded_to_its_canonical_spelling(served: Router) -> None:
    body = json.dumps(chat_body("echo")).encode()
    for path in ("/v1/x/../chat/completions?n=1", "/v1//chat//completions?n=1", "/v1/chat%2Fcompletions?n=1"):
        reply = await araw_request(served.port, post(path, body))
        assert reply.status == 200, (path, reply.body)
        assert reply.json()["path_qs"] == "/v1/chat/completions?n=1"


async def test_get_on_an_inference_route_is_405_and_unknown_v1_paths_404(served: Router) -> None:
    reply = await araw_request(served.port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                                 b"Connection: close\r\n\r\n")
    assert reply.status == 405
    reply = await araw_request(served.port, post("/v1/%ff%fe", b'{"model": "a"}'))
    assert reply.status == 404
    assert_envelope(reply.body)


async def test_audio_transcription_takes_its_model_from_the_form(served: Router) -> None:
    audio = os.urandom(4096) + b"\r\n--XyZ-b0und4r"  # binary, with a near-boundary at its end
    body, ctype = form([("file", audio, "a.wav"), ("model", b"echo-alias", None), ("language", b"en", None)])
    reply = await araw_request(served.port, post("/v1/audio/transcriptions", body, ctype))
    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["path_qs"] == "/v1/audio/transcriptions"
    # the alias is renamed in place; every other byte, the audio's included, is as the client sent it
    assert base64.b64decode(seen["body_b64"]) == body.replace(b"echo-alias", b"echo")


@pytest.mark.parametrize(("fields", "message"), [
    ([("file", b"RIFF", "a.wav")], "you must provide a model parameter"),
    ([("model", b"echo", None), ("model", b"a", None)], "more than one 'model' field"),
    ([("model", b"\xff\xfe", None)], "not valid UTF-8"),
    ([("model", b"x" * 5000, None)], "too long"),
])
async def test_bad_forms_get_a_400(served: Router, fields: list[tuple[str, bytes, str | None]],
                                   message: str) -> None:
    body, ctype = form(fields)
    reply = await araw_request(served.port, post("/v1/audio/translations", body, ctype))
    assert reply.status == 400, reply.body
    assert message in assert_envelope(reply.body)["message"]


async def test_a_form_without_a_boundary_gets_a_400(served: Router) -> None:
    reply = await araw_request(served.port, post("/v1/audio/transcriptions", b"x", "multipart/form-data"))
    assert reply.status == 400
    assert "boundary" in assert_envelope(reply.body)["message"]


async def test_chat_still_forwards_with_its_query(served: Router) -> None:
    reply = await araw_request(served.port, post(CHAT + "?a=%20b", json.dumps(chat_body("echo")).encode()))
    assert reply.status == 200 and reply.json()["path_qs"] == "/v1/chat/completions?a=%20b"


async def test_routes_vllm_serves_at_its_root_are_forwarded_there(served: Router) -> None:
    for route, upstream in (("/v1/tokenize", "/tokenize"), ("/v1/pooling", "/pooling"), ("/v1/score", "/v1/score")):
        reply = await araw_request(served.port, post(route, b'{"model": "echo", "prompt": "hi"}'))
        assert reply.status == 200 and reply.json()["path_qs"] == upstream, (route, reply.body)


async def test_an_unknown_expectation_gets_a_417_envelope_and_100_continue_still_works(served: Router) -> None:
    for path in (CHAT, "/health", "/admin/models"):
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 0\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        reply = await araw_request(served.port, head.encode())
        assert reply.status == 417, (path, reply.head, reply.body)
        assert "Expect" in assert_envelope(reply.body)["message"]
    body = json.dumps(chat_body("echo")).encode()
    raw = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    reply = await araw_request(served.port, raw)
    assert reply.status == 100  # the interim answer first; the final one follows it
    final = reply.body.split(b"\r\n\r\n", 1)
    assert final[0].startswith(b"HTTP/1.1 200"), reply.body[:200]
