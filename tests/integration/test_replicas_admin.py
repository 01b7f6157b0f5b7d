"""A replicated model as operators and clients see it: one admin entry with its replicas inside, one card in
/v1/models, metrics per replica, the scale route and the status command; against a router (in this event
loop) whose model ``chat`` keeps two replicas from startup (each a fake-engine process of its own)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.harness import Router, engine, launch_router
from vllm_model_router.admin_cli import status_table
from vllm_model_router.cli import main
from vllm_model_router.http.metrics import families

REPLICAS = {"min": 2, "max": 3, "target_in_flight": 8}
LOAD_S = 30.0  # two cores shared by several fake engines: a cold start can take a few seconds


@contextlib.asynccontextmanager
async def replicated_router(marker: str) -> AsyncIterator[Router]:
    """``chat`` (min 2, max 3, alias ``c``) and ``solo`` (no replicas), both on the fake engine; returns once
    the two replicas ``chat`` keeps are loaded."""
    models = {"chat": engine(memory_gb=10, aliases=["c"], replicas=REPLICAS), "solo": engine(memory_gb=5)}
    async with launch_router(models, marker, capacity={"max_resident": 4}) as r:
        await r.wait_model("chat", lambda m: [u["state"] for u in m.get("replicas", [])] ==
                           ["loaded", "loaded", "unloaded"], LOAD_S, "chat and chat@1 loaded at startup")
        yield r


def metric(text: str, name: str, **labels: str) -> list[float]:
    """The values of the samples of ``name`` whose labels include ``labels``."""
    return [v for n, lab, v in families(text) if n == name and labels.items() <= lab.items()]


async def test_a_replicated_model_is_one_entry_one_card_and_one_metric_model(marker: str) -> None:
    async with replicated_router(marker) as r:
        reply = await r.get("/admin/models")
        assert reply.status == 200
        data = reply.json()
        assert [m["name"] for m in data["models"]] == ["chat", "solo"]
        chat, solo = data["models"]
        assert chat["state"] == "loaded" and chat["resident"] is True
        assert chat["aliases"] == ["c"] and chat["kind"] == "process"
        assert "pid" not in chat and "port" not in chat  # each replica has its own
        assert chat["loads"] == 2 and chat["in_flight"] == 0 and chat["waiting"] == 0
        assert chat["replicas_config"] == {"min": 2, "max": 3, "target_in_flight": 8, "idle": 60.0}
        units = chat["replicas"]
        assert [(u["name"], u["replica"], u["state"], u["pinned"], u["resident"]) for u in units] == [
            ("chat", 0, "loaded", True, True), ("chat@1", 1, "loaded", True, True),
            ("chat@2", 2, "unloaded", False, False)]
        assert {"since", "last_used", "in_flight", "extra", "gpus", "sleep_level", "last_error"} <= set(units[0])
        pids, ports = {u["pid"] for u in units[:2]}, {u["port"] for u in units[:2]}
        assert len(pids) == 2 and None not in pids and len(ports) == 2 and None not in ports
        assert (units[2]["pid"], units[2]["port"]) == (None, None)
        # a model without replicas is shown as it always was
        assert "replicas" not in solo and "replicas_config" not in solo
        assert solo["state"] == "unloaded" and "pid" in solo and "port" in solo
        assert data["capacity"]["resident"] == ["chat", "chat@1"]  # units
        assert data["capacity"]["resident_memory_gb"] == 20

        # a request in flight on one replica: the model's figure is the sum, the replica shows which
        held = asyncio.create_task(r.chat("chat", fake={"delay": 2.0}))
        busy = await r.wait_model("chat", lambda m: m["in_flight"] == 1, 10, "one request in flight")
        assert sorted(u["in_flight"] for u in busy["replicas"]) == [0, 0, 1]

        cards = (await r.get("/v1/models")).json()["data"]
        assert [(c["id"], c["status"], c["root"]) for c in cards] == [
            ("chat", "loaded", "chat"), ("c", "loaded", "chat"), ("solo", "unloaded", "solo")]

        text = (await r.get("/metrics")).body.decode()
        assert metric(text, "router_replicas", model="chat") == [2]
        assert metric(text, "router_replicas", model="solo") == [0]
        for replica, state in (("0", "loaded"), ("1", "loaded"), ("2", "unloaded")):
            assert metric(text, "router_model_state", model="chat", replica=replica, state=state) == [1]
        assert sorted(metric(text, "router_in_flight", model="chat")) == [0, 0, 1]
        assert metric(text, "router_in_flight", model="solo", replica="0") == [0]
        assert metric(text, "router_waiting", model="chat") == [0]  # once per model, not per replica
        gauges = ("router_model_state", "router_in_flight", "router_waiting", "router_model_pinned", "router_replicas")
        assert not [(n, lab) for n, lab, _ in families(text)  # the gauges name the model, never a unit
                    if n in gauges and lab["model"].startswith("chat@")]
        assert (await held).status == 200


async def test_scale_checks_its_argument_then_brings_in_another_replica(marker: str) -> None:
    async with replicated_router(marker) as r:
        for query, words in (("?replicas=0", "keeps 2 to 3 replicas"), ("?replicas=4", "got 4"),
                             ("?replicas=x", "must be an integer from 2 to 3, got 'x'"),
                             ("", "?replicas=N is required")):
            reply = await r.post(f"/admin/models/chat/scale{query}")
            assert reply.status == 400, (query, reply.body)
            assert words in reply.error["message"] and reply.error["param"] == "replicas"
        reply = await r.post("/admin/models/solo/scale?replicas=1")
        assert reply.status == 400 and "solo has no replicas" in reply.error["message"]
        reply = await r.post("/admin/models/nope/scale?replicas=2")
        assert reply.status == 404 and reply.error["code"] == "model_not_found"
        assert not [e for e in await r.events() if e["kind"] == "scaled"]  # nothing was changed

        reply = await r.post("/admin/models/c/scale?replicas=3")  # by alias
        assert reply.status == 200, reply.body
        assert reply.json()["name"] == "chat" and len(reply.json()["replicas"]) == 3
        chat = await r.wait_model("chat", lambda m: m["replicas"][2]["state"] == "loaded", LOAD_S, "chat@2 loaded")
        assert [u["pinned"] for u in chat["replicas"]] == [True, True, True]
        assert len({u["pid"] for u in chat["replicas"]}) == 3
        assert (await r.model("chat"))["loads"] == 3
        text = (await r.get("/metrics")).body.decode()
        assert metric(text, "router_replicas", model="chat") == [3]
        assert [(e["model"], e["reason"]) for e in await r.events() if e["kind"] == "scaled"] == [("chat", "operator")]


async def test_status_lists_each_replica_under_its_model(marker: str, capsys: pytest.CaptureFixture[str]) -> None:
    async with replicated_router(marker) as r:
        chat = await r.model("chat")
        rc = await asyncio.to_thread(main, ["status", "--url", r.url])  # a blocking client: not on this loop
        assert rc == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["MODEL", "STATE", "MEMORY", "IN", "FLIGHT", "WAITING", "LAST", "USED", "PROCESS"]
        assert lines[1].split() == ["chat", "loaded", "(pinned)", "10", "GB", "0", "0", "never"]
        for line, unit in zip(lines[2:5], chat["replicas"], strict=True):
            assert line.startswith(f"  {unit['name']} ")
        first, second, _ = chat["replicas"]
        assert lines[2].split() == ["chat", "loaded", "(pinned)", "0", "never", "pid", str(first["pid"]),
                                    "port", str(first["port"])]
        assert lines[3].split()[-4:] == ["pid", str(second["pid"]), "port", str(second["port"])]
        assert lines[4].split() == ["chat@2", "unloaded", "0", "never"]
        assert lines[5].split() == ["solo", "unloaded", "5", "GB", "0", "0", "never"]
        assert lines[-1].split() == ["resident:", "2/4"]

        rc = await asyncio.to_thread(main, ["scale", "chat", "9", "--url", r.url])
        assert rc == 1
        assert capsys.readouterr().err.strip() == "error: chat keeps 2 to 3 replicas (replicas.min and max); got 9"
        rc = await asyncio.to_thread(main, ["scale", "chat", "2", "--url", r.url])
        assert rc == 0
        out = capsys.readouterr().out.splitlines()
        assert out[0] == "chat: keeping 2 replicas"
        assert out[1] == f"  chat: loaded (pid {first['pid']}, port {first['port']}, pinned)"


def test_status_table_puts_each_replica_with_its_server_under_its_model() -> None:
    unit: dict[str, Any] = {"state": "loaded", "in_flight": 2, "pinned": True, "extra": False, "last_used": 1120.0,
                            "gpus": [0, 1], "pid": 41, "port": 8001}
    data = {"models": [
        {"name": "chat", "state": "loaded", "memory_gb": 10, "in_flight": 3, "waiting": 1, "last_used": 1120.0,
         "replicas": [{**unit, "name": "chat"},
                      {**unit, "name": "chat@1", "in_flight": 1, "pinned": False, "extra": True, "gpus": [2],
                       "pid": 42, "port": 8002}]},
        {"name": "solo", "state": "unloaded", "memory_gb": 0, "in_flight": 0, "waiting": 0, "last_used": None}],
        "capacity": {"max_resident": 4, "resident": ["chat", "chat@1"]}}
    assert status_table(data, now=1125.0).splitlines() == [
        "MODEL     STATE            MEMORY  IN FLIGHT  WAITING  LAST USED  PROCESS",
        "chat      loaded            10 GB          3        1  5s ago",
        "  chat    loaded (pinned)                  2           5s ago     pid 41  port 8001  gpus 0,1",
        "  chat@1  loaded (extra)                   1           5s ago     pid 42  port 8002  gpus 2",
        "solo      unloaded              -          0        0  never",
        "",
        "resident: 2/4",
    ]
