"""What every section of the config file shares: the markers a key's declaration carries besides its check
(:class:`Env`, :class:`Scope`, :class:`Internal`) and the :class:`Section` base class, which turns them
into notes in the JSON Schema and keeps unknown keys aside for load.py to report."""

from __future__ import annotations

import enum
import functools
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, TypeAdapter, ValidationError, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from vllm_model_router.config.composites import NullIsDefault
from vllm_model_router.config.scalars import invalid


class Env:
    """The environment variables that set a key, and how (``use``): "overrides" (the first one set wins over
    the file; a wrong value is reported as ``environment NAME``), "replaces" (the first one set takes the
    file's place and is checked there), "default" (used when the file does not set the key) or "adds"
    (comma-separated items added to the file's list)."""

    def __init__(self, *names: str, use: Literal["overrides", "replaces", "default", "adds"] = "overrides") -> None:
        self.names, self.use = names, use

    def describe(self) -> str:
        names = " or ".join(f"${n}" for n in self.names)
        return {"overrides": f"Environment {names} overrides it.",
                "replaces": f"Environment {names} replaces it.",
                "default": f"Environment {names} sets it when the file does not.",
                "adds": f"Environment {names} (comma-separated) adds to it."}[self.use]


class Scope(enum.Enum):
    """Which kind of model entry a model key is for (a key without a scope is for both)."""

    PROCESS = "Not allowed on an adapter (it runs in its base's server)."
    ADAPTER = "Adapters only."
    IGNORED_ON_ADAPTER = "Ignored on an adapter."


@functools.cache
def checker(section: type[BaseModel], name: str) -> TypeAdapter[Any]:
    """Checks a value as the key ``name`` of ``section`` does (for a value from the environment)."""
    return TypeAdapter(section.model_fields[name].rebuild_annotation())


def accepts(section: type[BaseModel], name: str, value: Any) -> bool:
    """Whether ``value`` passes the check of the key ``name`` of ``section``."""
    try:
        checker(section, name).validate_python(value)
    except ValidationError:
        return False
    return True


def marker(field: Any, kind: type[Any]) -> Any:
    """The ``kind`` marker among a declared field's ``Annotated`` metadata, or None."""
    return next((m for m in field.metadata if isinstance(m, kind)), None)


class Section(BaseModel):
    """A mapping in the file. Unknown keys are kept aside (``model_extra``) so that load.py can report each
    with the keys allowed there; ``secret`` sections never name an unknown key unless it is a near miss."""

    model_config = ConfigDict(frozen=True, extra="allow", defer_build=True)  # built when first used: the
    # commands that never read a config (fake-engine, the admin client) do not pay for it
    secret: ClassVar[bool] = False

    @classmethod
    def keys(cls) -> dict[str, str]:
        """The file's keys of this section → attribute names."""
        return {f.alias or n: n for n, f in cls.model_fields.items() if not marker(f, Internal)}

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if data is None:
            return {}
        if isinstance(data, BaseModel):
            return data
        if not isinstance(data, dict):
            raise invalid(f"expected a mapping, got {type(data).__name__}")
        fields = {f.alias or n: f for n, f in cls.model_fields.items()}
        return {k: v for k, v in data.items()
                if not (v is None and k in fields and marker(fields[k], NullIsDefault))}

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        target = handler.resolve_ref_schema(json_schema)
        target["additionalProperties"] = False
        target.pop("title", None)
        target.pop("description", None)  # the class's docstring is for developers; the field says what it is for
        properties = target.get("properties", {})
        for name, field in cls.model_fields.items():
            prop = properties.get(field.alias or name)
            if prop is None:
                continue
            prop.pop("title", None)
            if "$ref" in prop:
                prop.pop("default", None)  # a section's defaults are its keys'
            env, scope = marker(field, Env), marker(field, Scope)
            notes = [n for n in (env.describe() if env else None, scope.value if scope else None) if n]
            if notes:
                prop["description"] = " ".join([prop.get("description", ""), *notes]).strip()
            if env is not None:
                prop["x-env"] = list(env.names)
                if env.use == "default":
                    prop.pop("default", None)
        return json_schema


class Internal:
    """Marks an attribute that is not a key of the file (a model's name is its key under ``models``)."""


def applies(field: Any, adapter: bool) -> bool:
    """Whether a model key is for an adapter (``adapter``) or for a model the router starts."""
    scope = marker(field, Scope)
    return scope in (None, Scope.ADAPTER) if adapter else scope is not Scope.ADAPTER
