"""Config values with a structure: a server command, GPU lists, environment maps, access keys, routes, and
the shape check that runs before a container's items are checked one by one."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

from vllm_model_router.config.scalars import Check, JsonDict, invalid
from vllm_model_router.routes import extra_route_problem


@dataclass(frozen=True)
class Command(Check):
    """A server command: a string split shell-style, or a list of arguments; never run through a shell.
    It must contain ``${PORT}``: the router picks the port."""

    def validate(self, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            try:
                cmd = tuple(shlex.split(value))
            except ValueError as e:
                raise invalid(f"cannot be split shell-style: {e}") from None
        elif isinstance(value, list | tuple) and all(isinstance(a, str | int | float) for a in value):
            cmd = tuple(str(a) for a in value)
        else:
            raise invalid("expected a string or a list of strings")
        if not cmd:
            raise invalid("must not be empty")
        if not any("${PORT}" in a for a in cmd):
            raise invalid("must contain ${PORT} (the router picks the port the server listens on)")
        return cmd

    def schema(self) -> JsonDict:
        return {"anyOf": [{"type": "string", "pattern": r"\$\{PORT\}"},
                          {"type": "array", "items": {"type": ["string", "number"]}, "minItems": 1}]}

    def dump(self, value: Any) -> Any:
        return " ".join(shlex.quote(a) for a in value)


def gpu_utilization(cmd: tuple[str, ...]) -> float | None:
    """The value of ``--gpu-memory-utilization U`` / ``=U`` in a command; -1 when it is not a number."""
    for i, arg in enumerate(cmd):
        if arg == "--gpu-memory-utilization" or arg.startswith("--gpu-memory-utilization="):
            value = arg.partition("=")[2] or (cmd[i + 1] if i + 1 < len(cmd) else "")
            try:
                return float(value)
            except ValueError:
                return -1.0
    return None


@dataclass(frozen=True)
class Gpus(Check):
    """Fixed GPU indexes (``0`` or ``[0, 1]``), or ``auto`` / null: the router places the model."""

    def validate(self, value: Any) -> tuple[int, ...] | None:
        if value is None or value == "auto":
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if (not isinstance(value, list | tuple) or not value
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in value)):
            raise invalid("expected a list of GPU indexes like [0] or [0, 1], or auto")
        if len(set(value)) != len(value):
            raise invalid(f"duplicate GPU index in {list(value)}")
        return tuple(value)

    def schema(self) -> JsonDict:
        return {"anyOf": [{"enum": ["auto", None]}, {"type": "integer", "minimum": 0},
                          {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
                           "uniqueItems": True}]}

    def dump(self, value: Any) -> Any:
        return "auto" if value is None else list(value)


_VAR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII without spaces: what fits in a Bearer header

@dataclass(frozen=True)
class EnvName(Check):
    """An environment variable's name (a mapping key: its error names the mapping, never the value)."""

    def validate(self, value: Any) -> str:
        if not isinstance(value, str) or not _VAR_RE.fullmatch(value):
            raise invalid(f"invalid variable name {value!r}")
        return value

    def schema(self) -> JsonDict:
        return {"type": "string", "pattern": f"^{_VAR_RE.pattern}$"}


@dataclass(frozen=True)
class EnvValue(Check):
    """A string, number or boolean, kept as the string the process sees (booleans as ``true`` / ``false``)."""

    def validate(self, value: Any) -> str:
        if isinstance(value, dict | list) or value is None:
            raise invalid("expected a string, number or boolean")
        return str(value).lower() if isinstance(value, bool) else str(value)

    def schema(self) -> JsonDict:
        return {"type": ["string", "number", "boolean"]}


@dataclass(frozen=True)
class BearerKey(Check):
    """An access key; its error never shows it."""

    def validate(self, value: Any) -> str:
        if not isinstance(value, str) or not _KEY_RE.match(value):
            raise invalid("a key must be a non-empty string of printable ASCII without spaces")
        return value

    def schema(self) -> JsonDict:
        return {"type": "string", "pattern": _KEY_RE.pattern}


