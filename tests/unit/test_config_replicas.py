"""``replicas``: a model run as several copies of its server, each a unit of its own (``chat``, ``chat@1``, ...)
that the scheduler sees as a spec of its own, grouped under the model's name."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml

from vllm_model_router.config import ConfigError, build_config, json_schema
from vllm_model_router.config.schema import Replicas
from vllm_model_router.config.specs import scheduler_specs
from vllm_model_router.gpu.memory import MemoryNeed
from vllm_model_router.scheduler import ModelSpec

CMD = "vllm serve x --port ${PORT} --served-model-name ${MODEL} --enable-lora"


def model(**keys: Any) -> dict[str, Any]:
    return {"cmd": CMD, **keys}


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(data, {})
    return e.value.problems


def replicas(value: object) -> Replicas:
    return build_config({"models": {"chat": model(replicas=value)}}, {}).models["chat"].replicas


def test_defaults_are_one_copy_none_kept() -> None:
    r = build_config({"models": {"chat": model()}}, {}).models["chat"].replicas
    assert (r.min, r.max, r.target_in_flight, r.idle) == (0, 1, 32, 60.0)
    assert replicas(None) == r  # an empty `replicas:` is the default


@pytest.mark.parametrize("value", [3, "3"])
def test_a_number_is_the_most_copies(value: object) -> None:
    r = replicas(value)
    assert (r.min, r.max, r.target_in_flight, r.idle) == (0, 3, 32, 60.0)


def test_the_mapping_form() -> None:
    r = replicas({"min": 1, "max": 3, "target_in_flight": 8, "idle": "2m"})
    assert (r.min, r.max, r.target_in_flight, r.idle) == (1, 3, 8, 120.0)
    assert replicas({"min": 2, "max": 2}).min == 2  # min == max: every copy kept


@pytest.mark.parametrize(("value", "expected"), [
    ({"min": 3, "max": 2}, "models.chat.replicas.min: must be <= max (2), got 3"),
    ({"min": 2}, "models.chat.replicas.min: must be <= max (1), got 2"),
    (0, "models.chat.replicas.max: must be >= 1, got 0"),
    ({"max": 0}, "models.chat.replicas.max: must be >= 1, got 0"),
    ({"min": -1}, "models.chat.replicas.min: must be >= 0, got -1"),
    (-2, "models.chat.replicas.max: must be >= 1, got -2"),
    ({"target_in_flight": 0}, "models.chat.replicas.target_in_flight: must be >= 1, got 0"),
    ({"idle": "soon"}, "models.chat.replicas.idle: expected a duration like 30, 30s, 20m or 1h, got 'soon'"),
    ({"maximum": 3}, "models.chat.replicas.maximum: unknown key (allowed: idle, max, min, target_in_flight)"),
    (True, "models.chat.replicas: expected a number of copies or a mapping of min, max, target_in_flight and "
           "idle, got True"),
    ("three", "models.chat.replicas: expected a number of copies or a mapping of min, max, target_in_flight "
              "and idle, got 'three'"),
], ids=["min-over-max", "min-over-default-max", "zero", "max-zero", "negative-min", "negative", "no-target",
        "bad-idle", "unknown-key", "boolean", "word"])
def test_bad_replicas_are_reported_at_their_key(value: object, expected: str) -> None:
    assert problems({"models": {"chat": model(replicas=value)}}) == [expected]


def test_names_and_aliases_may_not_look_like_a_replica() -> None:
    found = problems({"models": {"chat@1": model(), "other": model(aliases=["o@12", "o@x", "o@1a"])}})
    assert found == [
        "models.chat@1: model names must not end in @<number>: replicas are named that way (chat@1, chat@2, ...)",
        "models.other.aliases[0]: 'o@12' must not end in @<number>: replicas are named that way "
        "(chat@1, chat@2, ...)",
    ]
    build_config({"models": {"org/chat@v2": model()}}, {})  # an @ elsewhere is no replica's name


def test_an_adapter_has_no_replicas() -> None:
    data = {"models": {"base": model(), "l": {"adapter": "/l", "base": "base", "replicas": 2}}}
    assert problems(data) == ["models.l.replicas: not allowed on an adapter (it is loaded into its base's server)"]


def test_fixed_gpus_allow_replicas() -> None:
    m = build_config({"models": {"chat": model(gpus=[0], replicas=2)}}, {}).models["chat"]
    assert (m.gpus, m.replicas.max) == ((0,), 2)


def test_units_name_every_copy_in_config_order() -> None:
    cfg = build_config({"models": {
        "chat": model(replicas=3), "l": {"adapter": "/l", "base": "chat"}, "solo": model(),
        "pair": model(replicas={"min": 1, "max": 2})}}, {})
    units = cfg.units()
    assert list(units) == ["chat", "chat@1", "chat@2", "l", "solo", "pair", "pair@1"]
    assert units["chat@2"] is cfg.models["chat"] and units["pair@1"] is cfg.models["pair"]
    assert units["l"] is cfg.models["l"]
    assert cfg.models["chat"].unit_names() == ("chat", "chat@1", "chat@2")
    assert cfg.models["l"].unit_names() == ("l",)
    # every copy serves under the model's own name: clients see one model
    assert cfg.models["chat"].argv(9) == ["vllm", "serve", "x", "--port", "9", "--served-model-name", "chat",
                                          "--enable-lora"]


def test_scheduler_specs_one_per_unit() -> None:
    cfg = build_config({"default_ttl": "1m", "models": {
        "chat": model(replicas={"min": 1, "max": 3, "target_in_flight": 8, "idle": "30s"}, priority=5, gpus=[1]),
        "l": {"adapter": "/l", "base": "chat"},
        "solo": model(ttl=0)}}, {})
    needs = {"chat": MemoryNeed(10.0, "declared"), "solo": MemoryNeed(20.0, "declared")}
    specs = scheduler_specs(cfg, needs)
    assert list(specs) == ["chat", "chat@1", "chat@2", "solo", "l"]  # bases before adapters, replicas together
    for i, unit in enumerate(["chat", "chat@1", "chat@2"]):
        assert specs[unit] == ModelSpec(memory_gb=10.0, gpus=(1,), ttl=60.0, priority=5, group="chat", replica=i,
                                        replicas_min=1, replicas_max=3, target_in_flight=8, replica_idle=30.0)
    assert specs["solo"] == ModelSpec(memory_gb=20.0, ttl=0.0)  # one copy: no group, as before replicas
    assert specs["l"] == ModelSpec(base="chat")


def test_one_copy_kept_has_no_group() -> None:
    cfg = build_config({"models": {"m": model(replicas={"min": 1})}}, {})
    spec = scheduler_specs(cfg, {"m": MemoryNeed(5.0, "declared")})["m"]
    assert isinstance(spec, ModelSpec)
    assert (spec.group, spec.replica, spec.replicas_min, spec.replicas_max) == (None, 0, 1, 1)


def test_the_replicas_defaults_are_the_schedulers() -> None:
    spec, r = ModelSpec(), Replicas()
    assert (spec.replicas_min, spec.replicas_max, spec.target_in_flight, spec.replica_idle) == (
        r.min, r.max, r.target_in_flight, r.idle)


def test_the_schema_and_check_config_know_replicas() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    for good in (3, {"min": 1, "max": 3, "target_in_flight": 32, "idle": "60s"}, {}):
        assert validator.is_valid({"models": {"m": model(replicas=good)}}), good
    for bad in (0, True, {"maximum": 3}, {"min": -1}):
        assert not validator.is_valid({"models": {"m": model(replicas=bad)}}), bad
    cfg = build_config({"models": {"m": model(replicas={"min": 1, "max": 2, "idle": "2m"})}}, {})
    shown = cfg.to_dict()["models"]["m"]["replicas"]
    assert shown == {"min": 1, "max": 2, "target_in_flight": 32, "idle": 120.0}
    assert replicas(yaml.safe_load(yaml.safe_dump(shown))) == cfg.models["m"].replicas  # reads back the same
