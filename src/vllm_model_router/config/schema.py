"""Every key of the config file, declared once: its type and check, default, environment variable and meaning.

The sections below mirror ``router.yaml``. Validation (load.py), ``check-config``'s output (``to_dict``),
the JSON Schema (``config-schema``) and the scheduler's model specs (specs.py) are all derived from them,
so a new key is one declaration here plus the code that uses it. The markers in ``Annotated[...]`` say how
a value is checked (scalars.py, composites.py), which environment variable sets it (:class:`Env`), and
for a model key whether it applies to adapters (:class:`Scope`).

:class:`RouterConfig`, what the rest of the router reads, is the file flattened: the keys of ``listen``,
``capacity`` and ``endpoint`` are attributes of their own (``config.port``, ``config.max_resident``);
``limits``, ``auth`` and ``cluster`` (declared in cluster.py) stay sections (``config.cluster.backend``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

from pydantic import ConfigDict, Field, PlainSerializer
from pydantic.json_schema import SkipJsonSchema

from vllm_model_router.config.cluster import CLUSTER, RESOURCES, Cluster, Resources
from vllm_model_router.config.composites import (
    BearerKey,
    Command,
    EnvName,
    EnvValue,
    Gpus,
    NullIsDefault,
    Route,
    Shape,
    Shorthand,
    Switch,
    gpu_utilization,
)
from vllm_model_router.config.scalars import (
    BaseUrl,
    Duration,
    Flag,
    Number,
    OneOf,
    StateDir,
    Text,
    Whole,
)
from vllm_model_router.config.section import Env, Internal, Scope, Section, applies

ENGINE = "@engine"  # the scheduler's name for the (first) running vLLM in endpoint mode; the others are
# its replicas' names, ``@engine@1``, ... (RouterConfig.engine_units)
DEFAULT_ENDPOINT = "http://vllm:8000"


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


# --------------------------------------------------------------------------------------------- models
class Sleep(Section):
    """vLLM sleep mode: an evicted model is put to sleep instead of being stopped."""

    level: Annotated[int, OneOf((1, 2), "must be 1 (weights to host RAM) or 2 (weights dropped)")] = Field(
        1, description="1: weights are moved to host RAM (fast wake); 2: they are dropped (reloaded on wake).")
    warmup: Annotated[bool, Flag()] = Field(
        True, description="Send a 1-token request after a wake, before clients are let in.")


class Replicas(Section):
    """Copies of a model's server. Each copy is a unit of its own (its process, port, GPUs and memory, counted
    like any model's) named ``<model>@<n>`` after the first, which keeps the model's name; clients name the
    model and the scheduler picks the copy."""

    min: Annotated[int, Whole(0)] = Field(
        0, description="Copies kept resident: pinned, and loaded at startup while capacity allows.")
    max: Annotated[int, Whole(1)] = Field(
        1, description="Copies resident at most.")
    target_in_flight: Annotated[int, Whole(1)] = Field(
        32, description="Requests in flight per loaded copy above which another copy is started.")
    idle: Annotated[float, Duration()] = Field(
        60.0, description="A copy beyond min idle this long is stopped.")


_REPLICAS = "expected a number of copies or a mapping of min, max, target_in_flight and idle"


class ModelConfig(Section):
    """One entry of ``models:``: a server the router starts (``cmd``) or a LoRA adapter (``adapter``)."""

    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["cmd"]}, {"required": ["adapter"]}]})

    name: SkipJsonSchema[Annotated[str, Internal()]] = Field("", exclude=True)
    cmd: Annotated[tuple[str, ...], Command(), NullIsDefault(), Scope.PROCESS] = Field(
        (), json_schema_extra=_no_default,  # none shown: cmd is required unless adapter is set
        description="The command that starts the model's server: a string (split shell-style) or a list, "
        "run without a shell. ${PORT} is the port the router picks, ${MODEL} this entry's name.")
    memory_gb: Annotated[float, Number(0), NullIsDefault(), Scope.PROCESS] = Field(
        0.0, description="GPU memory it reserves, per GPU it is placed on; counts against capacity.memory_gb. "
        "0: derived from --gpu-memory-utilization.")
    aliases: Annotated[tuple[Annotated[str, Text("expected a non-empty string", test=str.strip)], ...],
                       Shape("list", "expected a list of names")] = Field(
        (), description="Other names clients may use for it.")
    env: Annotated[Mapping[Annotated[str, EnvName()], Annotated[str, EnvValue()]],
                   Shape("mapping", "expected a mapping of variable names to values"), Scope.PROCESS] = Field(
        default_factory=dict, description="Extra environment for the server.")
    health_path: Annotated[str, Text("expected a path starting with '/'", test=lambda p: p.startswith("/"),
                                     json={"type": "string", "pattern": "^/"}), Scope.PROCESS] = Field(
        "/health", description="Polled until the server is ready.")
    stop_timeout: Annotated[float, Duration(), Scope.PROCESS] = Field(
        30.0, description="SIGTERM to the process group, then SIGKILL after this long.")
    adapter: Annotated[str | None, Text("expected the adapter's path", test=str.strip, none=True),
                       Scope.ADAPTER] = Field(
        None, description="A LoRA adapter (its path) loaded at run time into a running server, instead of a cmd.")
    base: Annotated[str | None, Text("expected a model name", none=True), Scope.ADAPTER] = Field(
        None, description="The model the adapter is loaded on (none in endpoint mode: the engine).")
    max_adapters: Annotated[int, Whole(1), Scope.PROCESS] = Field(
        4, description="Adapters loaded on it at once. Default: --max-loras in cmd, else 4.")
    gpus: Annotated[tuple[int, ...] | None, Gpus(), Scope.PROCESS] = Field(
        None, description="Fixed GPUs (CUDA_VISIBLE_DEVICES), or auto: the router places it.")
    gpu_count: Annotated[int, Whole(1), NullIsDefault(), Scope.PROCESS] = Field(
        1, description="GPUs of one machine it is placed on, each holding memory_gb. Default: the number of gpus, "
        "else --tensor-parallel-size x --pipeline-parallel-size in cmd, else 1; set, it wins over cmd.")
    resources: Resources = Field(default_factory=dict, description=RESOURCES)
    sleep: Annotated[Sleep | None, Switch(), Scope.PROCESS] = Field(
        None, description="vLLM sleep mode when evicted: true (level 1), false, or {level, warmup}.")
    replicas: Annotated[Replicas, Shorthand("max", _REPLICAS), NullIsDefault(), Scope.PROCESS] = Field(
        Replicas.model_construct(), description="Copies of its server run side by side: N (at most N at once) or "
        "{min, max, target_in_flight, idle}. Each copy has its own port, GPUs and memory and counts against "
        "max_resident and memory_gb; ${MODEL} stays this entry's name in every copy.")
    weights_gb: Annotated[float | None, Number(0), Scope.PROCESS] = Field(
        None, description="Host RAM a level-1 sleeper holds. Default: estimated from the weight files.")
    sleeping_memory_gb: Annotated[float, Number(0), NullIsDefault(), Scope.PROCESS] = Field(
        1.0, description="GPU memory a sleeping server still holds.")
    forward_auth: Annotated[bool, Flag()] = Field(
        False, description="Send the client's Authorization / x-api-key header on to the model's server.")
    ttl: Annotated[float | None, Duration(unset="default"), Scope.IGNORED_ON_ADAPTER] = Field(
        None, description="Idle time after which it is unloaded (0: never). Default: default_ttl.")
    priority: Annotated[int, Whole(-1000, 1000), Scope.IGNORED_ON_ADAPTER] = Field(
        0, description="Higher wins a contested slot and is evicted last.")
    max_waiting: Annotated[int, Whole(0), Scope.IGNORED_ON_ADAPTER] = Field(
        100, description="Requests waiting for it beyond this get 429.")
    pinned: Annotated[bool, Flag(), Scope.IGNORED_ON_ADAPTER] = Field(
        False, description="Never evicted (an operator may still unload it); counts against capacity.")
    preload: Annotated[bool | str, OneOf((True, False, "predicted"), "expected true, false or predicted"),
                       Scope.IGNORED_ON_ADAPTER] = Field(
        False, description="true: loaded at startup while capacity allows; predicted: may be preloaded.")

    @property
    def is_adapter(self) -> bool:
        return self.adapter is not None

    @property
    def sleep_level(self) -> int:
        """The configured sleep level: 0 (off: evicted means stopped), 1 or 2."""
        return self.sleep.level if self.sleep is not None else 0

    @property
    def warmup(self) -> bool:
        return self.sleep.warmup if self.sleep is not None else True

    @property
    def gpu_memory_utilization(self) -> float | None:
        """``--gpu-memory-utilization`` in the command (rules.py refuses a value outside (0, 1])."""
        util = gpu_utilization(self.cmd)
        return util if util is not None and 0 < util <= 1 else None

    @property
    def copies(self) -> int:
        """The units it runs as at most: its replicas, or 1 for an adapter (it lives in its base's server)."""
        return 1 if self.is_adapter else self.replicas.max

    def unit_names(self) -> tuple[str, ...]:
        """The names of its units (``chat``, ``chat@1``, ...; an adapter's own name)."""
        return unit_names(self.name, self.copies)

    def argv(self, port: int) -> list[str]:
        """The command with ``${PORT}`` and ``${MODEL}`` substituted, ready for exec (no shell)."""
        return [a.replace("${PORT}", str(port)).replace("${MODEL}", self.name) for a in self.cmd]


def unit_names(model: str, copies: int) -> tuple[str, ...]:
    """The unit names of ``copies`` replicas of ``model``, as the scheduler names them (imported here rather
    than at the top so that reading a config does not load the scheduler; specs.py is what needs it)."""
    from vllm_model_router.scheduler.events import replica_name

    return tuple(replica_name(model, i) for i in range(copies))


# --------------------------------------------------------------------------------------------- sections
class Listen(Section):
    host: Annotated[str, Text("expected a host name or address")] = Field(
        "0.0.0.0", description="Address the router listens on.")
    port: Annotated[int, Whole(0, 65535), Env("ROUTER_PORT", "PORT")] = Field(
        8010, description="Port the router listens on.")


class Capacity(Section):
    max_resident: Annotated[int, Whole(1), Env("MAX_RESIDENT")] = Field(
        2, description="Models resident at once; in endpoint mode, adapters resident at once per engine.")
    memory_gb: Annotated[float | None, Number(0)] = Field(
        None, description="Total GPU memory the resident models may reserve (per GPU when GPUs are detected).")
    memory_fraction: Annotated[float, Number(0.01, 1), NullIsDefault()] = Field(
        0.95, description="Per-GPU budget = total memory x this, when GPUs are detected and memory_gb is not set.")
    release_timeout: Annotated[float, Duration()] = Field(
        30.0, description="How long a stopped model's GPU memory may take to come back.")
    host_memory_gb: Annotated[float | None, Number(0)] = Field(
        None, description="Host RAM level-1 sleepers' weights may take.")
    host_overflow: Annotated[str, OneOf(("stop", "level2"), "must be stop or level2")] = Field(
        "stop", description="When host_memory_gb is exceeded: stop the oldest sleeper, or sleep at level 2.")


_URLS = "expected a list of URLs like [http://vllm-0:8000, http://vllm-1:8000]"


class Endpoint(Section):
    """Endpoint mode (no model has a cmd): running vLLM engines, with adapters loaded on demand. One engine is
    ``url``; several are ``urls`` (load.py refuses both at once, an empty list and a URL listed twice)."""

    endpoint: Annotated[str | None, BaseUrl(DEFAULT_ENDPOINT), NullIsDefault(),
                        Env("VLLM_BASE_URL", use="replaces")] = Field(
        DEFAULT_ENDPOINT, alias="url", description="The running vLLM (a trailing /v1 is dropped).")
    endpoints: Annotated[tuple[Annotated[str, BaseUrl()], ...], Shape("list", _URLS, one=False), NullIsDefault(),
                         Env("VLLM_BASE_URL", use="replaces")] = Field(
        (), alias="urls", json_schema_extra={"minItems": 1, "uniqueItems": True},
        description="Several running vLLMs, instead of url: requests for their own models are balanced across "
        "the engines that serve them, adapters are loaded on engines with free slots. A $VLLM_BASE_URL with "
        "commas (http://a:8000,http://b:8000) lists them.")
    adapter_dir: Annotated[str | None, Text("expected a directory path", none=True),
                           Env("ADAPTER_DIR", use="replaces")] = Field(
        None, description="Requests for <name> load the adapter <adapter_dir>/<name> when it exists.")
    sync_interval: Annotated[float, Duration(positive=True)] = Field(
        10.0, description="How often the router's view is reconciled with each engine's /v1/models.")


class LimitsConfig(Section):
    """Client and upstream limits."""

    max_body_mb: Annotated[float, Number(0.001), NullIsDefault()] = Field(
        16.0, description="Larger request bodies get 413.")
    client_header_timeout: Annotated[float, Duration(positive=True)] = Field(
        75.0, description="A connection must send a complete request head within this (keep-alive too).")
    client_body_timeout: Annotated[float, Duration(positive=True)] = Field(
        60.0, description="Reading a request body takes at most this long (else 408).")
    upstream_connect_timeout: Annotated[float, Duration(positive=True)] = Field(
        10.0, description="Connecting to a model's server (else 504).")
    first_byte_timeout: Annotated[float | None, Duration(off=True)] = Field(
        600.0, description="Forwarded request to the first byte of its answer (else 504); false: no bound.")
    max_connections: Annotated[int, Whole(1)] = Field(
        1000, description="Open client connections; beyond it new ones get 503 and are closed.")
    extra_forward_paths: Annotated[
        tuple[Annotated[str, Route()], ...],
        Shape("list", "must be a list of paths, e.g. [/v1/my/route]", one=False, strings=True, unique=True),
        NullIsDefault()] = Field((), description="Paths forwarded besides vLLM's inference routes.")


def _count(keys: tuple[str, ...]) -> str:
    return f"{len(keys)} keys"


_Keys = Annotated[tuple[Annotated[str, BearerKey()], ...], Shape("list", "expected a list of keys"),
                  PlainSerializer(_count)]
_KeysFile = Annotated[str | None, Text("expected a file path", none=True, secret=True)]


class AuthConfig(Section):
    """Bearer keys: clients need one of ``api_keys`` on /v1 (when any is set); /admin needs one of
    ``admin_keys`` (when any is set). Never printed: ``repr`` and ``to_dict`` show counts only."""

    secret: ClassVar[bool] = True

    api_keys: Annotated[_Keys, Env("ROUTER_API_KEYS", use="adds")] = Field(
        (), repr=False, description="Keys clients may use on /v1.")
    admin_keys: Annotated[_Keys, Env("ROUTER_ADMIN_KEYS", use="adds")] = Field(
        (), repr=False, description="Keys for /admin.")
    api_keys_file: _KeysFile = Field(
        None, exclude_if=lambda v: v is None,
        description="More client keys, one per line (# comments); relative to the config file.")
    admin_keys_file: _KeysFile = Field(
        None, exclude_if=lambda v: v is None, description="More admin keys, one per line.")

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)


