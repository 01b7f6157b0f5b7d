"""The dashboard's last hour (/ui: timeline, charts, queue) and a model's log, in headless Chromium, against
a router with fake-engine models and its real ``GET /admin/history``.

The scripted past: alpha loads, beta takes its place (max_resident 1: alpha is swapped out), alpha waits
while beta is busy and then takes the place back (a queue), and broken, whose server exits during
startup, fails to load. The page must show a lane per unit with those marks, charts with those requests,
and the fake engine's own lines in a model's log.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
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

SLOW = 15000  # ms: a load of a fake engine, and the page's next look at the history


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    models = {"alpha": engine(memory_gb=10), "beta": engine(memory_gb=10),
              "broken": engine("--exit-during-startup", memory_gb=10)}
    with threaded_router(models, how="app", capacity={"max_resident": 1}) as r:
        yield r


@pytest.fixture(scope="module")
def base_url(router: Router) -> str:
    return router.url


def http(router: Router, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    req = urllib.request.Request(router.url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.load(resp)


def chat(router: Router, model: str, **fake: Any) -> int:
    """A chat completion through the OpenAI API; its status (a failed load answers an error)."""
    try:
        http(router, "POST", CHAT, chat_body(model, **({"fake": fake} if fake else {})))
        return 200
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def state(router: Router, model: str) -> str:
    return str(next(m["state"] for m in http(router, "GET", "/admin/models")["models"] if m["name"] == model))


def in_flight(router: Router, model: str) -> int:
    return int(router.call(lambda: sum(v.in_flight for v in router.runtime.views() if v.name == model)))


def watch_page(page: Any) -> list[str]:
    """Every script error and Content-Security-Policy refusal of the page (none is expected)."""
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
    page.on("console", lambda m: problems.append(f"console: {m.text}")
            if m.type == "error" or "Content Security Policy" in m.text else None)
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return problems


def lane_events(page: Any, unit: str) -> list[list[str]]:
    """The marks of a unit's lane, oldest first: per mark element, the event kinds it stands for."""
    return list(page.locator(f'#lanes .lane[data-unit="{unit}"] .mark').evaluate_all(
        "ms => ms.map(m => m.dataset.eventKinds.split(' '))"))


def until(page: Any, unit: str, expected: list[str], timeout: float = SLOW / 1000) -> list[list[str]]:
    """Wait until the lane's marks stand for ``expected`` (event kinds, oldest first), however they group;
    the marks as grouped."""
    deadline = time.monotonic() + timeout
    while True:
        marks = lane_events(page, unit)
        if [kind for mark in marks for kind in mark] == expected:
            return marks
        if time.monotonic() > deadline:
            pytest.fail(f"{unit}'s marks: expected {expected}, got {marks} after {timeout}s")
        page.wait_for_timeout(100)


