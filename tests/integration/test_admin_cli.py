"""The admin CLI against a running router (``vllm-model-router serve`` as a process, fake engines behind it)."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Router, engine, free_port, threaded_router, wait_until_sync
from vllm_model_router.admin_cli import status_table
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
