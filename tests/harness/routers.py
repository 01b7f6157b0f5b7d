"""A router under test, started one of three ways, and a client for it.

``launch_router`` is the one way a test starts a router; ``how`` says which:

- ``"app"``: ``build_app`` on aiohttp's plain runner, in this event loop; the test can look at its
  runtime directly.
- ``"served"``: the same, served the way ``serve`` serves it (server.py's runner and site: connection
  limit, client timeouts, graceful shutdown), in this event loop.
- ``"process"``: ``vllm-model-router serve --config FILE`` as a real process, where process-level
  behaviour (signals, exit status, log output, restarts) is under test.

``threaded_router`` runs any of them on an event loop of its own in a background thread, for
synchronous tests (a browser, raw sockets driven by hypothesis).

Whichever way, the router is started when it answers ``GET /health``, and on exit it is shut down and no
process of the test's marker may be left (unless the test says it leaves some on purpose).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiohttp
import pytest
import uvloop
import yaml
from aiohttp import web
from multidict import CIMultiDictProxy

from vllm_model_router.config import RouterConfig, build_config
from vllm_model_router.http.app import RUNTIME, build_app
from vllm_model_router.http.server import RouterSite, make_runner, start_site, stop_serving
from vllm_model_router.runtime.pump import Runtime

from . import sse
from .models import CHAT, chat_body
from .net import free_port, wait_healthy
from .processes import MARKER_VAR, assert_no_processes_left
from .waiting import wait_until

How = Literal["app", "served", "process"]
T = TypeVar("T")

# restart recovery's state files for the tests' routers (not the user's ~/.local/state)
TEST_STATE_DIR = os.path.join(tempfile.gettempdir(), "vllm-model-router-test-state")
# what the router reads from the environment, and a test's config file says itself
_ROUTER_ENV = ("PORT", "ROUTER_PORT", "ROUTER_CONFIG", "LOG_FORMAT")


def router_data(models: Mapping[str, Mapping[str, Any]], marker: str, **top: Any) -> dict[str, Any]:
    """A router configuration (as parsed YAML) with the marker added to every model's environment."""
    data: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": 0}, "load_timeout": 30,
                            "state_dir": os.path.join(TEST_STATE_DIR, marker), **top}  # one per test
    data["models"] = {  # adapters have no process of their own, so no environment
        name: m if "adapter" in m else {**m, "env": {**m.get("env", {}), MARKER_VAR: marker}}
        for name, m in models.items()
    }
    return data


# ------------------------------------------------------------------------------------------ client
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
class Stream:
    """A streamed answer: its status, headers and events, each with its arrival time."""

    status: int
    headers: CIMultiDictProxy[str]
    events: list[sse.Event] = field(default_factory=list)

    def payloads(self) -> list[Any]:
        return [e.json() for e in self.events if e.data != "[DONE]"]


@dataclass
class Router:
    """A running router and a client session for it."""

    url: str
    session: aiohttp.ClientSession
    marker: str
    app: web.Application | None = None  # a router in this process
    config: RouterConfig | None = None  # a router in this process
    _runner: web.AppRunner | None = None  # a router in this process
    log_path: Path | None = None  # a router process
    _site: RouterSite | None = None  # a served router
    _proc: asyncio.subprocess.Process | None = None  # a router process
    _loop: asyncio.AbstractEventLoop | None = None  # a threaded router

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def runtime(self) -> Runtime:
        assert self.app is not None, "a router process has no runtime to look at"
        return self.app[RUNTIME]

    @property
    def runner(self) -> web.AppRunner:
        assert self._runner is not None, "a router process has no runner to look at"
        return self._runner

    @property
    def site(self) -> RouterSite:
        assert self._site is not None, "only a served router has server.py's site"
        return self._site

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, "not a router process"
        return self._proc

    def log(self) -> str:
        """What the router process printed."""
        assert self.log_path is not None, "not a router process"
        return self.log_path.read_text(errors="replace")

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on a threaded router's event loop (its state is only safe to read there)."""
        assert self._loop is not None, "not a threaded router"

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

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

    async def stream(self, body: Any, path: str = CHAT, *, stop_after: int | None = None) -> Stream:
        """POST a streaming request; record every event with its arrival time. With ``stop_after`` the
        client goes away after that many events."""
        async with self.session.post(self.url + path, json=body) as resp:
            result = Stream(resp.status, resp.headers)
            async with contextlib.aclosing(sse.aiter_events(resp.content)) as events:
                async for event in events:
                    result.events.append(event)
                    if stop_after is not None and len(result.events) >= stop_after:
                        resp.close()  # drop the connection, like a client that went away
                        break
            return result

    async def events(self, history: int = 500, quiet: float = 0.3) -> list[dict[str, Any]]:
        """The router's lifecycle events (GET /admin/events?history=N, read until ``quiet`` seconds pass
        without more: the backlog comes at once, then nothing until the next event)."""
        buf = b""
        async with self.session.get(f"{self.url}/admin/events?history={history}") as resp:
            with contextlib.suppress(TimeoutError):
                while chunk := await asyncio.wait_for(resp.content.readany(), quiet):
                    buf += chunk
        return [event.json() for event in sse.parse(buf)]

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
        last: dict[str, Any] = {}

        async def holds() -> dict[str, Any] | None:
            nonlocal last
            last = await self.model(name)
            return last if predicate(last) else None

        try:
            view: dict[str, Any] = await wait_until(holds, timeout)
            return view
        except pytest.fail.Exception:
            pytest.fail(f"{name}: {what or 'condition'} not reached within {timeout}s; last view {last}")

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


