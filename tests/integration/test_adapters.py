"""LoRA adapters: endpoint mode (one running vLLM at VLLM_BASE_URL, adapters loaded into it from
ADAPTER_DIR) and adapters on bases the router starts, against the fake engine's emulation of vLLM's
runtime LoRA API."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import MARKER_VAR, Router, engine, free_port, wait_healthy, wait_until

from .conftest import StartRouter


@contextlib.asynccontextmanager
async def fake_vllm(marker: str, port: int | None = None) -> AsyncIterator[str]:
    """A fake engine serving base model "base-llm" with runtime LoRA loading, like the vLLM of endpoint mode."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", str(port), "--served-model-name",
         "base-llm", "--enable-lora"],
        env={**os.environ, MARKER_VAR: marker}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url + "/health", what="the fake vLLM", exited=proc.poll)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def engine_adapters(url: str) -> list[str]:
    async with aiohttp.ClientSession() as s, s.get(url + "/fake/state") as r:
        state: dict[str, Any] = await r.json()
        return sorted(a["name"] if isinstance(a, dict) else a for a in state["adapters"])


async def engine_post(url: str, path: str, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as s, s.post(url + path, json=body) as r:
        await r.read()
        return r.status


async def wait_view(r: Router, name: str, state: str, timeout: float = 5.0) -> dict[str, Any]:
    """Wait for the admin view of ``name`` (which the router may not know yet) to reach ``state``."""
    await wait_until(lambda: any(v.name == name and v.state.value == state for v in r.runtime.views()),
                     timeout, what=f"{name} {state}")
    return await r.model(name)


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    for name in ("sql", "poem", "chef"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
    (tmp_path / "adapters" / "not-a-dir").write_text("x")
    return tmp_path / "adapters"


async def endpoint_router(start_router: StartRouter, url: str, adapter_dir: Path, **kw: Any) -> Router:
    return await start_router({}, capacity={"max_resident": kw.pop("max_resident", 2)},
                              endpoint={"url": url, "adapter_dir": str(adapter_dir), "sync_interval": 0.2}, **kw)


async def test_endpoint_mode_forwards_base_models_and_loads_adapters_on_demand(
    start_router: StartRouter, marker: str, adapter_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vllm_model_router")
    async with fake_vllm(marker) as url:
        r = await endpoint_router(start_router, url, adapter_dir)
        base = await r.chat("base-llm")
        assert base.status == 200 and base.json()["model"] == "base-llm"
        reply = await r.chat("sql")
        assert reply.status == 200, reply.body
        assert reply.json()["model"] == "sql"
        assert await engine_adapters(url) == ["sql"]
        assert f"Loading model {adapter_dir / 'sql'} as served name sql" in caplog.text
        cards = {c["id"]: c for c in (await r.get("/v1/models")).json()["data"]}
        assert cards["base-llm"]["status"] == "loaded" and cards["base-llm"]["parent"] is None
        assert cards["sql"]["status"] == "loaded" and cards["sql"]["parent"] == "base-llm"
        assert cards["chef"]["status"] == "unloaded" and "not-a-dir" not in cards

        # at most max_resident (2) adapters: the least recently used idle one is unloaded
        assert (await r.chat("poem")).status == 200
        assert (await r.chat("sql")).status == 200  # sql is now more recent than poem
        assert (await r.chat("chef")).status == 200
        assert await engine_adapters(url) == ["chef", "sql"]
        assert (await r.model("poem"))["state"] == "unloaded"


async def test_adapter_with_a_request_in_flight_is_never_unloaded(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllm(marker) as url:
        r = await endpoint_router(start_router, url, adapter_dir, max_resident=1, max_wait=30)
        slow = asyncio.create_task(r.chat("sql", fake={"delay": 1.0}))
        await wait_until(lambda: any(v.name == "sql" and v.in_flight == 1 for v in r.runtime.views()),
                         what="sql in flight")
        other = asyncio.create_task(r.chat("poem"))
        # once the router has poem's request, its decision is taken: poem waits, since sql is busy
        await wait_until(lambda: any(v.name == "poem" and v.waiting == 1 for v in r.runtime.views()),
                         what="poem waiting")
        assert await engine_adapters(url) == ["sql"]
        assert (await slow).status == 200
        assert (await other).status == 200
        assert await engine_adapters(url) == ["poem"]


async def test_unknown_and_unsafe_names_are_404_and_never_loaded(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllm(marker) as url:
        r = await endpoint_router(start_router, url, adapter_dir)
        for name in ("nope", "../adapters/sql", "not-a-dir", ".hidden", "sql/../poem"):
            reply = await r.chat(name)
            assert reply.status == 404, (name, reply.body)
            err = reply.error
            assert err["code"] == "model_not_found" and "base-llm" in err["message"] and "sql" in err["message"]
        assert await engine_adapters(url) == []


async def test_out_of_band_loads_and_unloads_are_noticed_and_counted(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllm(marker) as url:
        r = await endpoint_router(start_router, url, adapter_dir)
        # loaded behind the router's back: noticed by the periodic sync
        assert await engine_post(url, "/v1/load_lora_adapter",
                                 {"lora_name": "poem", "lora_path": str(adapter_dir / "poem")}) == 200
        view = await wait_view(r, "poem", "loaded")
        assert view["out_of_band"] == 1
        # an adapter the router has never heard of is adopted too
        assert await engine_post(url, "/v1/load_lora_adapter",
                                 {"lora_name": "extra", "lora_path": str(adapter_dir / "chef")}) == 200
        await wait_view(r, "extra", "loaded")
        # unloaded behind its back: noticed too
        assert await engine_post(url, "/v1/unload_lora_adapter", {"lora_name": "poem"}) == 200
        view = await wait_view(r, "poem", "unloaded")
        assert view["out_of_band"] == 2
        # and the request that finds an adapter gone (404 "does not exist") is retried after a reload
        assert (await r.chat("extra")).status == 200
        assert await engine_post(url, "/v1/unload_lora_adapter", {"lora_name": "extra"}) == 200
        reply = await r.chat("extra")
        assert reply.status == 200, reply.body
        assert "extra" in await engine_adapters(url)


async def test_already_loaded_on_the_engine_counts_as_loaded(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllm(marker) as url:
        r = await start_router({"sql": {"adapter": str(adapter_dir / "sql")}}, capacity={"max_resident": 2},
                               endpoint={"url": url, "sync_interval": 60})
        assert await engine_post(url, "/v1/load_lora_adapter",
                                 {"lora_name": "sql", "lora_path": str(adapter_dir / "sql")}) == 200
        reply = await r.chat("sql")  # the router's load answers 400 "already been loaded"
        assert reply.status == 200, reply.body
        assert (await r.model("sql"))["failures"] == 0


async def test_engine_down_gives_502_and_the_router_recovers_by_itself(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    port = free_port()
    async with fake_vllm(marker, port) as url:
        r = await endpoint_router(start_router, url, adapter_dir)
        assert (await r.chat("sql")).status == 200
    # the engine is gone
    assert (await r.get("/health")).status == 200
    for model in ("base-llm", "poem"):
        reply = await r.chat(model)
        assert reply.status == 502, reply.body
        assert url in reply.error["message"]
    # it comes back (a restart: no adapter loaded any more)
    async with fake_vllm(marker, port):
        await r.wait_state("sql", "unloaded", timeout=5)
        for model in ("base-llm", "sql", "poem"):
            reply = await r.chat(model)
            assert reply.status == 200, (model, reply.body)


# ------------------------------------------------------------- adapters on managed bases
def managed(**base_settings: Any) -> dict[str, Any]:
    return {
        "base": engine("--enable-lora", "--startup-delay", "0.2", **base_settings),
        "other": engine(),
        "sql": {"adapter": "/adapters/sql", "base": "base"},
        "poem": {"adapter": "/adapters/poem", "base": "base", "aliases": ["poet"]},
    }


async def test_adapter_on_a_managed_base_starts_the_base_first(start_router: StartRouter, tmp_path: Path) -> None:
    for name in ("sql", "poem"):
        (tmp_path / name).mkdir()
    models = managed(max_adapters=1)
    models["sql"]["adapter"] = str(tmp_path / "sql")
    models["poem"]["adapter"] = str(tmp_path / "poem")
    r = await start_router(models, capacity={"max_resident": 1})
    reply = await r.chat("sql")
    assert reply.status == 200, reply.body
    assert reply.json()["model"] == "sql"
    base = await r.model("base")
    assert base["state"] == "loaded" and base["last_used"] is not None
    assert (await r.engine_state("base"))["adapters"] and (await r.model("sql"))["state"] == "loaded"
    # max_adapters 1: the next adapter replaces the first on the same base process
    pid = base["pid"]
    reply = await r.chat("poet")
    assert reply.status == 200 and reply.json()["model"] == "poem"
    assert (await r.model("sql"))["state"] == "unloaded"
    assert (await r.model("base"))["pid"] == pid
    # capacity 1: another model evicts the base, and its adapters go with it
    assert (await r.chat("other")).status == 200
    views = await r.models()
    assert views["base"]["state"] == "unloaded" and views["poem"]["state"] == "unloaded"
    # and the adapter brings its base back
    assert (await r.chat("poem")).status == 200
    await wait_until(lambda: r.runtime.state_of("other").value == "unloaded", what="other evicted")
