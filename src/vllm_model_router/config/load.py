"""Reading the configuration: the YAML file, the environment, key files, then the checks across keys.

:func:`build_config` validates the file against its declaration (schema.py), applies the environment
variables each key declares, reads the access-key files, runs the checks that span keys (rules.py) and
returns the flat :class:`RouterConfig`, or raises :class:`ConfigError` with every problem found.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import PydanticCustomError

from vllm_model_router.config.cluster import Cluster
from vllm_model_router.config.composites import BearerKey
from vllm_model_router.config.problems import (
    ConfigError,
    Problems,
    unknown_keys,
    validated,
    where,
)
from vllm_model_router.config.rules import (
    check_adapters,
    check_aliases,
    check_cluster,
    check_fit,
    resolve_model,
    sort_model_keys,
)
from vllm_model_router.config.scalars import BaseUrl
from vllm_model_router.config.schema import (
    DEFAULT_ENDPOINT,
    FLATTENED,
    AuthConfig,
    ConfigFile,
    Endpoint,
    ModelConfig,
    RouterConfig,
    Settings,
)
from vllm_model_router.config.section import Env, Section, checker, marker


def build_config(data: object, env: Mapping[str, str] | None = None, source: str = "<dict>") -> RouterConfig:
    """Validate parsed YAML (a dict) plus environment overrides into a RouterConfig, or raise ConfigError."""
    env = os.environ if env is None else env
    problems = Problems()
    data = copy.deepcopy(data)
    engine = data.pop("endpoint", None) if isinstance(data, dict) else None  # checked once the mode is known
    if isinstance(data, dict) and isinstance(data.get("models"), dict):
        sort_model_keys(data["models"], problems)
    file = validated(ConfigFile, data, problems)
    for loc, message in unknown_keys(file):
        problems.add(loc, message)
    models: dict[str, ModelConfig] = {}
    for name, entry in file.models.items():
        model = resolve_model(name, entry, problems)
        if model is not None:
            models[name] = model
    check_aliases(models, problems)
    values = _flat_values(file, env, problems)
    values |= _endpoint(engine, env, all(m.is_adapter for m in models.values()), problems)
    check_adapters(models, values["endpoints"], problems)
    check_fit(models, values["memory_gb"], problems)
    cluster = file.cluster.model_copy(update=_env_values(Cluster, file.cluster, env, problems))
    check_cluster(cluster, models, values["memory_gb"], problems, values["host_memory_gb"])
    auth = _auth(file.auth, env, source, problems)
    if problems:
        raise ConfigError(problems.messages)
    return RouterConfig.model_construct(**values, models=models, auth=auth, limits=file.limits, cluster=cluster,
                                        source=source)


def _flat_values(file: ConfigFile, env: Mapping[str, str], problems: Problems) -> dict[str, Any]:
    """The values of the sections RouterConfig flattens (but ``endpoint``), with the environment's overrides."""
    sections: list[tuple[type[Section], Section]] = [(Settings, file)]
    sections += [(field.annotation, getattr(file, key)) for key, field in ConfigFile.model_fields.items()
                 if field.annotation in FLATTENED and field.annotation not in (Settings, Endpoint)]
    values: dict[str, Any] = {}
    for kind, section in sections:
        values |= _env_values(kind, section, env, problems)
    if "state_dir" not in file.model_fields_set:  # the one key whose default comes from the environment
        values["state_dir"] = default_state_dir(env)
    return values


def _env_values(kind: type[Section], section: Section, env: Mapping[str, str], problems: Problems) -> dict[str, Any]:
    """The values of the keys of ``kind`` in ``section``, each overridden by the variable it declares, if set."""
    values: dict[str, Any] = {}
    for name, field in kind.model_fields.items():
        values[name] = getattr(section, name)
        declared = marker(field, Env)
        if declared is not None and declared.use == "overrides":
            values[name] = _overridden(kind, name, declared, values[name], env, problems)
    return values


_URL_KEYS = ("url", "urls")  # the engines: one, or several
_ENGINE_KEYS = (*_URL_KEYS, "adapter_dir")  # the endpoint keys that mean something only in endpoint mode
_ONE_URL = BaseUrl()  # an engine's URL as urls' items are checked


def _endpoint(raw: object, env: Mapping[str, str], endpoint_mode: bool, problems: Problems) -> dict[str, Any]:
    """The ``endpoint`` section. In endpoint mode (no model has a cmd) the variables that replace its keys
    do so before they are checked; otherwise there is no engine to point at."""
    if raw is not None and not isinstance(raw, dict):
        validated(Endpoint, raw, problems, at=("endpoint",))  # reports its shape; the environment still counts
    raw = dict(raw) if isinstance(raw, dict) else {}
    if not endpoint_mode:
        for key in _URL_KEYS:
            if raw.get(key) is not None:
                problems.add(("endpoint", key), "models with a cmd are started by the router; endpoint mode is "
                                                "for a config without them")
        for key in _ENGINE_KEYS:
            raw.pop(key, None)
    else:
        for key, name in Endpoint.keys().items():
            declared = marker(Endpoint.model_fields[name], Env)
            var = _first_set(declared, env)
            if var is not None and declared.use == "replaces" and key not in _URL_KEYS:
                raw[key] = env[var]
        _engine_urls(raw, env)
    section = validated(Endpoint, raw, problems, at=("endpoint",))
    for loc, message in unknown_keys(section, ("endpoint",)):
        problems.add(loc, message)
    values = {name: getattr(section, name) for name in Endpoint.model_fields}
    if not endpoint_mode:
        return values | {"endpoint": None, "endpoints": (), "adapter_dir": None}
    _check_engines(raw, problems)
    engines: tuple[str, ...] = section.endpoints or (section.endpoint or DEFAULT_ENDPOINT,)
    return values | {"endpoint": engines[0], "endpoints": engines}


