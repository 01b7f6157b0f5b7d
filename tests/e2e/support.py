"""What the end-to-end suite shares: prerequisites, the process table, HTTP, the router and LiteLLM
processes (ports, health checks and the process table come from ``tests.harness``). Fixtures using them
are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import Process, free_port, processes, wait_healthy_sync, wait_until_sync

REPO = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "vllm-model-router"
VLLM_VENV = Path(os.environ.get("VLLM_VENV") or CACHE / "venv-vllm")
LITELLM_VENV = Path(os.environ.get("LITELLM_VENV") or CACHE / "venv-litellm")
MODELS_DIR = Path(os.environ.get("MODELS_DIR") or CACHE / "models")
SERVE = REPO / "scripts" / "vllm_cpu_serve.sh"
MODEL_DIRS = ("tiny-chat-a", "tiny-chat-b", "tiny-embed", "tiny-chat-a-lora", "broken-model")

RUN_ID = secrets.token_hex(6)
RUN_VAR = "VMR_E2E_RUN"
ROLE_VAR = "VMR_E2E_ROLE"
MODEL_VAR = "VMR_E2E_MODEL"
LOAD_TIMEOUT_S = 600.0  # generous: the first start of a model compiles, and CI shares two cores
LITELLM_KEY = "sk-vmr-e2e"
# LiteLLM would fetch a cost map and more from the internet at import; keep everything local.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "LITELLM_TELEMETRY": "False",
}
# Variables the router reads that must not leak in from the caller's environment.
ROUTER_OVERRIDES = ("PORT", "ROUTER_PORT", "ROUTER_CONFIG", "MAX_RESIDENT", "LOAD_TIMEOUT", "VLLM_BASE_URL",
                    "ADAPTER_DIR", "LOG_FORMAT", "LOG_LEVEL")


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def check_prerequisites() -> None:
    """Skip (fail under CI) when what scripts/prepare_e2e.sh makes is missing."""
    missing = missing_prerequisites()
    if missing:
        msg = "end-to-end prerequisites missing (run scripts/prepare_e2e.sh): " + "; ".join(missing)
        if _ci():
            pytest.fail(msg)
        pytest.skip(msg)


def missing_prerequisites() -> list[str]:
    missing = []
    if not (VLLM_VENV / "bin" / "python").is_file() or not (VLLM_VENV / ".vllm-model-router-ready").is_file():
        missing.append(f"vLLM venv {VLLM_VENV}")
    if not (LITELLM_VENV / "bin" / "litellm").is_file():
        missing.append(f"LiteLLM venv {LITELLM_VENV}")
    for name in MODEL_DIRS:
        if not (MODELS_DIR / name / ".complete").is_file():
            missing.append(f"model {MODELS_DIR / name}")
    return missing


# ----------------------------------------------------------------------------- process table
def is_vllm_engine(p: Process) -> bool:
    """vLLM's engine processes retitle themselves: VLLM::EngineCore, VLLM::Worker, ..."""
    return p.cmdline.startswith("VLLM::") or p.comm.startswith("VLLM::")


def live_processes(**env: str) -> list[Process]:
    """Live (non-zombie) processes whose environment has every ``KEY=value`` given."""
    return processes(**env)


