"""Endpoint mode with several engines: two fake vLLMs behind one router (``endpoint.urls``). Requests for
the engines' own model are balanced over them, adapters go to an engine with a free slot, an engine that
dies is routed around (a request that never reached it is retried on the other) and rejoins when it
answers again, and with every engine down a request fails at once, not after load_timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import MARKER_VAR, Router, free_port, wait_healthy, wait_until

from .conftest import StartRouter, StartRouterProcess

E0, E1 = "@engine", "@engine@1"
SYNC = 0.3  # the router's sync_interval: an engine that answers again rejoins within a few of these


@dataclass
class FakeVllm:
    """A fake engine serving ``names`` (the first is its model) with runtime LoRA loading, on a port that
    outlives it (so that it can be killed and started again where the router expects it)."""

    marker: str
    port: int
    names: tuple[str, ...] = ("base-llm",)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_model_router.testing.fake_engine", "--port", str(self.port),
             "--served-model-name", *self.names, "--enable-lora"],
            env={**os.environ, MARKER_VAR: self.marker}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        await wait_healthy(self.url + "/health", what=f"the fake vLLM on {self.port}", exited=self.proc.poll)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: connections refused from now on."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    async def state(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.url + "/fake/state") as r:
            state: dict[str, Any] = await r.json()
            return state

    async def adapters(self) -> list[str]:
        return sorted(a["name"] if isinstance(a, dict) else a for a in (await self.state())["adapters"])

    async def served(self) -> int:
        return int((await self.state())["requests_served"])


@contextlib.asynccontextmanager
async def fake_vllms(marker: str, *names: tuple[str, ...]) -> AsyncIterator[list[FakeVllm]]:
    """Fake engines serving ``names`` each (default: two serving "base-llm")."""
    engines = [FakeVllm(marker, free_port(), n) for n in names or (("base-llm",), ("base-llm",))]
    try:
        await asyncio.gather(*(e.start() for e in engines))
        yield engines
    finally:
        for e in engines:
            e.kill()


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    for name in ("x", "y"):
        (tmp_path / "adapters" / name).mkdir(parents=True)
    return tmp_path / "adapters"


async def engines_router(start_router: StartRouter, engines: list[FakeVllm], adapter_dir: Path,
                         **kw: Any) -> Router:
    return await start_router({}, capacity={"max_resident": kw.pop("max_resident", 2)},
                               endpoint={"urls": [e.url for e in engines], "adapter_dir": str(adapter_dir),
                                         "sync_interval": SYNC}, **kw)


async def engine_states(r: Router) -> dict[str, str]:
    """Each engine's state, as GET /admin/models shows it (the replicas of the model "@engine")."""
    return {unit["name"]: unit["state"] for unit in (await r.model(E0))["replicas"]}


def engine_unit(engines: list[FakeVllm], engine: FakeVllm) -> str:
    """The scheduler's name of ``engine``: ``@engine``, ``@engine@1``, ... in the order of ``urls``."""
    return E0 if engines.index(engine) == 0 else f"{E0}@{engines.index(engine)}"


async def test_requests_for_the_engines_model_are_spread_over_both(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker) as engines:
        r = await engines_router(start_router, engines, adapter_dir)
        replies = await asyncio.gather(*(r.chat("base-llm", fake={"delay": 0.2}) for _ in range(20)))
        assert [x.status for x in replies] == [200] * 20, [x.body for x in replies if x.status != 200]
        assert all(x.json()["model"] == "base-llm" for x in replies)
        served = [await e.served() for e in engines]
        assert sum(served) == 20 and min(served) >= 5, served  # fewest outstanding: about half each


