"""Typed, frozen router configuration: YAML file + environment overrides.

Every validation problem is collected with its location (``models.qwen.memory_gb``) so that
``check-config`` can print all of them at once and ``serve`` refuses to start with a clear message.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from vllm_model_router.routes import extra_route_problem

DEFAULT_PORT = 8010
DEFAULT_MAX_RESIDENT = 2
DEFAULT_LOAD_TIMEOUT = 20 * 60.0
DEFAULT_STOP_TIMEOUT = 30.0
DEFAULT_MAX_WAIT = 30.0
DEFAULT_MAX_BODY_MB = 16.0
DEFAULT_ENDPOINT = "http://vllm:8000"
DEFAULT_SYNC_INTERVAL = 10.0
DEFAULT_MAX_ADAPTERS = 4
DEFAULT_SHUTDOWN_GRACE = 10.0
ENGINE = "@engine"  # the scheduler's name for the one running vLLM in endpoint mode
PLACEHOLDERS = ("${PORT}", "${MODEL}")


class ConfigError(Exception):
    """One or more configuration problems, each prefixed with the field it concerns."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    cmd: tuple[str, ...]
    memory_gb: float = 0.0
    aliases: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    health_path: str = "/health"
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    adapter: str | None = None  # a LoRA adapter (path) instead of a server command
    base: str | None = None  # for an adapter in process mode: the model it is loaded on
    max_adapters: int = DEFAULT_MAX_ADAPTERS  # for a base: adapters loaded at once
    gpus: tuple[int, ...] | None = None  # fixed GPUs (CUDA_VISIBLE_DEVICES); None: the router places it
    gpu_memory_utilization: float | None = None  # from --gpu-memory-utilization in cmd
    forward_auth: bool = False  # send the client's Authorization / x-api-key on to the model's server
    sleep_level: int = 0  # vLLM sleep mode: 0 off (evicted = stopped), 1 (weights to host RAM) or 2 (dropped)
    warmup: bool = True  # a 1-token request after a wake, before clients are let in
    weights_gb: float | None = None  # host RAM a level-1 sleeper holds (None: estimated)
    ttl: float | None = None  # idle time after which it is unloaded (None: default_ttl; 0: never)
    priority: int = 0  # higher wins a contested slot and is evicted last
    max_waiting: int = 100  # requests waiting for it beyond this get 429
    pinned: bool = False  # never evicted (an operator may still unload it); counts against capacity
    preload: bool | str = False  # True: loaded at startup while capacity allows; "predicted": may be preloaded
    sleeping_memory_gb: float = 1.0  # GPU memory a sleeping engine still holds

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    def argv(self, port: int) -> list[str]:
        """The command with ``${PORT}`` and ``${MODEL}`` substituted, ready for exec (no shell)."""
        return [a.replace("${PORT}", str(port)).replace("${MODEL}", self.name) for a in self.cmd]


@dataclass(frozen=True)
class AuthConfig:
    """Bearer keys: clients need one of ``api_keys`` on /v1 (when any is set); /admin needs one of
    ``admin_keys`` (when any is set). Never printed: ``repr`` and ``to_dict`` show counts only."""

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    admin_keys: tuple[str, ...] = field(default=(), repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)


@dataclass(frozen=True)
class LimitsConfig:
    """Client and upstream timeouts and the connection limit (``max_body_mb`` is RouterConfig.max_body_bytes)."""

    client_header_timeout: float = 75.0  # a connection must send a complete request head within this (keep-alive too)
    client_body_timeout: float = 60.0  # reading a request body takes at most this long (else 408)
    upstream_connect_timeout: float = 10.0  # connecting to a model's server (else 504)
    first_byte_timeout: float | None = 600.0  # forwarded request → first byte of the answer (else 504); None: no bound
    max_connections: int = 1000  # open client connections; beyond it new ones get 503 and are closed
    extra_forward_paths: tuple[str, ...] = ()  # forwarded besides vLLM's inference routes (routes.py)


