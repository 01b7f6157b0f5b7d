"""The dashboard (/ui) end to end in headless Chromium, against a router with fake-engine models.

The router's aiohttp app runs on its own event loop in a background thread; the browser tests are
synchronous (Playwright's sync API cannot run inside an asyncio loop).
"""

from __future__ import annotations

import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import CHAT, Router, chat_body, engine, threaded_router, wait_until_sync

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips, or fails under CI
    expect = None


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    models = {"alpha": engine(memory_gb=10, aliases=["a"]), "beta": engine(memory_gb=20)}
    with threaded_router(models, how="app", capacity={"max_resident": 2, "memory_gb": 40}) as r:
        yield r


@pytest.fixture(scope="module")
def base_url(router: Router) -> str:
    return router.url


def http(router: Router, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(router.url + path, method=method, data=json.dumps(body).encode() if body else b"",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def state(router: Router, model: str) -> str:
    models = http(router, "GET", "/admin/models")["models"]
    return str(next(m["state"] for m in models if m["name"] == model))


def test_a_request_through_the_api_shows_up_live_and_unload_unloads(page: Any, router: Router,
                                                                    tmp_path: Path) -> None:
    page.goto("/ui")
    alpha = page.locator('#models tr[data-model="alpha"]')
    expect(page.locator("#models tbody tr")).to_have_count(2)
    expect(alpha.locator(".state")).to_have_text("unloaded")
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#nodes-card")).to_be_hidden()  # one machine: no nodes to show
    page.evaluate("window.__notReloaded = true")

    # a request through the OpenAI API (by alias) loads the model: the page follows without a reload
    answer = http(router, "POST", CHAT, chat_body("a"))
    assert answer["choices"][0]["message"]["content"]
    expect(alpha.locator(".state")).to_have_text("loaded", timeout=15000)
    expect(alpha.locator(".last-used")).not_to_have_text("never")
    expect(page.locator("#memory-text")).to_have_text("10 GB / 40 GB")
    expect(page.locator("#count-text")).to_have_text("1 / 2 resident")
    expect(page.locator('#events li[data-kind="loaded"][data-model="alpha"]')).to_have_count(1)
    expect(page.locator('#events li[data-kind="load_started"][data-model="alpha"]')).to_have_count(1)
    page.screenshot(path=tmp_path / "dashboard-loaded.png")

    # clicking Unload unloads it (graceful: it has nothing in flight)
    alpha.locator('button[data-action="unload"]').click()
    expect(alpha.locator(".state")).to_have_text("unloaded", timeout=15000)
    assert state(router, "alpha") == "unloaded"
    expect(page.locator('#events li[data-kind="unloaded"][data-model="alpha"]')).to_have_count(1)
    expect(page.locator("#memory-text")).to_have_text("0 GB / 40 GB")
    expect(page.locator("#error")).to_be_hidden()
    assert page.evaluate("window.__notReloaded") is True


def test_load_button_sends_the_admin_key_and_shows_an_auth_error(page: Any, router: Router) -> None:
    page.goto("/ui")
    beta = page.locator('#models tr[data-model="beta"]')
    expect(beta.locator(".state")).to_have_text("unloaded")
    page.fill("#admin-key", "k-123")
    page.press("#admin-key", "Enter")
    page.locator("#admin-key").blur()
    assert page.evaluate("localStorage.getItem('vllm-model-router.admin-key')") == "k-123"

    # the router has no auth yet: stand in for one that refuses the key
    seen: list[str | None] = []

    def refuse(route: Any) -> None:
        seen.append(route.request.headers.get("authorization"))
        route.fulfill(status=401, content_type="application/json", body=json.dumps(
            {"error": {"message": "invalid admin key", "type": "authentication_error", "param": None, "code": 401}}))

    page.route(re.compile(r".*/admin/models/beta/load$"), refuse)
    beta.locator('button[data-action="load"]').click()
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("401 Unauthorized: invalid admin key")
    assert seen == ["Bearer k-123"]
    assert state(router, "beta") == "unloaded"

    # the real admin API: Load loads it, and the page shows it loaded
    page.unroute(re.compile(r".*/admin/models/beta/load$"))
    page.click("#error-close")
    beta.locator('button[data-action="load"]').click()
    expect(beta.locator(".state")).to_have_text("loaded", timeout=15000)
    expect(page.locator("#error")).to_be_hidden()
    assert state(router, "beta") == "loaded"
    http(router, "POST", "/admin/models/beta/unload")
    expect(beta.locator(".state")).to_have_text("unloaded", timeout=15000)


def test_gpu_bars_show_where_models_sit_and_what_others_use(browser: Any, tmp_path: Path) -> None:
    from vllm_model_router.gpu.probe import FakeProbe

    probe = FakeProbe([80.0, 80.0])
    probe.gpus[1].processes[4242] = 30.0  # someone else's job on GPU 1
    models = {"big": engine(memory_gb=50), "small": engine(memory_gb=20)}
    with threaded_router(models, how="app", probe=probe, capacity={"max_resident": 2}) as r:
        ctx = browser.new_context(base_url=r.url, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        try:
            page.goto("/ui")
            gpu0, gpu1 = page.locator('.gpu[data-gpu="0"]'), page.locator('.gpu[data-gpu="1"]')
            expect(gpu1.locator(".seg.others")).to_have_count(1)
            expect(gpu1.locator(".bar-text")).to_contain_text("others 30 GB")
            http(r, "POST", CHAT, chat_body("big"))
            http(r, "POST", CHAT, chat_body("small"))
            # big fits best on GPU 0 (80 GB free); small then goes where it leaves the least over (GPU 0: 30)
            expect(gpu0.locator('.seg[data-state="loaded"]')).to_have_count(2, timeout=15000)
            expect(gpu0.locator(".bar-text")).to_contain_text("70 GB / 76 GB reserved")
            expect(gpu1.locator('.seg[data-state="loaded"]')).to_have_count(0)
            page.screenshot(path=tmp_path / "dashboard-gpus.png")
        finally:
            ctx.close()


def test_a_replicated_model_shows_each_replica_and_scales_from_the_page(browser: Any, tmp_path: Path) -> None:
    models = {"chat": engine(memory_gb=10, replicas={"min": 2, "max": 3})}
    with threaded_router(models, how="app", capacity={"max_resident": 3, "memory_gb": 40}) as r:
        ctx = browser.new_context(base_url=r.url, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        try:
            page.goto("/ui")
            replicas = page.locator('#models tr.replica[data-model-of="chat"]')
            expect(page.locator("#models tbody tr[data-model]")).to_have_count(1)  # one model, not one per copy
            expect(replicas).to_have_count(3)
            rows = {name: page.locator(f'#models tr.replica[data-replica="{name}"]')
                    for name in ("chat", "chat@1", "chat@2")}
            expect(rows["chat"].locator(".state")).to_have_text("loaded", timeout=20000)
            expect(rows["chat@1"].locator(".state")).to_have_text("loaded", timeout=20000)
            expect(rows["chat@2"].locator(".state")).to_have_text("unloaded")
            entry = next(m for m in http(r, "GET", "/admin/models")["models"] if m["name"] == "chat")
            for unit in entry["replicas"][:2]:
                expect(rows[unit["name"]].locator(".server")).to_have_text(f"pid {unit['pid']} · port {unit['port']}")
            expect(rows["chat@2"].locator(".server")).to_have_text("\u2013")  # no server
            model = page.locator('#models tr[data-model="chat"]')
            expect(model.locator(".replica-count")).to_have_text("2/3 replicas · keep 2")
            expect(page.locator("#memory-text")).to_have_text("20 GB / 40 GB")  # each copy holds its memory
            expect(page.locator("#count-text")).to_have_text("2 / 3 resident")
            expect(model.locator('button[data-scale="down"]')).to_be_disabled()  # at min

            # one request in flight: the replica serving it shows it, and the model the sum
            held = threading.Thread(target=http, args=(r, "POST", CHAT, chat_body("chat", fake={"delay": 2.0})))
            held.start()
            wait_until_sync(lambda: r.call(lambda: sum(v.in_flight for v in r.runtime.views())) == 1, 10,
                            what="the request in flight")
            page.evaluate("refresh()")  # a request is no lifecycle event: the page would see it at its next poll
            expect(model.locator(".in-flight")).to_have_text("1")
            expect(replicas.locator(".in-flight", has_text="1")).to_have_count(1)
            held.join(30)

            model.locator('button[data-scale="up"]').click()
            expect(rows["chat@2"].locator(".state")).to_have_text("loaded", timeout=20000)
            expect(model.locator(".replica-count")).to_have_text("3/3 replicas · keep 3")
            expect(page.locator("#count-text")).to_have_text("3 / 3 resident")
            expect(page.locator("#error")).to_be_hidden()
            page.screenshot(path=tmp_path / "dashboard-replicas.png")
        finally:
            ctx.close()


def test_on_a_cluster_each_node_shows_its_state_memory_and_units(browser: Any, tmp_path: Path) -> None:
    """The nodes of a synthetic cluster (Ray's node list as ``RayNodes`` reads it, no Ray needed) whose
    GPUs are the fake GPUs' ids: a holds GPU 0, b GPU 1, c was lost. What each node reserves follows
    where the scheduler places the models, live."""
    from vllm_model_router.gpu.probe import FakeProbe
    from vllm_model_router.gpu.ray_nodes import RayNodes, node_views

    def ray_node(node_id: str, address: str, alive: bool = True, **custom: float) -> dict[str, Any]:
        return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": address,
                "Resources": {"CPU": 4.0, "GPU": 1.0, "node:" + address: 1.0, **custom} if alive else {}}

    nodes = RayNodes(80.0)
    a_id = "a" * 56  # as long as Ray's ids
    nodes.read([ray_node(a_id, "10.0.0.1", special=1.0), ray_node("b", "10.0.0.2"), ray_node("c", "10.0.0.3")])
    nodes.read([ray_node(a_id, "10.0.0.1", special=1.0), ray_node("b", "10.0.0.2"),
                ray_node("c", "10.0.0.3", alive=False)])
    models = {"big": engine(memory_gb=50), "small": engine(memory_gb=20)}
    with threaded_router(models, how="app", probe=FakeProbe([80.0, 80.0]), capacity={"max_resident": 2}) as r:
        runtime = r.runtime
        r.call(lambda: setattr(runtime, "nodes", lambda: node_views(nodes.known(), 80.0, runtime.views())))
        ctx = browser.new_context(base_url=r.url, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        try:
            page.goto("/ui")
            expect(page.locator("#nodes-card")).to_be_visible()
            rows = page.locator("#nodes tbody tr")
            expect(rows).to_have_count(3)
            a, b, c = (page.locator(f'#nodes tr[data-node="{n}"]') for n in (a_id, "b", "c"))
            expect(a.locator(".node-id")).to_have_text("aaaaaaaaaaaa…offers special")  # short id, what it offers
            expect(a.locator(".address")).to_have_text("10.0.0.1")
            expect(a.locator(".node-state")).to_have_text("alive")
            expect(a.locator(".gpus")).to_have_text("0")
            expect(a.locator(".memory-text")).to_have_text("0 GB / 80 GB")
            expect(a.locator(".units")).to_have_text("\u2013")
            expect(c.locator(".node-state")).to_have_text("lost")
            expect(c.locator(".gpus")).to_have_text("2")
            expect(c.locator(".memory-text")).to_have_text("\u2013")

            http(r, "POST", CHAT, chat_body("big"))
            http(r, "POST", CHAT, chat_body("small"))  # best fit: next to big on GPU 0, node a
            expect(a.locator(".units")).to_have_text("big, small", timeout=15000)
            expect(a.locator(".memory-text")).to_have_text("70 GB / 80 GB")
            expect(a.locator('.bar .seg')).to_have_count(1)
            expect(b.locator(".units")).to_have_text("\u2013")
            expect(b.locator(".memory-text")).to_have_text("0 GB / 80 GB")
            expect(page.locator("#memory-text")).to_have_text("70 GB (budgets per node below)")
            page.screenshot(path=tmp_path / "dashboard-nodes.png")
        finally:
            ctx.close()