async def test_a_second_adapter_goes_to_the_other_engine_without_evicting_the_first(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker) as engines:
        r = await engines_router(start_router, engines, adapter_dir, max_resident=1)  # one slot per engine
        reply = await r.chat("x")
        assert reply.status == 200 and reply.json()["model"] == "x", reply.body
        held = [await e.adapters() for e in engines]
        assert sorted(held) == [[], ["x"]], held
        x_on = held.index(["x"])
        reply = await r.chat("y")
        assert reply.status == 200 and reply.json()["model"] == "y", reply.body
        assert await engines[x_on].adapters() == ["x"]  # not evicted: y went where a slot was free
        assert await engines[1 - x_on].adapters() == ["y"]
        # both stay where they are: each request goes to its adapter's engine
        before = [await e.served() for e in engines]
        for name in ("x", "y", "x"):
            assert (await r.chat(name)).status == 200
        after = [await e.served() for e in engines]
        assert after[x_on] - before[x_on] == 2 and after[1 - x_on] - before[1 - x_on] == 1
        cards = {c["id"]: c for c in (await r.get("/v1/models")).json()["data"]}
        assert cards["x"]["status"] == "loaded" and cards["y"]["status"] == "loaded"


async def test_a_killed_engine_loses_no_request_and_rejoins_when_it_is_back(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker) as engines:
        r = await engines_router(start_router, engines, adapter_dir)
        assert (await r.chat("x")).status == 200
        held = [await e.adapters() for e in engines]
        doomed, survivor = (engines[0], engines[1]) if held[0] == ["x"] else (engines[1], engines[0])
        assert await doomed.adapters() == ["x"] and await survivor.adapters() == [], held
        stop = asyncio.Event()
        statuses: list[int] = []
        failed: list[tuple[str, bytes]] = []

        async def client(model: str, concurrent: int) -> None:
            while not stop.is_set():
                replies = await asyncio.gather(*(r.chat(model, fake={"delay": 0.1}) for _ in range(concurrent)))
                statuses.extend(x.status for x in replies)
                failed.extend((model, x.body) for x in replies if x.status != 200)

        clients = [asyncio.create_task(client(m, n)) for m, n in (("base-llm", 1), ("base-llm", 1),
                                                                   ("base-llm", 4), ("x", 1))]
        # killed with requests in flight on it: they are sent again, to the other engine
        await wait_until(lambda: len(statuses) >= 10, what="requests before the kill")
        async def busy() -> bool:
            return int((await doomed.state())["in_flight"]) >= 2

        await wait_until(busy, interval=0.005, what="requests in flight on the engine to kill")
        killed_at = len(statuses)
        doomed.kill()
        await wait_until(lambda: len(statuses) >= killed_at + 30, what="requests after the kill")
        stop.set()
        await asyncio.gather(*clients)
        assert not failed, failed[:3]
        assert set(statuses) == {200}

        down = [e for e in await r.events() if e["kind"] == "engine_down"]
        assert [(e["model"], e["data"]["url"]) for e in down] == [(engine_unit(engines, doomed), doomed.url)]
        # the engines are the replicas of one "@engine" in /admin/models: the one that is down is failed
        dead, alive = engine_unit(engines, doomed), engine_unit(engines, survivor)
        assert await engine_states(r) == {dead: "failed", alive: "loaded"}
        assert (await r.model(E0))["state"] == "loaded"  # the engines together still serve
        assert await survivor.adapters() == ["x"]  # x went with its engine and was loaded on the other
        # while it is down everything goes to the other engine
        before = await survivor.served()
        replies = await asyncio.gather(*(r.chat("base-llm") for _ in range(6)))
        assert [x.status for x in replies] == [200] * 6
        assert await survivor.served() - before == 6

        await doomed.start()  # on the same port: the sync notices that it answers again
        await wait_until(lambda: r.runtime.state_of(dead).value == "loaded", SYNC * 6, what="the engine rejoins")
        assert await engine_states(r) == {dead: "loaded", alive: "loaded"}
        up = [e for e in await r.events() if e["kind"] == "engine_up"]
        assert [(e["model"], e["data"]["url"]) for e in up] == [(dead, doomed.url)]
        replies = await asyncio.gather(*(r.chat("base-llm", fake={"delay": 0.2}) for _ in range(8)))
        assert [x.status for x in replies] == [200] * 8
        assert await doomed.served() > 0