@dataclass(frozen=True)
class RouterConfig:
    models: Mapping[str, ModelConfig]
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    max_resident: int = DEFAULT_MAX_RESIDENT
    memory_gb: float | None = None
    load_timeout: float = DEFAULT_LOAD_TIMEOUT
    max_wait: float = DEFAULT_MAX_WAIT
    host_memory_gb: float | None = None  # budget for level-1 sleepers' weights in host RAM
    host_overflow: str = "stop"  # when it is exceeded: stop the oldest sleeper, or sleep at level 2
    default_ttl: float = 0.0  # idle time after which a model is unloaded (0: never)
    keep_idle: float = 0.0  # protect a model in steady use this long after its last request (0: off)
    max_waiting_total: int = 1000  # requests waiting for any model beyond this get 429
    preload_predicted: bool = False  # when idle with free capacity, load the model most likely needed next
    restore: bool = False  # at startup, preload the models that were resident before the restart
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1024 * 1024)
    endpoint: str | None = None  # endpoint mode: the one running vLLM (no model has a cmd)
    adapter_dir: str | None = None  # endpoint mode: <adapter_dir>/<name> adapters load on demand
    sync_interval: float = DEFAULT_SYNC_INTERVAL
    memory_fraction: float = 0.95  # per-GPU budget = total x this, when GPUs are detected
    release_timeout: float = 30.0  # how long a stopped model's GPU memory may take to come back
    source: str = "<defaults>"
    auth: AuthConfig = field(default_factory=AuthConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    state_dir: str | None = None  # where the started process groups are recorded (restart recovery); None: off
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE  # in-flight requests may finish for this long on SIGTERM

    @property
    def endpoint_mode(self) -> bool:
        return self.endpoint is not None

    def resolve(self, name: str) -> ModelConfig | None:
        """A configured model by its name or one of its aliases."""
        model = self.models.get(name)
        if model is not None:
            return model
        for m in self.models.values():
            if name in m.aliases:
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "listen": {"host": self.host, "port": self.port},
            "capacity": {"max_resident": self.max_resident, "memory_gb": self.memory_gb,
                         "host_memory_gb": self.host_memory_gb, "host_overflow": self.host_overflow,
                         "memory_fraction": self.memory_fraction, "release_timeout": self.release_timeout},
            "load_timeout": self.load_timeout,
            "max_wait": self.max_wait,
            "keep_idle": self.keep_idle,
            "default_ttl": self.default_ttl,
            "max_waiting": self.max_waiting_total,
            "preload": "predicted" if self.preload_predicted else False,
            "restore": self.restore,
            "limits": {"max_body_mb": self.max_body_bytes / (1024 * 1024), **_limits_dict(self.limits)},
            "auth": {"api_keys": f"{len(self.auth.api_keys)} keys", "admin_keys": f"{len(self.auth.admin_keys)} keys"},
            "state_dir": self.state_dir if self.state_dir is not None else False,
            "shutdown_grace": self.shutdown_grace,
            **(
                {"endpoint": {"url": self.endpoint, "adapter_dir": self.adapter_dir,
                              "sync_interval": self.sync_interval}}
                if self.endpoint_mode else {}
            ),
            "models": {m.name: _model_dict(m) for m in self.models.values()},
        }


def _model_dict(m: ModelConfig) -> dict[str, Any]:
    if m.adapter is not None:
        d: dict[str, Any] = {"adapter": m.adapter}
        if m.base is not None:
            d["base"] = m.base
        d["aliases"] = list(m.aliases)
        if m.forward_auth:
            d["forward_auth"] = True
        return d
    return {
        "cmd": " ".join(shlex.quote(a) for a in m.cmd),
        "memory_gb": m.memory_gb,
        "aliases": list(m.aliases),
        "env": dict(m.env),
        "health_path": m.health_path,
        "stop_timeout": m.stop_timeout,
        "max_adapters": m.max_adapters,
        "gpus": list(m.gpus) if m.gpus is not None else "auto",
        "sleep": {"level": m.sleep_level, "warmup": m.warmup} if m.sleep_level else False,
        "ttl": m.ttl if m.ttl is not None else "default",
        "priority": m.priority,
        "max_waiting": m.max_waiting,
        "pinned": m.pinned,
        "preload": m.preload,
        "forward_auth": m.forward_auth,
    }


_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*)+$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from ``90``, ``1.5``, ``"30s"``, ``"20m"``, ``"1h"``, ``"1h30m"`` or ``"250ms"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value!r}")
        return float(value)
    if not isinstance(value, str) or not value.strip() or not _DURATION_RE.match(value):
        raise ValueError(f"expected a duration like 30, 30s, 20m or 1h, got {value!r}")
    return sum(float(n) * _UNITS[u or None] for n, u in _PART_RE.findall(value))


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of silently keeping the last one."""


class _DuplicateKey(yaml.constructor.ConstructorError):
    """A mapping key given twice: its message names the key (a field or model name), so it is kept."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise _DuplicateKey(
                None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

# a quoted name in PyYAML's problem text: an alias, anchor or tag, i.e. text from the file (it may be a key
# that starts with * & or !), unless it is a single character or a token name such as '<block end>'
_QUOTED_RE = re.compile(r"""'([^']*)'|"([^"]*)\"""")


