"""The admin CLI against a running router (``vllm-model-router serve`` as a process, fake engines behind it)."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.harness import CHAT, Router, chat_body, engine, free_port, threaded_router, wait_until_sync
from vllm_model_router.admin_cli import history_text, status_table
from vllm_model_router.cli import main


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("ROUTER_URL", "ROUTER_API_KEY")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "vllm_model_router", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    models = {"m": engine("--access-log", memory_gb=8), "n": engine(memory_gb=4)}
    with threaded_router(models, how="process", workdir=tmp_path_factory.mktemp("cli"),
                         serve_args=("--log-format", "json"), capacity={"max_resident": 2, "memory_gb": 16}) as r:
        yield r


def test_router_down_is_a_clear_message_and_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = cli("status", "--url", url)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: cannot reach the router at {url}: ")
    assert "Traceback" not in done.stderr
    # the URL may come from the environment too
    done = cli("load", "m", env={"ROUTER_URL": url})
    assert done.returncode == 1 and f"cannot reach the router at {url}" in done.stderr


def test_status_load_logs_unload(router: Router) -> None:
    done = cli("status", "--url", router.url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["MODEL", "STATE", "MEMORY", "IN", "FLIGHT", "WAITING", "LAST", "USED"]
    assert lines[1].split() == ["m", "unloaded", "8", "GB", "0", "0", "never"]
    assert lines[2].split() == ["n", "unloaded", "4", "GB", "0", "0", "never"]
    assert lines[-1].split() == ["resident:", "0/2", "memory:", "0/16", "GB"]

    done = cli("load", "m", "--url", router.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("m: loaded (pid ")

    done = cli("status", env={"ROUTER_URL": router.url})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[:2] == ["m", "loaded"]
    assert done.stdout.splitlines()[-1].split() == ["resident:", "1/2", "memory:", "8/16", "GB"]

    done = cli("logs", "m", "--url", router.url, "-n", "50")
    assert done.returncode == 0, done.stderr
    assert any("FAKE vLLM-compatible engine" in ln for ln in done.stdout.splitlines())

    done = cli("unload", "m", "--url", router.url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "m: unloaded"

    # every lifecycle event is in the router's log as a JSON line with its model and reason
    def logged() -> list[dict[str, Any]]:
        events = []
        for line in router.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("logger") == "vllm_model_router.events":
                    events.append(record)
        return events

    wait_until_sync(lambda: any(e["kind"] == "unloaded" and e["model"] == "m" for e in logged()), 15,
                    what="unloaded logged")
    events = [e for e in logged() if e["model"] == "m"]
    assert [e["kind"] for e in events] == ["load_started", "loaded", "unloading", "unloaded"]
    assert all(e["reason"] and e["level"] == "INFO" for e in events)
    assert events[2]["reason"] == "unloaded by operator"
    assert events[1]["seconds"] > 0


def test_logs_follow_prints_lines_as_they_come(router: Router) -> None:
    follower = subprocess.Popen([sys.executable, "-m", "vllm_model_router", "logs", "n", "-f", "--url", router.url],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert cli("load", "n", "--url", router.url).returncode == 0
        assert follower.stdout is not None
        seen = []
        for line in follower.stdout:  # the model's startup output, as the process prints it
            seen.append(line)
            if "Application startup complete" in line:
                break
        assert seen[0].startswith("--- starting: ")
        follower.send_signal(signal.SIGINT)
        _, err = follower.communicate(timeout=10)
        assert follower.returncode == 130
        assert "Traceback" not in err
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        cli("unload", "n", "--url", router.url)


def test_pin_unpin_force_unload_and_api_errors_in_process(router: Router,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pin", "m", "--url", router.url]) == 0
    assert capsys.readouterr().out.strip() == "m: unloaded (pinned)"
    assert main(["status", "--url", router.url]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["m", "unloaded", "(pinned)"]
    assert main(["unpin", "m", "--url", router.url]) == 0
    assert capsys.readouterr().out.strip() == "m: unloaded"

    assert main(["load", "nope", "--url", router.url]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: The model `nope` does not exist. Available models: m, n"

    assert main(["unload", "m", "--force", "--url", router.url]) == 0
    assert capsys.readouterr().out.strip() == "m: unloaded"
    assert main(["status", "--json", "--url", router.url]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)["models"]} == {"m", "n"}


class _Recorder(http.server.BaseHTTPRequestHandler):
    """A stand-in router: records headers, answers 401 in the OpenAI envelope to everything."""

    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:
        _Recorder.seen.append(dict(self.headers))
        body = json.dumps({"error": {"message": "invalid admin key", "type": "authentication_error",
                                     "param": None, "code": 401}}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_api_key_is_sent_as_bearer_and_error_messages_are_printed_plainly(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert main(["status", "--url", url, "--api-key", "s3cret"]) == 1
        assert capsys.readouterr().err.strip() == "error: invalid admin key"
        monkeypatch.setenv("ROUTER_API_KEY", "from-env")
        monkeypatch.setenv("ROUTER_URL", url)
        assert main(["logs", "m"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert [h.get("Authorization") for h in _Recorder.seen] == ["Bearer s3cret", "Bearer from-env"]


def test_status_table_formats_relative_times_and_flags() -> None:
    data = {"models": [{"name": "a", "state": "loaded", "memory_gb": 36, "in_flight": 3, "waiting": 12,
                        "last_used": 1000.0, "pinned": True, "draining": False},
                       {"name": "bbbbbbbbbb", "state": "unloaded", "memory_gb": 0, "in_flight": 0, "waiting": 0,
                        "last_used": None}],
            "capacity": {"max_resident": 2, "memory_gb": None, "resident": ["a"], "resident_memory_gb": 36}}
    lines = status_table(data, now=1125.0).splitlines()
    assert lines[0] == "MODEL       STATE            MEMORY  IN FLIGHT  WAITING  LAST USED"
    assert lines[1] == "a           loaded (pinned)   36 GB          3       12  2m ago"
    assert lines[2] == "bbbbbbbbbb  unloaded              -          0        0  never"
    assert lines[-1] == "resident: 1/2"


def test_serve_and_check_config_still_work(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"models": {"m": engine()}}))
    assert main(["check-config", str(cfg)]) == 0
    done = cli("serve", "--log-format", "xml", "--config", str(cfg))
    assert done.returncode == 2 and "invalid choice: 'xml'" in done.stderr


# ------------------------------------------------------------------- history
ADMIN = "sk-admin-cli-4711"
CLIENT = "sk-client-cli-0815"


def http_json(url: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
    """A request from a client that is not the CLI: (status, JSON answer)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def hhmmss(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")  # the CLI's clock: this machine's time zone


@pytest.fixture(scope="module")
def swapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    """A router that loaded ``a``, swapped it out for ``b``, swapped ``b`` out for ``broken``, whose start
    failed: two requests for a, one for b, one turned away for broken."""
    models = {"a": engine(), "b": engine(), "broken": engine("--exit-during-startup")}
    with threaded_router(models, how="process", workdir=tmp_path_factory.mktemp("history"),
                         capacity={"max_resident": 1}) as r:
        for model, status in (("a", 200), ("a", 200), ("b", 200), ("broken", 503)):
            got, body = http_json(r.url + CHAT, chat_body(model))
            assert got == status, body

        def b_stopped() -> bool:
            models = http_json(r.url + "/admin/models")[1]["models"]
            return any(m["name"] == "b" and m["state"] == "unloaded" for m in models)

        wait_until_sync(b_stopped, 15, what="b unloaded")  # evicted for broken, whose start then failed
        wait_until_sync(lambda: http_json(r.url + "/admin/history")[1]["queue"][-1][1] == 0, 5,
                        what="the history's poll (every second) seeing nothing waiting")
        yield r


def test_history_shows_each_units_states_the_marks_and_the_requests(swapped: Router) -> None:
    done = cli("history", "--url", swapped.url)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    _, h = http_json(swapped.url + "/admin/history")  # what it printed, read the other way
    lines = done.stdout.splitlines()
    since = datetime.fromtimestamp(h["since"]).strftime("%Y-%m-%d %H:%M")
    assert lines[0].startswith(f"last 60 minutes: {since}") and lines[1] == ""

    # one line per unit: the time and state of each change, a stop shown as unloaded
    assert lines[2].split() == ["UNIT", "STATES"]
    lanes = {ln.split()[0]: ln.split()[1:] for ln in lines[3:6]}
    for lane in h["lanes"]:
        spans = lane["spans"]
        expected = [(hhmmss(s["start"]), s["state"]) for s in spans]
        if spans[-1]["end"] is not None:
            expected.append((hhmmss(spans[-1]["end"]), "unloaded"))
        got = lanes[lane["unit"]]
        assert list(zip(got[::2], got[1::2], strict=True)) == expected
    assert lanes["a"][1::2] == lanes["b"][1::2] == ["loading", "loaded", "unloading", "unloaded"]
    assert lanes["broken"][1::2] == ["loading", "failed"]  # still failed
    assert lines[6] == ""

    # one line per mark: time, kind, unit, event, reason (a failed start's log lines cut to fit)
    assert lines[7].split() == ["TIME", "MARK", "UNIT", "EVENT", "REASON"]
    marks = lines[8:14]
    assert [ln.split()[:4] for ln in marks] == [
        [hhmmss(m["time"]), m["kind"], m["unit"], m["event"]["kind"]] for m in h["marks"]]
    assert [ln.split()[1:4] for ln in marks] == [
        ["load", "a", "loaded"], ["swap", "a", "unloading"], ["load", "b", "loaded"], ["swap", "b", "unloading"],
        ["failure", "broken", "load_failed"], ["failure", "broken", "rejected"]]
    assert marks[0].endswith("  ready") and marks[1].endswith("  evicted to make room for b")
    assert "exited with code 1 while loading" in marks[4] and marks[4].endswith("…")
    assert all(len(ln) <= 100 for ln in lines)
    assert lines[14] == ""

    # per model and minute: requests, errors, median and p99 of the wait and of the time to first byte
    assert lines[15].split() == ["MODEL", "MINUTE", "REQUESTS", "ERRORS", "WAIT", "P50", "WAIT", "P99",
                                        "FIRST", "BYTE", "P50", "FIRST", "BYTE", "P99"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines[16:19]}
    assert {m: r[1:3] for m, r in rows.items()} == {"a": ["2", "0"], "b": ["1", "0"], "broken": ["1", "1"]}
    assert rows["broken"][5:] == ["-", "-"]  # turned away: no first byte
    assert all(re.fullmatch(r"\d+ms|\d+\.\d+s", x) for x in rows["b"][3:])
    assert rows["a"][0] == datetime.fromtimestamp(h["models"]["a"][0]["start"]).strftime("%H:%M")
    assert lines[19] == "" and len(lines) == 21
    assert re.fullmatch(r"waiting in total: peak [1-9]\d* at \d\d:\d\d:\d\d, last 0", lines[-1]), lines[-1]


def test_history_json_is_the_endpoints_and_model_narrows_it(swapped: Router,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["history", "--json", "--minutes", "5", "--url", swapped.url]) == 0
    printed = json.loads(capsys.readouterr().out)
    _, direct = http_json(swapped.url + "/admin/history?minutes=5")
    assert printed["minutes"] == 5 and printed["since"] == printed["now"] - 300
    assert set(printed) == set(direct)
    for key in ("lanes", "marks", "models", "bucket_seconds"):
        assert printed[key] == direct[key], key

    assert main(["history", "--json", "--model", "b", "--url", swapped.url]) == 0
    only_b = json.loads(capsys.readouterr().out)
    assert [la["unit"] for la in only_b["lanes"]] == ["b"] and list(only_b["models"]) == ["b"]
    assert [m["kind"] for m in only_b["marks"]] == ["load", "swap"]
    assert only_b["queue"][:len(direct["queue"])] == direct["queue"]  # the poll may have sampled since

    assert main(["history", "--model", "b", "--url", swapped.url]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^b +\d\d:\d\d:\d\d loading", text, re.M)
    assert not re.search(r"^(a|broken) ", text, re.M) and " broken " not in text.replace("for broken", "")

    assert main(["history", "--model", "zz", "--url", swapped.url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "error: no model `zz` in the router's history (it has: a, b, broken)"


def test_history_minutes_is_checked_before_asking(capsys: pytest.CaptureFixture[str]) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    asked = len(_Recorder.seen)
    try:
        for bad in ("0", "61", "abc", "1.5", "-5", "", " 5", "\u0663", "9" * 5000):
            with pytest.raises(SystemExit) as exit_:
                main(["history", f"--minutes={bad}", "--url", url])
            assert exit_.value.code == 2
            err = capsys.readouterr().err
            assert f"argument --minutes: must be a whole number from 1 to 60, got {bad[:20]!r}" in err, err
        assert len(_Recorder.seen) == asked  # none of them reached the router
        assert main(["history", "--minutes", "60", "--url", url]) == 1  # a good one is sent
        assert capsys.readouterr().err.strip() == "error: invalid admin key"
    finally:
        server.shutdown()
        server.server_close()
    done = cli("history", "--minutes", "99", "--url", url)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_history_sends_the_key_and_prints_the_routers_refusal() -> None:
    models = {"m": engine()}
    with threaded_router(models, auth={"api_keys": [CLIENT], "admin_keys": [ADMIN]}) as r:
        done = cli("history", "--url", r.url)
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr.strip() == "error: Missing API key: send it as 'Authorization: Bearer KEY'."
        done = cli("history", "--url", r.url, "--api-key", CLIENT)
        assert done.returncode == 1 and done.stderr.strip() == "error: GET /admin/history needs an admin key."
        done = cli("history", "--url", r.url, "--api-key", "sk-wrong")
        assert done.returncode == 1 and done.stderr.strip() == "error: Invalid API key."
        done = cli("history", "--minutes", "1", env={"ROUTER_URL": r.url, "ROUTER_API_KEY": ADMIN})
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("last 1 minute: ")
        assert done.stdout.splitlines()[3].split() == ["m", "unloaded"]  # never started in the window
        assert "no requests" in done.stdout.splitlines()


def test_history_text_wraps_a_busy_lane_cuts_long_reasons_and_names_gaps() -> None:
    t0 = 1_764_560_400.0  # 2025-12-01 03:40:00 UTC
    states = ["loading", "loaded", "falling_asleep", "sleeping", "waking", "loaded"] * 2
    busy = [{"state": st, "start": t0 + 10 * i, "end": t0 + 10 * (i + 1) if i < 11 else None}
            for i, st in enumerate(states)]
    data = {
        "now": t0 + 600, "since": t0, "minutes": 10, "bucket_seconds": 60,
        "lanes": [{"unit": "chat", "model": "chat", "replica": 0, "spans": busy},
                  {"unit": "chat@1", "model": "chat", "replica": 1,
                   "spans": [{"state": "loaded", "start": t0, "end": t0 + 5},  # stopped, later started again
                             {"state": "loading", "start": t0 + 65, "end": t0 + 70}]},
                  {"unit": "idle", "model": "idle", "replica": 0, "spans": []}],
        "marks": [{"time": t0 + 5, "unit": "chat@1", "model": "chat", "kind": "failure",
                   "event": {"kind": "exited", "reason": "exited with code 1.\nLast log lines:\n" + "x" * 300}},
                  {"time": t0 + 7, "unit": None, "model": None, "kind": "node",
                   "event": {"kind": "node_lost", "reason": "n3"}}],
        "models": {"chat": [{"start": t0, "requests": 12, "errors": 1, "wait_p50": 0.0004, "wait_p99": 3.25,
                             "first_byte_p50": 0.05, "first_byte_p99": 125.0},
                            {"start": t0 + 120, "requests": 1, "errors": 0, "wait_p50": 42.0, "wait_p99": 42.0,
                             "first_byte_p50": None, "first_byte_p99": None}]},
        "queue": [[t0, 0], [t0 + 30, 4], [t0 + 40, 4], [t0 + 50, 1]],
    }
    lines = history_text(data, tz=UTC).splitlines()
    assert lines[:8] == [
        "last 10 minutes: 2025-12-01 03:40:00 to 03:50:00",
        "",
        "UNIT    STATES",
        "chat    03:40:00 loading  03:40:10 loaded  03:40:20 falling_asleep  03:40:30 sleeping",
        "        03:40:40 waking  03:40:50 loaded  03:41:00 loading  03:41:10 loaded  03:41:20 falling_asleep",
        "        03:41:30 sleeping  03:41:40 waking  03:41:50 loaded",
        "chat@1  03:40:00 loaded  03:40:05 unloaded  03:41:05 loading  03:41:10 unloaded",
        "idle    unloaded",
    ]
    assert lines[9:12] == [
        "TIME      MARK     UNIT    EVENT      REASON",
        "03:40:05  failure  chat@1  exited     exited with code 1. Last log lines: " + "x" * 25 + "…",
        "03:40:07  node     -       node_lost  n3",
    ]
    assert len(lines[4]) == len(lines[10]) == 100  # WIDTH: wrapped, cut
    assert lines[13:] == [
        "MODEL  MINUTE  REQUESTS  ERRORS  WAIT P50  WAIT P99  FIRST BYTE P50  FIRST BYTE P99",
        "chat   03:40         12       1       0ms     3.25s            50ms            125s",
        "       03:42          1       0     42.0s     42.0s               -               -",
        "",
        "waiting in total: peak 4 at 03:40:30, last 1",
    ]
    quiet = history_text({**data, "marks": [], "models": {}, "queue": [[t0, 0]]}, tz=UTC).splitlines()
    assert quiet[-5:] == ["no loads, swaps, failures, sleeps, wakes or node changes", "", "no requests", "",
                          "waiting in total: peak 0, last 0"]
