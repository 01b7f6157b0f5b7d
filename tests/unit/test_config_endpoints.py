"""Endpoint mode with several engines: ``endpoint.urls`` (or a comma-separated $VLLM_BASE_URL) next to the
single ``endpoint.url`` it generalises, what RouterConfig makes of them, and what is refused."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from vllm_model_router.config import ENGINE, ConfigError, RouterConfig, build_config, json_schema
from vllm_model_router.scheduler.events import replica_name

MODEL = {"cmd": "vllm serve x --port ${PORT} --served-model-name ${MODEL}"}
TWO = ["http://vllm-0:8000", "http://vllm-1:8000"]


def engines(cfg: RouterConfig) -> tuple[str | None, tuple[str, ...], tuple[str, ...]]:
    return cfg.endpoint, cfg.endpoints, cfg.engine_units()


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(data, env or {})
    return e.value.problems


def test_one_url_is_one_engine_as_before() -> None:
    assert engines(build_config({}, {})) == ("http://vllm:8000", ("http://vllm:8000",), (ENGINE,))
    cfg = build_config({"endpoint": {"url": "http://gpu:9000/v1/"}}, {})
    assert engines(cfg) == ("http://gpu:9000", ("http://gpu:9000",), ("@engine",))
    cfg = build_config({"endpoint": {"url": "http://file:1"}}, {"VLLM_BASE_URL": "http://env:2"})
    assert engines(cfg) == ("http://env:2", ("http://env:2",), ("@engine",))


def test_urls_are_the_engines_in_order() -> None:
    cfg = build_config({"endpoint": {"urls": ["http://c:1/v1", *TWO], "adapter_dir": "/adapters"}}, {})
    assert engines(cfg) == ("http://c:1", ("http://c:1", *TWO), ("@engine", "@engine@1", "@engine@2"))
    assert cfg.endpoint_mode and cfg.adapter_dir == "/adapters"
    assert cfg.engine_units() == tuple(replica_name(ENGINE, i) for i in range(3))
    assert engines(build_config({"endpoint": {"urls": TWO[:1], "url": None}}, {})) == (
        TWO[0], (TWO[0],), ("@engine",))


@pytest.mark.parametrize("file", [{}, {"url": "http://file:1"}, {"urls": ["http://f:1", "http://g:1"]}])
def test_a_comma_separated_vllm_base_url_overrides_the_file(file: dict[str, object]) -> None:
    env = {"VLLM_BASE_URL": " http://a:8000 ,http://b:8000/v1,  http://c:8000 ,"}
    cfg = build_config({"endpoint": file}, env)
    assert engines(cfg) == ("http://a:8000", ("http://a:8000", "http://b:8000", "http://c:8000"),
                            ("@engine", "@engine@1", "@engine@2"))
    one = build_config({"endpoint": file}, {"VLLM_BASE_URL": "http://only:1"})
    assert one.endpoints == ("http://only:1",)


def test_outside_endpoint_mode_there_are_no_engines() -> None:
    cfg = build_config({"models": {"m": MODEL}}, {"VLLM_BASE_URL": ",".join(TWO)})
    assert engines(cfg) == (None, (), ())
    assert problems({"endpoint": {"urls": TWO}, "models": {"m": MODEL}}) == [
        "endpoint.urls: models with a cmd are started by the router; endpoint mode is for a config without them"]


@pytest.mark.parametrize(("endpoint", "env", "expected"), [
    ({"url": TWO[0], "urls": TWO[1:]}, {}, ["endpoint: give url or urls, not both"]),
    ({"urls": []}, {}, ["endpoint.urls: must list at least one URL"]),
    ({"urls": [TWO[0], "http://vllm-0:8000/v1/"]}, {}, ["endpoint.urls[1]: 'http://vllm-0:8000' is already urls[0]"]),
    ({"urls": [TWO[0], "vllm-1:8000", ""]}, {}, [
        "endpoint.urls[1]: expected an http(s) URL like http://vllm:8000, got 'vllm-1:8000'",
        "endpoint.urls[2]: expected an http(s) URL like http://vllm:8000, got ''"]),
    ({"urls": TWO[0]}, {}, ["endpoint.urls: expected a list of URLs like [http://vllm-0:8000, http://vllm-1:8000]"]),
    ({}, {"VLLM_BASE_URL": "http://a:1, ftp://b:2"}, [
        "endpoint.urls[1]: expected an http(s) URL like http://vllm:8000, got 'ftp://b:2'"]),
    ({}, {"VLLM_BASE_URL": "http://a:1,http://a:1/"}, ["endpoint.urls[1]: 'http://a:1' is already urls[0]"]),
], ids=["url-and-urls", "empty", "duplicate", "bad-url", "not-a-list", "bad-env-url", "duplicate-env-url"])
def test_what_is_refused(endpoint: dict[str, object], env: dict[str, str], expected: list[str]) -> None:
    assert problems({"endpoint": endpoint}, env) == expected


def test_an_adapter_with_a_base_names_every_engine() -> None:
    data = {"endpoint": {"urls": TWO}, "models": {"sql": {"adapter": "/a/sql", "base": "b"}}}
    assert problems(data) == ["models.sql.base: endpoint mode (no model has a cmd) has no managed bases; adapters "
                              "load on the engines at http://vllm-0:8000, http://vllm-1:8000"]


def test_check_config_shows_the_engines_and_reads_back() -> None:
    several = build_config({"endpoint": {"urls": [f"{u}/v1" for u in TWO]}}, {})
    shown = several.to_dict()["endpoint"]
    assert shown["urls"] == TWO and "url" not in shown
    one = build_config({"endpoint": {"url": TWO[0]}}, {}).to_dict()["endpoint"]
    assert one["url"] == TWO[0] and "urls" not in one
    for cfg in (several, build_config({}, {})):
        printed = cfg.to_dict()
        del printed["auth"]  # shown as counts
        again = build_config(yaml.safe_load(yaml.safe_dump(printed)), {})
        assert again.endpoints == cfg.endpoints and again.to_dict() == cfg.to_dict()


def test_the_schema_describes_urls_and_per_engine_capacity() -> None:
    schema = json_schema()
    urls = schema["$defs"]["Endpoint"]["properties"]["urls"]
    assert urls["x-env"] == ["VLLM_BASE_URL"] and urls["minItems"] == 1 and urls["uniqueItems"] is True
    assert "per engine" in schema["$defs"]["Capacity"]["properties"]["max_resident"]["description"]
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"endpoint": {"urls": TWO, "adapter_dir": "/adapters"}})
    for bad in ([], [TWO[0], TWO[0]], ["vllm-0:8000"], TWO[0]):
        assert not validator.is_valid({"endpoint": {"urls": bad}}), bad