def _unquoted(text: str) -> str:
    def keep_or_hide(m: re.Match[str]) -> str:
        name = m.group(1) if m.group(1) is not None else m.group(2)
        return m.group(0) if len(name) <= 4 or (name.startswith("<") and name.endswith(">")) else "'…'"

    return _QUOTED_RE.sub(keep_or_hide, text)


def yaml_error_problem(path: Path, e: yaml.YAMLError) -> str:
    """File, line, column and what is wrong, never the source around it: PyYAML's own message quotes the
    lines near the error, which in an ``auth`` section are keys, and config errors reach logs and terminals."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        if not isinstance(e, _DuplicateKey):
            what = _unquoted(what)
        if e.problem and e.context and e.context_mark is not None:
            what += f" ({_unquoted(e.context)} started at line {e.context_mark.line + 1})"
        return f"{path}: invalid YAML{where}: {what}"
    if isinstance(e, yaml.reader.ReaderError):
        return f"{path}: invalid YAML at character {e.position}: {e.reason}"
    return f"{path}: invalid YAML ({type(e).__name__})"

_TOP_KEYS = {"listen", "capacity", "load_timeout", "max_wait", "limits", "endpoint", "models", "auth", "state_dir",
             "shutdown_grace",
             "default_ttl", "keep_idle", "max_waiting", "preload", "restore"}
_ENDPOINT_KEYS = {"url", "adapter_dir", "sync_interval"}
_LISTEN_KEYS = {"host", "port"}
_CAPACITY_KEYS = {"max_resident", "memory_gb", "memory_fraction", "release_timeout", "host_memory_gb", "host_overflow"}
_LIMIT_KEYS = {"max_body_mb", "client_header_timeout", "client_body_timeout", "upstream_connect_timeout",
               "first_byte_timeout", "max_connections", "extra_forward_paths"}
_AUTH_KEYS = {"api_keys", "admin_keys", "api_keys_file", "admin_keys_file"}
_MODEL_KEYS = {
    "cmd", "memory_gb", "aliases", "env", "health_path", "stop_timeout", "adapter", "base", "max_adapters", "gpus",
    "sleep", "weights_gb", "sleeping_memory_gb", "forward_auth", "ttl", "priority", "max_waiting", "pinned", "preload",
}
_SLEEP_KEYS = {"level", "warmup"}
_GPU_UTIL_RE = re.compile(r"^--gpu-memory-utilization(?:=(.+))?$")
_MAX_LORAS_RE = re.compile(r"^--max-loras(?:=(\d+))?$")


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def mapping(self, value: object, where: str, allowed: set[str], *, secret: bool = False) -> dict[str, Any]:
        """``secret``: a section in which an unknown key is named only when it is a near miss of an allowed
        one (a typo); anything else may be a misplaced API key, so it is not shown."""
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return {}
        for key in value:
            if secret and key not in allowed and not difflib.get_close_matches(str(key), allowed, 1, 0.8):
                self.problems.append(f"{where}: unknown key, not shown (allowed: {', '.join(sorted(allowed))})")
            elif not isinstance(key, str):
                self.problems.append(f"{where}: keys must be strings, got {key!r}")
            elif key not in allowed:
                self.problems.append(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(allowed))})")
        return {k: v for k, v in value.items() if isinstance(k, str)}

    def duration(self, raw: Mapping[str, Any], key: str, where: str, default: float) -> float:
        if key not in raw:
            return default
        try:
            return parse_duration(raw[key])
        except ValueError as e:
            self.problems.append(f"{where}: {e}")
            return default

    def number(self, raw: Mapping[str, Any], key: str, where: str, *, minimum: float) -> float | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problems.append(f"{where}: expected a number, got {value!r}")
            return None
        if value < minimum:
            self.problems.append(f"{where}: must be >= {minimum:g}, got {value!r}")
            return None
        return float(value)

    def integer(self, value: object, where: str, *, minimum: int, maximum: int | None = None) -> int | None:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            self.problems.append(f"{where}: expected an integer, got {value!r}")
            return None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            self.problems.append(f"{where}: must be {bound}, got {value}")
            return None
        return value


def _parse_model(c: _Checker, name: object, raw_value: object) -> ModelConfig | None:
    where = f"models.{name}"
    if not isinstance(name, str) or not name.strip():
        c.problems.append(f"models: model names must be non-empty strings, got {name!r}")
        return None
    if name.startswith("@"):
        c.problems.append(f"{where}: model names must not start with '@' (reserved)")
    raw = c.mapping(raw_value, where, _MODEL_KEYS)
    if raw_value is not None and not isinstance(raw_value, dict):
        return None
    adapter = raw.get("adapter")
    if adapter is not None:
        return _parse_adapter(c, name, raw, where)
    cmd_raw = raw.get("cmd")
    cmd: tuple[str, ...] = ()
    if cmd_raw is None:
        c.problems.append(f"{where}.cmd: required (the command that starts the model's server), or adapter:")
    elif isinstance(cmd_raw, str):
        try:
            cmd = tuple(shlex.split(cmd_raw))
        except ValueError as e:
            c.problems.append(f"{where}.cmd: cannot be split shell-style: {e}")
    elif isinstance(cmd_raw, list) and all(isinstance(a, str | int | float) for a in cmd_raw):
        cmd = tuple(str(a) for a in cmd_raw)
    else:
        c.problems.append(f"{where}.cmd: expected a string or a list of strings")
    if cmd_raw is not None and cmd == () and not any(p.startswith(f"{where}.cmd") for p in c.problems):
        c.problems.append(f"{where}.cmd: must not be empty")
    if cmd and not any("${PORT}" in a for a in cmd):
        c.problems.append(f"{where}.cmd: must contain ${{PORT}} (the router picks the port the server listens on)")
    memory = c.number(raw, "memory_gb", f"{where}.memory_gb", minimum=0) or 0.0
    env_raw = raw.get("env", {})
    env: dict[str, str] = {}
    if not isinstance(env_raw, dict):
        c.problems.append(f"{where}.env: expected a mapping of variable names to values")
    else:
        for k, v in env_raw.items():
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                c.problems.append(f"{where}.env: invalid variable name {k!r}")
            elif isinstance(v, dict | list) or v is None:
                c.problems.append(f"{where}.env.{k}: expected a string, number or boolean")
            else:
                env[k] = str(v).lower() if isinstance(v, bool) else str(v)
    health = raw.get("health_path", "/health")
    if not isinstance(health, str) or not health.startswith("/"):
        c.problems.append(f"{where}.health_path: expected a path starting with '/', got {health!r}")
        health = "/health"
    stop_timeout = c.duration(raw, "stop_timeout", f"{where}.stop_timeout", DEFAULT_STOP_TIMEOUT)
    for key in ("base",):
        if key in raw:
            c.problems.append(f"{where}.{key}: only adapters (models with adapter:) have a base")
    max_adapters = _max_loras(cmd) or DEFAULT_MAX_ADAPTERS
    if "max_adapters" in raw:
        max_adapters = c.integer(raw["max_adapters"], f"{where}.max_adapters", minimum=1) or max_adapters
    gpus: tuple[int, ...] | None = None
    gpus_raw = raw.get("gpus")
    if gpus_raw is not None and gpus_raw != "auto":
        if isinstance(gpus_raw, int) and not isinstance(gpus_raw, bool):
            gpus_raw = [gpus_raw]
        if (not isinstance(gpus_raw, list) or not gpus_raw
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in gpus_raw)):
            c.problems.append(f"{where}.gpus: expected a list of GPU indexes like [0] or [0, 1], or auto")
        elif len(set(gpus_raw)) != len(gpus_raw):
            c.problems.append(f"{where}.gpus: duplicate GPU index in {gpus_raw}")
        else:
            gpus = tuple(gpus_raw)
    util = _gpu_util(cmd)
    if util is not None and not 0 < util <= 1:
        c.problems.append(f"{where}.cmd: --gpu-memory-utilization must be in (0, 1], got {util:g}")
        util = None
    sleep_level, warmup = _sleep(c, raw.get("sleep"), where)
    if sleep_level and cmd and "--enable-sleep-mode" not in cmd:
        c.problems.append(f"{where}.cmd: must include --enable-sleep-mode (sleep: is set)")
    if sleep_level and "VLLM_SERVER_DEV_MODE" not in env:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # vLLM serves /sleep and /wake_up only in dev mode ("1", not "true")
    weights = c.number(raw, "weights_gb", f"{where}.weights_gb", minimum=0)
    ttl = c.duration(raw, "ttl", f"{where}.ttl", -1.0)
    priority = c.integer(raw.get("priority", 0), f"{where}.priority", minimum=-1000, maximum=1000)
    max_waiting = c.integer(raw.get("max_waiting", 100), f"{where}.max_waiting", minimum=0)
    pinned = raw.get("pinned", False)
    if not isinstance(pinned, bool):
        c.problems.append(f"{where}.pinned: expected true or false, got {pinned!r}")
        pinned = False
    preload = raw.get("preload", False)
    if preload not in (True, False, "predicted"):
        c.problems.append(f"{where}.preload: expected true, false or predicted, got {preload!r}")
        preload = False
    sleeping = c.number(raw, "sleeping_memory_gb", f"{where}.sleeping_memory_gb", minimum=0)
    return ModelConfig(
        name=name,
        cmd=cmd,
        memory_gb=memory,
        aliases=_aliases(c, raw, where),
        env=env,
        health_path=health,
        stop_timeout=stop_timeout,
        max_adapters=max_adapters,
        gpus=gpus,
        gpu_memory_utilization=util,
        sleep_level=sleep_level,
        warmup=warmup,
        weights_gb=weights,
        sleeping_memory_gb=1.0 if sleeping is None else sleeping,
        ttl=None if ttl < 0 else ttl,
        priority=priority or 0,
        max_waiting=100 if max_waiting is None else max_waiting,
        pinned=pinned,
        preload=preload,
        forward_auth=_flag(c, raw, "forward_auth", where),
    )


def _sleep(c: _Checker, raw: object, where: str) -> tuple[int, bool]:
    """``sleep: true`` (level 1), ``false``, or ``{level: 1|2, warmup: true}``."""
    if raw is None or raw is False:
        return 0, True
    if raw is True:
        return 1, True
    settings = c.mapping(raw, f"{where}.sleep", _SLEEP_KEYS)
    if not isinstance(raw, dict):
        return 0, True
    level = settings.get("level", 1)
    if level not in (1, 2) or isinstance(level, bool):
        c.problems.append(f"{where}.sleep.level: must be 1 (weights to host RAM) or 2 (weights dropped), got {level!r}")
        level = 1
    warmup = settings.get("warmup", True)
    if not isinstance(warmup, bool):
        c.problems.append(f"{where}.sleep.warmup: expected true or false, got {warmup!r}")
        warmup = True
    return int(level), warmup


def _gpu_util(cmd: tuple[str, ...]) -> float | None:
    for i, arg in enumerate(cmd):
        m = _GPU_UTIL_RE.match(arg)
        if m:
            value = m.group(1) or (cmd[i + 1] if i + 1 < len(cmd) else "")
            try:
                return float(value)
            except ValueError:
                return -1.0  # reported as out of range
    return None


def _max_loras(cmd: tuple[str, ...]) -> int | None:
    for i, arg in enumerate(cmd):
        m = _MAX_LORAS_RE.match(arg)
        if m:
            value = m.group(1) or (cmd[i + 1] if i + 1 < len(cmd) else "")
            return int(value) if value.isdigit() and int(value) > 0 else None
    return None


def _aliases(c: _Checker, raw: Mapping[str, Any], where: str) -> tuple[str, ...]:
    aliases_raw = raw.get("aliases", [])
    aliases: list[str] = []
    if isinstance(aliases_raw, str):
        aliases_raw = [aliases_raw]
    if not isinstance(aliases_raw, list):
        c.problems.append(f"{where}.aliases: expected a list of names")
        return ()
    for i, a in enumerate(aliases_raw):
        if not isinstance(a, str) or not a.strip():
            c.problems.append(f"{where}.aliases[{i}]: expected a non-empty string, got {a!r}")
        elif a in aliases:
            c.problems.append(f"{where}.aliases[{i}]: duplicate alias {a!r}")
        else:
            aliases.append(a)
    return tuple(aliases)


def _parse_adapter(c: _Checker, name: str, raw: Mapping[str, Any], where: str) -> ModelConfig | None:
    path = raw["adapter"]
    if not isinstance(path, str) or not path.strip():
        c.problems.append(f"{where}.adapter: expected the adapter's path, got {path!r}")
        return None
    for key in ("cmd", "memory_gb", "env", "health_path", "stop_timeout", "max_adapters", "sleep", "weights_gb",
                "sleeping_memory_gb", "gpus"):
        if key in raw:
            c.problems.append(f"{where}.{key}: not allowed on an adapter (it is loaded into its base's server)")
    base = raw.get("base")
    if base is not None and (not isinstance(base, str) or not base):
        c.problems.append(f"{where}.base: expected a model name, got {base!r}")
        base = None
    return ModelConfig(name=name, cmd=(), aliases=_aliases(c, raw, where), adapter=path, base=base,
                       forward_auth=_flag(c, raw, "forward_auth", where))


def build_config(data: object, env: Mapping[str, str] | None = None, source: str = "<dict>") -> RouterConfig:
    """Validate parsed YAML (a dict) plus environment overrides into a RouterConfig, or raise ConfigError."""
    env = os.environ if env is None else env
    c = _Checker()
    top = c.mapping(data, "config", _TOP_KEYS) if data is not None else {}
    listen = c.mapping(top.get("listen"), "listen", _LISTEN_KEYS)
    capacity = c.mapping(top.get("capacity"), "capacity", _CAPACITY_KEYS)
    limits = c.mapping(top.get("limits"), "limits", _LIMIT_KEYS)
    auth_raw = c.mapping(top.get("auth"), "auth", _AUTH_KEYS, secret=True)
    endpoint_raw = c.mapping(top.get("endpoint"), "endpoint", _ENDPOINT_KEYS)

    host = listen.get("host", "0.0.0.0")
    if not isinstance(host, str) or not host:
        c.problems.append(f"listen.host: expected a host name or address, got {host!r}")
        host = "0.0.0.0"
    port: int | None = DEFAULT_PORT
    if "port" in listen:
        port = c.integer(listen["port"], "listen.port", minimum=0, maximum=65535)
    for var in ("ROUTER_PORT", "PORT"):
        if env.get(var):
            port = c.integer(env[var], f"environment {var}", minimum=0, maximum=65535)
            break
    max_resident: int | None = DEFAULT_MAX_RESIDENT
    if "max_resident" in capacity:
        max_resident = c.integer(capacity["max_resident"], "capacity.max_resident", minimum=1)
    if env.get("MAX_RESIDENT"):
        max_resident = c.integer(env["MAX_RESIDENT"], "environment MAX_RESIDENT", minimum=1)
    memory_budget = c.number(capacity, "memory_gb", "capacity.memory_gb", minimum=0)
    fraction = c.number(capacity, "memory_fraction", "capacity.memory_fraction", minimum=0.01)
    if fraction is not None and fraction > 1:
        c.problems.append(f"capacity.memory_fraction: must be <= 1, got {fraction:g}")
        fraction = None
    release_timeout = c.duration(capacity, "release_timeout", "capacity.release_timeout", 30.0)
    host_budget = c.number(capacity, "host_memory_gb", "capacity.host_memory_gb", minimum=0)
    host_overflow = capacity.get("host_overflow", "stop")
    if host_overflow not in ("stop", "level2"):
        c.problems.append(f"capacity.host_overflow: must be stop or level2, got {host_overflow!r}")
        host_overflow = "stop"
    load_timeout = c.duration(top, "load_timeout", "load_timeout", DEFAULT_LOAD_TIMEOUT)
    if env.get("LOAD_TIMEOUT"):
        try:
            load_timeout = parse_duration(env["LOAD_TIMEOUT"])
        except ValueError as e:
            c.problems.append(f"environment LOAD_TIMEOUT: {e}")
    if load_timeout <= 0:
        c.problems.append("load_timeout: must be greater than 0")
    max_wait = c.duration(top, "max_wait", "max_wait", DEFAULT_MAX_WAIT)
    default_ttl = c.duration(top, "default_ttl", "default_ttl", 0.0)
    keep_idle = c.duration(top, "keep_idle", "keep_idle", 0.0)
    max_waiting_total = c.integer(top.get("max_waiting", 1000), "max_waiting", minimum=1) or 1000
    preload_global = top.get("preload", False)
    if preload_global not in (False, "predicted"):
        c.problems.append(f"preload: expected predicted or false, got {preload_global!r}")
        preload_global = False
    restore = top.get("restore", False)
    if not isinstance(restore, bool):
        c.problems.append(f"restore: expected true or false, got {restore!r}")
        restore = False
    body_mb = c.number(limits, "max_body_mb", "limits.max_body_mb", minimum=0.001) or DEFAULT_MAX_BODY_MB

    models_raw = top.get("models")
    models: dict[str, ModelConfig] = {}
    if models_raw is None or models_raw == {}:
        pass  # endpoint mode: front the running vLLM at VLLM_BASE_URL
    elif not isinstance(models_raw, dict):
        c.problems.append("models: expected a mapping of model names to settings")
    else:
        for name, raw_model in models_raw.items():
            model = _parse_model(c, name, raw_model)
            if model is not None:
                models[model.name] = model
    owner: dict[str, str] = {name: name for name in models}
    for m in models.values():
        for i, alias in enumerate(m.aliases):
            if alias in owner:
                other = owner[alias]
                what = "a model name" if alias == other else f"an alias of {other!r}"
                c.problems.append(f"models.{m.name}.aliases[{i}]: {alias!r} is already {what}")
            else:
                owner[alias] = m.name
    endpoint, adapter_dir, sync_interval = _endpoint_settings(c, endpoint_raw, env, models)
    for m in models.values():
        if not m.is_adapter:
            continue
        if endpoint is not None and m.base is not None:
            c.problems.append(f"models.{m.name}.base: endpoint mode (no model has a cmd) has no managed bases; "
                              f"adapters load on the engine at {endpoint}")
        elif endpoint is None and m.base is None:
            c.problems.append(f"models.{m.name}.base: required (the model this adapter is loaded on)")
        elif endpoint is None and m.base is not None:
            base = models.get(m.base)
            if base is None:
                c.problems.append(f"models.{m.name}.base: unknown model {m.base!r}")
            elif base.is_adapter:
                c.problems.append(f"models.{m.name}.base: {m.base!r} is an adapter, not a base model")
            elif not any(a == "--enable-lora" or a.startswith("--enable-lora=") for a in base.cmd):
                c.problems.append(f"models.{m.base}.cmd: must include --enable-lora (adapter {m.name!r} is "
                                  f"loaded on it at run time)")
    bases = {m.base for m in models.values() if m.base is not None}
    for name in bases & set(models):
        base = models[name]
        if not base.is_adapter and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in base.env:
            models[name] = replace(base, env={**base.env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})
    if memory_budget is not None:
        for m in models.values():
            if m.memory_gb > memory_budget:
                c.problems.append(
                    f"models.{m.name}.memory_gb: {m.memory_gb:g} GB can never fit in "
                    f"capacity.memory_gb ({memory_budget:g} GB)"
                )
    auth = _auth_settings(c, auth_raw, env, source)
    limit_settings = _limit_settings(c, limits)
    state_dir = _state_dir(c, top, env)
    shutdown_grace = c.duration(top, "shutdown_grace", "shutdown_grace", DEFAULT_SHUTDOWN_GRACE)
    if c.problems:
        raise ConfigError(c.problems)
    assert port is not None and max_resident is not None
    return RouterConfig(
        models=models,
        host=host,
        port=port,
        max_resident=max_resident,
        memory_gb=memory_budget,
        load_timeout=load_timeout,
        max_wait=max_wait,
        max_body_bytes=int(body_mb * 1024 * 1024),
        endpoint=endpoint,
        adapter_dir=adapter_dir,
        sync_interval=sync_interval,
        memory_fraction=fraction or 0.95,
        host_memory_gb=host_budget,
        host_overflow=str(host_overflow),
        default_ttl=default_ttl,
        keep_idle=keep_idle,
        max_waiting_total=max_waiting_total,
        preload_predicted=preload_global == "predicted",
        restore=restore,
        release_timeout=release_timeout,
        source=source,
        auth=auth,
        limits=limit_settings,
        state_dir=state_dir,
        shutdown_grace=shutdown_grace,
    )


def _endpoint_settings(
    c: _Checker, raw: Mapping[str, Any], env: Mapping[str, str], models: Mapping[str, ModelConfig]
) -> tuple[str | None, str | None, float]:
    """Endpoint mode when no model has a command: the URL of the running vLLM, the adapter folder."""
    sync_interval = c.duration(raw, "sync_interval", "endpoint.sync_interval", DEFAULT_SYNC_INTERVAL)
    if sync_interval <= 0:
        c.problems.append("endpoint.sync_interval: must be greater than 0")
    if any(not m.is_adapter for m in models.values()):
        if raw.get("url") is not None:
            c.problems.append("endpoint.url: models with a cmd are started by the router; endpoint mode is for a "
                              "config without them")
        return None, None, sync_interval
    url = env.get("VLLM_BASE_URL") or raw.get("url") or DEFAULT_ENDPOINT
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
        c.problems.append(f"endpoint.url: expected an http(s) URL like http://vllm:8000, got {url!r}")
        url = DEFAULT_ENDPOINT
    url = url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    adapter_dir = env.get("ADAPTER_DIR") or raw.get("adapter_dir")
    if adapter_dir is not None and (not isinstance(adapter_dir, str) or not adapter_dir):
        c.problems.append(f"endpoint.adapter_dir: expected a directory path, got {adapter_dir!r}")
        adapter_dir = None
    return url, adapter_dir, sync_interval


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> RouterConfig:
    """Read and validate a YAML config file (``None``: defaults plus environment only)."""
    if path is None:
        return build_config({}, env, source="<no config file>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text: {e}"]) from e
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        raise ConfigError([yaml_error_problem(p, e)]) from None  # the chained error would quote the source
    return build_config(data, env, source=str(p))


# ----------------------------------------------------------------- access control, limits, state
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: what fits in a Bearer header


def _flag(c: _Checker, raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        c.problems.append(f"{where}.{key}: expected true or false, got {value!r}")
        return False
    return value


def _keys(c: _Checker, raw: Mapping[str, Any], env: Mapping[str, str], kind: str, var: str,
          base_dir: Path | None) -> tuple[str, ...]:
    """The ``<kind>_keys`` list, the keys in ``<kind>_keys_file`` (one per line; blank lines and ``#``
    comments ignored) and env ``var`` (comma-separated). Problems never quote a key."""
    found: list[tuple[str, str]] = []  # (where, key)
    listed = raw.get(f"{kind}_keys", [])
    if isinstance(listed, str):
        listed = [listed]
    if not isinstance(listed, list):
        c.problems.append(f"auth.{kind}_keys: expected a list of keys")
    else:
        found += [(f"auth.{kind}_keys[{i}]", k) for i, k in enumerate(listed)]
    path_raw = raw.get(f"{kind}_keys_file")
    if path_raw is not None:
        where = f"auth.{kind}_keys_file"
        if not isinstance(path_raw, str) or not path_raw:
            c.problems.append(f"{where}: expected a file path, got {type(path_raw).__name__}")
        else:
            path = Path(path_raw).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                c.problems.append(f"{where}: cannot read {path}: {reason}")
            else:
                found += [(f"{where} ({path}) line {n}", ln.strip()) for n, ln in enumerate(lines, 1)
                          if ln.strip() and not ln.strip().startswith("#")]
    found += [(f"environment {var} item {i}", k.strip())
              for i, k in enumerate(env.get(var, "").split(",")) if k.strip()]
    keys: list[str] = []
    for where, key in found:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            c.problems.append(f"{where}: a key must be a non-empty string of printable ASCII without spaces")
        elif key not in keys:
            keys.append(key)
    return tuple(keys)


def _auth_settings(c: _Checker, raw: Mapping[str, Any], env: Mapping[str, str], source: str) -> AuthConfig:
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    return AuthConfig(
        api_keys=_keys(c, raw, env, "api", "ROUTER_API_KEYS", base_dir),
        admin_keys=_keys(c, raw, env, "admin", "ROUTER_ADMIN_KEYS", base_dir),
    )


def _limit_settings(c: _Checker, raw: Mapping[str, Any]) -> LimitsConfig:
    d = LimitsConfig()
    timeouts: dict[str, float] = {}
    for key in ("client_header_timeout", "client_body_timeout", "upstream_connect_timeout"):
        timeouts[key] = c.duration(raw, key, f"limits.{key}", getattr(d, key))
        if timeouts[key] <= 0:
            c.problems.append(f"limits.{key}: must be greater than 0")
    first_byte: float | None = d.first_byte_timeout
    if "first_byte_timeout" in raw:
        value = raw["first_byte_timeout"]
        first_byte = None if value in (None, False, 0, "0", "off") else c.duration(
            raw, "first_byte_timeout", "limits.first_byte_timeout", 0.0) or None
    max_connections = d.max_connections
    if "max_connections" in raw:
        max_connections = c.integer(raw["max_connections"], "limits.max_connections", minimum=1) or max_connections
    return LimitsConfig(first_byte_timeout=first_byte, max_connections=max_connections,
                        extra_forward_paths=_extra_forward_paths(c, raw.get("extra_forward_paths")), **timeouts)


def _extra_forward_paths(c: _Checker, raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
        c.problems.append("limits.extra_forward_paths: must be a list of paths, e.g. [/v1/my/route]")
        return ()
    for i, path in enumerate(raw):
        problem = extra_route_problem(path)
        if problem is not None:
            c.problems.append(f"limits.extra_forward_paths[{i}]: {problem}")
    return tuple(dict.fromkeys(raw))


def _limits_dict(limits: LimitsConfig) -> dict[str, Any]:
    return {
        "client_header_timeout": limits.client_header_timeout,
        "client_body_timeout": limits.client_body_timeout,
        "upstream_connect_timeout": limits.upstream_connect_timeout,
        "first_byte_timeout": limits.first_byte_timeout if limits.first_byte_timeout is not None else False,
        "max_connections": limits.max_connections,
        "extra_forward_paths": list(limits.extra_forward_paths),
    }


def default_state_dir(env: Mapping[str, str]) -> str:
    """$ROUTER_STATE_DIR, else $XDG_STATE_HOME/vllm-model-router, else ~/.local/state/vllm-model-router."""
    if env.get("ROUTER_STATE_DIR"):
        return env["ROUTER_STATE_DIR"]
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "vllm-model-router")


def _state_dir(c: _Checker, top: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """``state_dir: PATH``; ``false`` turns restart recovery off; absent: :func:`default_state_dir`."""
    if "state_dir" not in top:
        return default_state_dir(env)
    value = top["state_dir"]
    if value is False or value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        c.problems.append(f"state_dir: expected a directory path, or false, got {value!r}")
        return None
    return os.path.expanduser(value)
