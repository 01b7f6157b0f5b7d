"""The router image, tested outside a container (no container engine runs here): the Dockerfile's
entrypoint and healthcheck commands run as they would in the image, in endpoint mode against a fake
vLLM, configured only by environment variables (VLLM_BASE_URL, MAX_RESIDENT, PORT, ADAPTER_DIR); and
the compose example is wired the way the router needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.harness import free_port, wait_until_sync

from .test_adapters import engine_adapters, fake_vllm

ROOT = Path(__file__).resolve().parents[2]


COMPOSE_HEALTHCHECK = "wget --spider -q http://localhost:8010/health"  # as in the setup the image replaces


def dockerfile_instructions(name: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines() if line.startswith(name + " ")]


def dockerfile_instruction(name: str) -> str:
    found = dockerfile_instructions(name)
    assert found, f"no {name} in the Dockerfile"
    return found[-1]


def apt_installed_packages() -> set[str]:
    """Packages named by ``apt-get install`` in the Dockerfile's RUN instructions (options left out)."""
    packages: set[str] = set()
    for run in dockerfile_instructions("RUN"):
        for command in re.split(r"&&|;", run):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages |= {w.split("=")[0] for w in words[2:] if not w.startswith("-")}
    return packages


def compose_healthcheck(service: dict[str, Any]) -> str:
    """A compose healthcheck's ``test`` as the command line it runs (list or string form)."""
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return test
    kind, *argv = test
    assert kind in ("CMD", "CMD-SHELL"), test
    return " ".join(argv) if kind == "CMD" else str(argv[0])


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_non_root_with_tini_and_a_healthcheck() -> None:
    assert dockerfile_instruction("FROM").startswith("python:3.11-slim")
    assert dockerfile_instruction("USER") != "root" and dockerfile_instruction("USER") != "0"
    assert json.loads(dockerfile_instruction("ENTRYPOINT"))[:2] == ["tini", "--"]
    assert "/health" in dockerfile_instruction("HEALTHCHECK")


def test_image_ships_wget_for_the_compose_healthcheck_and_troubleshooting() -> None:
    assert {"tini", "wget"} <= apt_installed_packages()


async def test_entrypoint_runs_in_endpoint_mode_from_the_environment(marker: str, tmp_path: Path) -> None:
    entrypoint = json.loads(dockerfile_instruction("ENTRYPOINT"))
    cmd = json.loads(dockerfile_instruction("CMD"))
    health = re.search(r"CMD (\[.*\])", dockerfile_instruction("HEALTHCHECK"))
    assert health is not None
    health_cmd = json.loads(health.group(1))
    # tini only reaps orphans as PID 1 in the container; outside it the router runs directly
    argv = [str(Path(sys.executable).parent / entrypoint[2]), *entrypoint[3:], *cmd]
    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    port = free_port()
    async with fake_vllm(marker) as url:
        env = {**os.environ, "VLLM_BASE_URL": url, "MAX_RESIDENT": "2", "PORT": str(port),
               "ADAPTER_DIR": str(tmp_path / "adapters")}
        env.pop("ROUTER_CONFIG", None)
        router = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  cwd=tmp_path, start_new_session=True)
        try:
            health_env = {**env, "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}"}

            def healthcheck() -> subprocess.CompletedProcess[bytes]:
                return subprocess.run([sys.executable if health_cmd[0] == "python" else health_cmd[0],
                                       *health_cmd[1:]], env=health_env, capture_output=True)

            # the image's HEALTHCHECK command is what tells the router is up
            wait_until_sync(lambda: healthcheck().returncode == 0, timeout=20, what="the image's healthcheck",
                            interval=0.1)
            if shutil.which("wget"):  # the compose healthcheck, on this router's port
                compose_probe = COMPOSE_HEALTHCHECK.replace(":8010/", f":{port}/").split()
                assert subprocess.run(compose_probe, capture_output=True, timeout=10).returncode == 0
            async with aiohttp.ClientSession() as s:
                for model in ("base-llm", "sql"):
                    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                    async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        assert (await r.json())["model"] == model
            assert await engine_adapters(url) == ["sql"]
        finally:
            router.terminate()
            out, _ = router.communicate(timeout=15)
        assert router.returncode == 0, out.decode()
        assert f"Loading model {tmp_path / 'adapters' / 'sql'} as served name sql" in out.decode()


def test_compose_example_matches_what_the_router_needs() -> None:
    compose = yaml.safe_load((ROOT / "examples" / "docker-compose.yaml").read_text())
    router = compose["services"]["model-router"]
    vllm = compose["services"]["vllm"]
    assert router["environment"]["VLLM_BASE_URL"] == "http://vllm:8000"
    assert set(router["environment"]) >= {"VLLM_BASE_URL", "MAX_RESIDENT", "PORT"}
    assert "--enable-lora" in vllm["command"]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert any(a.startswith("--port=8000") for a in vllm["command"])
    assert compose_healthcheck(router) == COMPOSE_HEALTHCHECK
