"""Restart recovery: no model server outlives a router crash unnoticed.

Every process group the process driver starts is recorded — leader pid, its start time (field 22 of
/proc/<pid>/stat), model, port, a hash of the resolved command and environment — in a small JSON file in
``state_dir`` (written atomically: a temporary file, then ``rename``), and removed once the group is gone.
A router that stops normally leaves nothing recorded. After a crash or ``kill -9``, the next router (same
``state_dir``) settles each record before it serves anything:

- the leader is gone and so is its group: the record is dropped;
- the leader's pid now belongs to another process (another start time): the record is dropped and that
  process is never touched;
- the leader is gone but members of its group or session are alive (vLLM's EngineCore outlives its API
  server): they are stopped;
- the group is alive, its model is still configured with the same command and environment, it answers
  its ``health_path`` (and is awake, for a model with sleep mode), and it fits the capacity: it is
  **adopted** — a loaded model on its recorded port (lifecycle event ``adopted``); its output goes on to
  ``state_dir/logs/<model>.log``, where the process driver follows it as the previous router did;
- otherwise the whole group is stopped (SIGTERM, SIGKILL after the model's ``stop_timeout``; lifecycle
  event ``orphan_stopped``) before the router takes any request, so its GPU memory is free again.

With GPUs detected (NVML), an adopted model keeps the GPUs it was started on (recorded with it), and it
must fit their budgets next to the others adopted. A lock file (``flock``) keeps two routers from sharing
one ``state_dir``: the second runs without recovery and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from vllm_model_router.config import DEFAULT_STOP_TIMEOUT, ModelConfig
from vllm_model_router.drivers import procs
from vllm_model_router.drivers.process import ProcessDriver
from vllm_model_router.runtime.pump import Runtime
from vllm_model_router.scheduler import ModelFound
from vllm_model_router.state.lifecycle import EventKind

log = logging.getLogger("vllm_model_router.recovery")
STATE_FILE = "process-groups.json"
LOCK_FILE = "router.lock"
LOG_DIR = "logs"  # the model servers' output files, which outlive the router that started them
HEALTH_TIMEOUT_S = 2.0
VERSION = 1


def config_hash(cfg: ModelConfig, port: int, gpus: tuple[int, ...]) -> str:
    """What the group was started with: the command as executed and the environment the config adds."""
    env = dict(cfg.env)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    payload = json.dumps({"argv": cfg.argv(port), "env": sorted(env.items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class GroupRecord:
    model: str
    pid: int  # the leader, whose pid is also the process group and session id
    start_time: int  # /proc/<pid>/stat field 22: with the pid, names this process and no later one
    port: int
    config_hash: str
    gpus: tuple[int, ...] = ()
    started_at: float = 0.0  # Unix time, for humans

    @classmethod
    def parse(cls, raw: object) -> GroupRecord | None:
        if not isinstance(raw, dict):
            return None
        try:
            return cls(model=str(raw["model"]), pid=int(raw["pid"]), start_time=int(raw["start_time"]),
                       port=int(raw["port"]), config_hash=str(raw["config_hash"]),
                       gpus=tuple(int(g) for g in raw.get("gpus", ())), started_at=float(raw.get("started_at", 0)))
        except (KeyError, TypeError, ValueError):
            return None


class StateFile:
    """``state_dir/process-groups.json``, owned by one router at a time (``state_dir/router.lock``)."""

    def __init__(self, directory: Path, lock_fd: int) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self._lock_fd: int | None = lock_fd

    @classmethod
    def acquire(cls, directory: Path) -> StateFile | None:
        """The state file, locked for this process; None when another live router holds it."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return cls(directory, fd)

    def read(self) -> list[GroupRecord]:
        try:
            data: Any = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): process groups a previous router left are unknown", self.path, e)
            return []
        groups = data.get("groups", []) if isinstance(data, dict) else []
        records = [GroupRecord.parse(g) for g in groups] if isinstance(groups, list) else []
        return [r for r in records if r is not None]

    def write(self, records: list[GroupRecord]) -> None:
        """Atomically: readers (and a crash) see the old content or the new one, never a mix."""
        if not records:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        payload = {"version": VERSION, "router_pid": os.getpid(), "groups": [asdict(r) for r in records]}
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, self.path)

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None