async def test_with_every_engine_down_a_request_gets_502_at_once(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker) as engines:
        r = await engines_router(start_router, engines, adapter_dir, load_timeout=20)
        assert (await r.chat("base-llm")).status == 200
        for e in engines:
            e.kill()
        for model in ("base-llm", "x", "base-llm", "y", "x"):
            started = time.monotonic()
            reply = await r.chat(model)
            elapsed = time.monotonic() - started
            assert reply.status == 502, (model, reply.body)
            assert reply.error["type"] and reply.error["message"]
            assert elapsed < 5, (model, elapsed)  # not a wait for load_timeout (20s)
        # they come back: both serve again, and the adapters load again
        for e in engines:
            await e.start()
        await wait_until(lambda: all(r.runtime.state_of(u).value == "loaded" for u in (E0, E1)), SYNC * 6,
                         what="both engines rejoin")
        for model in ("base-llm", "x", "y"):
            reply = await r.chat(model)
            assert reply.status == 200, (model, reply.body)


async def test_a_model_only_one_engine_serves_goes_only_there(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker, ("base-llm",), ("base-llm", "extra-llm")) as engines:
        r = await engines_router(start_router, engines, adapter_dir)
        replies = await asyncio.gather(*(r.chat("extra-llm", fake={"delay": 0.1}) for _ in range(6)))
        assert [x.status for x in replies] == [200] * 6
        assert [await e.served() for e in engines] == [0, 6]
        cards = {c["id"] for c in (await r.get("/v1/models")).json()["data"]}
        assert {"base-llm", "extra-llm", "x", "y"} <= cards
        # the only engine that serves it is down: 502 at once, while the other engine's model still works
        engines[1].kill()
        await wait_until(lambda: r.runtime.state_of(E1).value == "failed", SYNC * 6, what="the engine is down")
        started = time.monotonic()
        reply = await r.chat("extra-llm")
        assert reply.status == 502 and time.monotonic() - started < 2, reply.body
        assert "no vLLM engine that serves" in reply.error["message"]
        assert (await r.chat("base-llm")).status == 200


async def test_several_engines_from_the_environment(
    start_router_process: StartRouterProcess, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker) as engines:
        # $VLLM_BASE_URL with commas lists the engines (blanks around the commas ignored)
        r = await start_router_process({}, env={"VLLM_BASE_URL": f"{engines[0].url}/v1 , {engines[1].url}",
                                                "ADAPTER_DIR": str(adapter_dir)},
                                       endpoint={"sync_interval": SYNC})
        assert sorted(await engine_states(r)) == [E0, E1]
        replies = await asyncio.gather(*(r.chat("base-llm", fake={"delay": 0.2}) for _ in range(8)))
        assert [x.status for x in replies] == [200] * 8
        assert min([await e.served() for e in engines]) >= 2
        assert (await r.chat("x")).status == 200
        assert sorted([await e.adapters() for e in engines]) == [[], ["x"]]


async def test_an_adapter_load_on_an_engine_nobody_knows_is_dead_goes_to_the_other(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    async with fake_vllms(marker) as engines:
        r = await start_router({}, capacity={"max_resident": 2},  # no sync will notice: the load finds out
                               endpoint={"urls": [e.url for e in engines], "adapter_dir": str(adapter_dir),
                                         "sync_interval": 60})
        engines[0].kill()  # the first engine, where an adapter goes when both have room
        reply = await r.chat("y")
        assert reply.status == 200, reply.body
        assert await engines[1].adapters() == ["y"]
        assert await engine_states(r) == {E0: "failed", E1: "loaded"}


async def test_a_request_whose_engine_dies_while_working_on_it_is_answered_by_the_other(
    start_router: StartRouter, marker: str, adapter_dir: Path
) -> None:
    """Not only a refused connection: an engine that dies with the request in hand has sent nothing back
    either, so the request is tried once on the other engine (never on the same one again)."""
    async with fake_vllms(marker) as engines:
        r = await engines_router(start_router, engines, adapter_dir)
        first = asyncio.create_task(r.chat("base-llm", fake={"delay": 1.0}))
        second = asyncio.create_task(r.chat("base-llm", fake={"delay": 1.0}))
        await wait_until(lambda: all(e.proc is not None for e in engines), 5)
        await asyncio.sleep(0.4)  # both in hand, one on each engine (fewest outstanding)
        engines[1].kill()
        replies = await asyncio.gather(first, second)
        assert [x.status for x in replies] == [200, 200], [x.body for x in replies]
        assert await engines[0].served() == 2
