"""Helpers for the router integration tests: the router in front of fake-engine subprocesses.

The router runs in the test's event loop (``build_app`` + ``AppRunner`` on a free port), which gives the
tests its runtime state directly, or as a real ``vllm-model-router serve`` process where process-level
behaviour is under test. Every model process carries ``VMR_IT_MARKER=<marker>`` in its environment;
children inherit it, so the process table tells which processes a test started, whatever happened to
their parent, and a test fails if any of them outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy

from vllm_model_router.config import build_config
from vllm_model_router.http.app import RUNTIME, build_app
from vllm_model_router.runtime.pump import Runtime

# restart recovery's state file for the tests' routers (not the user's ~/.local/state)
TEST_STATE_DIR = os.path.join(tempfile.gettempdir(), "vllm-model-router-test-state")
MARKER_VAR = "VMR_IT_MARKER"
CHAT = "/v1/chat/completions"
FAKE_ENGINE = (sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}",
               "--served-model-name", "${MODEL}")


def engine(*args: str, **settings: Any) -> dict[str, Any]:
    """A model entry whose server is the fake engine with extra ``args``; ``stop_timeout`` 1 s by default."""
    return {"cmd": [*FAKE_ENGINE, *args], "stop_timeout": 1, **settings}


def router_data(models: Mapping[str, Mapping[str, Any]], marker: str, **top: Any) -> dict[str, Any]:
    """A router configuration (as parsed YAML) with the marker added to every model's environment."""
    data: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": 0}, "load_timeout": 30,
                            "state_dir": os.path.join(TEST_STATE_DIR, marker), **top}  # one per test
    data["models"] = {  # adapters have no process of their own, so no environment
        name: m if "adapter" in m else {**m, "env": {**m.get("env", {}), MARKER_VAR: marker}}
        for name, m in models.items()
    }
    return data


