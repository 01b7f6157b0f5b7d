"""``cluster``: where the models' servers run (``local``: here, the default; ``ray``: on a Ray cluster), and a
model's ``resources`` (Ray placement constraints). Only the configuration: what is accepted, what is refused
and why, what ``check-config`` and ``config-schema`` show, and that reading it never needs Ray."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from vllm_model_router.cli import main
from vllm_model_router.config import ConfigError, RouterConfig, build_config, json_schema

CMD = "vllm serve x --port ${PORT} --served-model-name ${MODEL} --enable-lora"
RAY = {"backend": "ray", "gpu_memory_gb": 80}


def config(cluster: Any = None, env: dict[str, str] | None = None, **models: dict[str, Any]) -> RouterConfig:
    data: dict[str, Any] = {"models": models or {"m": {"cmd": CMD, "memory_gb": 10}}}
    if cluster is not None:
        data["cluster"] = cluster
    return build_config(data, env or {})


def problems(cluster: Any = None, env: dict[str, str] | None = None, **models: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config(cluster, env, **models)
    return e.value.problems


def test_the_default_is_the_local_backend_with_no_constraints() -> None:
    cfg = config()
    assert (cfg.cluster.backend, cfg.cluster.address, cfg.cluster.namespace, cfg.cluster.gpu_memory_gb) == (
        "local", "auto", "vllm-model-router", None)
    assert not cfg.cluster.ray and cfg.models["m"].resources == {}
    assert config({"namespace": "x"}).cluster.backend == "local"


def test_ray_backend_takes_its_address_from_the_environment() -> None:
    cfg = config({**RAY, "address": "ray://file:10001", "namespace": "team-a"},
                 {"RAY_ADDRESS": "ray://head:10001"},
                 m={"cmd": CMD, "memory_gb": 10, "resources": {"accelerator_type:H100": 0.001, "big_disk": 2}})
    assert cfg.cluster.ray
    assert (cfg.cluster.address, cfg.cluster.namespace, cfg.cluster.gpu_memory_gb) == (
        "ray://head:10001", "team-a", 80.0)
    assert cfg.models["m"].resources == {"accelerator_type:H100": 0.001, "big_disk": 2.0}
    assert config({**RAY, "address": "head:6379"}, {"RAY_ADDRESS": ""}).cluster.address == "head:6379"  # unset
    assert problems(RAY, {"RAY_ADDRESS": "ray://a b"}) == [
        "environment RAY_ADDRESS: expected a Ray cluster address like auto or ray://head:10001, got 'ray://a b'"]


@pytest.mark.parametrize(("cluster", "expected"), [
    ({"backend": "slurm"}, "cluster.backend: must be local or ray, got 'slurm'"),
    ({"backend": True}, "cluster.backend: must be local or ray, got True"),
    ({"namespace": ""}, "cluster.namespace: expected a non-empty namespace, got ''"),
    ({"namespace": "  "}, "cluster.namespace: expected a non-empty namespace, got '  '"),
    ({"address": ""}, "cluster.address: expected a Ray cluster address like auto or ray://head:10001, got ''"),
    ({"address": 6379}, "cluster.address: expected a Ray cluster address like auto or ray://head:10001, got 6379"),
    ({"gpu_memory_gb": 0}, "cluster.gpu_memory_gb: must be > 0, got 0"),
    ({"gpu_memory_gb": "80"}, "cluster.gpu_memory_gb: expected a number, got '80'"),
    ({"adress": "auto"}, "cluster.adress: unknown key (allowed: address, backend, gpu_memory_gb, namespace)"),
    ("ray", "cluster: expected a mapping, got str"),
], ids=["unknown-backend", "bool-backend", "empty-namespace", "blank-namespace", "empty-address", "number-address",
        "zero-memory", "string-memory", "typo", "not-a-mapping"])
def test_bad_cluster_values_are_refused_by_key(cluster: Any, expected: str) -> None:
    assert problems(cluster) == [expected]


def test_resources_are_only_for_the_ray_backend() -> None:
    want = "models.m.resources: resources are Ray placement constraints: only with cluster.backend ray"
    assert problems(m={"cmd": CMD, "memory_gb": 10, "resources": {"accelerator_type:H100": 0.001}}) == [want]
    assert problems({"backend": "local"}, m={"cmd": CMD, "memory_gb": 10, "resources": {"x": 1}}) == [want]
    # none given: nothing to refuse
    assert config(m={"cmd": CMD, "memory_gb": 10, "resources": {}}).models["m"].resources == {}


def test_resources_are_refused_on_an_adapter() -> None:
    found = problems(RAY, m={"cmd": CMD, "memory_gb": 10}, lora={"adapter": "/a", "base": "m", "resources": {"x": 1}})
    assert found == ["models.lora.resources: not allowed on an adapter (it is loaded into its base's server)"]


@pytest.mark.parametrize(("resources", "expected"), [
    ({"": 1}, "models.m.resources: resource names must be non-empty strings, got ''"),
    ({"GPU": 1}, "models.m.resources: 'GPU' is not a placement constraint"),
    ({"CPU": 2}, "models.m.resources: 'CPU' is not a placement constraint"),
    ({"x": 0}, "models.m.resources.x: must be >= 0.0001, got 0"),
    ({"x": -1}, "models.m.resources.x: must be >= 0.0001, got -1"),
    ({"x": 0.00001}, "models.m.resources.x: must be >= 0.0001, got 1e-05"),  # Ray would count it as 0
    ({"x": "1"}, "models.m.resources.x: expected a number, got '1'"),
    ({"x": None}, "models.m.resources.x: expected a number, got None"),
    ({"x": True}, "models.m.resources.x: expected a number, got True"),
    (["x"], "models.m.resources: expected a mapping of Ray resource names to amounts"),
], ids=["empty-name", "gpu", "cpu", "zero", "negative", "below-ray-unit", "string", "null", "bool", "list"])
def test_bad_resources_are_refused(resources: Any, expected: str) -> None:
    found = problems(RAY, m={"cmd": CMD, "memory_gb": 10, "resources": resources})
    assert len(found) == 1 and found[0].startswith(expected), found


def test_ray_backend_is_not_for_endpoint_mode() -> None:
    want = ("cluster.backend: the ray backend starts the models' servers on the cluster; endpoint mode (no model "
            "has a cmd) fronts engines that are already running")
    assert problems(RAY, lora={"adapter": "/a"}) == [want]
    with pytest.raises(ConfigError) as e:
        build_config({"cluster": RAY}, {})  # no models at all: endpoint mode too
    assert e.value.problems == [want]


def test_ray_backend_needs_the_gpus_memory_and_every_models_memory() -> None:
    """The router cannot read the nodes' GPUs: each GPU's size and each model's share are declared."""
    assert problems({"backend": "ray"}) == [
        "cluster.gpu_memory_gb: required with backend ray (Ray counts GPUs, not their memory)"]
    assert problems(RAY, m={"cmd": CMD + " --gpu-memory-utilization 0.5"}) == [
        "models.m.memory_gb: required with backend ray: the router cannot read the nodes' GPUs to derive it "
        "from --gpu-memory-utilization"]
    assert config(RAY, m={"cmd": CMD, "memory_gb": 30}).cluster.gpu_memory_gb == 80
    assert problems(RAY, m={"cmd": CMD, "memory_gb": 90}) == [
        "models.m.memory_gb: 90 GB can never fit on a GPU of cluster.gpu_memory_gb (80 GB)"]


