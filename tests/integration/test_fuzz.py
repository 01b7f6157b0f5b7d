"""Bad input, generated (hypothesis) and sent over raw sockets: malformed JSON, wrong types, invalid UTF-8,
deep nesting, bodies over the limit, odd or broken headers, odd methods and paths, truncated bodies. Every
answer is a 4xx in the OpenAI envelope (or the model's own answer to a valid request), never a 5xx and
never a hang, and the router is healthy and serving afterwards."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import CHAT, RawReply, Router, assert_envelope, engine, raw_request, threaded_router

MAX_BODY = 64 * 1024
FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    with threaded_router(
        {"alpha": engine(aliases=["a"])}, uuid.uuid4().hex, load_timeout=20,
        limits={"max_body_mb": MAX_BODY / (1024 * 1024), "client_body_timeout": 0.5, "client_header_timeout": 2,
                "first_byte_timeout": 5},
    ) as r:
        yield r


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            content_length: int | None = None) -> bytes:
    hdrs = {"Host": "router", "Connection": "close", "Content-Type": "application/json", **(headers or {})}
    hdrs["Content-Length"] = str(len(body) if content_length is None else content_length)
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode("utf-8", "surrogateescape") + body


def check(reply: RawReply, *, allow_ok: bool = True) -> None:
    """Answered, quickly, never with a 5xx; an error is in the OpenAI envelope."""
    assert reply.status is not None, f"no answer: {reply}"
    assert reply.elapsed < 4, reply
    assert reply.status < 500, (reply.status, reply.body[:500])
    if reply.status >= 400:
        assert_envelope(reply.body)
    else:
        assert allow_ok, reply


def send(router: Router, data: bytes) -> RawReply:
    return raw_request(router.port, data, timeout=6)


# ---------------------------------------------------------------------------------------- strategies
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
models = st.sampled_from(["alpha", "a", "nope", "", "alpha\x00", "../alpha"]) | json_values
bodies = st.fixed_dictionaries({}, optional={
    "model": models,
    "messages": json_values | st.just([{"role": "user", "content": "hi"}]),
    "prompt": json_values,
    "stream": json_values,
    "max_tokens": json_values,
    "input": json_values,
}) | st.dictionaries(st.text(max_size=8).filter(lambda k: k != "fake"), json_values, max_size=5) | json_values
paths = st.sampled_from([CHAT, "/v1/completions", "/v1/embeddings", "/v1/responses"]) | st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_./%", max_size=30).map(lambda t: "/v1/" + t)


@FUZZ
@given(body=bodies, path=paths)
def test_json_bodies_of_any_shape(router: Router, body: Any, path: str) -> None:
    check(send(router, request("POST", path, json.dumps(body).encode())))


@FUZZ
@given(raw=st.binary(max_size=300), prefix=st.sampled_from([b"", b'{"model": "alpha", "x": "', b"\xef\xbb\xbf"]))
def test_bytes_that_are_not_json_or_not_utf8(router: Router, raw: bytes, prefix: bytes) -> None:
    check(send(router, request("POST", CHAT, prefix + raw)))


@FUZZ
@given(
    method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]),
    path=st.sampled_from([CHAT, "/v1/models", "/admin/models", "/admin/models/alpha/load", "/metrics", "/nowhere",
                          "/admin/models/%2e%2e/logs", "/v1/../admin/models"]),
)
def test_odd_methods_and_paths(router: Router, method: str, path: str) -> None:
    reply = send(router, request(method, path))
    assert reply.status is not None and reply.status < 500, reply
    if reply.status >= 400 and method != "HEAD":
        assert_envelope(reply.body)


header_names = st.sampled_from(["Content-Type", "Content-Encoding", "Transfer-Encoding", "Authorization", "Expect",
                                "X-Api-Key", "Accept", "Accept-Encoding", "Last-Event-ID", "X-Forwarded-For"])
header_values = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=40)


@FUZZ
@given(headers=st.dictionaries(header_names, header_values, max_size=3))
def test_odd_or_broken_headers(router: Router, headers: dict[str, str]) -> None:
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}).encode()
    check(send(router, request("POST", CHAT, body, headers)))


@FUZZ
@given(line=st.binary(min_size=1, max_size=80), header=st.binary(max_size=80))
def test_request_lines_and_headers_that_are_not_http(router: Router, line: bytes, header: bytes) -> None:
    reply = send(router, line + b"\r\n" + header + b"\r\nConnection: close\r\n\r\n")
    if reply.status is None:  # e.g. no request line at all yet: closed by client_header_timeout at the latest
        assert reply.closed and reply.elapsed < 4
    else:
        check(reply)


@pytest.mark.parametrize("body, status", [
    (b"[" * 30_000 + b"]" * 30_000, 400),  # nested too deeply for the parser
    (b'{"model": "alpha", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", None),  # deep, yet valid JSON
    (json.dumps({"model": "alpha", "pad": "x" * MAX_BODY}).encode(), 413),  # over limits.max_body_mb
    (b'{"model": "alpha"}' + b" " * 10, None),
    (b"\x1f\x8b\x08\x00garbage", 400),
], ids=["deep-array", "deep-messages", "over-max-body", "trailing-space", "gzip-magic"])
def test_huge_and_deep_bodies(router: Router, body: bytes, status: int | None) -> None:
    reply = send(router, request("POST", CHAT, body))
    check(reply)
    if status is not None:
        assert reply.status == status


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "x-unknown"])
def test_compressed_bodies_that_do_not_decompress(router: Router, encoding: str) -> None:
    reply = send(router, request("POST", CHAT, b"this is not compressed", {"Content-Encoding": encoding}))
    check(reply, allow_ok=False)


def test_a_compressed_body_is_read_and_forwarded_decoded(router: Router) -> None:
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "zipped"}]}).encode()
    reply = send(router, request("POST", CHAT, gzip.compress(body), {"Content-Encoding": "gzip"}))
    assert reply.status == 200, reply.body


def test_truncated_and_lying_bodies(router: Router) -> None:
    body = json.dumps({"model": "alpha", "messages": []}).encode()
    short = send(router, request("POST", CHAT, body[:10], content_length=len(body)))  # never completed
    assert short.status == 408
    assert_envelope(short.body)
    long = send(router, request("POST", CHAT, body + b"GET / HTTP/1.1\r\n\r\n", content_length=len(body)))
    check(long)
    chunked = send(router, request("POST", CHAT, b"zz\r\nnot hex\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}))
    check(chunked, allow_ok=False)


def test_the_router_is_healthy_and_serving_after_all_that(router: Router) -> None:
    assert send(router, request("GET", "/health")).status == 200
    body = json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "still there?"}]}).encode()
    reply = send(router, request("POST", CHAT, body))
    assert reply.status == 200 and json.loads(reply.body)["choices"]
    views = router.call(router.runtime.views)
    assert all(v.in_flight == 0 and v.waiting == 0 for v in views)
