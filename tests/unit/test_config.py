from __future__ import annotations

from pathlib import Path

import pytest

from vllm_model_router.config import ConfigError, build_config, load_config, parse_duration

MODEL = {"cmd": "vllm serve x --port ${PORT} --served-model-name ${MODEL}"}


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(data, env or {})
    return e.value.problems


@pytest.mark.parametrize(("text", "seconds"), [
    (90, 90.0), (1.5, 1.5), ("30s", 30.0), ("20m", 1200.0), ("1h", 3600.0), ("1h30m", 5400.0),
    ("250ms", 0.25), ("45", 45.0),
])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "soon", "10 parsecs", "-5s", -1, True, None, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_defaults_and_resolved_values() -> None:
    cfg = build_config({"models": {"m": {**MODEL, "aliases": ["mm"], "env": {"A": 1, "B": True}}}}, {})
    assert (cfg.host, cfg.port, cfg.max_resident, cfg.memory_gb) == ("0.0.0.0", 8010, 2, None)
    assert cfg.load_timeout == 1200 and cfg.max_body_bytes == 16 * 1024 * 1024
    assert cfg.max_waiting == 1000 and cfg.models["m"].max_waiting == 100
    m = cfg.models["m"]
    assert m.health_path == "/health" and m.stop_timeout == 30
    assert m.env == {"A": "1", "B": "true"}
    assert cfg.resolve("mm") is m and cfg.resolve("m") is m and cfg.resolve("x") is None
    assert m.argv(1234) == ["vllm", "serve", "x", "--port", "1234", "--served-model-name", "m"]


def test_environment_overrides() -> None:
    data = {"listen": {"port": 9000}, "capacity": {"max_resident": 3}, "models": {"m": MODEL}}
    cfg = build_config(data, {"PORT": "9100", "MAX_RESIDENT": "1", "LOAD_TIMEOUT": "5m"})
    assert (cfg.port, cfg.max_resident, cfg.load_timeout) == (9100, 1, 300.0)
    assert build_config(data, {"ROUTER_PORT": "9200", "PORT": "9100"}).port == 9200
    assert "environment MAX_RESIDENT: expected an integer, got 'two'" in problems(data, {"MAX_RESIDENT": "two"})


def test_every_problem_is_reported_with_its_field() -> None:
    found = problems({
        "listen": {"port": 70000, "hots": "x"},
        "capacity": {"max_resident": 0, "memory_gb": 40},
        "load_timeout": "forever",
        "models": {
            "big": {**MODEL, "memory_gb": 50, "stop_timeout": "a while"},
            "noport": {"cmd": "serve --served-model-name ${MODEL}"},
            "nocmd": {"aliases": ["big"]},
            "odd": {**MODEL, "gpu": 1, "health_path": "health"},
        },
    })
    text = "\n".join(found)
    for expected in [
        "listen.port: must be between 0 and 65535",
        "listen.hots: unknown key",
        "capacity.max_resident: must be >= 1",
        "load_timeout: expected a duration",
        "models.big.memory_gb: 50 GB can never fit in capacity.memory_gb (40 GB)",
        "models.big.stop_timeout: expected a duration",
        "models.noport.cmd: must contain ${PORT}",
        "models.nocmd.cmd: required",
        "models.nocmd.aliases[0]: 'big' is already a model name",
        "models.odd.gpu: unknown key",
        "models.odd.health_path: expected a path starting with '/'",
    ]:
        assert expected in text, f"missing {expected!r} in:\n{text}"


def test_alias_collisions() -> None:
    found = problems({"models": {"a": {**MODEL, "aliases": ["x", "x"]}, "b": {**MODEL, "aliases": ["x"]}}})
    assert "models.a.aliases[1]: duplicate alias 'x'" in found
    assert "models.b.aliases[0]: 'x' is already an alias of 'a'" in found


