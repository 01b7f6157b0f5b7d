"""Route matching, path canonicalisation and the multipart ``model`` field, without a router."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_model_router.config import ConfigError, build_config
from vllm_model_router.http.request_body import parse_form_model
from vllm_model_router.routes import RouteTable, canonical_path


def form(fields: list[tuple[str, bytes, str | None]], boundary: str = "XyZ-b0und4ry") -> tuple[bytes, str]:
    parts = []
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        extra = "Content-Type: audio/wav\r\n" if filename else ""
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + value + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(("raw", "canonical"), [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions?x=/../y", "/v1/chat/completions"),
    ("/v1/../sleep", "/sleep"),
    ("/v1/%2e%2e/wake_up", "/wake_up"),
    ("/v1/..%2fwake_up", "/wake_up"),
    ("/../../v1/./embeddings/", "/v1/embeddings"),
    ("/v1/%252e%252e/sleep", "/v1/%2e%2e/sleep"),  # decoded once: a literal name, not a dot segment
    ("/v1/a%00b", None),
    ("/v1/%ff", None),
])
def test_canonical_path(raw: str, canonical: str | None) -> None:
    assert canonical_path(raw) == canonical


def test_route_table_never_holds_management_routes() -> None:
    table = RouteTable(["/v1/load_lora_adapter", "/v1/my/route"])
    assert table.match("/v1/my/route") == "/v1/my/route"
    assert table.match("/v1/load_lora_adapter") is None


@pytest.mark.parametrize(("paths", "problem"), [
    (["/sleep"], "must start with /v1/"),
    (["/v1/load_lora_adapter"], "management routes"),
    (["/v1/a/../b"], "plain path"),
    (["/v1/a%2fb"], "plain path"),
    ("/v1/x", "must be a list"),
])
def test_extra_forward_paths_are_checked(paths: Any, problem: str) -> None:
    data = {"models": {"a": {"cmd": "x --port ${PORT}"}}, "limits": {"extra_forward_paths": paths}}
    with pytest.raises(ConfigError) as e:
        build_config(data, env={}, source="<test>")
    assert any("limits.extra_forward_paths" in p and problem in p for p in e.value.problems), e.value.problems


def test_a_form_field_split_by_the_parser_is_still_read() -> None:
    body, ctype = form([("model", b"abc\r\n--XyZ-b0und4r", None)])
    parsed = parse_form_model(body, ctype)
    assert parsed.model == "abc\r\n--XyZ-b0und4r"