def test_the_last_hour_shows_loads_a_swap_a_failure_the_queue_and_a_models_log(
        page: Any, router: Router, artifacts: Path) -> None:
    problems = watch_page(page)
    histories: list[str] = []
    page.on("request", lambda r: histories.append(r.url) if "/admin/history" in r.url else None)
    page.goto("/ui")
    expect(page.locator("#live")).to_have_text("live")
    lanes = page.locator("#lanes .lane")
    # nothing happened yet: a lane per configured unit, empty, and the empty states say so
    expect(lanes).to_have_count(3)
    assert lanes.evaluate_all("ls => ls.map(l => l.dataset.unit)") == ["alpha", "beta", "broken"]
    expect(page.locator("#lanes .mark")).to_have_count(0)
    expect(page.locator("#timeline-empty")).to_have_text("No model was resident in this window.")
    expect(page.locator("#charts-empty")).to_have_text("No requests in this window.")
    assert histories and all(u.endswith("/admin/history?minutes=60") for u in histories)
    page.select_option("#history-minutes", "5")  # a closer look: the last 5 minutes
    expect(page.locator("#history")).to_have_attribute("data-minutes", "5")
    assert histories[-1].endswith("/admin/history?minutes=5")

    # alpha loads; the page looks at the history again on the lifecycle events, long before its 10 s poll
    assert chat(router, "alpha") == 200
    alpha = page.locator('#lanes .lane[data-unit="alpha"]')
    expect(alpha.locator('.mark[data-kind="load"][data-event-kind="loaded"]')).to_have_count(1, timeout=4000)
    expect(page.locator("#timeline-empty")).to_be_hidden()

    # beta takes alpha's place (max_resident 1): a swap out on alpha's lane, a load on beta's
    assert chat(router, "beta") == 200
    until(page, "alpha", ["loaded", "unloading"])
    until(page, "beta", ["loaded"])
    assert "swap" in alpha.locator(".mark").evaluate_all("ms => ms.map(m => m.dataset.kinds).join(' ')").split()

    # alpha again while beta is busy: it waits (the queue), then beta is swapped out
    busy = threading.Thread(target=chat, args=(router, "beta"), kwargs={"delay": 3.0})
    busy.start()
    wait_until_sync(lambda: in_flight(router, "beta") == 1, 10, what="beta busy")
    assert chat(router, "alpha") == 200
    busy.join(30)
    assert chat(router, "alpha") == 200
    until(page, "beta", ["loaded", "unloading"])

    # broken: its server exits during startup, the request gets an error, the lane a failure mark
    assert chat(router, "broken") >= 500
    assert state(router, "broken") == "failed"
    # the failed load and the request it turned away are one mark (they are a few ms apart), a failure
    assert until(page, "broken", ["load_failed", "rejected"]) == [["load_failed", "rejected"]]
    broken = page.locator('#lanes .lane[data-unit="broken"]')
    failure = broken.locator('.mark[data-kind="failure"][data-event-kind="load_failed"]')
    expect(failure).to_have_attribute("data-kinds", "failure failure")
    expect(broken.locator('.span[data-state="failed"][data-end=""]')).to_have_count(1)  # failed until now
    until(page, "alpha", ["loaded", "unloading", "loaded", "unloading"])  # alpha made room for it

    # the spans follow the states: alpha loaded twice, beta once; nothing is loaded now
    expect(alpha.locator('.span[data-state="loaded"]')).to_have_count(2)
    expect(page.locator('#lanes .lane[data-unit="beta"] .span[data-state="loaded"]')).to_have_count(1)
    expect(page.locator('#lanes .span[data-state="loaded"][data-end=""]')).to_have_count(0)
    expect(lanes).to_have_count(3)

    # hovering a mark shows its events: kind, time, unit, reason, as the router sent them
    history = http(router, "GET", "/admin/history?minutes=5")
    event = next(m["event"] for m in history["marks"] if m["kind"] == "failure" and m["unit"] == "broken")
    assert event["kind"] == "load_failed" and event["reason"]
    tip = page.locator("#timeline-tip")
    expect(tip).to_be_hidden()
    failure.hover()
    expect(tip).to_be_visible()
    expect(tip).to_contain_text("failure: load_failed")
    expect(tip).to_contain_text("failure: rejected")
    expect(tip).to_contain_text("broken")
    expect(tip).to_contain_text(event["reason"].splitlines()[0])
    time_shown = page.evaluate(f"new Date({event['time']} * 1000).toLocaleTimeString()")
    expect(tip).to_contain_text(time_shown)
    page.evaluate("refreshHistory()")  # a redraw under the pointer keeps the tooltip
    page.wait_for_timeout(300)
    expect(tip).to_contain_text("failure: load_failed")
    page.mouse.move(5, 5)
    expect(tip).to_be_hidden()
    alpha.locator('.mark[data-kinds~="swap"]').last.focus()  # the keyboard reaches the marks too
    expect(tip).to_contain_text("swap: unloading")

    # the charts hold the requests as the router counted them, per model clients name
    expect(page.locator("#charts-empty")).to_be_hidden()
    rows = page.locator("#model-charts .model-charts")
    expect(rows).to_have_count(3)
    counted = {m: sum(b["requests"] for b in buckets) for m, buckets in history["models"].items()}
    assert counted == {"alpha": 3, "beta": 2, "broken": 1}
    page.wait_for_function("historyCharts.models.get('broken')?.requests.data[1].some(v => v)")
    drawn = page.evaluate("""() => Object.fromEntries([...historyCharts.models].map(([m, c]) => [m, {
        requests: c.requests.data[1].reduce((s, v) => s + (v || 0), 0),
        errors: c.requests.data[2].reduce((s, v) => s + (v || 0), 0),
        wait: c.wait.data[2].filter(v => v !== null).length,
        first_byte: c.first_byte.data[2].filter(v => v !== null).length}]))""")
    assert {m: d["requests"] for m, d in drawn.items()} == counted
    assert drawn["broken"]["errors"] == 1 and drawn["alpha"]["errors"] == 0
    assert drawn["alpha"]["first_byte"] >= 1 and drawn["alpha"]["wait"] >= 1
    assert drawn["broken"]["first_byte"] == 0  # an error has no time to first byte
    alpha_charts = page.locator('#model-charts .model-charts[data-model="alpha"]')
    assert int(alpha_charts.locator('[data-chart="requests"]').get_attribute("data-points")) >= 1
    assert int(alpha_charts.locator('[data-chart="first_byte"]').get_attribute("data-points")) >= 1
    expect(alpha_charts.locator('[data-chart="requests"] canvas')).to_have_count(1)

    # the queue: alpha's request waited behind busy beta
    assert max(n for _, n in history["queue"]) >= 1
    expect(page.locator("#queue-empty")).to_be_hidden()
    queue = page.evaluate("historyCharts.queue.data[1]")
    assert max(v for v in queue if v is not None) >= 1
    assert int(page.locator("#queue-chart").get_attribute("data-points")) >= 2

    # a model's log, opened from its row: the lines its server printed, as the admin API returns them
    page.locator('#models tr[data-model="broken"] button[data-action="logs"]').click()
    dialog = page.locator("dialog#logs")
    expect(dialog).to_be_visible()
    expect(dialog).to_have_attribute("data-model", "broken")
    lines = page.locator("#logs-lines")
    expect(lines).to_contain_text("simulated failure (--exit-during-startup)")
    expect(lines).to_contain_text("EngineCore failed to start.")
    page.screenshot(path=artifacts / "dashboard-log.png")
    page.locator("#logs-close").click()
    expect(dialog).to_be_hidden()
    page.locator('#models tr[data-model="alpha"] button[data-action="logs"]').click()
    expect(dialog).to_have_attribute("data-state", "loaded")
    api_lines = http(router, "GET", "/admin/models/alpha/logs?lines=200")["lines"]
    assert any("FAKE vLLM-compatible engine" in ln for ln in api_lines)
    expect(lines).to_contain_text("FAKE vLLM-compatible engine")
    assert lines.get_attribute("data-lines") == str(len(api_lines))
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()

    page.select_option("#history-minutes", "1")  # the last minute: the scripted past spread out
    expect(page.locator("#history")).to_have_attribute("data-minutes", "1")
    until(page, "alpha", ["loaded", "unloading", "loaded", "unloading"])
    path = artifacts / "dashboard-history.png"
    page.screenshot(path=path, full_page=True)
    print(f"dashboard screenshot: {path}")
    assert problems == []


