"""LoRA adapters loaded into a running vLLM through its runtime API.

vLLM must run with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1``. Its answers are taken
at their word where they contradict the router's view: "already been loaded" (400) on a load means it
is loaded; 404 on an unload means it is gone. An engine that cannot be reached fails the load with 502.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from vllm_model_router.drivers.base import ExitCallback, LoadError

log = logging.getLogger("vllm_model_router.adapters")
TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=5)


@dataclass(frozen=True, slots=True)
class EngineCards:
    """What an engine's GET /v1/models says: its own models and its adapters (name → path)."""

    bases: list[str]
    adapters: dict[str, str]


async def fetch_models(session: aiohttp.ClientSession, url: str) -> EngineCards:
    """GET {url}/v1/models; raises aiohttp.ClientError/OSError/TimeoutError when unreachable."""
    async with session.get(f"{url}/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        resp.raise_for_status()
        body = await resp.json(content_type=None)
    bases: list[str] = []
    adapters: dict[str, str] = {}
    for card in body.get("data", []) if isinstance(body, dict) else []:
        if not isinstance(card, dict) or not isinstance(card.get("id"), str):
            continue
        if card.get("parent"):
            adapters[card["id"]] = str(card.get("root") or "")
        else:
            bases.append(card["id"])
    return EngineCards(bases, adapters)


def _error_text(body: str) -> str:
    """vLLM's error message from an OpenAI envelope, or the text as it is."""
    import json

    try:
        parsed = json.loads(body)
    except ValueError:
        return body.strip()
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return str(parsed["error"].get("message", body))
    return body.strip()


class LoraDriver:
    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        base_of: Callable[[str], str],
        base_url: Callable[[str], str | None],
        path_of: Callable[[str], str],
        name_of: Callable[[str], str] = lambda unit: unit,
        unreachable: Callable[[str, str], None] = lambda base, error: None,
    ) -> None:
        self._session = session
        self._base_of = base_of
        self._base_url = base_url
        self._path_of = path_of
        self._name_of = name_of  # the adapter's name on the engine (one adapter's copies share it)
        self._unreachable = unreachable  # told when an engine cannot be reached (it may be marked down)
        self._logs: dict[str, deque[str]] = {}

    def set_exit_callback(self, callback: ExitCallback) -> None:
        pass  # adapters do not die on their own; the reconciler notices out-of-band unloads

    def _note(self, model: str, line: str) -> None:
        buf = self._logs.setdefault(model, deque(maxlen=200))
        buf.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}")

    def _url(self, model: str) -> str:
        base = self._base_of(model)
        url = self._base_url(base)
        if url is None:
            raise LoadError(f"base model {base} of adapter {model} is not running")
        return url

    async def start(self, model: str, gpus: tuple[int, ...] = ()) -> None:
        url = self._url(model)
        path = self._path_of(model)
        self._note(model, f"loading {path} on {url}")
        body = {"lora_name": self._name_of(model), "lora_path": path}
        try:
            async with self._session().post(f"{url}/v1/load_lora_adapter", json=body, timeout=TIMEOUT) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._note(model, f"engine unreachable: {e!r}")
            if isinstance(e, aiohttp.ClientConnectorError):
                # no connection at all: first, so that with several engines the engine is down (and the
                # load placed on another) before this load's failure reaches the scheduler
                self._unreachable(self._base_of(model), repr(e))
            raise LoadError(f"cannot reach the vLLM engine at {url}: {e}", status=502) from e
        if status == 200:
            self._note(model, "loaded")
            return
        message = _error_text(text)
        if status == 400 and "already been loaded" in message:
            self._note(model, "already loaded on the engine: taking it as loaded")
            log.info("Adapter %s was already loaded on the engine", model)
            return
        self._note(model, f"load failed ({status}): {message}")
        raise LoadError(f"vLLM refused to load adapter {model} from {path} ({status}): {message}")

    async def stop(self, model: str, force: bool = False) -> None:
        try:
            url = self._url(model)
        except LoadError:
            return  # the base is gone, and the adapter with it
        try:
            async with self._session().post(
                f"{url}/v1/unload_lora_adapter", json={"lora_name": self._name_of(model)}, timeout=TIMEOUT
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._note(model, f"unload: engine unreachable ({e!r}); taking it as gone")
            return
        if status == 200:
            self._note(model, "unloaded")
        elif status == 404:
            self._note(model, "unload: the engine did not have it; taking it as gone")
        else:
            self._note(model, f"unload failed ({status}): {_error_text(text)}")
            log.warning("Unloading adapter %s answered %d: %s", model, status, _error_text(text))

    def endpoint(self, model: str) -> str | None:
        return self._base_url(self._base_of(model))

    def info(self, model: str) -> dict[str, Any]:
        return {"adapter": self._path_of(model), "base": self._base_of(model), "pid": None, "port": None}

    def logs(self, model: str, lines: int) -> list[str]:
        return list(self._logs.get(model, ()))[-lines:] if lines > 0 else []

    def pids(self, model: str) -> list[int]:
        return []

    async def sleep(self, model: str, level: int) -> None:
        raise LoadError("sleep mode is not available for adapters")

    async def wake(self, model: str, level: int, warmup: bool = True) -> None:
        raise LoadError("sleep mode is not available for adapters")

    async def close(self) -> None:
        pass  # adapters live and die with their engine