class Settings(Section):
    """The file's top-level keys that are not sections."""

    load_timeout: Annotated[float, Duration(positive=True), Env("LOAD_TIMEOUT")] = Field(
        1200.0, description="A load that takes longer fails.")
    max_wait: Annotated[float, Duration()] = Field(
        30.0, description="Fairness bound: a model waiting for busy ones gets its turn after this.")
    keep_idle: Annotated[float, Duration()] = Field(
        60.0, description="Protect a model in steady use at most this long after its last request (0: off).")
    keep_idle_reloads: Annotated[float, Number(0)] = Field(
        6.5, description="A newcomer waits for a protected model at most this many of its reloads (and max_wait).")
    default_ttl: Annotated[float, Duration()] = Field(
        0.0, description="Idle time after which a model is unloaded (0: never).")
    max_waiting: Annotated[int, Whole(1)] = Field(
        1000, description="Requests waiting for any model beyond this get 429.")
    preload: Annotated[bool | str, OneOf((False, "predicted"), "expected predicted or false")] = Field(
        False, description="predicted: when idle with free capacity, load the model most likely needed next.")
    restore: Annotated[bool, Flag()] = Field(
        False, description="At startup, preload the models that were resident before the restart.")
    state_dir: Annotated[str | None, StateDir(), Env("ROUTER_STATE_DIR", use="default")] = Field(
        None, description="Usage history, restart records and model logs; false: off. Default: "
        "$XDG_STATE_HOME/vllm-model-router, else ~/.local/state/vllm-model-router.")
    shutdown_grace: Annotated[float, Duration()] = Field(
        10.0, description="On SIGTERM, requests in flight may finish for this long.")