_RAY_COUNTED = ("CPU", "GPU")  # Ray's own counts, which it refuses among an actor's custom resources


@dataclass(frozen=True)
class ResourceName(Check):
    """The name of a Ray resource a model's server needs on its node (a mapping key: its error names it).
    CPU and GPU are refused: the router asks for the GPUs (``gpu_count``) itself, and Ray takes neither
    among custom resources."""

    def validate(self, value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise invalid(f"resource names must be non-empty strings, got {value!r}")
        if value in _RAY_COUNTED:
            raise invalid(f"{value!r} is not a placement constraint: the router asks Ray for the model's CPU "
                          f"and GPUs (gpu_count) itself")
        return value

    def schema(self) -> JsonDict:
        return {"type": "string", "minLength": 1, "not": {"enum": list(_RAY_COUNTED)}}


@dataclass(frozen=True)
class Route(Check):
    """A path forwarded besides vLLM's inference routes (routes.py says which may not be)."""

    def validate(self, value: Any) -> str:
        problem = extra_route_problem(value)
        if problem is not None:
            raise invalid(problem)
        return str(value)

    def schema(self) -> JsonDict:
        return {"type": "string", "pattern": "^/v1/"}


# ----------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """Checks a container's shape before its items are checked one by one, so that each item's error names
    the item (``aliases[1]``). ``kind``: "list" or "mapping"; ``expected``: the error for a wrong shape;
    ``one``: a single string counts as a list of one; ``strings``: every item must be a string, else the
    error names the whole list; ``unique``: repeated items are dropped once they are checked."""

    kind: str
    expected: str
    one: bool = True
    strings: bool = False
    unique: bool = False

    def check(self, value: Any) -> Any:
        if self.kind == "mapping":
            if not isinstance(value, dict):
                raise invalid(self.expected)
            return value
        if isinstance(value, str) and self.one:
            return [value]
        if not isinstance(value, list | tuple) or (self.strings and not all(isinstance(v, str) for v in value)):
            raise invalid(self.expected)
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        inner = handler(source)
        if self.unique:
            inner = core_schema.no_info_after_validator_function(lambda v: type(v)(dict.fromkeys(v)), inner)
        return core_schema.no_info_before_validator_function(self.check, inner)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        inner = handler(schema)
        if self.kind == "list" and self.one and "items" in inner:
            return {"anyOf": [inner["items"], inner]}
        return inner


@dataclass(frozen=True)
class NullIsDefault:
    """``key: null`` (or an empty ``key:`` in YAML) means the key's default, as if it were not there."""


@dataclass(frozen=True)
class Switch:
    """A section that can also be switched with a boolean: ``true`` is the section with its defaults,
    ``false`` or null is off (None, shown as false)."""

    def check(self, value: Any) -> Any:
        if value is None or value is False:
            return None
        return {} if value is True else value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        shown = core_schema.wrap_serializer_function_ser_schema(lambda v, nxt: False if v is None else nxt(v))
        return core_schema.no_info_before_validator_function(self.check, handler(source), serialization=shown)

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        inner = handler(schema)
        return {"anyOf": [{"type": "boolean"}, *inner.get("anyOf", [inner])]}


@dataclass(frozen=True)
class Shorthand:
    """A section that can also be written as a whole number, which sets its key ``key`` (``replicas: 3`` is
    ``replicas: {max: 3}``); ``expected``: the error for a value that is neither a number nor a mapping."""

    key: str
    expected: str

    def check(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, int) and not isinstance(value, bool):
            return {self.key: value}
        if not isinstance(value, dict):
            raise invalid(f"{self.expected}, got {value!r}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_before_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        inner = handler(schema)
        key = handler.resolve_ref_schema(inner).get("properties", {}).get(self.key, {})
        number = {k: v for k, v in key.items() if k in ("type", "minimum", "maximum")}  # the key's own bounds
        return {"anyOf": [number or {"type": "integer"}, inner]}