class GroupRecorder:
    """The process driver's observer: keeps the state file equal to the groups that are alive."""

    def __init__(self, state: StateFile, models: Mapping[str, ModelConfig], records: list[GroupRecord]) -> None:
        self._state = state
        self._models = models
        self.records: dict[int, GroupRecord] = {r.pid: r for r in records}

    def started(self, model: str, pid: int, port: int, gpus: tuple[int, ...]) -> None:
        start = procs.start_time(pid)
        if start is None:  # gone already: nothing to find after a crash
            return
        self.records[pid] = GroupRecord(model, pid, start, port, config_hash(self._models[model], port, gpus),
                                        gpus, time.time())
        self.save()

    def gone(self, model: str, pid: int) -> None:
        if self.records.pop(pid, None) is not None:
            self.save()

    def save(self) -> None:
        try:
            self._state.write(sorted(self.records.values(), key=lambda r: r.started_at))
        except OSError as e:
            log.error("cannot write %s: %s (a router crash now would leave its models unknown)", self._state.path, e)


def process_driver(driver: object, models: Mapping[str, ModelConfig]) -> ProcessDriver | None:
    """The process driver behind ``driver`` (itself, or the one a MultiDriver dispatches models to)."""
    if isinstance(driver, ProcessDriver):
        return driver
    driver_of = getattr(driver, "driver_of", None)
    if callable(driver_of):
        for name, m in models.items():
            with contextlib.suppress(KeyError):
                inner = driver_of(name)
                if not m.is_adapter and isinstance(inner, ProcessDriver):
                    return inner
    return None


