"""The scheduler's view of the configured models, derived from the declarations.

A setting the scheduler needs is named the same in the config (``models.<name>.<key>``, schema.py) and in
:class:`ModelSpec`, and is copied by name: a new one is declared in both places and nowhere else. The
fields below in :data:`COMPUTED` are what the router works out instead (memory from the GPUs, what a
sleeping model holds, the inherited ttl, where an adapter runs, which replica a unit is).

A model with ``replicas`` is several units, one server each (``chat``, ``chat@1``, ...): each gets the
model's settings and memory, and names the model as its ``group`` so that the scheduler grants requests for
the model to any of them. A model with at most one copy has no group, so its spec is what it always was.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from vllm_model_router.config.schema import ENGINE, RouterConfig
from vllm_model_router.scheduler import ModelSpec
from vllm_model_router.scheduler.events import replica_name

COMPUTED = frozenset({"needs", "memory_gb", "sleeping_gb", "weights_gb", "ttl", "base", "external",
                      "group", "replica", "replicas_min", "replicas_max", "target_in_flight", "replica_idle"})


class Need(Protocol):
    """An amount of memory worked out for a model (gpu/memory.py's MemoryNeed)."""

    @property
    def gb(self) -> float: ...


def adapter_specs(name: str, engines: Sequence[str]) -> dict[str, ModelSpec]:
    """An adapter of endpoint mode: a unit per engine (``name`` on the first, ``name@1`` on the second...),
    each in its engine's adapter slots, so it can be loaded where a slot is free, and on more than one
    engine when it is hot. With one engine: the adapter itself, as a model of its own."""
    n = len(engines)
    return {replica_name(name, i): ModelSpec(base=engine, group=name if n > 1 else None, replica=i, replicas_max=n)
            for i, engine in enumerate(engines)}


def scheduler_specs(
    config: RouterConfig, needs: Mapping[str, Need], weights: Mapping[str, Need] | None = None
) -> dict[str, ModelSpec | float]:
    """The scheduler's view of the configured models (endpoint mode: the engine plus its adapters), one spec
    per unit in config order (a model's replicas together), bases before their adapters. ``needs``: GPU memory
    per model; ``weights``: host memory per level-1 sleeper (both by model name: every replica needs as much)."""
    specs: dict[str, ModelSpec | float] = {}
    engines = config.engine_units()
    for i, engine in enumerate(engines):  # endpoint mode: each engine has max_resident adapter slots
        specs[engine] = ModelSpec(external=True, max_adapters=config.max_resident,
                                  group=ENGINE if len(engines) > 1 else None, replica=i, replicas_max=len(engines))
    shared = [f.name for f in dataclasses.fields(ModelSpec) if f.name not in COMPUTED]
    for name, m in config.models.items():
        if m.is_adapter:
            specs.update(adapter_specs(name, engines) if m.base is None else {name: ModelSpec(base=m.base)})
            continue
        settings: dict[str, Any] = {key: getattr(m, key) for key in shared}
        r = m.replicas
        for i in range(r.max):
            specs[replica_name(name, i)] = ModelSpec(
                **settings,
                memory_gb=needs[name].gb,
                sleeping_gb=min(m.sleeping_memory_gb, needs[name].gb),
                weights_gb=weights[name].gb if weights and name in weights else 0.0,
                ttl=m.ttl if m.ttl is not None else config.default_ttl,
                group=name if r.max > 1 else None,
                replica=i,
                replicas_min=r.min,
                replicas_max=r.max,
                target_in_flight=r.target_in_flight,
                replica_idle=r.idle,
                needs=frozenset(m.resources),
            )
    return dict(sorted(specs.items(), key=lambda kv: isinstance(kv[1], ModelSpec) and kv[1].base is not None))
