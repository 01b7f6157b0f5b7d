"""Process driver: each model is a server process (vLLM, or anything OpenAI-compatible) the router spawns.

- The command is exec'd without a shell, in its own session/process group, with ``${PORT}`` and
  ``${MODEL}`` substituted; nothing from a client request ever reaches it.
- Its stdout/stderr go to a file, ``<log_dir>/<model>.log`` (engine_log.py: appended to, size-bounded by
  rotation), never to a pipe: a server outlives a router crash, and a pipe without its reader would fail
  its writes (EPIPE) or kill it (SIGPIPE). The router follows the file, polling it every 0.2 s, into a
  per-model ring buffer, to log followers and to the router log, prefixed with the model name. With
  restart recovery the files are in ``state_dir/logs``, where the next router finds the output of the
  servers it adopts; otherwise in a private temporary directory, removed when the driver closes.
- Ready = ``health_path`` answers 200; polled every 50 ms at first, backing off to 250 ms. If the process
  exits while loading, the load fails at once with its last log lines.
- Stop = SIGTERM to the group (once to each process: uvicorn takes a second one as "exit now"), SIGKILL
  after ``stop_timeout``; it returns only when no process of the group or session is left (vLLM's
  EngineCore survives a kill of the API server alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from vllm_model_router.config import ModelConfig
from vllm_model_router.drivers import engine_log, procs, sleep_mode
from vllm_model_router.drivers.adopted import AdoptedProcess
from vllm_model_router.drivers.base import ExitCallback, LoadError

log = logging.getLogger("vllm_model_router.process")
LOG_LINES = 2000
ERROR_TAIL = 20
OUTPUT_POLL_S = 0.2  # how often a server's log file is looked at for new lines


class GroupObserver(Protocol):
    """Told about every process group the driver starts and every one that is gone (recovery.py records
    them, so that a router restarted after a crash finds what its predecessor left running)."""

    def started(self, model: str, pid: int, port: int, gpus: tuple[int, ...]) -> None: ...

    def gone(self, model: str, pid: int) -> None: ...


@dataclass
class _Instance:
    model: str
    port: int
    proc: asyncio.subprocess.Process | AdoptedProcess
    started: float
    logs: deque[str]
    output: engine_log.LogFollower | None = None  # its log file; None when it cannot be read
    reader: asyncio.Task[None] | None = None
    watcher: asyncio.Task[None] | None = None
    ready: bool = False
    stopping: bool = False
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid


class ProcessDriver:
    def __init__(self, models: Mapping[str, ModelConfig], host: str = "127.0.0.1", log_dir: Path | None = None,
                 max_log_bytes: int = engine_log.MAX_LOG_BYTES, preexec: Callable[[], None] | None = None) -> None:
        self._models = models
        self._preexec = preexec  # run in each server between fork and exec (ray_actor.py ties it to its actor)
        self._host = host
        self._log_dir = log_dir  # None: a private temporary directory, made on first use
        self._private_log_dir: Path | None = None
        self._max_log_bytes = max_log_bytes
        self._instances: dict[str, _Instance] = {}
        self._logs: dict[str, deque[str]] = {name: deque(maxlen=LOG_LINES) for name in models}
        self._log_followers: dict[str, list[asyncio.Queue[str]]] = {}
        self._on_exit: ExitCallback = lambda model, reason: None
        self._session: aiohttp.ClientSession | None = None
        self.observer: GroupObserver | None = None

    def set_exit_callback(self, callback: ExitCallback) -> None:
        self._on_exit = callback

    def use_log_dir(self, directory: Path) -> None:
        """Write the servers' output files to ``directory`` from now on. Restart recovery points it into
        ``state_dir``, so that the next router finds the output of the servers it adopts."""
        self._log_dir = directory

    def log_file(self, model: str) -> Path:
        """Where ``model``'s server writes its stdout and stderr."""
        if self._log_dir is None:
            self._private_log_dir = Path(tempfile.mkdtemp(prefix="vllm-model-router-logs-"))
            self._log_dir = self._private_log_dir
        return engine_log.log_path(self._log_dir, model)

    def manages(self, model: str) -> bool:
        return model in self._models

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=2.0), connector=aiohttp.TCPConnector(force_close=True)
            )
        return self._session

    # ------------------------------------------------------------------ start
    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        cfg = self._models[model]
        if model in self._instances:
            raise LoadError(f"{model} is already running (pid {self._instances[model].pid})")
        port = procs.free_port(self._host)
        argv = cfg.argv(port)
        env = {**os.environ, **cfg.env}
        if gpus:  # where the router placed it (or its fixed gpus)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
        buf = self._logs[model]
        buf.append(f"--- starting: {' '.join(argv)}")
        self._publish(model, buf[-1])
        output, out_fd = self._open_output(model)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_fd,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        except OSError as e:
            output.close()
            raise LoadError(f"cannot start {argv[0]!r}: {e.strerror or e}") from e
        finally:
            os.close(out_fd)  # the server has its own copy
        inst = _Instance(model, port, proc, time.monotonic(), buf, output)
        self._instances[model] = inst
        if self.observer is not None:
            self.observer.started(model, proc.pid, port, gpus)
        inst.reader = asyncio.create_task(self._follow_output(inst, output), name=f"logs:{model}")
        try:
            await self._wait_ready(inst, cfg)
        except BaseException:
            # failed or cancelled (a stop during the load): leave nothing running
            await self._reap(inst, cfg.stop_timeout)
            raise
        inst.ready = True
        self._catch_up(inst)
        inst.watcher = asyncio.create_task(self._watch(inst, cfg), name=f"watch:{model}")
        log.info("Model %s ready on port %d (pid %d) after %.2fs", model, port, inst.pid,
                 time.monotonic() - inst.started)

    async def _wait_ready(self, inst: _Instance, cfg: ModelConfig) -> None:
        url = f"http://{self._host}:{inst.port}{cfg.health_path}"
        exited = asyncio.ensure_future(inst.proc.wait())
        started = time.monotonic()
        try:
            while True:
                if inst.proc.returncode is not None or exited.done():
                    await self._drain_reader(inst)
                    raise LoadError(
                        f"process exited with code {inst.proc.returncode} while loading. "
                        f"Last log lines:\n{self._tail(inst.model)}"
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with self._http().get(url) as resp:
                        if resp.status == 200:
                            return
                # quick at first (the engine's own start time is what the client waits for), then gentler
                elapsed = time.monotonic() - started
                await asyncio.wait({exited}, timeout=0.05 if elapsed < 10 else 0.1 if elapsed < 120 else 0.25)
        finally:
            if not exited.done():
                exited.cancel()

    def _open_output(self, model: str) -> tuple[engine_log.LogFollower, int]:
        """The follower of ``model``'s log file, positioned at its end, and the descriptor for the server."""
        try:
            path = self.log_file(model)
            out_fd = engine_log.open_for_server(path)
        except OSError as e:
            raise LoadError(f"cannot open its log file: {e}") from e
        try:
            return engine_log.LogFollower(path, self._max_log_bytes), out_fd
        except OSError as e:
            os.close(out_fd)
            raise LoadError(f"cannot read its log file: {e}") from e

    async def _follow_output(self, inst: _Instance, output: engine_log.LogFollower) -> None:
        """Take in the lines the server writes until it has exited and all it wrote is read (the file is
        looked at once more after the exit is seen, so the final lines are never missed)."""
        try:
            while True:
                exited = inst.proc.returncode is not None
                self._take_lines(inst, output.read())
                if output.behind:
                    await asyncio.sleep(0)
                    continue
                if exited:
                    self._take_lines(inst, output.finish())
                    return
                await asyncio.sleep(OUTPUT_POLL_S)
        except OSError as e:
            log.error("Model %s: cannot read its log file %s any more: %s", inst.model, output.path, e)
        finally:
            output.close()

    def _catch_up(self, inst: _Instance) -> None:
        """Take in what the server has written so far, without waiting for the next poll: once it is
        ready, its log shows how it started."""
        if inst.output is None or inst.reader is None or inst.reader.done():
            return
        with contextlib.suppress(OSError):  # the follower task reports it
            self._take_lines(inst, inst.output.read())

    def _take_lines(self, inst: _Instance, lines: list[str]) -> None:
        mlog = logging.getLogger(f"vllm_model_router.model.{inst.model}")
        for line in lines:
            inst.logs.append(line)
            self._publish(inst.model, line)
            mlog.info("[%s] %s", inst.model, line)

    async def _drain_reader(self, inst: _Instance) -> None:
        if inst.reader is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(inst.reader), timeout=1.0)

    def _tail(self, model: str, n: int = ERROR_TAIL) -> str:
        lines = [ln for ln in self._logs[model] if not ln.startswith("--- starting:")]
        return "\n".join(lines[-n:]) or "(no output)"

    async def _watch(self, inst: _Instance, cfg: ModelConfig) -> None:
        code = await inst.proc.wait()
        if inst.stopping:
            return
        # died on its own: reap what it left behind before anyone may reuse its memory
        await self._drain_reader(inst)
        await self._reap(inst, 0.0)
        reason = f"process exited with code {code}. Last log lines:\n{self._tail(inst.model)}"
        log.error("Model %s exited unexpectedly: %s", inst.model, reason)
        self._on_exit(inst.model, reason)

    async def _reap(self, inst: _Instance, stop_timeout: float) -> None:
        inst.stopping = True
        if stop_timeout > 0:
            killed = await procs.terminate_group(inst.pid, stop_timeout)
            if killed:
                log.warning("Model %s: pids %s ignored SIGTERM for %.0fs and were killed",
                            inst.model, killed, stop_timeout)
        if not await procs.kill_group(inst.pid):
            log.error("Model %s: processes %s survive SIGKILL", inst.model, procs.group_members(inst.pid))
        with contextlib.suppress(ProcessLookupError):
            await inst.proc.wait()
        await self._drain_reader(inst)
        if inst.reader is not None and not inst.reader.done():
            inst.reader.cancel()
        if self._instances.get(inst.model) is inst:
            del self._instances[inst.model]
        if self.observer is not None and not procs.group_members(inst.pid):
            self.observer.gone(inst.model, inst.pid)

    # ----------------------------------------------------------------- adopt
    def adopt(self, model: str, pid: int, port: int) -> None:
        """Take over a healthy server a previous router process started (its process group ``pid``,
        listening on ``port``): it is loaded from now on. Not being our child, it is watched by polling."""
        if model in self._instances:
            raise LoadError(f"{model} is already running (pid {self._instances[model].pid})")
        buf = self._logs[model]
        output: engine_log.LogFollower | None = None
        try:
            output = engine_log.LogFollower(self.log_file(model), self._max_log_bytes)
            buf.extend(output.recent_lines(LOG_LINES))  # what it printed before this router
            note = f"following its output in {output.path}"
        except OSError as e:
            if output is not None:
                output.close()
                output = None
            note = f"its output cannot be followed ({e})"
        buf.append(f"--- adopted after a router restart: pid {pid}, port {port}; {note}")
        self._publish(model, buf[-1])
        inst = _Instance(model, port, AdoptedProcess(pid, procs.start_time(pid)), time.monotonic(), buf, output,
                         ready=True)
        self._instances[model] = inst
        if output is not None:
            inst.reader = asyncio.create_task(self._follow_output(inst, output), name=f"logs:{model}")
        inst.watcher = asyncio.create_task(self._watch_adopted(inst), name=f"watch:{model}")
        log.info("Model %s adopted: pid %d on port %d", model, pid, port)

    async def _watch_adopted(self, inst: _Instance) -> None:
        await inst.proc.wait()
        if inst.stopping:
            return
        await self._reap(inst, 0.0)
        reason = (f"adopted process {inst.pid} exited (it is not this router's child: its exit status is "
                  f"unknown). Last log lines:\n{self._tail(inst.model)}")
        log.error("Model %s exited unexpectedly: %s", inst.model, reason)
        self._on_exit(inst.model, reason)

    # ------------------------------------------------------------------- stop
    async def stop(self, model: str, force: bool = False) -> None:
        inst = self._instances.get(model)
        if inst is None:
            return
        inst.stopping = True
        if inst.watcher is not None and not inst.watcher.done():
            inst.watcher.cancel()
        await self._reap(inst, self._models[model].stop_timeout)
        inst.logs.append("--- stopped")
        self._publish(model, "--- stopped")

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(m) for m in list(self._instances)), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        if self._private_log_dir is not None:  # nothing writes there any more: its servers are stopped
            shutil.rmtree(self._private_log_dir, ignore_errors=True)
            self._private_log_dir = None
            self._log_dir = None

    # ------------------------------------------------------------------ views
    def endpoint(self, model: str) -> str | None:
        inst = self._instances.get(model)
        if inst is None or not inst.ready:
            return None
        return f"http://{self._host}:{inst.port}"

    def info(self, model: str) -> dict[str, Any]:
        inst = self._instances.get(model)
        if inst is None:
            return {"pid": None, "port": None}
        return {"pid": inst.pid, "port": inst.port}

    def logs(self, model: str, lines: int) -> list[str]:
        buf = self._logs.get(model)
        if buf is None:
            return []
        return list(buf)[-lines:] if lines > 0 else []

    def subscribe_logs(self, model: str, maxsize: int = 10000) -> asyncio.Queue[str]:
        """Every line the model prints from now on (a follower too slow to keep up loses lines)."""
        q: asyncio.Queue[str] = asyncio.Queue(maxsize=maxsize)
        self._log_followers.setdefault(model, []).append(q)
        return q

    def unsubscribe_logs(self, model: str, q: asyncio.Queue[str]) -> None:
        followers = self._log_followers.get(model, [])
        if q in followers:
            followers.remove(q)

    def _publish(self, model: str, line: str) -> None:
        for q in self._log_followers.get(model, ()):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(line)

    # ------------------------------------------------------------ sleep mode
    def _engine(self, model: str) -> sleep_mode.Call:
        """Calls to the model's server, for the sleep-mode protocol (sleep_mode.py)."""
        inst = self._instances.get(model)
        if inst is None or not inst.ready:
            raise LoadError(f"{model} is not running")
        return sleep_mode.http_call(self._http, f"http://{self._host}:{inst.port}")

    async def sleep(self, model: str, level: int) -> None:
        self._logs[model].append(f"--- sleep level {level}")
        await sleep_mode.sleep(self._engine(model), level)

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        self._logs[model].append(f"--- wake up (from level {level})")
        await sleep_mode.wake(self._engine(model), self._models[model].name, level, warmup)

    def pids(self, model: str) -> list[int]:
        inst = self._instances.get(model)
        return procs.group_members(inst.pid) if inst is not None else []

    def running_pids(self) -> list[int]:
        return [inst.pid for inst in self._instances.values()]
