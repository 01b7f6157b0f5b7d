"""``gpu_count``: the GPUs of one machine a model is placed on (tensor / pipeline parallel), each holding its
``memory_gb``: derived from the command's parallel sizes or fixed ``gpus``, carried to the scheduler, and
refused by ``check_fit`` when the machine has fewer GPUs."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from vllm_model_router.config import ConfigError, RouterConfig, build_config, json_schema
from vllm_model_router.config.specs import scheduler_specs
from vllm_model_router.gpu.memory import MemoryNeed, check_fit, resolve_needs
from vllm_model_router.gpu.probe import GpuMemory

CMD = "vllm serve x --port ${PORT} --served-model-name ${MODEL} --enable-lora"


def config(**keys: Any) -> RouterConfig:
    return build_config({"models": {"m": {"cmd": CMD, **keys}}}, {})


def count(cmd: str = CMD, **keys: Any) -> int:
    return config(cmd=cmd, **keys).models["m"].gpu_count


def problems(**keys: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config(**keys)
    return e.value.problems


def gpus(*totals: float) -> list[GpuMemory]:
    return [GpuMemory(i, f"GPU {i}", total, 0.0, total) for i, total in enumerate(totals)]


def test_one_gpu_by_default() -> None:
    assert count() == 1
    assert count(gpu_count=None) == 1  # an empty key is the default


@pytest.mark.parametrize(("flags", "expected"), [
    ("--tensor-parallel-size 2", 2),
    ("--tensor-parallel-size=4", 4),
    ("-tp 2 -pp 2", 4),
    ("-tp=2 --pipeline-parallel-size=3", 6),
    ("--pipeline-parallel-size 2", 2),
    ("--tensor_parallel_size 2", 2),  # vLLM reads underscores as dashes
    ("-tp 8 -tp 2", 2),  # the last one wins, as in vLLM's parser
])
def test_derived_from_the_parallel_sizes_in_cmd(flags: str, expected: int) -> None:
    assert count(f"{CMD} {flags}") == expected


def test_an_explicit_count_wins_over_cmd() -> None:
    assert count(f"{CMD} -tp 2", gpu_count=4) == 4
    assert count(f"{CMD} -tp 4", gpu_count="1") == 1  # digits, as from the environment, count


def test_fixed_gpus_set_the_count() -> None:
    assert count(gpus=[0, 2]) == 2
    assert count(f"{CMD} -tp 4", gpus=[1]) == 1  # gpus, like gpu_count, is explicit
    assert count(gpus=[0, 1], gpu_count=2) == 2


def test_gpus_and_a_different_count_are_refused() -> None:
    assert problems(gpus=[0, 1], gpu_count=3) == [
        "models.m.gpu_count: must equal the number of gpus (2) when both are set, got 3"]


@pytest.mark.parametrize(("value", "expected"), [
    (0, "models.m.gpu_count: must be >= 1, got 0"),
    (-2, "models.m.gpu_count: must be >= 1, got -2"),
    ("two", "models.m.gpu_count: expected an integer, got 'two'"),
    (True, "models.m.gpu_count: expected an integer, got True"),
])
def test_a_count_below_one_is_refused(value: object, expected: str) -> None:
    assert problems(gpu_count=value) == [expected]


@pytest.mark.parametrize(("flags", "expected"), [
    ("-tp two", "models.m.cmd: --tensor-parallel-size must be an integer >= 1, got 'two'"),
    ("--pipeline-parallel-size=0", "models.m.cmd: --pipeline-parallel-size must be an integer >= 1, got '0'"),
    ("--tensor-parallel-size", "models.m.cmd: --tensor-parallel-size must be an integer >= 1, got ''"),
])
def test_a_bad_parallel_size_in_cmd_is_refused(flags: str, expected: str) -> None:
    assert problems(cmd=f"{CMD} {flags}") == [expected]


def test_refused_on_an_adapter() -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"models": {"b": {"cmd": CMD}, "l": {"adapter": "/l", "base": "b", "gpu_count": 2}}}, {})
    assert e.value.problems == [
        "models.l.gpu_count: not allowed on an adapter (it is loaded into its base's server)"]


def test_the_schema_and_check_config_show_it() -> None:
    prop = json_schema()["$defs"]["ModelConfig"]["properties"]["gpu_count"]
    assert prop["minimum"] == 1 and "Not allowed on an adapter" in prop["description"]
    jsonschema.validate({"models": {"m": {"cmd": CMD, "gpu_count": 2}}}, json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"models": {"m": {"cmd": CMD, "gpu_count": 0}}}, json_schema())
    printed = config(cmd=f"{CMD} -tp 2").to_dict()["models"]["m"]
    assert printed["gpu_count"] == 2  # the resolved count, which reads back the same
    del printed["ttl"]  # shown as "default" (inherited)
    assert build_config({"models": {"m": printed}}, {}).models["m"].gpu_count == 2


def test_scheduler_specs_carry_it_to_every_replica() -> None:
    cfg = config(cmd=f"{CMD} -tp 2", replicas=2)
    specs = scheduler_specs(cfg, {"m": MemoryNeed(10.0, "declared")})
    assert [(u, s.gpu_count) for u, s in specs.items() if not isinstance(s, float)] == [("m", 2), ("m@1", 2)]


def test_check_fit_refuses_more_gpus_than_the_machine_has() -> None:
    cfg = config(cmd=f"{CMD} -tp 4", memory_gb=10)
    devices = gpus(80, 80)
    assert check_fit(cfg, devices, resolve_needs(cfg, devices)) == [
        "models.m.gpu_count: needs 4 GPUs, this machine has 2"]
    assert check_fit(cfg, gpus(80, 80, 80, 80), resolve_needs(cfg, gpus(80, 80, 80, 80))) == []


def test_check_fit_needs_the_memory_on_each_of_its_gpus() -> None:
    """Two GPUs with room for 30 GB: the roomiest (80 GB) alone is not enough for a model on two."""
    cfg = build_config({"capacity": {"memory_fraction": 1.0}, "models": {
        "one": {"cmd": CMD, "memory_gb": 40}, "two": {"cmd": f"{CMD} -tp 2", "memory_gb": 40}}}, {})
    devices = gpus(80, 30, 30)
    assert check_fit(cfg, devices, resolve_needs(cfg, devices)) == [
        "models.two: needs 40.0 GB per GPU (memory_gb (declared)), more than the budget of its GPUs (30.0 GB)"]