class Recovery:
    """Owns the state file while the router runs; ``open`` settles what a previous router left."""

    def __init__(self, state: StateFile | None = None) -> None:
        self.state = state
        self.adopted: list[str] = []
        self.stopped: list[str] = []

    @classmethod
    async def open(cls, runtime: Runtime) -> Recovery:
        config = runtime.config
        driver = process_driver(runtime.driver, config.units())
        if config.state_dir is None or driver is None:
            return cls()
        directory = Path(config.state_dir)
        try:
            state = StateFile.acquire(directory)
        except OSError as e:
            log.warning("cannot use state_dir %s (%s): restart recovery is off", directory, e.strerror or e)
            return cls()
        if state is None:
            log.warning("state_dir %s is in use by another router process: restart recovery is off for this one "
                        "(give each router its own state_dir)", directory)
            return cls()
        recovery = cls(state)
        driver.use_log_dir(directory / LOG_DIR)  # only the router holding the lock: the files are per model
        try:
            kept = await recovery._settle(runtime, driver, state.read())
        except BaseException:
            state.release()
            raise
        recorder = GroupRecorder(state, driver_models(driver, config.units()), kept)
        recorder.save()
        driver.observer = recorder
        return recovery

    def close(self) -> None:
        if self.state is not None:
            self.state.release()
            self.state = None

    async def _settle(self, runtime: Runtime, driver: ProcessDriver, records: list[GroupRecord]) -> list[GroupRecord]:
        """Adopt or stop each recorded group that is still alive; return the records to keep (adopted)."""
        adopt: list[GroupRecord] = []
        stop: list[tuple[GroupRecord, str]] = []
        resident_gb = 0.0
        for r in sorted(records, key=lambda r: r.started_at):
            leader_start = procs.start_time(r.pid)
            if leader_start is None:
                left = [p for p in procs.group_members(r.pid) if (procs.start_time(p) or 0) >= r.start_time]
                if left:
                    stop.append((r, f"its server (pid {r.pid}) is gone but processes {left} of its group are not"))
                continue
            if leader_start != r.start_time:
                log.info("pid %d of %s's recorded server now belongs to another process: leaving it alone",
                         r.pid, r.model)
                continue
            reason = await self._cannot_adopt(runtime, driver, r, adopt, resident_gb)
            if reason is None:
                adopt.append(r)
                resident_gb += runtime.gpus.needs[r.model].gb if r.model in runtime.gpus.needs else 0.0
            else:
                stop.append((r, reason))
        await asyncio.gather(*(self._stop(runtime, r, reason) for r, reason in stop))
        for r in adopt:
            driver.adopt(r.model, r.pid, r.port)
            log.info("Adopted model %s left running by a previous router: pid %d on port %d", r.model, r.pid, r.port)
            runtime.events.emit(EventKind.ADOPTED, r.model, "left running by a previous router process", pid=r.pid,
                                port=r.port)
            runtime.submit(ModelFound(r.model, r.gpus))
            self.adopted.append(r.model)
        return adopt

    async def _cannot_adopt(self, runtime: Runtime, driver: ProcessDriver, r: GroupRecord,
                            adopted: list[GroupRecord], resident_gb: float) -> str | None:
        """Why the live group ``r`` is not adopted, or None when it is."""
        config = runtime.config
        needs, budgets = runtime.gpus.needs, runtime.gpus.budgets
        units = config.units()  # a replica keeps its identity: chat@1 is adopted as chat@1
        cfg = units.get(r.model)
        if cfg is None or cfg.is_adapter or r.model not in driver_models(driver, units):
            return "its model is no longer configured"
        if any(a.model == r.model for a in adopted):
            return "another server of the same model is adopted"
        if config_hash(cfg, r.port, r.gpus) != r.config_hash:
            return "its model's command or environment changed"
        if budgets is not None:
            if not r.gpus or any(g not in budgets for g in r.gpus):
                return f"it was started on GPUs {list(r.gpus)}, which this machine does not have"
            need_gb = needs[r.model].gb if r.model in needs else 0.0
            for g in r.gpus:
                held = sum(needs[a.model].gb for a in adopted if g in a.gpus and a.model in needs)
                if held + need_gb > budgets[g] + 1e-9:
                    return f"GPU {g}'s budget ({budgets[g]:.1f} GB) would be exceeded"
        if len(adopted) >= config.max_resident:
            return f"capacity.max_resident ({config.max_resident}) is reached"
        need = needs[r.model].gb if r.model in needs else 0.0
        if config.memory_gb is not None and resident_gb + need > config.memory_gb:
            return f"capacity.memory_gb ({config.memory_gb:g} GB) would be exceeded"
        problem = await _health_problem(r, cfg)
        return problem

    async def _stop(self, runtime: Runtime, r: GroupRecord, reason: str) -> None:
        cfg = runtime.config.units().get(r.model)
        timeout = cfg.stop_timeout if cfg is not None and not cfg.is_adapter else DEFAULT_STOP_TIMEOUT
        log.warning("Stopping the process group %d of model %s left by a previous router: %s", r.pid, r.model, reason)
        killed = await procs.terminate_group(r.pid, timeout)
        if killed:
            log.warning("Process group %d: pids %s ignored SIGTERM for %.0fs and were killed", r.pid, killed, timeout)
        if procs.group_members(r.pid):
            log.error("Process group %d of %s survives SIGKILL: %s", r.pid, r.model, procs.group_members(r.pid))
        runtime.events.emit(EventKind.ORPHAN_STOPPED, r.model, reason, pid=r.pid, port=r.port)
        self.stopped.append(r.model)


def driver_models(driver: ProcessDriver, models: Mapping[str, ModelConfig]) -> dict[str, ModelConfig]:
    """The configured models the process driver starts."""
    return {name: m for name, m in models.items() if not m.is_adapter and driver.manages(name)}


async def _health_problem(r: GroupRecord, cfg: ModelConfig) -> str | None:
    """None when the server answers its health check (and, with sleep mode, says it is awake)."""
    base = f"http://127.0.0.1:{r.port}"
    timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(base + cfg.health_path) as resp:
                if resp.status != 200:
                    return f"its health check answered {resp.status}"
            if getattr(cfg, "sleep_level", 0):
                async with session.get(base + "/is_sleeping") as resp:
                    body: Any = await resp.json(content_type=None) if resp.status == 200 else None
                    if not isinstance(body, dict) or body.get("is_sleeping") is not False:
                        return "it is asleep (or does not say it is awake)"
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
        return f"its health check failed: {e!r}"
    return None
