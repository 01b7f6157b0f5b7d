"""The config is declared once: the JSON Schema (`config-schema`), `check-config`'s output and the scheduler's
model specs follow from the declarations, so a key added there shows up everywhere without more edits."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from vllm_model_router.cli import main
from vllm_model_router.config import ConfigError, ModelConfig, build_config, json_schema, load_config
from vllm_model_router.config.specs import COMPUTED, scheduler_specs
from vllm_model_router.gpu.memory import MemoryNeed
from vllm_model_router.scheduler import ModelSpec, SchedulerConfig

ROOT = Path(__file__).resolve().parents[2]
CMD = "vllm serve x --port ${PORT} --enable-lora --enable-sleep-mode"
SECTIONS = ["", "listen", "capacity", "limits", "endpoint", "cluster", "models.m", "models.m.sleep"]


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def router_configs() -> list[Path]:
    """The example files that are router configs (not, say, a compose file)."""
    found = [p for p in sorted((ROOT / "examples").glob("*.yaml")) if "services" not in yaml.safe_load(p.read_text())]
    assert found
    return found


@pytest.mark.parametrize("path", router_configs(), ids=lambda p: p.name)
def test_the_schema_accepts_the_examples(validator: jsonschema.Draft202012Validator, path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert [e.message for e in validator.iter_errors(data)] == []
    build_config(data, {})  # and so does the router


@pytest.mark.parametrize("data", [
    {"listen": {"prot": 8010}},
    {"models": {"m": {"cmd": "serve --port ${PORT}", "memroy_gb": 4}}},
    {"models": {"m": {"cmd": "serve --port ${PORT}", "sleep": {"levle": 1}}}},
    {"capacity": {"max_resident": "two"}},
    {"load_timeout": "forever"},
    {"models": {"m": {"cmd": "serve --port ${PORT}", "pinned": "yes"}}},
    {"models": {"m": {"memory_gb": 4}}},  # neither cmd nor adapter
], ids=["unknown-key", "unknown-model-key", "unknown-sleep-key", "not-an-integer", "not-a-duration", "not-a-flag",
        "no-cmd"])
def test_the_schema_rejects_what_the_router_rejects(validator: jsonschema.Draft202012Validator,
                                                   data: dict[str, Any]) -> None:
    assert not validator.is_valid(data)
    with pytest.raises(ConfigError):
        build_config(data, {})


def test_config_schema_command_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json_schema()
    port = printed["$defs"]["Listen"]["properties"]["port"]
    assert port["default"] == 8010 and port["x-env"] == ["ROUTER_PORT", "PORT"] and "overrides" in port["description"]


def accepted_keys() -> set[str]:
    """Every key the parser accepts, as it lists them itself when it meets an unknown one."""
    keys: set[str] = set()
    for section in SECTIONS:
        data: dict[str, Any] = {"models": {"m": {"cmd": CMD, "sleep": {}}}}
        at = data
        for part in filter(None, section.split(".")):
            at = at.setdefault(part, {})
        at["zz_unknown"] = 1
        found = [p for p in problems(data) if "zz_unknown: unknown key" in p]
        assert len(found) == 1, found
        allowed = re.search(r"\(allowed: (.*)\)", found[0])
        assert allowed is not None
        keys |= {f"{section}.{k}".lstrip(".") for k in allowed.group(1).split(", ")}
    found = problems({"auth": {"api_keyz": []}})  # a near miss is named, with the keys allowed
    keys |= {f"auth.{k}" for k in re.findall(r"\(allowed: (.*)\)", found[0])[0].split(", ")}
    return keys


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(data, {})
    return e.value.problems


def schema_has(schema: dict[str, Any], path: str) -> bool:
    node: dict[str, Any] = schema
    for part in path.split("."):
        node = resolve(schema, node)
        if part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]  # models: any name
        else:
            return False
    return True


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    refs = [node, *node.get("anyOf", [])]
    ref = next((n["$ref"] for n in refs if "$ref" in n), None)
    return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else node


def shown(dumps: list[dict[str, Any]], path: str) -> bool:
    def walk(node: Any, parts: list[str]) -> bool:
        if not parts:
            return True
        if not isinstance(node, dict):
            return False
        if parts[0] == "m":  # any model: a process model or an adapter
            return any(walk(v, parts[1:]) for v in node.values())
        return parts[0] in node and walk(node[parts[0]], parts[1:])
    return any(walk(d, path.split(".")) for d in dumps)


def test_every_key_the_parser_accepts_is_in_the_schema_and_in_check_config_output(tmp_path: Path) -> None:
    keys = accepted_keys()
    assert {"listen.port", "models.m.stop_timeout", "models.m.sleep.level", "auth.api_keys_file"} <= keys
    (tmp_path / "keys").write_text("sk-client-aaaaaaaa\n")
    path = tmp_path / "router.yaml"
    path.write_text(yaml.safe_dump({
        "auth": {"api_keys_file": "keys", "admin_keys_file": "keys"},
        "models": {"base": {"cmd": CMD, "sleep": True}, "lora": {"adapter": "/a", "base": "base"}},
    }))
    engines = {"endpoint": {"urls": ["http://a:8000", "http://b:8000"]}}  # url is shown for one engine, urls for more
    dumps = [load_config(path, {}).to_dict(), build_config({"models": {"lora": {"adapter": "/a"}}}, {}).to_dict(),
             build_config(engines, {}).to_dict()]
    schema = json_schema()
    assert sorted(k for k in keys if not schema_has(schema, k)) == []
    assert sorted(k for k in keys if not shown(dumps, k)) == []


def test_check_config_output_reads_back_as_the_same_config(tmp_path: Path) -> None:
    data = {"listen": {"port": 9000}, "load_timeout": "5m", "state_dir": False,
            "limits": {"first_byte_timeout": "off", "extra_forward_paths": ["/v1/x"]},
            "models": {"m": {"cmd": CMD, "gpus": [0], "sleep": {"level": 2}, "ttl": "1h", "env": {"A": 1}}}}
    cfg = build_config(data, {})
    printed = cfg.to_dict()
    del printed["auth"]  # shown as counts
    printed["models"]["m"]["ttl"] = 3600.0
    again = build_config(yaml.safe_load(yaml.safe_dump(printed)), {})
    assert again.to_dict() == cfg.to_dict() and again.models == cfg.models


def test_scheduler_specs_copy_the_settings_the_scheduler_shares_by_name() -> None:
    shared = {f.name for f in dataclasses.fields(ModelSpec)} - COMPUTED
    assert shared <= set(ModelConfig.model_fields) | {"sleep_level"}, "a ModelSpec field with no config key"
    cfg = build_config({"default_ttl": "1m", "models": {
        "a": {"cmd": CMD, "priority": 5, "max_waiting": 7, "gpus": [1], "sleep": True, "max_adapters": 3},
        "b": {"cmd": CMD, "ttl": 0}, "l": {"adapter": "/l", "base": "a"}}}, {})
    needs = {n: MemoryNeed(10.0, "declared") for n in cfg.models}
    specs = scheduler_specs(cfg, needs, {"a": MemoryNeed(4.0, "declared")})
    assert list(specs) == ["a", "b", "l"]
    assert specs["a"] == ModelSpec(memory_gb=10.0, max_adapters=3, gpus=(1,), sleep_level=1, sleeping_gb=1.0,
                                   weights_gb=4.0, ttl=60.0, priority=5, max_waiting=7)
    assert specs["b"] == ModelSpec(memory_gb=10.0, ttl=0.0)
    assert specs["l"] == ModelSpec(base="a")


def test_the_config_and_the_scheduler_agree_on_defaults() -> None:
    """The scheduler keeps defaults of its own (tests build specs by hand); they must be the config's."""
    spec, model = ModelSpec(), ModelConfig()
    for name in {f.name for f in dataclasses.fields(ModelSpec)} - COMPUTED:
        assert getattr(spec, name) == getattr(model, name), name
    scheduler = {f.name: f.default for f in dataclasses.fields(SchedulerConfig)}
    cfg = build_config({}, {})
    assert (scheduler["max_waiting_total"], scheduler["keep_idle"], scheduler["keep_idle_reloads"],
            scheduler["host_overflow"]) == (cfg.max_waiting, cfg.keep_idle, cfg.keep_idle_reloads, cfg.host_overflow)
