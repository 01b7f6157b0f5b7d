"""Integration tests of the fake vLLM engine, run as a real subprocess on a free port."""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import chat_body, cmdline, free_port, sse, state, wait_healthy_sync, wait_until_sync

MODULE = "vllm_model_router.testing.fake_engine"
CHAT = "/v1/chat/completions"


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def spawn(log_dir: Path, args: list[str], env_extra: dict[str, str] | None = None) -> Engine:
    port = free_port()
    log_path = log_dir / f"engine-{port}.log"
    env = dict(os.environ)
    env.pop("VLLM_SERVER_DEV_MODE", None)
    env.update(env_extra or {})
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--port", str(port), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return Engine(proc, port, log_path)


def kill_group(engine: Engine) -> None:
    try:
        os.killpg(engine.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    engine.proc.wait(timeout=5)


def call(port: int, method: str, path: str, body: Any = None, timeout: float = 5.0) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def wait_listening(engine: Engine, timeout: float = 10.0) -> None:
    """Until the engine answers GET /health (with any status)."""
    wait_healthy_sync(f"http://127.0.0.1:{engine.port}/health", what="engine", timeout=timeout, accept=None,
                      exited=engine.proc.poll, log=engine.log)


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    wait_until_sync(predicate, timeout)


@dataclass
class Stream:
    status: int
    headers: dict[str, str]
    events: list[sse.Event]
    broken: bool

    def chunks(self) -> list[dict[str, Any]]:
        return [e.json() for e in self.events if e.data != "[DONE]"]


def stream(port: int, body: dict[str, Any], path: str = CHAT) -> Stream:
    """POST a streaming request and record each event with its arrival time."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5.0)
    events: list[sse.Event] = []
    broken = False
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            events.extend(sse.iter_events(iter(resp.readline, b"")))
        except (http.client.HTTPException, OSError):
            broken = True
        finally:
            resp.close()
        # http.client ends readline() quietly when a chunked body is cut off: no [DONE] means broken.
        broken = broken or not events or events[-1].data != "[DONE]"
        return Stream(resp.status, headers, events, broken)
    finally:
        conn.close()


def gauges(port: int) -> dict[str, float]:
    """The vLLM gauges and counters of /metrics, by name (the fake engine has one model, so one of each)."""
    values: dict[str, float] = {}
    for line in call(port, "GET", "/metrics").body.decode().splitlines():
        if line.startswith("vllm:") and "sleep_state" not in line:
            name, _, value = line.partition("{")
            values[name] = float(value.rsplit(" ", 1)[1])
    return values


def open_request(port: int, body: dict[str, Any]) -> socket.socket:
    """Send a chat request on a raw connection and return it unread, so that the test decides when the client leaves."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        + data
    )
    return sock


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> Engine:
        engine = spawn(tmp_path, list(args), env)
        engines.append(engine)
        if wait:
            wait_listening(engine)
        return engine

    yield start
    for engine in engines:
        kill_group(engine)


@pytest.fixture(scope="module")
def basic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = spawn(
        tmp_path_factory.mktemp("basic"),
        [
            "--served-model-name",
            "alpha",
            "beta",
            "--model",
            "/models/alpha",
            "--chunks",
            "4",
            "--enable-lora",
            "--enable-sleep-mode",  # without VLLM_SERVER_DEV_MODE=1: sleep routes stay hidden
        ],
    )
    try:
        wait_listening(engine)
        yield engine
    finally:
        kill_group(engine)


# ----------------------------------------------------------------- startup


def test_port_refused_during_startup_delay_then_healthy(launch: Callable[..., Engine]) -> None:
    started = time.monotonic()
    engine = launch("--served-model-name", "slow", "--startup-delay", "1.0", wait=False)
    wait_for(lambda: "loading model" in engine.log())
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", engine.port), timeout=1):
        pass
    wait_listening(engine)
    reply = call(engine.port, "GET", "/health")
    assert reply.status == 200 and reply.body == b""
    assert time.monotonic() - started >= 0.95
    log = engine.log()
    assert "Application startup complete." in log
    assert f"Uvicorn running on http://127.0.0.1:{engine.port}" in log


def test_exit_during_startup(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "broken", "--startup-delay", "0.4", "--exit-during-startup", wait=False)
    assert engine.proc.wait(timeout=10) == 1
    log = engine.log()
    assert "ERROR fake-engine: failed to load model:" in log
    assert "Uvicorn running" not in log


