"""The dashboard against a router with admin keys: refused without the key, live once the key is entered
(its event stream, which cannot send headers, passes the key as ?key=)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import CHAT, Router, chat_body, engine, threaded_router

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips, or fails under CI
    expect = None

ADMIN = "dashboard-admin-key-0123"
CLIENT = "dashboard-client-key-4567"


@pytest.fixture(scope="module")
def router() -> Iterator[Router]:
    with threaded_router({"alpha": engine()}, how="app", auth={"api_keys": [CLIENT], "admin_keys": [ADMIN]}) as r:
        yield r


@pytest.fixture(scope="module")
def base_url(router: Router) -> str:
    return router.url


def post(router: Router, path: str, body: dict[str, Any], key: str) -> Any:
    req = urllib.request.Request(router.url + path, method="POST", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.load(resp)


def test_the_dashboard_needs_the_admin_key_and_then_follows_events_live(page: Any, router: Router) -> None:
    page.goto("/ui")  # the page itself is open
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("401 Unauthorized")
    expect(page.locator("#live")).to_have_text("no live updates (admin key?)")

    page.fill("#admin-key", CLIENT)  # a client key is not an admin key
    page.press("#admin-key", "Enter")
    page.locator("#admin-key").blur()
    expect(page.locator("#error-text")).to_contain_text("403 Forbidden")

    page.fill("#admin-key", ADMIN)
    page.press("#admin-key", "Enter")
    page.locator("#admin-key").blur()
    expect(page.locator("#live")).to_have_text("live")
    expect(page.locator("#error")).to_be_hidden()
    alpha = page.locator('#models tr[data-model="alpha"]')
    expect(alpha.locator(".state")).to_have_text("unloaded")

    answer = post(router, CHAT, chat_body("alpha"), CLIENT)  # a client's request: the page follows it live
    assert answer["choices"]
    expect(alpha.locator(".state")).to_have_text("loaded", timeout=15000)
    expect(page.locator('#events li[data-kind="loaded"][data-model="alpha"]')).to_have_count(1)
    alpha.locator('button[data-action="unload"]').click()  # and its actions carry the key
    expect(alpha.locator(".state")).to_have_text("unloaded", timeout=15000)
    expect(page.locator("#error")).to_be_hidden()