def now_ticks() -> int:
    """Clock ticks since boot, comparable with ``Process.start_time``."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return int(uptime * os.sysconf("SC_CLK_TCK"))


SUITE_START_TICKS = now_ticks()


def vllm_engines_since(ticks: int = SUITE_START_TICKS) -> list[Process]:
    """Live VLLM::* processes started since ``ticks`` (by default: since this suite started)."""
    return [p for p in processes() if is_vllm_engine(p) and p.start_time >= ticks]


def session_processes(sids: set[int]) -> list[Process]:
    """Live processes in any of the sessions ``sids``, whoever their parent is now."""
    return [p for p in processes() if p.session in sids]


def model_processes(model: str) -> list[Process]:
    """Every live process of ``model``'s server: those carrying its environment tag, and the rest of
    their sessions. vLLM's EngineCore and Worker retitle themselves with setproctitle, which
    overwrites the environment block that /proc shows, so the tag alone would miss them; the router
    starts each server in a session of its own, which a re-parented orphan keeps."""
    tagged = live_processes(**{RUN_VAR: RUN_ID, MODEL_VAR: model})
    found = {p.pid: p for p in session_processes({p.session for p in tagged})}
    found.update((p.pid, p) for p in tagged)
    return sorted(found.values(), key=lambda p: p.pid)


def wait_no_processes(timeout: float, **env: str) -> list[Process]:
    """Wait until no live process matches ``env``; return what is left after ``timeout``."""
    with contextlib.suppress(pytest.fail.Exception):
        wait_until_sync(lambda: not live_processes(**env), timeout, interval=0.2)
    return live_processes(**env)


# ----------------------------------------------------------------------------- HTTP
@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http(method: str, url: str, body: Any = None, timeout: float = LOAD_TIMEOUT_S + 60,
         headers: dict[str, str] | None = None) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Reply(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as e:
        with e:
            return Reply(e.code, e.read(), dict(e.headers))


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL to the process group after ``timeout``; always reaps."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


# ----------------------------------------------------------------------------- router
def model_entry(model_dir: str, extra_args: str = "", env: dict[str, str] | None = None,
                stop_timeout: str = "30s") -> dict[str, Any]:
    return {
        "cmd": f"{SERVE} {MODELS_DIR / model_dir} ${{PORT}} ${{MODEL}} --enforce-eager {extra_args}".strip(),
        "env": {MODEL_VAR: model_dir, "VLLM_VENV": str(VLLM_VENV), **(env or {})},
        "stop_timeout": stop_timeout,
    }


def router_config(port: int, max_resident: int = 1) -> dict[str, Any]:
    """The suite's router: capacity 1 over the real vLLM models (CPU build); tiny-chat-a takes LoRA
    adapters at run time."""
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "capacity": {"max_resident": max_resident},
        "load_timeout": f"{int(LOAD_TIMEOUT_S)}s",
        "models": {
            "tiny-chat-a": {**model_entry("tiny-chat-a", "--enable-lora --max-lora-rank 8 --max-loras 2",
                                          env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}),
                            "max_adapters": 1},  # one adapter at a time: a second one evicts the first
            "tiny-chat-a-lora": {"adapter": str(MODELS_DIR / "tiny-chat-a-lora"), "base": "tiny-chat-a"},
            # the same weights under a second name: a second adapter without generating another
            "tiny-chat-a-lora-2": {"adapter": str(MODELS_DIR / "tiny-chat-a-lora"), "base": "tiny-chat-a"},
            "tiny-chat-b": model_entry("tiny-chat-b"),
            "tiny-embed": model_entry("tiny-embed", "--runner pooling --convert embed"),
            "broken-model": model_entry("broken-model"),
        },
    }


@dataclass
class Router:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    config: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)

    def get(self, path: str, **kw: Any) -> Reply:
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> Reply:
        return http("POST", self.url + path, body, **kw)

    def admin(self, model: str) -> dict[str, Any]:
        reply = self.get("/admin/models", timeout=10)
        assert reply.status == 200, reply.text
        for m in reply.json()["models"]:
            if m["name"] == model:
                return dict(m)
        raise AssertionError(f"{model} not in /admin/models: {reply.text}")

    def status(self, model: str) -> str:
        reply = self.get("/v1/models", timeout=10)
        assert reply.status == 200, reply.text
        for card in reply.json()["data"]:
            if card["id"] == model:
                return str(card["status"])
        raise AssertionError(f"{model} not in /v1/models: {reply.text}")


def start_router(workdir: Path, config: dict[str, Any]) -> Router:
    port = config["listen"]["port"]
    cfg_path = workdir / "router.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = workdir / "router.log"
    env = {k: v for k, v in os.environ.items() if k not in ROUTER_OVERRIDES}
    env.update({RUN_VAR: RUN_ID, ROLE_VAR: "router", "MODELS_DIR": str(MODELS_DIR), "PYTHONUNBUFFERED": "1"})
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm_model_router", "serve", "--config", str(cfg_path)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    router = Router(proc, port, log_path, config)
    try:
        wait_healthy_sync(router.url + "/health", what="router", timeout=60, exited=proc.poll,
                          log=lambda: tail(log_path))
    except BaseException:
        stop_process(proc, 30)
        raise
    return router


def stop_router(router: Router) -> None:
    """SIGTERM the router; it must exit by itself and leave no process of any model behind."""
    exited = True
    if router.proc.poll() is None:
        router.proc.send_signal(signal.SIGTERM)
        try:
            router.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            exited = False
            os.killpg(router.proc.pid, signal.SIGKILL)
            router.proc.wait(timeout=30)
    def left_behind() -> list[Process]:
        # tagged by environment, or a vLLM engine process started by this suite (an orphaned
        # EngineCore/Worker no longer shows the environment it inherited)
        found = {p.pid: p for p in [*live_processes(**{RUN_VAR: RUN_ID, ROLE_VAR: "router"}),
                                    *vllm_engines_since()]}
        return sorted(found.values(), key=lambda p: p.pid)

    with contextlib.suppress(pytest.fail.Exception):
        wait_until_sync(lambda: not left_behind(), 10, interval=0.2)
    left = left_behind()
    for p in left:  # do not leak them into the next run, but fail
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert exited, f"router did not exit within 120s of SIGTERM:\n{router.log()}"
    assert not left, "processes left after the router stopped:\n" + "\n".join(map(str, left))


def make_room(router: Router) -> None:
    """Unload what ``router`` holds, so that a second router's engines have the machine's two cores."""
    for m in router.get("/admin/models", timeout=10).json()["models"]:
        if m["state"] == "loaded":
            router.post(f"/admin/models/{m['name']}/unload", None, timeout=120)


def stop_second_router(router: Router, model: str, grace: float = 20) -> None:
    """SIGTERM a router started beside the suite's shared one (``stop_router``'s check would count the shared
    one, still running, as left behind): it must exit and leave no process of ``model`` behind."""
    print(f"\nrouter log: {router.log_path}\n{router.log(40)}")
    router.proc.send_signal(signal.SIGTERM)
    try:
        router.proc.wait(timeout=120)
    finally:
        stop_process(router.proc, 5)
    with contextlib.suppress(pytest.fail.Exception):
        wait_until_sync(lambda: not model_processes(model), grace, interval=0.2)
    left = model_processes(model)
    for p in left:  # do not leak them into the next run, but fail
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    assert not left, f"processes of {model} left after its router stopped:\n" + "\n".join(map(str, left))


# ----------------------------------------------------------------------------- LiteLLM
@dataclass
class LiteLLM:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def litellm_config(router_url: str) -> dict[str, Any]:
    """LiteLLM's model entry for the router, as in the README."""
    return {
        "model_list": [
            {
                "model_name": "tiny-chat-a",
                "litellm_params": {
                    "model": "openai/tiny-chat-a",
                    "api_base": f"{router_url}/v1",
                    "api_key": "unused",
                },
            }
        ],
        "general_settings": {"master_key": LITELLM_KEY},
    }


def start_litellm(workdir: Path, router_url: str) -> LiteLLM:
    cfg_path = workdir / "litellm.yaml"
    cfg_path.write_text(yaml.safe_dump(litellm_config(router_url), sort_keys=False))
    port = free_port()
    log_path = workdir / "litellm.log"
    env = {**os.environ, **LITELLM_ENV, RUN_VAR: RUN_ID, ROLE_VAR: "litellm", "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [str(LITELLM_VENV / "bin" / "litellm"), "--config", str(cfg_path), "--host", "127.0.0.1",
             "--port", str(port), "--num_workers", "1"],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    proxy = LiteLLM(proc, port, log_path)
    try:
        wait_healthy_sync(f"{proxy.url}/health/liveliness", what="LiteLLM", timeout=180, exited=proc.poll,
                          log=lambda: tail(log_path))
    except BaseException:
        stop_litellm(proxy)
        raise
    return proxy


def stop_litellm(proxy: LiteLLM) -> None:
    stop_process(proxy.proc, 30)
    left = wait_no_processes(10, **{RUN_VAR: RUN_ID, ROLE_VAR: "litellm"})
    for p in left:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "LiteLLM left processes behind:\n" + "\n".join(map(str, left))
