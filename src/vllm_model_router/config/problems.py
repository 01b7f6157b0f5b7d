"""Configuration problems, each with its location (``models.qwen.memory_gb: must be >= 0, got -1``).

``check-config`` prints every problem at once, so validation must go on past the first: :func:`validated`
runs pydantic over the whole file, turns each of its errors into the router's wording, and validates
again without the keys found wrong (their defaults take over), so that the checks across keys (load.py,
rules.py) still see every model and alias and report their own problems too.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from vllm_model_router.config.section import Section

Loc = tuple[str | int, ...]
S = TypeVar("S", bound=Section)


class ConfigError(Exception):
    """One or more configuration problems, each prefixed with the field it concerns."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def where(loc: Loc) -> str:
    """``("models", "m", "aliases", 1)`` → ``models.m.aliases[1]``; the whole file is ``config``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "config"


class Problems:
    """The problems found so far, in the order found, and the locations they concern."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self._at: set[Loc] = set()

    def add(self, loc: Loc | str, message: str) -> None:
        """A problem at a key (``loc``) or at a place named in words (``"environment PORT"``)."""
        if not isinstance(loc, str):
            self._at.add(loc)
            loc = where(loc)
        self.messages.append(f"{loc}: {message}")

    def at(self, loc: Loc) -> bool:
        """Whether a problem was reported at ``loc`` (or inside it)."""
        return any(found[:len(loc)] == loc for found in self._at)

    def __bool__(self) -> bool:
        return bool(self.messages)


_GONE = object()  # a list item found wrong, removed after the pass


def validated(cls: type[S], data: object, problems: Problems, at: Loc = ()) -> S:
    """``data`` (found at ``at`` in the file) validated as ``cls``, every problem reported; keys found wrong are
    dropped, so that their defaults apply."""
    secret = secret_sections(cls, at)  # a key there that is not a string is not shown
    data = copy.deepcopy(data)
    for _ in range(8):  # each pass drops what the last one found wrong; two are the rule
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            errors = e.errors(include_url=False, include_context=False, include_input=False)
        for error in errors:
            found = tuple(error["loc"])
            loc = (*at, *found)
            if loc and loc[-1] == "[key]":  # a mapping key: the problem is the mapping's
                problems.add(loc[:-2], error["msg"])
            elif error["type"] == "invalid_key":  # a key that is not a string
                hidden = next((s for s in secret if loc[:-1] == s), None)
                problems.add(loc[:-1], _unknown_secret(secret[hidden]) if hidden is not None
                             else f"keys must be strings, got {loc[-1]!r}")
            else:
                problems.add(loc, error["msg"])
            data = _drop(data, found)
        data = _purge(data)
    return cls()


def _drop(data: Any, loc: Loc) -> Any:
    """``data`` without what ``loc`` points at (or at its deepest part that exists): the whole of it when
    ``loc`` is empty, a list item marked for removal, a mapping key deleted."""
    if not loc or not isinstance(data, dict | list):
        return {}
    parent, key = data, loc[0]
    for part in loc[1:]:
        child = _child(parent, key)
        if not isinstance(child, dict | list) or _child(child, part) is _GONE:
            break
        parent, key = child, part
    if isinstance(parent, list) and isinstance(key, int) and 0 <= key < len(parent):
        parent[key] = _GONE
    elif isinstance(parent, dict):
        parent.pop(key, None)
    return data


def _child(container: Any, key: Any) -> Any:
    if isinstance(container, dict):
        return container.get(key, _GONE)
    if isinstance(container, list) and isinstance(key, int) and 0 <= key < len(container):
        return container[key]
    return _GONE


def _purge(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _purge(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_purge(v) for v in data if v is not _GONE]
    return data


def _unknown_secret(allowed: list[str]) -> str:
    return f"unknown key, not shown (allowed: {', '.join(sorted(allowed))})"


def unknown_keys(section: BaseModel, loc: Loc = ()) -> Iterator[tuple[Loc, str]]:
    """The keys of the file that no section declares, each with the keys allowed where it was found."""
    if not isinstance(section, Section):
        return
    allowed = sorted(section.keys())
    for key in section.model_extra or {}:
        if section.secret and not difflib.get_close_matches(str(key), allowed, 1, 0.8):
            yield loc, _unknown_secret(allowed)
        else:
            yield (*(loc or ("config",)), key), f"unknown key (allowed: {', '.join(allowed)})"
    for file_key, name in section.keys().items():
        value = getattr(section, name)
        if isinstance(value, Mapping):
            for k, item in value.items():
                yield from unknown_keys(item, (*loc, file_key, k))
        elif isinstance(value, BaseModel):
            yield from unknown_keys(value, (*loc, file_key))


def secret_sections(cls: type[Section], loc: Loc = ()) -> dict[Loc, list[str]]:
    """Where the secret sections are in ``cls`` (the file), with their keys."""
    found: dict[Loc, list[str]] = {loc: sorted(cls.keys())} if cls.secret else {}
    for key, name in cls.keys().items():
        annotation = cls.model_fields[name].annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            found |= secret_sections(annotation, (*loc, key))
    return found
