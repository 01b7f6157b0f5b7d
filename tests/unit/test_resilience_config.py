"""Configuration of access control, limits, restart recovery and shutdown; the key check and log
redaction on their own."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from vllm_model_router.config import ConfigError, build_config, load_config
from vllm_model_router.http import security
from vllm_model_router.http.security import KeyChecker, RedactKeys, Role
from vllm_model_router.runtime.recovery import config_hash

MODEL = {"cmd": "vllm serve x --port ${PORT} --served-model-name ${MODEL}"}
KEY_A, KEY_B, ADMIN = "sk-client-aaaaaaaa", "sk-client-bbbbbbbb", "sk-admin-cccccccc"


def problems(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        build_config(data, env or {})
    return e.value.problems


def test_defaults() -> None:
    cfg = build_config({"models": {"m": MODEL}}, {"HOME": "/home/u"})
    assert not cfg.auth.enabled and cfg.auth.api_keys == () and cfg.auth.admin_keys == ()
    lim = cfg.limits
    assert (lim.client_header_timeout, lim.client_body_timeout, lim.upstream_connect_timeout) == (75, 60, 10)
    assert lim.first_byte_timeout == 600 and lim.max_connections == 1000
    assert cfg.shutdown_grace == 10
    assert cfg.state_dir == os.path.join(os.path.expanduser("~"), ".local", "state", "vllm-model-router")
    assert cfg.models["m"].forward_auth is False
    assert build_config({}, {"ROUTER_STATE_DIR": "/srv/state"}).state_dir == "/srv/state"
    assert build_config({}, {"XDG_STATE_HOME": "/x"}).state_dir == "/x/vllm-model-router"
    assert build_config({"state_dir": "/y"}, {"ROUTER_STATE_DIR": "/srv/state"}).state_dir == "/y"
    assert build_config({"state_dir": False}, {}).state_dir is None


def test_settings_are_parsed() -> None:
    cfg = build_config({
        "auth": {"api_keys": [KEY_A, KEY_A], "admin_keys": ADMIN},
        "limits": {"max_body_mb": 2, "client_header_timeout": "5s", "client_body_timeout": "1m",
                   "upstream_connect_timeout": 3, "first_byte_timeout": "2m", "max_connections": 50},
        "shutdown_grace": "30s", "state_dir": "~/st",
        "models": {"m": {"cmd": MODEL["cmd"] + " --enable-lora", "forward_auth": True},
                   "lora": {"adapter": "/a", "base": "m"}},
    }, {"ROUTER_API_KEYS": f" {KEY_B} ,, ", "ROUTER_ADMIN_KEYS": ""})
    assert cfg.auth.api_keys == (KEY_A, KEY_B) and cfg.auth.admin_keys == (ADMIN,)
    lim = cfg.limits
    assert (lim.client_header_timeout, lim.client_body_timeout, lim.upstream_connect_timeout) == (5, 60, 3)
    assert (lim.first_byte_timeout, lim.max_connections, cfg.max_body_bytes) == (120, 50, 2 * 1024 * 1024)
    assert cfg.shutdown_grace == 30 and cfg.state_dir == os.path.expanduser("~/st")
    assert cfg.models["m"].forward_auth and not cfg.models["lora"].forward_auth
    for off in (0, False, None, "0"):
        assert build_config({"limits": {"first_byte_timeout": off}}, {}).limits.first_byte_timeout is None


def test_keys_are_never_shown() -> None:
    cfg = build_config({"auth": {"api_keys": [KEY_A], "admin_keys": [ADMIN]}}, {})
    for text in (repr(cfg), str(cfg), repr(cfg.auth), str(cfg.to_dict())):
        assert KEY_A not in text and ADMIN not in text
    assert cfg.to_dict()["auth"] == {"api_keys": "1 keys", "admin_keys": "1 keys"}
    found = problems({"auth": {"api_keys": [f"{KEY_A} with spaces", "", 42]}})
    assert found == [f"auth.api_keys[{i}]: a key must be a non-empty string of printable ASCII without spaces"
                     for i in range(3)]


def test_key_files(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "clients").write_text(f"# one per line\n{KEY_A}\n\n  {KEY_B}  \n")
    (tmp_path / "admins").write_text(f"{ADMIN}\n")
    config = tmp_path / "router.yaml"
    config.write_text(f"auth:\n  api_keys_file: keys/clients\n  admin_keys_file: {tmp_path / 'admins'}\n")
    cfg = load_config(config, env={})
    assert cfg.auth.api_keys == (KEY_A, KEY_B) and cfg.auth.admin_keys == (ADMIN,)

    config.write_text("auth:\n  api_keys_file: missing.txt\n")
    with pytest.raises(ConfigError) as e:
        load_config(config, env={})
    assert e.value.problems == [f"auth.api_keys_file: cannot read {tmp_path / 'missing.txt'}: No such file or "
                                "directory"]
    (tmp_path / "bad").write_text(f"{KEY_A} {KEY_B}\n")
    with pytest.raises(ConfigError) as e:
        load_config(_write(config, f"auth:\n  admin_keys_file: {tmp_path / 'bad'}\n"), env={})
    assert len(e.value.problems) == 1 and "line 1: a key must be" in e.value.problems[0]
    assert KEY_A not in e.value.problems[0]


HEAD = f"listen: {{port: 8010}}\nauth:\n  admin_keys: [{ADMIN}]\n"


@pytest.mark.parametrize("text", [
    HEAD + f"  api_keys: [{KEY_A}, : ]]\n",
    HEAD + f"   api_keys: [{KEY_A}]\n",
    HEAD + f"  api_keys: [{KEY_A}\n",
    HEAD + f"\tapi_keys: [{KEY_A}]\n",
    HEAD + f"  api_keys: *{KEY_A}\n",
    HEAD + f"  api_keys: [&{KEY_A}, *{KEY_B}]\n",
    HEAD + f"  api_keys: !{KEY_A}\n",
    HEAD + f"  api_keys: \"{KEY_A}\\q\"\n",
], ids=["flow", "indented", "unclosed", "tab", "alias", "anchor", "tag", "escape"])
def test_yaml_errors_say_where_and_what_but_never_quote_the_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path / "router.yaml", text), env={})
    assert len(e.value.problems) == 1, e.value.problems
    problem = e.value.problems[0]
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/router\.yaml: invalid YAML at line [345], column \d+: [^\n]+",
                        problem), problem
    for key in (ADMIN, KEY_A, KEY_B, "sk-"):
        assert key not in str(e.value), problem
    assert e.value.__cause__ is None and e.value.__suppress_context__  # nothing chained to quote it either


def test_auth_never_names_an_unknown_key_unless_it_is_a_typo() -> None:
    found = problems({"auth": {KEY_A: 1, "api_key": [KEY_B], "admin_keys_file": [ADMIN]}})
    assert sorted(found) == sorted([
        "auth: unknown key, not shown (allowed: admin_keys, admin_keys_file, api_keys, api_keys_file)",
        "auth.api_key: unknown key (allowed: admin_keys, admin_keys_file, api_keys, api_keys_file)",
        "auth.admin_keys_file: expected a file path, got list",
    ])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_new_problem_names_its_field() -> None:
    found = problems({
        "auth": {"api_key": [KEY_A], "api_keys": "x y", "admin_keys_file": 3},
        "limits": {"max_bodymb": 1, "client_body_timeout": 0, "first_byte_timeout": "soon", "max_connections": 0},
        "shutdown_grace": "later", "state_dir": 5,
        "models": {"m": {**MODEL, "forward_auth": "yes"}},
    })
    assert sorted(found) == sorted([
        "models.m.forward_auth: expected true or false, got 'yes'",
        "limits.max_bodymb: unknown key (allowed: client_body_timeout, client_header_timeout, extra_forward_paths, "
        "first_byte_timeout, max_body_mb, max_connections, upstream_connect_timeout)",
        "auth.api_key: unknown key (allowed: admin_keys, admin_keys_file, api_keys, api_keys_file)",
        "auth.api_keys[0]: a key must be a non-empty string of printable ASCII without spaces",
        "auth.admin_keys_file: expected a file path, got int",
        "limits.client_body_timeout: must be greater than 0",
        "limits.first_byte_timeout: expected a duration like 30, 30s, 20m or 1h, got 'soon'",
        "limits.max_connections: must be >= 1, got 0",
        "state_dir: expected a directory path, or false, got 5",
        "shutdown_grace: expected a duration like 30, 30s, 20m or 1h, got 'later'",
    ])
    assert any(p.startswith("config.secrets: unknown key") for p in problems({"secrets": 1}))


def test_key_checker_compares_every_key_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real = security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", counting)
    checker = KeyChecker(build_config({"auth": {"api_keys": [KEY_A, KEY_B], "admin_keys": [ADMIN]}}, {}).auth)
    for key, role in ((KEY_A, Role.CLIENT), (KEY_B, Role.CLIENT), (ADMIN, Role.ADMIN), ("nope", Role.NONE),
                      (KEY_A[:-1], Role.NONE), ("", Role.NONE), ("\udcff", Role.NONE)):
        calls.clear()
        assert checker.role(key) is role
        assert sorted(calls) == sorted(k.encode() for k in (KEY_A, KEY_B, ADMIN))  # no early exit
    assert checker.role(None) is Role.NONE


def test_redaction_scrubs_keys_from_messages_arguments_and_tracebacks() -> None:
    redact = RedactKeys([KEY_A, ADMIN])
    plain = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s and %r", (KEY_A, {"k": ADMIN}), None)
    assert redact.filter(plain) and KEY_A not in plain.getMessage() and ADMIN not in plain.getMessage()
    assert plain.getMessage() == "got *** and {'k': '***'}"
    try:
        raise ValueError(f"bad key {KEY_A}")
    except ValueError as e:
        failing = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None, (type(e), e, e.__traceback__))
    redact.filter(failing)
    text = logging.Formatter().format(failing)
    assert KEY_A not in text and "bad key ***" in text and "ValueError" in text
    untouched = logging.LogRecord("x", logging.INFO, __file__, 1, "nothing %d", (1,), None)
    assert redact.filter(untouched) and untouched.args == (1,)


def test_config_hash_follows_the_command_and_environment() -> None:
    cfg = build_config({"models": {"m": {**MODEL, "env": {"A": "1"}}}}, {})
    m = cfg.models["m"]
    same = build_config({"models": {"m": {**MODEL, "env": {"A": "1"}, "stop_timeout": 5}}}, {}).models["m"]
    other_env = build_config({"models": {"m": {**MODEL, "env": {"A": "2"}}}}, {}).models["m"]
    assert config_hash(m, 8000, ()) == config_hash(same, 8000, ())  # not part of what runs
    assert config_hash(m, 8000, ()) != config_hash(m, 8001, ())
    assert config_hash(m, 8000, ()) != config_hash(m, 8000, (1,))
    assert config_hash(m, 8000, ()) != config_hash(other_env, 8000, ())