def _engine_urls(raw: dict[Any, Any], env: Mapping[str, str]) -> None:
    """$VLLM_BASE_URL (declared on both url and urls) takes the place of whichever the file gave: one URL is
    ``url``, several (comma-separated, blanks around the commas ignored) are ``urls``."""
    var = _first_set(marker(Endpoint.model_fields["endpoint"], Env), env)
    if var is None:
        return
    urls = [u.strip() for u in env[var].split(",") if u.strip()]
    for key in _URL_KEYS:
        raw.pop(key, None)
    if len(urls) == 1:
        raw["url"] = urls[0]
    else:
        raw["urls"] = urls


def _check_engines(raw: dict[Any, Any], problems: Problems) -> None:
    """What the engines' keys cannot check one by one: url and urls at once, an empty list, an engine listed
    twice (compared as checked: ``http://a:8000/v1`` is ``http://a:8000``), each at its place in the file."""
    urls = raw.get("urls")
    if raw.get("url") is not None and urls is not None:
        problems.add(("endpoint",), "give url or urls, not both")
    if not isinstance(urls, list | tuple):
        return
    if not urls:
        problems.add(("endpoint", "urls"), "must list at least one URL")
    seen: dict[str, int] = {}
    for i, url in enumerate(urls):
        try:
            url = _ONE_URL.validate(url)
        except PydanticCustomError:
            continue  # reported by the key's check
        if url in seen:
            problems.add(("endpoint", "urls", i), f"{url!r} is already urls[{seen[url]}]")
        seen.setdefault(url, i)


def _overridden(kind: type[Section], name: str, declared: Env, value: Any, env: Mapping[str, str],
                problems: Problems) -> Any:
    """The value of the first of ``declared``'s variables that is set, checked as the key is, else ``value``."""
    var = _first_set(declared, env)
    if var is None:
        return value
    try:
        return checker(kind, name).validate_python(env[var])
    except ValidationError as e:
        for error in e.errors(include_url=False, include_context=False, include_input=False):
            problems.add(f"environment {var}", error["msg"])
        return value


def _first_set(declared: Env | None, env: Mapping[str, str]) -> str | None:
    """The first of the variables a key declares that is set (and not empty)."""
    return next((n for n in declared.names if env.get(n)), None) if declared is not None else None


def default_state_dir(env: Mapping[str, str]) -> str:
    """$ROUTER_STATE_DIR, else $XDG_STATE_HOME/vllm-model-router, else ~/.local/state/vllm-model-router."""
    if env.get("ROUTER_STATE_DIR"):
        return env["ROUTER_STATE_DIR"]
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "vllm-model-router")


# ----------------------------------------------------------------------------------------------- access keys
def _auth(section: AuthConfig, env: Mapping[str, str], source: str, problems: Problems) -> AuthConfig:
    """The keys listed in the file, plus those in each ``<kind>_keys_file`` (one per line; blank lines and
    ``#`` comments ignored) and in the environment variable the key declares (comma-separated). Problems
    never quote a key."""
    base_dir = Path(source).parent if source and not source.startswith("<") else None
    update: dict[str, tuple[str, ...]] = {}
    for name, field in AuthConfig.model_fields.items():
        declared = marker(field, Env)
        if declared is None or declared.use != "adds":
            continue
        found: list[tuple[str, object]] = []  # (where, key)
        path_text = getattr(section, f"{name}_file")
        if path_text is not None:
            found += _key_file(where(("auth", f"{name}_file")), path_text, base_dir, problems)
        var = declared.names[0]
        found += [(f"environment {var} item {i}", k.strip()) for i, k in enumerate(env.get(var, "").split(","))
                  if k.strip()]
        keys = list(getattr(section, name))
        for place, key in found:
            try:
                keys.append(BearerKey().validate(key))
            except PydanticCustomError as e:
                problems.add(place, e.message())
        update[name] = tuple(dict.fromkeys(keys))
    return section.model_copy(update=update)


def _key_file(place: str, path_text: str, base_dir: Path | None, problems: Problems) -> list[tuple[str, object]]:
    path = Path(path_text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        problems.add(place, f"cannot read {path}: {reason}")
        return []
    return [(f"{place} ({path}) line {n}", ln.strip()) for n, ln in enumerate(lines, 1)
            if ln.strip() and not ln.strip().startswith("#")]


# ----------------------------------------------------------------------------------------------- YAML
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
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        if not isinstance(e, _DuplicateKey):
            what = _unquoted(what)
        if e.problem and e.context and e.context_mark is not None:
            what += f" ({_unquoted(e.context)} started at line {e.context_mark.line + 1})"
        return f"{path}: invalid YAML{at}: {what}"
    if isinstance(e, yaml.reader.ReaderError):
        return f"{path}: invalid YAML at character {e.position}: {e.reason}"
    return f"{path}: invalid YAML ({type(e).__name__})"


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
