"""Helpers for the operations tests (metrics, admin API, CLI, dashboard): a router in front of fake-engine
subprocesses, in this event loop, in a background thread (for synchronous browser tests) or as a process.

Every model process carries ``VMR_OPS_MARKER=<marker>`` in its environment, so a test can check in the
process table that none of them outlived the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
import yaml
from aiohttp import web

from vllm_model_router.config import RouterConfig, build_config
from vllm_model_router.http.app import RUNTIME, build_app
from vllm_model_router.runtime.pump import AUTO, Runtime

# restart recovery's state file for the tests' routers (not the user's ~/.local/state)
TEST_STATE_DIR = os.path.join(tempfile.gettempdir(), "vllm-model-router-test-state")
MARKER_VAR = "VMR_OPS_MARKER"
CHAT = "/v1/chat/completions"
FAKE_ENGINE = [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", "${PORT}",
               "--served-model-name", "${MODEL}"]


def fake_model(*args: str, **settings: Any) -> dict[str, Any]:
    """A model served by the fake engine with extra ``args``; stop_timeout 1 s unless given."""
    return {"cmd": [*FAKE_ENGINE, *args], "stop_timeout": 1, **settings}


def router_data(models: Mapping[str, Mapping[str, Any]], marker: str, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"listen": {"host": "127.0.0.1", "port": 0}, "load_timeout": 30,
                            "state_dir": os.path.join(TEST_STATE_DIR, marker), **top}  # one per test
    data["models"] = {n: {**m, "env": {**m.get("env", {}), MARKER_VAR: marker}} for n, m in models.items()}
    return data


def router_config(models: Mapping[str, Mapping[str, Any]], marker: str, **top: Any) -> RouterConfig:
    return build_config(router_data(models, marker, **top), env={}, source="<test>")


def new_marker() -> str:
    return uuid.uuid4().hex


def chat(model: str, text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries the marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2:].split()[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def assert_no_processes_left(marker: str, grace: float = 3.0) -> None:
    deadline = time.monotonic() + grace
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"model processes outlived the router: {left}"


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(0.05)


# ------------------------------------------------------------------ a router in this event loop
@dataclass
class LocalRouter:
    url: str
    app: web.Application

    @property
    def runtime(self) -> Runtime:
        return self.app[RUNTIME]


async def _start(config: RouterConfig, probe: Any = AUTO) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(build_app(config, probe=probe), handler_cancellation=True, access_log=None,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = next(a[1] for a in runner.addresses if isinstance(a, tuple))
    return runner, f"http://127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def local_router(models: Mapping[str, Mapping[str, Any]], **top: Any) -> AsyncIterator[LocalRouter]:
    marker = new_marker()
    runner, url = await _start(router_config(models, marker, **top))
    try:
        yield LocalRouter(url, runner.app)
    finally:
        await runner.cleanup()
        await asyncio.to_thread(assert_no_processes_left, marker)


# ------------------------------------------------------------------ a router in a background thread
@contextlib.contextmanager
def threaded_router(models: Mapping[str, Mapping[str, Any]], probe: Any = AUTO, **top: Any) -> Iterator[LocalRouter]:
    """The router's aiohttp app on its own event loop (uvloop, as ``serve`` runs it) in a daemon thread
    (for synchronous tests); ``probe``: a fake GPU probe (default: NVML if there is a GPU)."""
    marker = new_marker()
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="router", daemon=True)
    thread.start()
    runner, url = asyncio.run_coroutine_threadsafe(_start(router_config(models, marker, **top), probe),
                                                   loop).result(30)
    try:
        yield LocalRouter(url, runner.app)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        assert_no_processes_left(marker)


# ------------------------------------------------------------------ a router process
@dataclass
class RouterProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def router_process(workdir: Path, models: Mapping[str, Mapping[str, Any]], *serve_args: str,
                   **top: Any) -> Iterator[RouterProcess]:
    """``python -m vllm_model_router serve --config FILE [serve_args]`` on a free port; SIGTERM on exit."""
    marker = new_marker()
    port = free_port()
    data = router_data(models, marker, **top)
    data["listen"] = {"host": "127.0.0.1", "port": port}
    config_path = workdir / "router.yaml"
    config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    log_path = workdir / "router.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "ROUTER_PORT", "LOG_FORMAT")}
    with log_path.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vllm_model_router", "serve", "--config", str(config_path),
                                 *serve_args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    handle = RouterProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        def up() -> bool:
            assert proc.poll() is None, f"router exited with {proc.returncode}:\n{handle.log()}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
            return False

        wait_for(up, what="router listening")
        yield handle
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        assert_no_processes_left(marker)