def chat_body(model: str, text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# --------------------------------------------------------------------------------------- processes
def marked_processes(marker: str) -> dict[int, str]:
    """Live (non-zombie) processes whose environment carries the marker, with their command lines."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X"):
            continue
        found[int(entry.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


async def assert_no_processes_left(marker: str, grace: float = 2.0) -> None:
    """Fail (after killing them) if processes of this test are still alive after ``grace`` seconds."""
    deadline = time.monotonic() + grace
    while True:
        left = marked_processes(marker)
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"model processes outlived the test: {left}"


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------- HTTP
@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    elapsed: float = 0.0

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        """The OpenAI error envelope's content, checking its shape on the way."""
        payload = self.json()
        assert set(payload) == {"error"}, payload
        err: dict[str, Any] = payload["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and isinstance(err["type"], str)
        assert self.headers["Content-Type"].startswith("application/json")
        return err


@dataclass
class SSE:
    status: int
    headers: CIMultiDictProxy[str]
    events: list[tuple[float, bytes]] = field(default_factory=list)  # (arrival time, data after "data: ")

    def payloads(self) -> list[Any]:
        return [json.loads(data) for _, data in self.events if data != b"[DONE]"]


@dataclass
class Router:
    """A running router and a client session for it."""

    url: str
    session: aiohttp.ClientSession
    marker: str
    app: web.Application | None = None  # in-process routers only

    @property
    def runtime(self) -> Runtime:
        assert self.app is not None, "a router process has no runtime to look at"
        return self.app[RUNTIME]

    async def request(
        self, method: str, path: str, body: Any = None, *, data: bytes | None = None, timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        if body is not None:
            data = json.dumps(body).encode()
        hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else dict(headers or {})
        started = time.monotonic()
        async with self.session.request(
            method, self.url + path, data=data, headers=hdrs, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            raw = await resp.read()
            return Reply(resp.status, resp.headers, raw, time.monotonic() - started)

    async def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", path, body, **kw)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def chat(self, model: str, text: str = "hello there", **extra: Any) -> Reply:
        return await self.post(CHAT, chat_body(model, text, **extra))

    async def stream(self, body: Any, path: str = CHAT, *, stop_after: int | None = None) -> SSE:
        """POST a streaming request; record every SSE ``data:`` line with its arrival time. With
        ``stop_after`` the client goes away after that many events."""
        async with self.session.post(self.url + path, json=body) as resp:
            sse = SSE(resp.status, resp.headers)
            async for line in resp.content:
                if line.startswith(b"data: "):
                    sse.events.append((time.monotonic(), line[len(b"data: ") :].strip()))
                    if stop_after is not None and len(sse.events) >= stop_after:
                        resp.close()  # drop the connection, like a client that went away
                        break
            return sse

    async def models(self) -> dict[str, dict[str, Any]]:
        """GET /admin/models, by model name."""
        reply = await self.get("/admin/models")
        assert reply.status == 200, reply.body
        return {m["name"]: m for m in reply.json()["models"]}

    async def model(self, name: str) -> dict[str, Any]:
        return (await self.models())[name]

    async def statuses(self) -> dict[str, str]:
        """GET /v1/models: card id -> status."""
        reply = await self.get("/v1/models")
        assert reply.status == 200, reply.body
        return {card["id"]: card["status"] for card in reply.json()["data"]}

    async def wait_model(self, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0,
                         what: str = "") -> dict[str, Any]:
        """Poll the admin view of ``name`` until ``predicate`` holds; return that view."""
        deadline = time.monotonic() + timeout
        while True:
            view = await self.model(name)
            if predicate(view):
                return view
            if time.monotonic() > deadline:
                pytest.fail(f"{name}: {what or 'condition'} not reached within {timeout}s; last view {view}")
            await asyncio.sleep(0.02)

    async def wait_state(self, name: str, state: str, timeout: float = 10.0) -> dict[str, Any]:
        return await self.wait_model(name, lambda v: v["state"] == state, timeout, f"state {state}")

    async def engine_state(self, name: str) -> dict[str, Any]:
        """The fake engine's own counters (GET /fake/state on the model's port, not through the router)."""
        port = (await self.model(name))["port"]
        assert port is not None, f"{name} is not running"
        async with self.session.get(f"http://127.0.0.1:{port}/fake/state") as resp:
            state: dict[str, Any] = await resp.json()
            return state


def _client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


@contextlib.asynccontextmanager
async def in_process_router(
    models: Mapping[str, Mapping[str, Any]], marker: str, probe: Any = None, **settings: Any
) -> AsyncIterator[Router]:
    """The router application in this event loop on a free port; on exit it is shut down (stopping every
    model) and no process of ``marker`` may be left. ``probe``: a fake GPU probe (default: no GPU)."""
    config = build_config(router_data(models, marker, **settings), env={}, source="<test>")
    app = build_app(config, probe=probe)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        async with _client_session() as session:
            yield Router(f"http://127.0.0.1:{port}", session, marker, app)
    finally:
        await runner.cleanup()
        await assert_no_processes_left(marker)


@dataclass
class RouterProcess:
    proc: asyncio.subprocess.Process
    router: Router
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.asynccontextmanager
async def router_process(
    workdir: Path, models: Mapping[str, Mapping[str, Any]], marker: str, **settings: Any
) -> AsyncIterator[RouterProcess]:
    """``python -m vllm_model_router serve --config FILE`` as a real process, its port given by ``PORT``
    (the file says port 1, which it could not bind). On exit: SIGTERM if it still runs, and no process
    of ``marker`` may be left."""
    data = router_data(models, marker, **settings)
    data["listen"] = {"host": "127.0.0.1", "port": 1}
    config_path = workdir / "router.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    port = free_port()
    log_path = workdir / "router.log"
    env = {**os.environ, "PORT": str(port), "LOG_LEVEL": "info"}
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_model_router", "serve", "--config", str(config_path),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    handle: RouterProcess | None = None
    try:
        async with _client_session() as session:
            handle = RouterProcess(proc, Router(f"http://127.0.0.1:{port}", session, marker), log_path)
            deadline = time.monotonic() + 15
            while True:
                if proc.returncode is not None:
                    pytest.fail(f"router exited with {proc.returncode}:\n{handle.log()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    if (await handle.router.get("/health", timeout=1)).status == 200:
                        break
                if time.monotonic() > deadline:
                    pytest.fail(f"router not up after 15s:\n{handle.log()}")
                await asyncio.sleep(0.05)
            yield handle
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        await assert_no_processes_left(marker)