def test_a_host_budget_is_refused_with_level_1_sleepers_on_the_cluster() -> None:
    """A level-1 sleeper keeps its weights in its own node's RAM; one host budget for the whole cluster would
    be neither one node's limit nor a safe cluster total: refused, with what to do instead."""
    sleepy = CMD + " --enable-sleep-mode"
    models = {"a": {"cmd": sleepy, "memory_gb": 10, "sleep": True},
              "b": {"cmd": sleepy, "memory_gb": 10, "sleep": {"level": 1}, "replicas": 2},
              "deep": {"cmd": sleepy, "memory_gb": 10, "sleep": {"level": 2}},
              "plain": {"cmd": CMD, "memory_gb": 10}}

    def build(cluster: dict[str, Any], capacity: dict[str, Any], **only: Any) -> RouterConfig:
        chosen = {n: models[n] for n in only} if only else models
        return build_config({"cluster": cluster, "capacity": capacity, "models": chosen}, {})

    with pytest.raises(ConfigError) as e:
        build(RAY, {"host_memory_gb": 64, "host_overflow": "level2"})
    assert e.value.problems == [
        "capacity.host_memory_gb: not with cluster.backend ray while a model sleeps at level 1 (a, b): it is one "
        "machine's budget, and each sleeper keeps its weights in the RAM of its own node; remove it (and size "
        "each node's RAM for its sleepers), or give them sleep: {level: 2}"]
    # without a budget every level sleeps on the cluster; with one, level 2 does (it keeps nothing in host RAM)
    cfg = build(RAY, {})
    assert cfg.host_memory_gb is None and {n: m.sleep_level for n, m in cfg.models.items()} == {
        "a": 1, "b": 1, "deep": 2, "plain": 0}
    assert build(RAY, {"host_memory_gb": 64}, deep=1, plain=1).host_memory_gb == 64
    # on one machine the budget is this machine's: level 1 with a budget is what it is for
    assert build({"backend": "local"}, {"host_memory_gb": 64}).host_memory_gb == 64


