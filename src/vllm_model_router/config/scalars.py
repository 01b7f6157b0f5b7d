"""The kinds of value a config key can hold, each with the router's own error wording and its JSON Schema.

A check is a marker in ``Annotated[...]`` (``port: Annotated[int, Whole(0, 65535)]``): pydantic calls it to
validate and to write the schema, so both live here once. Checks raise :func:`invalid` with the text
``check-config`` prints after the key's location ("expected an integer, got 'two'"); they accept what the
hand-written parser accepted (``"8080"`` as an integer, ``30s`` as a duration), while the schema describes
the canonical form an editor should suggest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

JsonDict = dict[str, Any]


def invalid(message: str) -> PydanticCustomError:
    """A validation error whose text is ``message`` exactly (the template is filled from the context, so
    braces in the message, as in ``${PORT}``, stay as they are)."""
    return PydanticCustomError("config", "{message}", {"message": message})


class Check:
    """A value check usable as ``Annotated`` metadata: :meth:`validate` returns the value to store or raises
    :func:`invalid`; :meth:`schema` is its JSON Schema; :meth:`dump` what ``to_dict`` shows for it."""

    def validate(self, value: Any) -> Any:
        raise NotImplementedError

    def schema(self) -> JsonDict:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.validate, serialization=core_schema.plain_serializer_function_ser_schema(self.dump))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return self.schema()


# ----------------------------------------------------------------------------------------------- numbers
_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*)+$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DURATION_SCHEMA: JsonDict = {"anyOf": [{"type": "number", "minimum": 0},
                                        {"type": "string", "pattern": _DURATION_RE.pattern}]}


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


@dataclass(frozen=True)
class Duration(Check):
    """Seconds, written as a number or ``30s`` / ``20m`` / ``1h30m`` / ``250ms``. ``positive``: 0 is refused;
    ``off``: ``false``, ``off``, ``null`` or 0 mean "no bound" (stored as None, shown as false); ``unset``:
    what ``to_dict`` shows for None (a key whose absence means "inherit")."""

    positive: bool = False
    off: bool = False
    unset: str | None = None

    def validate(self, value: Any) -> float | None:
        if self.off and value in (None, False, 0, "0", "off"):
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            raise invalid(str(e)) from None
        if self.positive and seconds <= 0:
            raise invalid("must be greater than 0")
        return None if self.off and seconds == 0 else seconds

    def schema(self) -> JsonDict:
        if self.off:
            return {"anyOf": [*_DURATION_SCHEMA["anyOf"], {"enum": [False, "off", None]}]}
        return _DURATION_SCHEMA

    def dump(self, value: Any) -> Any:
        if value is None:
            return False if self.off else self.unset
        return value


@dataclass(frozen=True)
class Whole(Check):
    """An integer within bounds; a string of digits counts (the environment only has strings)."""

    minimum: int
    maximum: int | None = None

    def validate(self, value: Any) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"expected an integer, got {value!r}")
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            bound = f"between {self.minimum} and {self.maximum}" if self.maximum is not None else f">= {self.minimum}"
            raise invalid(f"must be {bound}, got {value}")
        return value

    def schema(self) -> JsonDict:
        return {"type": "integer", "minimum": self.minimum,
                **({"maximum": self.maximum} if self.maximum is not None else {})}


@dataclass(frozen=True)
class Number(Check):
    """A number (not a string, not a boolean) within bounds, stored as a float. ``positive``: the minimum
    itself is refused (a figure that must be more than 0); ``none``: null is allowed (``null`` for an
    optional figure), not where a number must be given (a mapping's values)."""

    minimum: float
    maximum: float | None = None
    positive: bool = False
    none: bool = True

    def validate(self, value: Any) -> float | None:
        if value is None and self.none:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(f"expected a number, got {value!r}")
        if value < self.minimum or (self.positive and value == self.minimum):
            raise invalid(f"must be {'>' if self.positive else '>='} {self.minimum:g}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            raise invalid(f"must be <= {self.maximum:g}, got {value:g}")
        return float(value)

    def schema(self) -> JsonDict:
        return {"type": ["number", "null"] if self.none else "number",
                "exclusiveMinimum" if self.positive else "minimum": self.minimum,
                **({"maximum": self.maximum} if self.maximum is not None else {})}


# ----------------------------------------------------------------------------------------------- choices
@dataclass(frozen=True)
class Flag(Check):
    """``true`` or ``false``, nothing that merely looks like one."""

    def validate(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise invalid(f"expected true or false, got {value!r}")
        return value

    def schema(self) -> JsonDict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class OneOf(Check):
    """One of a few values (``true`` / ``false`` only where they are listed); ``expected`` is the wording of
    the error, which is followed by ``, got <value>``."""

    choices: tuple[Any, ...]
    expected: str

    def validate(self, value: Any) -> Any:
        if value not in self.choices or (isinstance(value, bool) and not any(c is value for c in self.choices)):
            raise invalid(f"{self.expected}, got {value!r}")
        return value

    def schema(self) -> JsonDict:
        return {"enum": list(self.choices)}


@dataclass(frozen=True)
class Text(Check):
    """A string that passes ``test``; ``expected`` words the error. ``none``: null is allowed (and
    means the key's default, None); ``secret``: the error shows a wrong value's type, never the value;
    ``json``: the JSON Schema of a valid value (default: a non-empty string)."""

    expected: str
    test: Callable[[str], object] = bool
    none: bool = False
    secret: bool = False
    json: JsonDict | None = None

    def validate(self, value: Any) -> str | None:
        if value is None and self.none:
            return None
        if not isinstance(value, str) or not self.test(value):
            shown = type(value).__name__ if self.secret else repr(value)
            raise invalid(f"{self.expected}, got {shown}")
        return value

    def schema(self) -> JsonDict:
        schema = self.json or {"type": "string", "minLength": 1}
        return {"anyOf": [schema, {"type": "null"}]} if self.none else schema


@dataclass(frozen=True)
class StateDir(Check):
    """A directory (``~`` expanded), or ``false`` / ``null`` for none: stored as None, shown as false."""

    def validate(self, value: Any) -> str | None:
        if value is False or value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise invalid(f"expected a directory path, or false, got {value!r}")
        return os.path.expanduser(value)

    def schema(self) -> JsonDict:
        return {"anyOf": [{"type": "string", "minLength": 1}, {"enum": [False, None]}]}

    def dump(self, value: Any) -> Any:
        return False if value is None else value


_URL_RE = re.compile(r"^https?://[^/\s]+")


@dataclass(frozen=True)
class BaseUrl(Check):
    """An http(s) URL of a vLLM server, kept without a trailing ``/`` or ``/v1`` (routes are appended);
    an empty value (``""``, ``false``) means ``default`` where there is one (not for an item of a list)."""

    default: str | None = None

    def validate(self, value: Any) -> str:
        if not value and self.default is not None:
            value = self.default
        if not isinstance(value, str) or not _URL_RE.match(value):
            raise invalid(f"expected an http(s) URL like http://vllm:8000, got {value!r}")
        url = value.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url

    def schema(self) -> JsonDict:
        return {"type": "string", "pattern": _URL_RE.pattern}
