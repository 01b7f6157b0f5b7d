"""bench/proxy_bench.py and bench/proxy_profile.py measure what they say: the large case is a 200 KB chat
that names its model last (so it cannot be found without looking through the body), the paced streams
ask the engine for chunks that arrive one by one, and the profile files a sample under the stage of its
innermost frame that names one."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def script(name: str) -> ModuleType:
    if name not in sys.modules:
        sys.path.insert(0, str(ROOT / "bench"))
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_large_case_is_a_200_kb_chat_naming_its_model_last() -> None:
    bench = script("proxy_bench")
    body = bench.LARGE_BODY.encode()
    assert 200_000 <= len(body) < 210_000
    payload = json.loads(body)
    assert list(payload)[-1] == "model" and payload["model"] == "bench"
    assert len(payload["messages"]) > 100 and all(isinstance(m["content"], str) for m in payload["messages"])


def test_paced_streams_ask_for_many_chunks_spaced_out() -> None:
    paced = json.loads(script("proxy_bench").PACED_BODY)
    assert paced["stream"] is True
    assert paced["fake"]["chunks"] == 200 and paced["fake"]["chunk_delay"] > 0


def test_samples_go_to_the_stage_of_their_innermost_frame() -> None:
    profile = script("proxy_profile")
    handler = ["Runner.run (asyncio/runners.py)", "RequestHandler._handle_request (aiohttp/web_protocol.py)",
               "proxy_post (vllm_model_router/http/app.py)", "Proxy._handle (vllm_model_router/http/proxy.py)"]
    assert profile.stage_of(handler) == "proxy's own logic"
    assert profile.stage_of([*handler, "json_model (vllm_model_router/http/request_body.py)"]).startswith("model")
    acquire = [*handler, "Runtime.acquire (vllm_model_router/runtime/pump.py)"]
    assert profile.stage_of(acquire) == "scheduler acquire/release"
    assert profile.stage_of([*acquire, "Store.record_request (vllm_model_router/state/store.py)"]) == "usage history"
    forward = [*handler, "Proxy._forward (vllm_model_router/http/proxy.py)",
               "ClientSession._request (aiohttp/client.py)"]
    assert profile.stage_of(forward).startswith("upstream request")
    assert profile.stage_of([*forward, "StreamWriter._writelines (aiohttp/http_writer.py)"]).startswith("socket writes")
    assert profile.stage_of(handler[:2]).startswith("server")
    assert profile.stage_of([]).startswith("event loop")