def test_check_config_and_the_schema_show_every_cluster_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unknown = problems({"zz": 1})[0]
    listed = re.search(r"\(allowed: (.*)\)", unknown)
    assert listed is not None
    keys = listed.group(1).split(", ")
    assert keys == ["address", "backend", "gpu_memory_gb", "namespace"]
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"cluster": {**RAY, "address": "ray://head:10001"},
                                    "models": {"m": {"cmd": CMD, "memory_gb": 10,
                                                     "resources": {"accelerator_type:H100": 0.001}}}}))
    assert main(["check-config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["cluster"] == {"backend": "ray", "address": "ray://head:10001", "namespace": "vllm-model-router",
                                  "gpu_memory_gb": 80.0}
    assert printed["models"]["m"]["resources"] == {"accelerator_type:H100": 0.001}
    resources = printed["models"]["m"]["resources"]
    again = {"cluster": printed["cluster"], "models": {"m": {"cmd": CMD, "memory_gb": 10, "resources": resources}}}
    assert build_config(again, {}).to_dict() == build_config(yaml.safe_load(path.read_text()), {}).to_dict()
    schema = json_schema()
    cluster = schema["$defs"]["Cluster"]
    assert schema["properties"]["cluster"]["$ref"] == "#/$defs/Cluster" and sorted(cluster["properties"]) == keys
    assert cluster["properties"]["address"]["x-env"] == ["RAY_ADDRESS"]
    assert "resources" in schema["$defs"]["ModelConfig"]["properties"]
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(again)
    for bad in ({"backend": "slurm"}, {"namespace": ""}, {"gpu_memory_gb": 0}, {"address": "a b"}):
        assert not validator.is_valid({"cluster": bad}), bad
    for resources in ({"GPU": 1}, {"x": 0}, {"": 1}):
        model = {"cmd": CMD, "memory_gb": 10, "resources": resources}
        assert not validator.is_valid({"models": {"m": model}}), resources


def test_reading_a_ray_config_never_imports_ray() -> None:
    """Ray is an optional extra: the router's modules and the config, even a ray one, do without it."""
    data = {"cluster": RAY, "models": {"m": {"cmd": CMD, "memory_gb": 10, "resources": {"x": 1}}}}
    code = ("import sys, vllm_model_router.cli, vllm_model_router.http.app\n"
            "from vllm_model_router.config import build_config\n"
            f"assert build_config({data!r}, {{}}).cluster.ray\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_check_config_does_not_hold_a_cluster_config_to_the_gpus_of_the_machine_it_runs_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # run on a node of the cluster, often one with a GPU of its own: the models go on the nodes' GPUs, whose
    # budget is cluster.gpu_memory_gb (capacity.memory_gb where lower), not on this machine's
    from vllm_model_router.gpu import probe

    monkeypatch.setattr(probe.NvmlProbe, "create", classmethod(lambda cls: probe.FakeProbe([24.0])))
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({"cluster": RAY, "capacity": {"memory_gb": 70},
                                    "models": {"tp": {"cmd": CMD, "memory_gb": 36, "gpu_count": 2}}}))
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# Ray cluster: each GPU of its nodes has a budget of 70.0 GB" in out
    assert "Fake GPU" not in out and "GPU 0" not in out
    # the fit it can check without the cluster: a model beyond a GPU's budget is refused as before
    path.write_text(yaml.safe_dump({"cluster": RAY, "models": {"big": {"cmd": CMD, "memory_gb": 90}}}))
    assert main(["check-config", str(path)]) == 1
