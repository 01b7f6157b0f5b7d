"""Admin API additions: pin/unpin, the lifecycle event stream, following logs, the OpenAPI description, the
dashboard's files and the lifecycle log lines; against a router (in this event loop) and fake engines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import aiohttp
import pytest

from tests.harness import CHAT, chat_body, engine, launch_router, sse
from vllm_model_router.http.admin import _batch
from vllm_model_router.log_format import EVENT_LOGGER, JsonFormatter, log_lifecycle_event
from vllm_model_router.routes import INFERENCE_ROUTES
from vllm_model_router.state.lifecycle import LifecycleEvent

TIMEOUT = aiohttp.ClientTimeout(total=30)


async def next_event(events: AsyncIterator[sse.Event], timeout: float = 10.0) -> sse.Event:
    """The next event of the stream (comments and the retry hint are not events)."""
    return await asyncio.wait_for(anext(events), timeout)


async def test_pin_and_unpin(marker: str) -> None:
    async with launch_router({"m": engine()}, marker) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(r.url + "/admin/models/m/pin") as resp:
            assert resp.status == 200
            assert (await resp.json())["pinned"] is True
        async with s.get(r.url + "/metrics") as resp:
            assert 'router_model_pinned{model="m"} 1.0' in await resp.text()
        async with s.post(r.url + "/admin/models/m/unpin") as resp:
            assert (await resp.json())["pinned"] is False
        async with s.post(r.url + "/admin/models/nope/pin") as resp:
            assert resp.status == 404
            assert "does not exist" in (await resp.json())["error"]["message"]
        assert [(e.kind, e.reason) for e in r.runtime.events.recent()] == [("pinned", "operator"),
                                                                           ("unpinned", "operator")]


async def test_event_stream_sends_history_then_live_events_and_resumes_after_last_event_id(marker: str) -> None:
    async with launch_router({"m": engine()}, marker) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        for _ in range(3):
            async with s.post(r.url + "/admin/models/m/pin"):
                pass
        async with (s.get(r.url + "/admin/events?history=2") as resp,
                    aclosing(sse.aiter_events(resp.content)) as events):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            history = [await next_event(events), await next_event(events)]
            assert [(e.id, e.event) for e in history] == [("2", "pinned"), ("3", "pinned")]
            assert history[0].json()["model"] == "m" and history[0].json()["reason"] == "operator"

            async with s.post(r.url + CHAT, json=chat_body("m")) as reply:  # a load, live
                assert reply.status == 200
            started = await next_event(events)
            assert (started.event, started.json()["model"]) == ("load_started", "m")
            loaded = await next_event(events)
            assert loaded.event == "loaded" and loaded.json()["data"]["seconds"] > 0
            last_seen = loaded.id
            assert last_seen is not None

        async with s.post(r.url + "/admin/models/m/unload") as reply:
            assert reply.status == 200
        # a reconnecting EventSource sends Last-Event-ID: it gets exactly what it missed
        async with (s.get(r.url + "/admin/events", headers={"Last-Event-ID": last_seen}) as resp,
                    aclosing(sse.aiter_events(resp.content)) as events):
            missed = [await next_event(events), await next_event(events)]
            assert [e.event for e in missed] == ["unloading", "unloaded"]
            assert missed[0].json()["reason"] == "unloaded by operator"
            assert int(missed[0].id or "") == int(last_seen) + 1

        # for a browser's EventSource: no event names, every kind arrives as a plain message
        async with (s.get(r.url + "/admin/events?history=1&named=false") as resp,
                    aclosing(sse.aiter_events(resp.content)) as events):
            last = await next_event(events)
            assert last.event is None and last.json()["kind"] == "unloaded"

        async with s.get(r.url + "/admin/events?history=x") as resp:
            assert resp.status == 400


async def test_follow_logs_streams_lines_as_the_process_prints_them(marker: str) -> None:
    async with (launch_router({"m": engine("--access-log")}, marker) as r,
                aiohttp.ClientSession(timeout=TIMEOUT) as s,
                s.get(r.url + "/admin/models/m/logs?follow=true&lines=5") as resp):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert r.runtime.driver.logs("m", 5) == []  # nothing yet: the stream waits for the first line

        async def read_until(pattern: str) -> list[str]:
            got = []
            while True:
                raw = await asyncio.wait_for(resp.content.readline(), 10)
                assert raw, f"stream ended before {pattern!r}; got {got}"
                got.append(raw.decode().rstrip("\n"))
                if re.search(pattern, got[-1]):
                    return got

        async with s.post(r.url + CHAT, json=chat_body("m")) as reply:
            assert reply.status == 200
        lines = await read_until("POST /v1/chat/completions")  # the engine's access log of that request
        assert lines[0].startswith("--- starting: ")
        assert any("FAKE vLLM-compatible engine" in ln for ln in lines)
        async with s.post(r.url + "/admin/models/m/unload"):
            pass
        assert (await read_until("^--- stopped$"))[-1] == "--- stopped"

    async with launch_router({"m": engine()}, marker) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(r.url + "/admin/models/nope/logs?follow=true") as resp:
            assert resp.status == 404


async def test_openapi_describes_every_route(marker: str) -> None:
    async with launch_router({"m": engine()}, marker) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(r.url + "/openapi.json") as resp:
            assert resp.status == 200
            spec = await resp.json()
        assert spec["openapi"].startswith("3.")
        documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
        for route in r.app.router.routes():
            if route.method == "HEAD":
                continue
            info = route.get_info()
            path = info.get("path") or info.get("formatter") or ""
            if path == "/ui/":  # a redirect to /ui
                continue
            if path == "/v1/{tail}":  # the forwarded routes are matched by the proxy: each is described
                assert {("POST", p) for p in INFERENCE_ROUTES} <= documented
                continue
            assert (route.method, path) in documented, f"{route.method} {path} is not in /openapi.json"
        for path, ops in spec["paths"].items():
            for method, op in ops.items():
                assert op.get("responses"), f"{method} {path} has no responses"
                assert op.get("operationId"), f"{method} {path} has no operationId"
                for param in re.findall(r"\{(\w+)\}", path):
                    assert any(p["name"] == param and p["in"] == "path" for p in op.get("parameters", [])), \
                        f"{method} {path}: path parameter {param} is not described"
        for ref in re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(spec)):
            node: Any = spec
            for part in ref.split("/"):
                assert part in node, f"dangling $ref #/{ref}"
                node = node[part]


async def test_dashboard_files_are_served(marker: str) -> None:
    async with launch_router({"m": engine()}, marker) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.get(r.url + "/ui") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            html = await resp.text()
            assert "/ui/app.js" in html and "/ui/style.css" in html
        for asset, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
            async with s.get(r.url + "/ui/" + asset) as resp:
                assert resp.status == 200 and resp.content_type == ctype
        async with s.get(r.url + "/ui/../app.py") as resp:
            assert resp.status == 404
        async with s.get(r.url + "/ui/secret.txt") as resp:
            assert resp.status == 404 and "error" in await resp.json()
        async with s.get(r.url + "/ui/", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/ui"


async def test_every_lifecycle_event_is_logged_with_model_and_reason(caplog: pytest.LogCaptureFixture,
                                                                   marker: str) -> None:
    caplog.set_level(logging.INFO, logger=EVENT_LOGGER)
    async with launch_router({"m": engine()}, marker) as r, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with s.post(r.url + CHAT, json=chat_body("m")):
            pass
        async with s.post(r.url + "/admin/models/m/unload"):
            pass
        kinds = [e.kind for e in r.runtime.events.recent()]
    records = [rec for rec in caplog.records if rec.name == EVENT_LOGGER]
    assert [rec.fields["kind"] for rec in records] == kinds == [  # type: ignore[attr-defined]
        "load_started", "loaded", "unloading", "unloaded"]
    assert all(rec.levelno == logging.INFO and rec.fields["model"] == "m" for rec in records)  # type: ignore[attr-defined]
    assert records[2].getMessage() == 'unloading model=m reason="unloaded by operator" force=False'
    assert records[1].getMessage().startswith("loaded model=m reason=ready seconds=")


def test_json_log_lines_carry_the_event_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(EVENT_LOGGER)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        log_lifecycle_event(LifecycleEvent(7, 0.0, "load_failed", "big", "process exited with code 1\nboom",
                                           {"seconds": 1.5}))
        logging.getLogger("vllm_model_router.model.big").warning("[big] CUDA out of memory")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    line = json.loads(stream.getvalue().splitlines()[0])
    assert line["kind"] == "load_failed" and line["model"] == "big" and line["seq"] == 7
    assert line["reason"] == "process exited with code 1\nboom" and line["seconds"] == 1.5
    assert line["level"] == "INFO" and line["logger"] == EVENT_LOGGER
    assert line["message"] == 'load_failed model=big reason="process exited with code 1\\nboom" seconds=1.5'
    assert len(stream.getvalue().splitlines()) == 1  # the model logger is not a child of the events logger


async def test_open_streams_end_when_the_router_shuts_down(marker: str) -> None:
    q: asyncio.Queue[int] = asyncio.Queue()
    closing = asyncio.Event()
    q.put_nowait(1)
    assert await _batch(q, closing, 0.01) == [1]
    assert await _batch(q, closing, 0.01) == []
    waiting = asyncio.create_task(_batch(q, closing, 30))
    await asyncio.sleep(0)  # one turn of the loop: the task runs until it waits
    closing.set()
    assert await asyncio.wait_for(waiting, 1) is None

    # and with a real router: an open event stream ends at shutdown instead of holding it up
    async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
        async with launch_router({"m": engine()}, marker) as r:
            resp = await s.get(r.url + "/admin/events")
            reading = asyncio.create_task(resp.content.read())
            await asyncio.sleep(0.1)  # what is tested: the stream stays open while the router runs
            assert not reading.done()
        # launch_router's exit shut the router down while the stream was open
        body = await asyncio.wait_for(reading, 5)
        assert body.startswith(b"retry: 2000")
        resp.release()