_ModelName = Annotated[str, Text("model names must be non-empty strings", test=str.strip)]


class ConfigFile(Settings):
    """``router.yaml``."""

    listen: Listen = Field(Listen.model_construct(), description="Where the router listens.")
    capacity: Capacity = Field(
        Capacity.model_construct(), description="How many models, and how much memory, may be resident.")
    limits: LimitsConfig = Field(LimitsConfig.model_construct(), description="Client and upstream limits.")
    auth: AuthConfig = Field(AuthConfig.model_construct(), description="Access keys; none: no access control.")
    endpoint: Endpoint = Field(Endpoint.model_construct(), description="Endpoint mode (no model has a cmd): "
                               "running vLLM engines, with adapters loaded on demand.")
    cluster: Cluster = Field(Cluster.model_construct(), description=CLUSTER)
    models: Annotated[dict[_ModelName, ModelConfig], Shape("mapping", "expected a mapping of model names to settings"),
                      NullIsDefault()] = Field(
        default_factory=dict, description="The models, by the name clients use. None: endpoint mode.")


FLATTENED = (Settings, Listen, Capacity, Endpoint)  # the sections whose keys are RouterConfig's own


class RouterConfig(Settings, Listen, Capacity, Endpoint):
    """The validated configuration (built by load.py). In endpoint mode ``endpoints`` are the URLs of the
    running vLLMs in order and ``endpoint`` is the first (what code written for one engine reads); otherwise
    they are empty and None, and so is ``adapter_dir``."""

    models: Mapping[str, ModelConfig] = Field(default_factory=dict)
    auth: AuthConfig = AuthConfig.model_construct()
    limits: LimitsConfig = LimitsConfig.model_construct()
    cluster: Cluster = Cluster.model_construct()
    source: str = "<defaults>"

    @property
    def endpoint_mode(self) -> bool:
        return self.endpoint is not None

    @property
    def preload_predicted(self) -> bool:
        return self.preload == "predicted"

    @property
    def max_body_bytes(self) -> int:
        return int(self.limits.max_body_mb * 1024 * 1024)

    def resolve(self, name: str) -> ModelConfig | None:
        """A configured model by its name or one of its aliases."""
        model = self.models.get(name)
        if model is not None:
            return model
        for m in self.models.values():
            if name in m.aliases:
                return m
        return None

    def units(self) -> dict[str, ModelConfig]:
        """Every unit the router runs, by name, in config order, each with its model's settings: all the
        replicas of a model (``chat``, ``chat@1``, ...) together; an adapter once, under its own name."""
        return {unit: m for name, m in self.models.items()
                for unit in unit_names(name, m.copies)}

    def engine_units(self) -> tuple[str, ...]:
        """The scheduler's names of the engines, in the order of ``endpoints``: ``@engine``, ``@engine@1``, ...
        (none outside endpoint mode); the engines are named as the replicas of one model are."""
        return unit_names(ENGINE, len(self.endpoints))

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as ``check-config`` prints it: the file's layout, every key, each value
        as its check shows it (access keys as counts; the endpoint section only in endpoint mode)."""
        out = _dump(Settings, self)
        for name, field in ConfigFile.model_fields.items():
            if name in Settings.model_fields:
                continue
            if name == "models":
                out[name] = {n: _model_dict(m) for n, m in self.models.items()}
            elif field.annotation is Endpoint:
                if self.endpoint_mode:  # url for one engine, urls for several: the output reads back
                    out[name] = _dump(Endpoint, self)
                    del out[name]["urls" if len(self.endpoints) <= 1 else "url"]
            elif field.annotation in FLATTENED:
                out[name] = _dump(field.annotation, self)
            else:
                out[name] = getattr(self, name).model_dump(mode="json", by_alias=True)
        return out


def _dump(section: type[Section], source: Section) -> dict[str, Any]:
    """The keys of ``section`` as the file spells them, with the values ``source`` has for them."""
    values = {n: getattr(source, n) for n in section.model_fields}
    return section.model_construct(**values).model_dump(mode="json", by_alias=True)


def _model_dict(m: ModelConfig) -> dict[str, Any]:
    keys = {n for n, f in ModelConfig.model_fields.items() if applies(f, m.is_adapter)}
    return m.model_dump(mode="json", by_alias=True, include=keys)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of ``router.yaml`` (``vllm-model-router config-schema``), for editors to validate
    and complete the file: key names, types, defaults, environment variables and what each key means."""
    schema = ConfigFile.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "vllm-model-router configuration",
            "description": "router.yaml: the models the router makes resident on demand, and how.", **schema}
