"""Dispatch the driver protocol to the driver that owns each model (process, adapter, endpoint)."""

from __future__ import annotations

import asyncio
from typing import Any

from vllm_model_router.drivers.base import Driver, ExitCallback


class MultiDriver:
    def __init__(self) -> None:
        self._by_model: dict[str, Driver] = {}
        self._drivers: list[Driver] = []

    def add(self, driver: Driver, models: list[str]) -> None:
        if driver not in self._drivers:
            self._drivers.append(driver)
        for m in models:
            self._by_model[m] = driver

    def driver_of(self, model: str) -> Driver:
        return self._by_model[model]

    def set_exit_callback(self, callback: ExitCallback) -> None:
        for d in self._drivers:
            d.set_exit_callback(callback)

    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        await self._by_model[model].start(model, gpus)

    async def stop(self, model: str, force: bool = False) -> None:
        await self._by_model[model].stop(model, force)

    def endpoint(self, model: str) -> str | None:
        d = self._by_model.get(model)
        return d.endpoint(model) if d is not None else None

    def info(self, model: str) -> dict[str, Any]:
        d = self._by_model.get(model)
        return d.info(model) if d is not None else {}

    def logs(self, model: str, lines: int) -> list[str]:
        d = self._by_model.get(model)
        return d.logs(model, lines) if d is not None else []

    def pids(self, model: str) -> list[int]:
        d = self._by_model.get(model)
        return d.pids(model) if d is not None else []

    async def sleep(self, model: str, level: int) -> None:
        await self._by_model[model].sleep(model, level)

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        await self._by_model[model].wake(model, level, warmup)

    async def close(self) -> None:
        await asyncio.gather(*(d.close() for d in self._drivers), return_exceptions=True)
