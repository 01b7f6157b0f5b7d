"""The one running vLLM of endpoint mode: always there as far as the router is concerned, never started
or stopped by it. Whether it answers is found out per request (502) and by the reconciler."""

from __future__ import annotations

from typing import Any

from vllm_model_router.drivers.base import ExitCallback, LoadError


class EndpointDriver:
    def __init__(self, url: str) -> None:
        self.url = url
        self.reachable: bool | None = None  # None: not checked yet
        self.last_error: str | None = None
        self.down_since: float | None = None  # when it was last found unreachable (event loop clock)

    def set_exit_callback(self, callback: ExitCallback) -> None:
        pass

    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        pass

    async def stop(self, model: str, force: bool = False) -> None:
        pass

    def endpoint(self, model: str) -> str | None:
        return self.url

    def info(self, model: str) -> dict[str, Any]:
        return {"url": self.url, "reachable": self.reachable, "pid": None, "port": None}

    def logs(self, model: str, lines: int) -> list[str]:
        return []

    def pids(self, model: str) -> list[int]:
        return []

    async def sleep(self, model: str, level: int) -> None:
        raise LoadError("sleep mode is not available for the external engine")

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        raise LoadError("sleep mode is not available for the external engine")

    async def close(self) -> None:
        pass
