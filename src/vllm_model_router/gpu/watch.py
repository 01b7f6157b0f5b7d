"""Proof, from the GPU itself, that memory is free before a start and released after a stop.

Declarations and the scheduler's accounting say a model *should* fit; NVML says whether it *does*:
other processes use GPUs too, and a stopped vLLM can hold its memory for seconds (or for ever, if an
orphaned worker survives). Before a start: the placement's GPUs must have the model's need free, or the
load fails with the processes that hold the memory named. After a stop: wait until the model's
processes are gone from NVML's list and the memory is back, bounded; stragglers are killed and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from vllm_model_router.drivers.base import LoadError
from vllm_model_router.gpu.probe import GpuMemory, GpuProbe, GpuProcess, process_name

log = logging.getLogger("vllm_model_router.gpu")
POLL = 0.1


class GpuWatch:
    def __init__(self, probe: GpuProbe, release_timeout: float, our_pids: Callable[[], set[int]],
                 start_wait: float = 5.0) -> None:
        self.probe = probe
        self.release_timeout = release_timeout
        self.start_wait = start_wait  # how long a start waits for memory that is on its way back
        self._our_pids = our_pids

    def devices(self) -> list[GpuMemory]:
        return self.probe.devices()

    def foreign(self, index: int) -> list[GpuProcess]:
        ours = self._our_pids()
        return [p for p in self.probe.processes(index) if p.pid not in ours]

    def _shortfall(self, gpus: tuple[int, ...], need_gb: float) -> list[str]:
        devices = {d.index: d for d in self.devices()}
        problems = []
        for g in gpus:
            d = devices.get(g)
            if d is None:
                problems.append(f"GPU {g} is not there")
            elif d.free_gb + 1e-6 < need_gb:
                others = self.foreign(g)
                held = "; ".join(f"{process_name(p.pid)} {p.used_gb:.1f} GB" for p in others)
                problems.append(
                    f"GPU {g} has {d.free_gb:.1f} GB free of {d.total_gb:.1f} GB, the model needs {need_gb:.1f} GB"
                    + (f"; held by processes the router did not start: {held}" if others else
                       f"; {d.used_gb:.1f} GB in use")
                )
        return problems

    async def ensure_free(self, model: str, gpus: tuple[int, ...], need_gb: float) -> None:
        """Raise LoadError (503) unless every GPU of the placement has ``need_gb`` free, waiting a little
        for memory that is still being released."""
        if not gpus or need_gb <= 0:
            return
        deadline = time.monotonic() + self.start_wait
        while problems := self._shortfall(gpus, need_gb):
            if time.monotonic() >= deadline:
                message = f"not enough free GPU memory to start {model}: " + " | ".join(problems)
                log.error("%s", message)
                raise LoadError(message)
            await asyncio.sleep(POLL)

    def free_gb(self, gpus: tuple[int, ...]) -> dict[int, float]:
        return {d.index: d.free_gb for d in self.devices() if d.index in gpus}

    async def wait_released(self, model: str, gpus: tuple[int, ...], pids: set[int], need_gb: float,
                            free_before: dict[int, float]) -> str | None:
        """Wait until the model's processes are off the GPUs and its memory is back; kill stragglers.
        Returns a report when something was wrong, None when the memory came back in time."""
        if not gpus:
            return None
        deadline = time.monotonic() + self.release_timeout
        expected = {g: min(free_before.get(g, 0.0) + need_gb * 0.9, self._total(g)) for g in gpus}
        while True:
            holding = self._holding(gpus, pids)
            free = self.free_gb(gpus)
            back = all(free.get(g, 0.0) + 1e-6 >= expected[g] for g in gpus)
            if not holding and back:
                return None
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        if holding:
            for p in holding:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p.pid, signal.SIGKILL)
            report = (f"{model}: GPU memory not released {self.release_timeout:g}s after the stop; killed "
                      + ", ".join(f"{process_name(p.pid)} holding {p.used_gb:.1f} GB" for p in holding))
        else:
            report = (f"{model}: its processes are gone but GPU memory did not come back within "
                      f"{self.release_timeout:g}s (free now: "
                      + ", ".join(f"GPU {g} {gb:.1f} GB" for g, gb in self.free_gb(gpus).items()) + ")")
        log.error("%s", report)
        return report

    def _holding(self, gpus: tuple[int, ...], pids: set[int]) -> list[GpuProcess]:
        return [p for g in gpus for p in self.probe.processes(g) if p.pid in pids]

    def _total(self, g: int) -> float:
        return next((d.total_gb for d in self.devices() if d.index == g), 0.0)

    def _usage(self, reserved: dict[int, float]) -> list[tuple[GpuMemory, list[GpuProcess], float, float]]:
        """Per GPU: the device, the processes the router did not start, GB used by the router's processes,
        GB used by others (without a process list, as in some sandboxes: whatever is in use beyond what
        the router's models reserve)."""
        ours = self._our_pids()
        out = []
        for d in self.devices():
            procs = self.probe.processes(d.index)
            others = [p for p in procs if p.pid not in ours]
            ours_used = sum(p.used_gb for p in procs if p.pid in ours)
            others_gb = sum(p.used_gb for p in others) if procs else max(0.0, d.used_gb - reserved.get(d.index, 0.0))
            out.append((d, others, ours_used, others_gb))
        return out

    def foreign_gb(self, reserved: dict[int, float]) -> dict[int, float]:
        """GB per GPU held by processes the router did not start."""
        return {d.index: others_gb for d, _, _, others_gb in self._usage(reserved)}

    def view(self, budgets: dict[int, float], reserved: dict[int, float]) -> list[dict[str, Any]]:
        out = []
        for d, others, ours_used, others_gb in self._usage(reserved):
            out.append({
                "index": d.index, "name": d.name, "total_gb": round(d.total_gb, 3),
                "budget_gb": round(budgets.get(d.index, 0.0), 3), "reserved_gb": round(reserved.get(d.index, 0.0), 3),
                "used_by_router_gb": round(ours_used, 3), "used_by_others_gb": round(others_gb, 3),
                "free_gb": round(d.free_gb, 3),
                "others": [{"pid": p.pid, "process": process_name(p.pid), "used_gb": round(p.used_gb, 3)}
                           for p in others],
            })
        return out