# ---------------------------------------------------------------------------------------- launcher
@contextlib.asynccontextmanager
async def launch_router(
    models: Mapping[str, Mapping[str, Any]], marker: str, how: How = "app", *, probe: Any = None,
    grace: float = 1.0, workdir: Path | None = None, name: str = "router", port: int | None = None,
    serve_args: Sequence[str] = (), env: Mapping[str, str] | None = None, leave_processes: bool = False,
    **settings: Any,
) -> AsyncIterator[Router]:
    """A router for ``models`` (router settings as YAML keys in ``settings``), started ``how``, answering
    /health; on exit it is shut down, and no process of ``marker`` may be left unless ``leave_processes``
    (a test that kills the router on purpose checks its models itself).

    In-process only: ``probe``, a fake GPU probe (default: no GPU); ``grace``, a served router's
    shutdown_grace. Process only: ``workdir`` for ``{name}.yaml`` and ``{name}.log``, the ``port`` to
    listen on (default: a free one), ``serve_args`` after ``serve --config FILE``, and ``env`` on top of
    this process's environment (whose router variables are left out).
    """
    data = router_data(models, marker, **settings)
    try:
        if how == "process":
            assert workdir is not None, "a router process needs a workdir for its config file and log"
            data["listen"] = {"host": "127.0.0.1", "port": port or free_port()}
            async with _router_process(data, marker, workdir, name, serve_args, env or {}) as router:
                yield router
        else:
            async with _router_in_process(data, marker, how == "served", probe, grace) as router:
                yield router
    finally:
        if not leave_processes:
            await assert_no_processes_left(marker)


async def _until_healthy(router: Router, what: str, exited: Callable[[], int | None] | None = None,
                         log: Callable[[], str] | None = None) -> None:
    await wait_healthy(router.url + "/health", what=what, exited=exited, log=log)


@contextlib.asynccontextmanager
async def _router_in_process(data: dict[str, Any], marker: str, served: bool, probe: Any,
                             grace: float) -> AsyncIterator[Router]:
    config = build_config(data, env={}, source="<test>")
    app = build_app(config, probe=probe)
    if served:
        runner = make_runner(app, config, shutdown_grace=grace)
    else:
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site: RouterSite | None = None
        if served:
            site = await start_site(runner, config, "127.0.0.1", 0)
            port = site.port
        else:
            plain = web.TCPSite(runner, "127.0.0.1", 0)
            await plain.start()
            port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
        async with _client_session() as session:
            router = Router(f"http://127.0.0.1:{port}", session, marker, app, config, _runner=runner, _site=site)
            await _until_healthy(router, "router")
            yield router
    finally:
        if served:
            await stop_serving(runner, grace)  # as `serve` shuts down
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _router_process(data: dict[str, Any], marker: str, workdir: Path, name: str, serve_args: Sequence[str],
                          env: Mapping[str, str]) -> AsyncIterator[Router]:
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    log_path = workdir / f"{name}.log"
    environment = {**{k: v for k, v in os.environ.items() if k not in _ROUTER_ENV}, "LOG_LEVEL": "info", **env}
    with log_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "vllm_model_router", "serve", "--config", str(config_path), *serve_args,
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=environment, start_new_session=True,
        )
    try:
        async with _client_session() as session:
            router = Router(f"http://127.0.0.1:{data['listen']['port']}", session, marker, log_path=log_path,
                            _proc=proc)
            await _until_healthy(router, f"router {name}", lambda: proc.returncode, router.log)
            yield router
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


@contextlib.contextmanager
def threaded_router(models: Mapping[str, Mapping[str, Any]], marker: str | None = None, how: How = "served",
                    **kw: Any) -> Iterator[Router]:
    """:func:`launch_router` for synchronous tests: run on its own event loop (uvloop, as ``serve`` runs it)
    in a daemon thread; read an in-process router's state with ``router.call``."""
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="router", daemon=True)
    thread.start()
    try:
        launched = launch_router(models, marker or uuid.uuid4().hex, how, **kw)
        router = asyncio.run_coroutine_threadsafe(launched.__aenter__(), loop).result(60)
        router._loop = loop
        try:
            yield router
        finally:
            asyncio.run_coroutine_threadsafe(launched.__aexit__(None, None, None), loop).result(60)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