# ---------------------------------------------------------------- inference


def test_models_lists_served_names(basic: Engine) -> None:
    reply = call(basic.port, "GET", "/v1/models")
    assert reply.status == 200
    payload = reply.json()
    assert payload["object"] == "list"
    cards = {card["id"]: card for card in payload["data"]}
    assert set(cards) == {"alpha", "beta"}
    for card in cards.values():
        assert card["object"] == "model"
        assert card["owned_by"] == "vllm"
        assert card["root"] == "/models/alpha"
        assert card["parent"] is None
        assert card["max_model_len"] == 2048


def test_chat_non_stream(basic: Engine) -> None:
    reply = call(basic.port, "POST", CHAT, chat_body("beta", "what is the answer"))
    assert reply.status == 200
    assert reply.headers["x-fake-engine"] == "alpha"
    assert reply.headers["x-fake-engine-pid"] == str(basic.proc.pid)
    payload = reply.json()
    assert payload["object"] == "chat.completion"
    assert payload["model"] == "beta"
    choice = payload["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "fake reply from beta to: what is the answer"
    assert choice["finish_reason"] == "stop"
    usage = payload["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # deterministic
    again = call(basic.port, "POST", CHAT, chat_body("beta", "what is the answer")).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]

    limited = call(basic.port, "POST", CHAT, chat_body("alpha", "what is the answer", max_tokens=3)).json()
    assert limited["choices"][0]["message"]["content"] == "fake reply from"
    assert limited["choices"][0]["finish_reason"] == "length"
    assert limited["usage"]["completion_tokens"] == 3


def test_completions_non_stream_and_stream(basic: Engine) -> None:
    reply = call(basic.port, "POST", "/v1/completions", {"model": "alpha", "prompt": "once upon"})
    assert reply.status == 200
    payload = reply.json()
    assert payload["object"] == "text_completion"
    assert payload["choices"][0]["text"] == "fake reply from alpha to: once upon"
    result = stream(basic.port, {"model": "alpha", "prompt": "once upon", "stream": True}, "/v1/completions")
    chunks = result.chunks()
    assert len(chunks) == 4
    assert "".join(c["choices"][0]["text"] for c in chunks) == payload["choices"][0]["text"]


def test_chat_stream_chunks_arrive_separately(basic: Engine) -> None:
    body = chat_body(
        "alpha",
        "tell me a story",
        stream=True,
        stream_options={"include_usage": True},
        fake={"chunks": 4, "chunk_delay": 0.15},
    )
    result = stream(basic.port, body)
    assert result.status == 200
    assert result.headers["content-type"].startswith("text/event-stream")
    assert not result.broken
    assert result.events[-1].data == "[DONE]"
    chunks = result.chunks()
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(content_chunks) == 4
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
    assert text == "fake reply from alpha to: tell me a story"
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(text.split())
    times = [e.arrived for e in result.events[:4]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 0.1 for gap in gaps), gaps


def test_request_delay_is_in_flight(basic: Engine) -> None:
    body = json.dumps(chat_body("alpha", fake={"delay": 0.6})).encode()
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", basic.port), timeout=5) as sock:
        sock.sendall(request)
        wait_for(lambda: call(basic.port, "GET", "/fake/state").json()["in_flight"] == 1)
        metrics = call(basic.port, "GET", "/metrics").body.decode()
        assert 'vllm:num_requests_running{engine="0",model_name="alpha"} 1.0' in metrics
        response = b""
        while data := sock.recv(65536):
            response += data
    assert response.startswith(b"HTTP/1.1 200")
    assert call(basic.port, "GET", "/fake/state").json()["in_flight"] == 0


def test_full_batch_queues_requests_inside_the_engine(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "busy", "--max-num-seqs", "2", "--service-time", "0.5")
    port = engine.port
    assert gauges(port)["vllm:num_requests_waiting"] == 0.0
    samples: list[tuple[float, float]] = []
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        replies = [pool.submit(call, port, "POST", CHAT, chat_body("busy", f"request {i}")) for i in range(6)]
        while not all(r.done() for r in replies):
            metrics = gauges(port)
            samples.append((metrics["vllm:num_requests_running"], metrics["vllm:num_requests_waiting"]))
            time.sleep(0.05)
        results = [r.result() for r in replies]
    elapsed = time.monotonic() - started
    assert [r.status for r in results] == [200] * 6
    assert elapsed >= 1.4  # three rounds of two, 0.5 s each
    assert max(running for running, _ in samples) == 2.0, samples  # never more than --max-num-seqs
    assert any(running == 2.0 and waiting > 0 for running, waiting in samples), samples
    after = gauges(port)
    assert (after["vllm:num_requests_running"], after["vllm:num_requests_waiting"]) == (0.0, 0.0)
    assert after["vllm:request_success_total"] == 6.0
    current = call(port, "GET", "/fake/state").json()
    assert (current["running"], current["waiting"], current["in_flight"]) == (0, 0, 0)


def test_streams_hold_their_slot_and_errors_skip_the_queue(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "busy", "--max-num-seqs", "1", "--service-time", "0.3", "--chunks", "3")
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(stream, engine.port, chat_body("busy", "one", stream=True, fake={"chunk_delay": 0.5}))
        wait_for(lambda: call(engine.port, "GET", "/fake/state").json()["running"] == 1)
        second = pool.submit(stream, engine.port, chat_body("busy", "two", stream=True))
        wait_for(lambda: call(engine.port, "GET", "/fake/state").json()["waiting"] == 1)
        # a request the engine refuses is answered before the queue moves, not after it
        assert call(engine.port, "POST", CHAT, {"model": "busy"}).status == 400
        assert call(engine.port, "GET", "/fake/state").json()["waiting"] == 1
        one, two = first.result(), second.result()
    assert not one.broken and not two.broken
    # the second waited for the whole first stream (service time and two chunk gaps), then its own service time
    assert two.events[0].arrived - one.events[0].arrived >= 1.0 + 0.3 - 0.05
    assert two.events[0].arrived - one.events[-1].arrived >= 0.25


def test_client_leaving_the_queue_or_the_batch_frees_its_place(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "busy", "--max-num-seqs", "1")
    port = engine.port

    def current() -> tuple[int, int]:
        view = call(port, "GET", "/fake/state").json()
        return view["running"], view["waiting"]

    holder = open_request(port, chat_body("busy", fake={"delay": 30}))
    queued = open_request(port, chat_body("busy"))
    try:
        wait_for(lambda: current() == (1, 1))
        queued.close()  # leaves while queued: out of the queue long before the holder's 30 s are over
        wait_for(lambda: current() == (1, 0))
        assert gauges(port)["vllm:num_requests_waiting"] == 0.0
        holder.close()  # leaves while running: its slot is free at once
        wait_for(lambda: current() == (0, 0))
    finally:
        queued.close()
        holder.close()
    reply = call(port, "POST", CHAT, chat_body("busy"), timeout=2.0)
    assert reply.status == 200
    metrics = gauges(port)
    assert metrics["vllm:request_success_total"] == 1.0  # neither request that left was served
    assert metrics["vllm:num_requests_running"] == 0.0


def test_errors(basic: Engine) -> None:
    reply = call(basic.port, "POST", CHAT, chat_body("nope"))
    assert reply.status == 404
    assert reply.json() == {
        "error": {
            "message": "The model `nope` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    for path in ("/v1/completions", "/v1/embeddings"):
        assert call(basic.port, "POST", path, {"model": "nope", "prompt": "x", "input": "x"}).status == 404
    bad = call(basic.port, "POST", CHAT, b"{not json")
    assert bad.status == 400
    error = bad.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] is None
    assert call(basic.port, "POST", CHAT, {"model": "alpha"}).status == 400
    missing = call(basic.port, "GET", "/no/such/route")
    assert missing.status == 404 and missing.json() == {"detail": "Not Found"}
    # sleep routes need VLLM_SERVER_DEV_MODE=1 as well as --enable-sleep-mode
    assert call(basic.port, "POST", "/sleep?level=1").json() == {"detail": "Not Found"}
    assert call(basic.port, "GET", "/is_sleeping").status == 404


def test_embeddings(basic: Engine) -> None:
    reply = call(basic.port, "POST", "/v1/embeddings", {"model": "alpha", "input": ["hello", "world"]})
    assert reply.status == 200
    payload = reply.json()
    assert payload["object"] == "list" and payload["model"] == "alpha"
    assert [d["index"] for d in payload["data"]] == [0, 1]
    first, second = (d["embedding"] for d in payload["data"])
    assert len(first) == 8 and first != second
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, abs_tol=1e-4)
    assert payload["usage"]["prompt_tokens"] == payload["usage"]["total_tokens"] == 2
    single = call(basic.port, "POST", "/v1/embeddings", {"model": "alpha", "input": "hello"}).json()
    assert single["data"][0]["embedding"] == first
    encoded = call(
        basic.port, "POST", "/v1/embeddings", {"model": "alpha", "input": "hello", "encoding_format": "base64"}
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, first, strict=True))