def test_without_history_the_page_shows_the_present_and_says_why(page: Any, router: Router) -> None:
    """A router that cannot answer the history (an older router, a proxy that blocks the route): the
    present-time parts still work and the last hour says it is unavailable, with no chart drawn."""
    problems = watch_page(page)
    page.route(re.compile(r".*/admin/history\b.*"), lambda route: route.fulfill(
        status=404, content_type="application/json",
        body=json.dumps({"error": {"message": "Not Found", "type": "not_found_error", "param": None, "code": 404}})))
    page.goto("/ui")
    expect(page.locator("#history-status")).to_contain_text("unavailable (404: Not Found)")
    expect(page.locator('#models tr[data-model="alpha"]')).to_have_count(1)
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#lanes .lane")).to_have_count(0)
    expect(page.locator("#timeline-empty")).to_be_visible()
    expect(page.locator("#charts-empty")).to_be_visible()
    expect(page.locator("#model-charts .model-charts")).to_have_count(0)
    expect(page.locator("#timeline-empty")).to_have_text("No history yet.")
    expect(page.locator("#error")).to_be_hidden()  # the rest of the page is fine: no banner
    assert [p for p in problems if "/admin/history" not in p and "404" not in p] == []


def test_a_replica_has_a_lane_of_its_own_and_its_requests_count_for_the_model(browser: Any, artifacts: Path) -> None:
    models = {"chat": engine(memory_gb=10, replicas={"min": 2, "max": 2})}
    with threaded_router(models, how="app", capacity={"max_resident": 2}) as r:
        ctx = browser.new_context(base_url=r.url, viewport={"width": 1280, "height": 900})
        page = ctx.new_page()
        try:
            page.goto("/ui")
            wait_until_sync(lambda: all(v.state.value == "loaded" for v in r.call(r.runtime.views)), 20,
                            what="both replicas loaded")
            for _ in range(4):
                assert chat(r, "chat") == 200
            page.evaluate("refreshHistory()")  # requests are no lifecycle event: ask now, not at the next poll
            lanes = page.locator("#lanes .lane")
            expect(lanes).to_have_count(2)
            assert lanes.evaluate_all("ls => ls.map(l => [l.dataset.unit, l.dataset.model])") == [
                ["chat", "chat"], ["chat@1", "chat"]]
            for unit in ("chat", "chat@1"):
                lane = page.locator(f'#lanes .lane[data-unit="{unit}"]')
                expect(lane.locator('.span[data-state="loaded"][data-end=""]')).to_have_count(1, timeout=SLOW)
                expect(lane.locator('.mark[data-kind="load"]')).to_have_count(1)
            rows = page.locator("#model-charts .model-charts")
            expect(rows).to_have_count(1)  # one model, whichever copy served it
            expect(rows).to_have_attribute("data-model", "chat")
            # the 4 requests are in a later answer than the one that drew the lanes, maybe
            page.wait_for_function("historyCharts.models.get('chat')?.requests.data[1]"
                                   ".reduce((s, v) => s + (v || 0), 0) === 4")
            page.screenshot(path=artifacts / "dashboard-replicas-history.png", full_page=True)
        finally:
            ctx.close()