def test_no_models_means_endpoint_mode() -> None:
    cfg = build_config({}, {})
    assert (cfg.endpoint, cfg.adapter_dir, cfg.endpoint_mode) == ("http://vllm:8000", None, True)
    cfg = build_config(None, {"VLLM_BASE_URL": "http://gpu-box:9000/v1/", "ADAPTER_DIR": "/adapters"})
    assert (cfg.endpoint, cfg.adapter_dir) == ("http://gpu-box:9000", "/adapters")
    cfg = build_config({"models": {"sql": {"adapter": "/a/sql", "aliases": ["text2sql"]}}}, {})
    assert cfg.endpoint_mode and cfg.models["sql"].is_adapter and cfg.resolve("text2sql") is cfg.models["sql"]
    assert "endpoint.url: expected an http(s) URL like http://vllm:8000, got 'vllm:8000'" in problems(
        {}, {"VLLM_BASE_URL": "vllm:8000"})


def test_endpoint_settings_count_only_in_endpoint_mode() -> None:
    data = {"endpoint": {"url": "http://file:1", "adapter_dir": "/file"}, "models": {"l": {"adapter": "/a"}}}
    cfg = build_config(data, {"VLLM_BASE_URL": "http://env:2/v1", "ADAPTER_DIR": "/env"})
    assert (cfg.endpoint, cfg.adapter_dir) == ("http://env:2", "/env")
    process_mode = build_config({"endpoint": {"adapter_dir": 5}, "models": {"m": MODEL}}, {"VLLM_BASE_URL": "x"})
    assert (process_mode.endpoint, process_mode.adapter_dir) == (None, None)
    assert problems({"endpoint": {"url": "x"}, "models": {"m": MODEL}}) == [
        "endpoint.url: models with a cmd are started by the router; endpoint mode is for a config without them"]


def test_an_adapter_ignores_scheduling_keys_and_refuses_server_keys() -> None:
    lora = {"adapter": "/a", "base": "b", "pinned": True, "priority": "high", "ttl": "1m"}
    cfg = build_config({"models": {"b": {"cmd": MODEL["cmd"] + " --enable-lora"}, "l": lora}}, {})
    assert (cfg.models["l"].pinned, cfg.models["l"].priority, cfg.models["l"].ttl) == (False, 0, None)
    found = problems({"models": {"l": {"adapter": "/a", "stop_timeout": "later", "gpus": [0]}}})
    assert found == [f"models.l.{key}: not allowed on an adapter (it is loaded into its base's server)"
                     for key in ("stop_timeout", "gpus")]


def test_adapters_on_managed_bases() -> None:
    base = {"cmd": "vllm serve m --port ${PORT} --enable-lora --max-loras 3"}
    cfg = build_config({"models": {"base": base, "sql": {"adapter": "/a/sql", "base": "base"}}}, {})
    assert not cfg.endpoint_mode
    assert cfg.models["base"].max_adapters == 3
    assert cfg.models["base"].env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"
    assert cfg.models["sql"].base == "base"
    found = problems({"models": {
        "plain": MODEL,
        "nobase": {"adapter": "/a/x"},
        "badbase": {"adapter": "/a/y", "base": "ghost"},
        "onplain": {"adapter": "/a/z", "base": "plain", "cmd": "x ${PORT}"},
    }})
    assert "models.nobase.base: required (the model this adapter is loaded on)" in found
    assert "models.badbase.base: unknown model 'ghost'" in found
    assert any(p.startswith("models.plain.cmd: must include --enable-lora") for p in found)
    assert any(p.startswith("models.onplain.cmd: not allowed on an adapter") for p in found)


def test_wrong_shapes() -> None:
    assert "config: expected a mapping, got list" in problems([1, 2])
    assert "models.m.cmd: expected a string or a list of strings" in problems({"models": {"m": {"cmd": {"a": 1}}}})


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("models:\n  m:\n    cmd: a ${PORT}\n  m:\n    cmd: b ${PORT}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, {})
    assert "duplicate key 'm'" in str(e.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", {})
    f = tmp_path / "bad.yaml"
    f.write_text("models: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(f, {})


def test_cmd_as_list_and_shell_metacharacters_stay_literal() -> None:
    cfg = build_config({"models": {"m": {"cmd": ["serve", "--port", "${PORT}", "$(rm -rf /);", "a b"]}}}, {})
    assert cfg.models["m"].argv(5) == ["serve", "--port", "5", "$(rm -rf /);", "a b"]
