"""Which names clients may use, and what each one means: the one place a model name is resolved.

- A configured model or alias → that model (an alias is rewritten to the model's name upstream).
- An adapter added since the router started (found on the engine, or loaded from ``adapter_dir``) → it.
- Endpoint mode: a model the engine serves itself → forwarded to the engine as it is; a directory
  ``adapter_dir/<name>`` → an adapter loaded on demand.

The proxy, the admin routes and the adapter sync all ask here (through ``AdapterSync.resolve`` when a
name may be new). Names from requests are checked against a strict pattern before they are used as a
path component, and only ever travel inside JSON bodies to vLLM, never to a shell.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vllm_model_router.config import ENGINE, ModelConfig, RouterConfig
from vllm_model_router.errors import ModelNotFound

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Target:
    model: str  # the scheduler's name for it
    rewrite: str | None = None  # the name to send upstream when it differs from the client's


@dataclass
class Catalog:
    config: RouterConfig
    engine_models: list[str] = field(default_factory=list)  # endpoint mode: the engine's own models
    dynamic: dict[str, tuple[str, str]] = field(default_factory=dict)  # adapter -> (path, base)
    _names: dict[str, ModelConfig] = field(init=False, repr=False)  # every configured name and alias

    def __post_init__(self) -> None:
        self._names = {alias: m for m in self.config.models.values() for alias in m.aliases}
        self._names.update(self.config.models)  # a model's own name wins over anyone's alias

    def configured(self, name: str) -> ModelConfig | None:
        """A configured model by its name or one of its aliases."""
        return self._names.get(name)

    def lookup(self, name: str, *, managed: bool = False) -> Target | None:
        """What ``name`` means, or None. ``managed``: only models the router loads and unloads (an
        operator's command), never the engine's own models."""
        m = self._names.get(name)
        if m is not None:
            return Target(m.name, m.name if name != m.name else None)
        if name in self.dynamic:
            return Target(name)
        if not self.config.endpoint_mode:
            return None
        if name in self.engine_models:
            return None if managed else Target(ENGINE)
        if self.adapter_dir_path(name) is not None:
            return Target(name)
        return None

    def not_found(self, name: str) -> ModelNotFound:
        """The 404 for a name that means nothing, listing the names that do."""
        return ModelNotFound(name, self.available())

    def add(self, name: str, path: str, base: str) -> None:
        """An adapter the router did not know of: from now on ``name`` means it."""
        self.dynamic[name] = (path, base)

    def adapter_dir_path(self, name: str) -> str | None:
        """``adapter_dir/<name>`` if ``name`` is a safe name and that directory exists."""
        if self.config.adapter_dir is None or not ADAPTER_NAME.match(name) or ".." in name:
            return None
        root = Path(self.config.adapter_dir)
        path = root / name
        try:
            if path.is_dir() and path.resolve().parent == root.resolve():
                return str(path)
        except OSError:
            return None
        return None

    def adapter_dir_names(self) -> list[str]:
        if self.config.adapter_dir is None:
            return []
        try:
            entries = sorted(p.name for p in Path(self.config.adapter_dir).iterdir() if p.is_dir())
        except OSError:
            return []
        return [n for n in entries if ADAPTER_NAME.match(n)]

    def adapter_path(self, model: str) -> str:
        m = self.config.models.get(model)
        if m is not None and m.adapter is not None:
            return m.adapter
        if model in self.dynamic:
            return self.dynamic[model][0]
        return self.adapter_dir_path(model) or ""

    def base_of(self, model: str) -> str:
        m = self.config.models.get(model)
        if m is not None and m.base is not None:
            return m.base
        if model in self.dynamic:
            return self.dynamic[model][1]
        return ENGINE

    def engine_model(self) -> str | None:
        """The engine's own (first) model: the parent /v1/models shows for its adapters."""
        return self.engine_models[0] if self.engine_models else None

    def available(self) -> list[str]:
        names = [*self.config.models, *self.dynamic]
        if self.config.endpoint_mode:
            names += self.engine_models + self.adapter_dir_names()
        return sorted(set(names))
