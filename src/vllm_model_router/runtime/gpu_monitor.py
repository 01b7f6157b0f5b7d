"""What the router knows of GPU memory: each model's need, each GPU's budget and, with NVML, what the
GPUs really hold.

With NVML, the memory other processes hold is read every ``INTERVAL`` seconds and handed to the
scheduler (``GpuUsage``), so it never plans with memory someone else took; a load first checks that its
GPUs have the memory free, and a stop waits until the memory is back (``memory_not_released`` when it
does not come back in time). Without NVML, memory is accounted from the declarations only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from vllm_model_router.config import ConfigError, RouterConfig
from vllm_model_router.drivers import procs
from vllm_model_router.gpu.memory import check_fit, gpu_budgets, resolve_needs, weights_need
from vllm_model_router.gpu.probe import GpuProbe
from vllm_model_router.gpu.watch import GpuWatch
from vllm_model_router.runtime.base import Pump
from vllm_model_router.scheduler import GpuUsage

log = logging.getLogger("vllm_model_router.runtime")


class GpuMonitor:
    INTERVAL = 2.0  # seconds between two looks at what other processes hold on the GPUs

    def __init__(self, config: RouterConfig, probe: GpuProbe | None, pump: Pump) -> None:
        """Raises ConfigError when the configured models cannot fit the GPUs found."""
        self.probe = probe
        self._pump = pump
        devices = probe.devices() if probe is not None else []
        if probe is None:
            log.info("No NVIDIA GPU found (NVML unavailable): accounting memory from declarations only")
        else:
            log.info("GPUs: %s", ", ".join(f"{d.index}: {d.name} {d.total_gb:.1f} GB" for d in devices))
        self.needs = resolve_needs(config, devices)
        self.weights = {n: weights_need(m, self.needs[n]) for n, m in config.models.items() if m.sleep_level}
        for unit, m in config.units().items():  # every replica needs what its model does
            if m.name in self.needs:
                self.needs.setdefault(unit, self.needs[m.name])
            if m.name in self.weights:
                self.weights.setdefault(unit, self.weights[m.name])
        self.budgets = gpu_budgets(config, devices)
        problems = check_fit(config, devices, self.needs)
        if problems:
            raise ConfigError(problems)
        self.watch = GpuWatch(probe, config.release_timeout, self._our_pids) if probe is not None else None
        self._foreign: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def measured(self) -> bool:
        """Memory is measured per GPU (NVML), not only declared."""
        return self.probe is not None

    def start(self) -> None:
        if self.watch is not None:
            self._note_foreign_usage()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="gpu-usage")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def view(self) -> list[dict[str, Any]]:
        """Per GPU: total, budget, reserved by resident models, used by others, free (empty without GPUs)."""
        if self.watch is None or self.budgets is None:
            return []
        return self.watch.view(self.budgets, self._reserved_gb())

    # ------------------------------------------------------- around loads and stops
    async def ensure_free(self, model: str, gpus: tuple[int, ...]) -> None:
        """Before a load: raise LoadError unless the model's GPUs have its memory free."""
        if self.watch is not None and model in self.needs:
            await self.watch.ensure_free(model, gpus, self.needs[model].gb)

    def free_before_stop(self, model: str, gpus: tuple[int, ...]) -> dict[int, float] | None:
        """What is free on ``gpus`` before ``model`` stops; None when its memory is not watched."""
        if self.watch is None or not gpus or model not in self.needs:
            return None
        return self.watch.free_gb(gpus)

    async def wait_released(self, model: str, gpus: tuple[int, ...], pids: set[int],
                            free_before: dict[int, float] | None) -> str | None:
        """After a stop: wait until the model's memory is back (see GpuWatch); a report when it is not."""
        if self.watch is None or free_before is None:
            return None
        return await self.watch.wait_released(model, gpus, pids, self.needs[model].gb, free_before)

    # ------------------------------------------------------- other processes' usage
    def _our_pids(self) -> set[int]:
        """Every live process of every model the router started (one pass over the process table, not
        one per model: this runs every INTERVAL on the event loop)."""
        driver = self._pump.driver
        leaders = [pid for v in self._pump.views() if not v.external
                   if isinstance(pid := driver.info(v.name).get("pid"), int)]
        return set(procs.members_of_groups(leaders))

    def _reserved_gb(self) -> dict[int, float]:
        reserved: dict[int, float] = {g: 0.0 for g in self.budgets or {}}
        for v in self._pump.views():
            if v.resident:
                for g in v.gpus:
                    reserved[g] = reserved.get(g, 0.0) + v.memory_gb
        return reserved

    def _note_foreign_usage(self) -> None:
        """Tell the scheduler what others hold on each GPU (changes under half a GB are ignored)."""
        if self.watch is None:
            return
        foreign = {g: round(gb * 2) / 2 for g, gb in self.watch.foreign_gb(self._reserved_gb()).items()}
        if foreign != self._foreign:
            self._foreign = foreign
            self._pump.submit(GpuUsage(tuple(sorted(foreign.items()))))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            try:
                self._note_foreign_usage()
            except Exception:  # NVML hiccups must not end the loop
                log.exception("reading GPU usage failed")