def test_lora_load_unload(basic: Engine, tmp_path: Path) -> None:
    adapter = tmp_path / "sql-adapter"
    adapter.mkdir()
    load = {"lora_name": "sql", "lora_path": str(adapter)}
    reply = call(basic.port, "POST", "/v1/load_lora_adapter", load)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    assert reply.body == b"Success: LoRA adapter 'sql' added successfully."
    try:
        duplicate = call(basic.port, "POST", "/v1/load_lora_adapter", load)
        assert duplicate.status == 400
        assert duplicate.json()["error"] == {
            "message": "The lora adapter 'sql' has already been loaded.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
        inplace = call(basic.port, "POST", "/v1/load_lora_adapter", {**load, "load_inplace": True})
        assert inplace.status == 200
        missing_path = str(tmp_path / "absent")
        bad = call(basic.port, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": missing_path})
        assert bad.status == 404
        assert bad.json()["error"]["message"] == f"Loading lora x failed: No adapter found for {missing_path}"
        assert bad.json()["error"]["type"] == "NotFoundError"

        cards = {c["id"]: c for c in call(basic.port, "GET", "/v1/models").json()["data"]}
        assert cards["sql"]["parent"] == "alpha"
        assert cards["sql"]["root"] == str(adapter)
        answer = call(basic.port, "POST", CHAT, chat_body("sql"))
        assert answer.status == 200 and answer.json()["model"] == "sql"
        assert call(basic.port, "GET", "/fake/state").json()["adapters"] == ["sql"]
    finally:
        unload = call(basic.port, "POST", "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert unload.status == 200
    assert unload.body == b"Success: LoRA adapter 'sql' removed successfully."
    again = call(basic.port, "POST", "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert again.status == 404
    assert again.json()["error"]["message"] == "The lora adapter 'sql' cannot be found."
    assert call(basic.port, "POST", CHAT, chat_body("sql")).status == 404


# --------------------------------------------------------------- sleep mode


def test_sleep_and_wake(launch: Callable[..., Engine]) -> None:
    engine = launch(
        "--served-model-name",
        "sleepy",
        "--enable-sleep-mode",
        "--memory-gb",
        "6",
        "--sleeping-memory-gb",
        "0.5",
        "--no-embeddings",
        env={"VLLM_SERVER_DEV_MODE": "1"},
    )
    port = engine.port

    def state() -> dict[str, Any]:
        result: dict[str, Any] = call(port, "GET", "/fake/state").json()
        return result

    assert call(port, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    assert state()["memory_gb"] == 6
    assert call(port, "POST", "/sleep?level=1").status == 200
    assert call(port, "GET", "/is_sleeping").json() == {"is_sleeping": True}
    current = state()
    assert current["sleeping"] and current["sleep_level"] == 1 and current["memory_gb"] == 0.5
    assert 'sleep_state="weights_offloaded"} 1.0' in call(port, "GET", "/metrics").body.decode()

    refused = call(port, "POST", CHAT, chat_body("sleepy"))
    assert refused.status == 503
    assert refused.json()["error"]["message"] == "engine is sleeping"
    assert call(port, "POST", "/v1/completions", {"model": "sleepy", "prompt": "x"}).status == 503
    assert state()["requests_while_sleeping"] == 2

    assert call(port, "POST", "/wake_up").status == 200
    assert call(port, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    assert state()["memory_gb"] == 6
    woke = call(port, "POST", CHAT, chat_body("sleepy"))
    assert woke.status == 200 and woke.json()["choices"][0]["message"]["content"].startswith("fake reply")

    # level 2: weights dropped; wake weights, reload them, then wake the KV cache
    assert call(port, "POST", "/sleep?level=2").status == 200
    assert state()["sleep_level"] == 2
    assert call(port, "POST", "/collective_rpc", {"method": "reload_weights"}).status == 500
    assert call(port, "POST", "/wake_up?tags=weights").status == 200
    assert call(port, "GET", "/is_sleeping").json() == {"is_sleeping": True}
    rpc = call(port, "POST", "/collective_rpc", {"method": "reload_weights"})
    assert rpc.status == 200 and rpc.json() == {"results": [None]}
    assert call(port, "POST", "/wake_up?tags=kv_cache").status == 200
    assert call(port, "GET", "/is_sleeping").json() == {"is_sleeping": False}
    content = call(port, "POST", CHAT, chat_body("sleepy")).json()["choices"][0]["message"]["content"]
    assert content.startswith("fake reply")
    assert state()["requests_while_sleeping"] == 2

    # level 2 woken without reloading the weights answers garbage, as vLLM would
    assert call(port, "POST", "/sleep?level=2").status == 200
    assert call(port, "POST", "/wake_up").status == 200
    content = call(port, "POST", CHAT, chat_body("sleepy")).json()["choices"][0]["message"]["content"]
    assert content.startswith("GARBAGE")

    assert call(port, "POST", "/sleep?level=3").status == 400
    assert call(port, "POST", "/v1/embeddings", {"input": "x"}).json() == {"detail": "Not Found"}
    assert call(port, "POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/"}).status == 404


def test_fail_wake(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "m", "--enable-sleep-mode", "--fail-wake", env={"VLLM_SERVER_DEV_MODE": "1"})
    assert call(engine.port, "POST", "/sleep?level=1").status == 200
    assert call(engine.port, "POST", "/wake_up").status == 500
    assert call(engine.port, "GET", "/is_sleeping").json() == {"is_sleeping": True}


# ------------------------------------------------------------ failure modes


def test_exit_mid_stream(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "crashy", "--chunks", "5", "--exit-mid-stream", "2")
    assert call(engine.port, "POST", CHAT, chat_body("crashy")).status == 200
    result = stream(engine.port, chat_body("crashy", stream=True))
    assert result.status == 200
    assert result.broken
    assert len(result.events) == 2 and "[DONE]" not in [e.data for e in result.events]
    assert engine.proc.wait(timeout=5) == 1


def test_fail_after_requests_and_health_status(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "m", "--health-status", "503", "--fail-after-requests", "2")
    assert call(engine.port, "GET", "/health").status == 503
    assert call(engine.port, "POST", CHAT, chat_body("m")).status == 200
    assert call(engine.port, "POST", CHAT, chat_body("m")).status == 200
    assert engine.proc.wait(timeout=5) == 1
    assert "--fail-after-requests" in engine.log()


def test_ignore_sigterm_needs_sigkill(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "stubborn", "--ignore-sigterm")
    engine.proc.send_signal(signal.SIGTERM)
    engine.proc.send_signal(signal.SIGINT)
    time.sleep(0.4)  # what is tested: nothing happens (an ignored signal is dropped when it is sent)
    assert engine.proc.poll() is None
    assert call(engine.port, "GET", "/health").status == 200
    engine.proc.kill()
    assert engine.proc.wait(timeout=5) == -signal.SIGKILL


def test_sigterm_stops_server_and_child_quickly(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "parent", "--spawn-child")
    child_pid = call(engine.port, "GET", "/fake/state").json()["child_pid"]
    assert state(child_pid) not in (None, "Z")
    # keep a request in flight: shutdown must not wait for it long
    body = json.dumps(chat_body("parent", fake={"delay": 10})).encode()
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", engine.port), timeout=5) as sock:
        sock.sendall(request)
        wait_for(lambda: call(engine.port, "GET", "/fake/state").json()["in_flight"] == 1)
        started = time.monotonic()
        engine.proc.send_signal(signal.SIGTERM)
        assert engine.proc.wait(timeout=5) == 0
        assert time.monotonic() - started < 1.5
    assert state(child_pid) is None  # terminated and reaped by the parent
    assert "Shutting down" in engine.log()


def test_spawned_child_survives_sigkill_of_parent(launch: Callable[..., Engine]) -> None:
    engine = launch("--served-model-name", "parent", "--spawn-child")
    child_pid = call(engine.port, "GET", "/fake/state").json()["child_pid"]
    args = cmdline(child_pid) or []
    assert "fake-engine-worker" in args and str(engine.port) in args
    assert os.getpgid(child_pid) == engine.proc.pid
    engine.proc.kill()
    assert engine.proc.wait(timeout=5) == -signal.SIGKILL
    time.sleep(0.2)  # what is tested: the child goes on living after its parent's death
    assert state(child_pid) not in (None, "Z", "X")
    assert os.getpgid(child_pid) == engine.proc.pid  # the launch fixture's killpg removes it