def test_the_dashboard_serves_only_its_own_files_under_a_strict_policy(router: Router) -> None:
    """The charting library is served by the router (no CDN); nothing but the listed files is, and the
    page runs under a Content-Security-Policy that allows no inline script and no other origin."""
    with urllib.request.urlopen(router.url + "/ui", timeout=10) as resp:
        policy = resp.headers["Content-Security-Policy"]
        page = resp.read().decode()
    assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "default-src 'self'" in policy
    assert "<script>" not in page and "http" not in re.sub(r'<meta[^>]*>', "", page)  # no inline, no remote
    scripts = re.findall(r'src="(/ui/[^"]+)"', page) + re.findall(r'href="(/ui/[^"]+)"', page)
    assert "/ui/vendor/uPlot.iife.min.js" in scripts and "/ui/history.js" in scripts
    for path in scripts:
        with urllib.request.urlopen(router.url + path, timeout=10) as resp:
            assert resp.status == 200 and resp.read()
    with urllib.request.urlopen(router.url + "/ui/vendor/uPlot.LICENSE", timeout=10) as resp:
        assert "MIT License" in resp.read().decode()
    for path in ("/ui/vendor/missing.js", "/ui/vendor/..%2finfo.py", "/ui/..%2f__init__.py", "/ui/vendor/a/b.js",
                 "/ui/other/uPlot.min.css", "/ui/vendor"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(router.url + path, timeout=10)
        err.value.close()
        assert err.value.code == 404, path


def test_the_history_and_the_log_are_read_with_the_admin_key(browser: Any) -> None:
    """With admin keys the last hour and a model's log need the key typed in the header, sent as the other
    admin calls send it (Authorization: Bearer)."""
    admin = "history-admin-key-0123"
    with threaded_router({"alpha": engine()}, how="app", auth={"admin_keys": [admin]}) as r:
        ctx = browser.new_context(base_url=r.url, viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        sent: list[tuple[str, str | None]] = []  # (history or logs, its Authorization header)
        page.on("request", lambda q: sent.append(("logs" if "/logs?" in q.url else "history",
                                                  q.headers.get("authorization")))
                if "/admin/history?" in q.url or "/logs?" in q.url else None)
        try:
            page.goto("/ui")
            expect(page.locator("#history-status")).to_contain_text("unavailable (401 Unauthorized")
            expect(page.locator("#lanes .lane")).to_have_count(0)
            page.fill("#admin-key", admin)
            page.press("#admin-key", "Enter")
            page.locator("#admin-key").blur()
            expect(page.locator('#lanes .lane[data-unit="alpha"]')).to_have_count(1)
            expect(page.locator("#history-status")).not_to_contain_text("unavailable")
            page.locator('#models tr[data-model="alpha"] button[data-action="logs"]').click()
            expect(page.locator("dialog#logs")).to_have_attribute("data-state", "loaded")
            expect(page.locator("#logs-empty")).to_have_text("No output yet.")  # never started
            assert sent[0] == ("history", None)  # before the key
            assert ("history", f"Bearer {admin}") in sent
            assert [auth for what, auth in sent if what == "logs"] == [f"Bearer {admin}"]
        finally:
            ctx.close()
