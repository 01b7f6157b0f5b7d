"""What ``serve`` and ``check-config`` print when they cannot start: one line that says what is wrong,
exit status 1, no traceback, no content of the ``auth`` section, and no model process left behind."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import assert_no_processes_left_sync, engine, router_data

ADMIN = "sk-secret-XYZ123"
CLIENT = "sk-client-abcdef"
# the api_keys line indented one space too far: PyYAML's message would quote the admin_keys line
BROKEN_AUTH = f"listen: {{host: 127.0.0.1, port: 1}}\nauth:\n  admin_keys: [{ADMIN}]\n   api_keys: [{CLIENT}]\n"


def router_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vllm_model_router", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("preload", [False, True], ids=["lazy", "preloaded"])
def test_serve_on_an_address_in_use_says_so_in_one_line_and_exits_1(
        tmp_path: Path, marker: str, preload: bool) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        data: dict[str, Any] = router_data({"a": engine(preload=preload)}, marker, state_dir=False)
        data["listen"] = {"host": "127.0.0.1", "port": port}
        config = tmp_path / "router.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        result = router_cli("serve", "--config", str(config))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and len(out.splitlines()) <= 4, out
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in out
    assert_no_processes_left_sync(marker)


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--config"]], ids=["check-config", "serve"])
def test_a_yaml_error_in_auth_is_reported_without_quoting_the_file(tmp_path: Path, command: list[str]) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(BROKEN_AUTH)
    result = router_cli(*command, str(config))
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert ADMIN not in out and CLIENT not in out and "sk-" not in out and "Traceback" not in out, out
    assert f"{config}: invalid YAML at line 4, column 4: expected <block end>, but found '<block mapping start>' " \
           "(while parsing a block mapping started at line 3)" in out, out
    assert len(out.splitlines()) <= 3, out



def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens there once it is closed


@pytest.mark.parametrize(("resources", "said"), [
    ({}, "cluster.address: cannot join the Ray cluster at 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"),
    ({"neuron_cores": 0.5}, "models.a.resources: Ray refuses them: neuron_cores resource quantity must be whole"),
], ids=["nothing-at-the-address", "resources-ray-refuses"])
def test_serve_on_a_ray_cluster_it_cannot_use_says_why_at_once_and_exits_1(
        tmp_path: Path, marker: str, resources: dict[str, float], said: str) -> None:
    # Ray itself retries an address where nothing answers for ever, printing only its own warnings; and it
    # refuses some resources only when the actor is made, which the router heard as a taken name
    pytest.importorskip("ray")
    port = _closed_port()
    data: dict[str, Any] = router_data({"a": engine(memory_gb=10, resources=resources)}, marker, state_dir=False)
    data["cluster"] = {"backend": "ray", "address": f"127.0.0.1:{port}", "gpu_memory_gb": 80}
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    result = router_cli("serve", "--config", str(config), timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert said.format(port=port) in out and "Traceback" not in out, out
