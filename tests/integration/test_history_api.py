"""GET /admin/history against a router (in this event loop) in front of fake-engine processes: a load, a
swap and a failed start as lanes, spans and marks; the requests per model and minute; the waiting total;
``minutes`` checked; the admin keys and the key scrubbing of the other admin routes."""

from __future__ import annotations

import itertools
import json
import sys
import time
from typing import Any

from tests.harness import CHAT, chat_body, engine, wait_until

from .conftest import ServeRouter, StartRouter

CLIENT = "sk-client-0123456789"
ADMIN = "sk-admin-secret-XYZ123"
LEAKY = [sys.executable, "-c",
         f"print('starting with api_key={ADMIN} and client={CLIENT}', flush=True); print({ADMIN!r} * 300, flush=True);"
         " raise SystemExit(3)", "${PORT}"]  # then a line of keys: one straddles any cut of the reason


def states(history: dict[str, Any]) -> dict[str, list[str]]:
    return {lane["unit"]: [s["state"] for s in lane["spans"]] for lane in history["lanes"]}


async def test_a_load_a_swap_and_a_failure_show_as_spans_marks_and_request_figures(start_router: StartRouter) -> None:
    r = await start_router({"a": engine(), "b": engine(), "broken": engine("--exit-during-startup")},
                           capacity={"max_resident": 1})
    for model, status in (("a", 200), ("a", 200), ("b", 200), ("broken", 503)):
        reply = await r.chat(model)
        assert reply.status == status, reply.body
    await r.wait_state("b", "unloaded")  # evicted for broken, whose start then failed

    async def nothing_waiting() -> bool:  # the waiting total is sampled by the poll (every second) only
        return bool((await r.get("/admin/history")).json()["queue"][-1][1] == 0)

    await wait_until(nothing_waiting, 5, what="the poll seeing nothing waiting")
    asked = time.time()
    reply = await r.get("/admin/history")
    assert reply.status == 200, reply.body
    h = reply.json()

    assert set(h) == {"now", "since", "minutes", "bucket_seconds", "lanes", "marks", "models", "queue"}
    assert abs(h["now"] - asked) < 5 and h["since"] == h["now"] - 3600
    assert h["minutes"] == 60 and h["bucket_seconds"] == 60
    assert [(la["unit"], la["model"], la["replica"]) for la in h["lanes"]] == [("a", "a", 0), ("b", "b", 0),
                                                                               ("broken", "broken", 0)]
    assert states(h) == {"a": ["loading", "loaded", "unloading"], "b": ["loading", "loaded", "unloading"],
                         "broken": ["loading", "failed"]}
    for lane in h["lanes"]:
        spans = lane["spans"]
        assert all(h["since"] <= s["start"] <= h["now"] for s in spans)
        assert all(s["end"] is not None and s["start"] <= s["end"] for s in spans[:-1])
        for before, after in itertools.pairwise(spans):  # contiguous while it runs
            assert before["end"] == after["start"]
    assert h["lanes"][2]["spans"][-1]["end"] is None  # still failed

    marks = [(m["unit"], m["model"], m["kind"], m["event"]["kind"]) for m in h["marks"]]
    assert marks == [("a", "a", "load", "loaded"), ("a", "a", "swap", "unloading"), ("b", "b", "load", "loaded"),
                     ("b", "b", "swap", "unloading"), ("broken", "broken", "failure", "load_failed"),
                     ("broken", "broken", "failure", "rejected")]
    assert [m["time"] for m in h["marks"]] == sorted(m["time"] for m in h["marks"])
    assert all(m["time"] == m["event"]["time"] for m in h["marks"])
    assert h["marks"][1]["event"]["reason"]  # the event as /admin/events sends it

    models = h["models"]
    assert set(models) == {"a", "b", "broken"}
    totals = {m: (sum(b["requests"] for b in bs), sum(b["errors"] for b in bs)) for m, bs in models.items()}
    assert totals == {"a": (2, 0), "b": (1, 0), "broken": (1, 1)}
    for buckets in models.values():
        for b in buckets:
            assert b["start"] % 60 == 0 and b["start"] + 60 > h["since"]
    b = models["b"][-1]  # b waited for a to stop and for its own start
    assert b["wait_p50"] > 0.05 and b["first_byte_p50"] >= b["wait_p50"]
    broken = models["broken"][-1]
    assert broken["wait_p50"] is not None and broken["first_byte_p50"] is None  # an error: no first byte

    assert h["queue"] and all(len(s) == 2 for s in h["queue"]) and h["queue"][-1][1] == 0
    assert [t for t, _ in h["queue"]] == sorted(t for t, _ in h["queue"])


async def test_minutes_is_a_whole_number_from_1_to_60(start_router: StartRouter) -> None:
    r = await start_router({"m": engine()})
    for bad in ("0", "61", "-1", "abc", "1.5", "", "+5", "1e1", "%20%205", "\u0663", "9" * 5000):
        reply = await r.get(f"/admin/history?minutes={bad}")
        assert reply.status == 400, (bad, reply.body)
        err = reply.error
        assert err["param"] == "minutes" and err["type"] == "invalid_request_error", err
    for good, minutes in (("1", 1), ("60", 60), ("07", 7)):
        reply = await r.get(f"/admin/history?minutes={good}")
        assert reply.status == 200, reply.body
        h = reply.json()
        assert h["minutes"] == minutes and h["since"] == h["now"] - 60 * minutes
    h = (await r.get("/admin/history")).json()
    assert h["minutes"] == 60 and [la["unit"] for la in h["lanes"]] == ["m"] and h["lanes"][0]["spans"] == []
    assert h["marks"] == [] and h["models"] == {}


async def test_history_needs_an_admin_key_and_scrubs_keys_from_what_it_quotes(serve_router: ServeRouter) -> None:
    r = await serve_router({"leaky": {"cmd": LEAKY, "stop_timeout": 1}},
                           auth={"api_keys": [CLIENT], "admin_keys": [ADMIN]})
    reply = await r.post(CHAT, chat_body("leaky"), headers={"Authorization": f"Bearer {CLIENT}"})
    assert reply.status == 503, reply.body

    assert (await r.get("/admin/history")).status == 401
    assert (await r.get(f"/admin/history?key={ADMIN}")).status == 401  # a key in the URL only for the streams
    forbidden = await r.get("/admin/history", headers={"Authorization": f"Bearer {CLIENT}"})
    assert forbidden.status == 403 and forbidden.error["code"] == "admin_key_required"
    reply = await r.get("/admin/history", headers={"Authorization": f"Bearer {ADMIN}"})
    assert reply.status == 200
    text = reply.body.decode()
    assert ADMIN not in text and CLIENT not in text
    failure = next(m for m in reply.json()["marks"] if m["event"]["kind"] == "load_failed")
    reason = failure["event"]["reason"]
    assert "api_key=***" in reason and failure["kind"] == "failure"
    # scrubbed, then cut: nothing of the key the cut fell in, and the start of a failure only
    assert ADMIN[:3] not in text and reason.endswith("*…"), reason[-60:]
    assert reason.rpartition("\n")[2] == "*" * (len(reason.rpartition("\n")[2]) - 1) + "…"
    assert len(json.dumps(reason)) - 2 <= 360
