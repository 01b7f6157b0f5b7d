"""The checks that span keys, and the values the router derives from the models' settings.

Each key's own check is declared with it (schema.py); what is here needs several keys or several models:
which keys an adapter may set, the command's flags that other keys depend on (``--enable-sleep-mode``,
``--enable-lora``, ``--max-loras``, the parallel sizes behind ``gpu_count``), aliases that collide, names
taken by replicas (``chat@1``), bases that do not exist, a model that can never fit, settings that need
the other cluster backend. It runs on what
validation kept, so it reports its problems next to those of the keys themselves.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vllm_model_router.config.cluster import Cluster
from vllm_model_router.config.composites import gpu_utilization
from vllm_model_router.config.problems import Loc, Problems
from vllm_model_router.config.schema import ModelConfig
from vllm_model_router.config.section import Scope, accepts, applies, marker

_REFUSED = {Scope.PROCESS: "not allowed on an adapter (it is loaded into its base's server)",
            Scope.ADAPTER: "only adapters (models with adapter:) have a {key}"}
_UNIT_RE = re.compile(r"@\d+$")  # how replicas are named (``chat@1``): a configured name must not look like one
_UNIT_NAME = "must not end in @<number>: replicas are named that way (chat@1, chat@2, ...)"
_PARALLEL = (("--tensor-parallel-size", "-tp"), ("--pipeline-parallel-size", "-pp"))  # their product: the
# GPUs one vLLM server uses (data parallelism is left out: across machines it is not all on this one)


def sort_model_keys(models: dict[Any, Any], problems: Problems) -> None:
    """Before validation, in the raw ``models:`` mapping: take out of each entry the keys that are not for
    its kind (an adapter, or a model the router starts), reporting those it may not set, and any that is not
    a key of the file (a model's name is its key under ``models:``). An entry whose ``adapter`` is wrong is
    neither kind: only that is reported."""
    keys = ModelConfig.keys()
    for name, entry in models.items():
        if not isinstance(entry, dict) or not isinstance(name, str):
            continue
        adapter = entry.get("adapter") is not None
        broken = adapter and not accepts(ModelConfig, "adapter", entry["adapter"])
        for key, field in ModelConfig.model_fields.items():
            if key not in entry or key == "adapter":
                continue
            scope = marker(field, Scope)
            if key not in keys:
                problems.add(("models", name, key), f"unknown key (allowed: {', '.join(sorted(keys))})")
            elif broken:
                pass
            elif applies(field, adapter):
                continue
            elif scope in _REFUSED:
                problems.add(("models", name, key), _REFUSED[scope].format(key=key))
            del entry[key]


def resolve_model(name: str, m: ModelConfig, problems: Problems) -> ModelConfig | None:
    """The entry ``models.<name>`` checked and completed, or None when it cannot be used at all."""
    loc: Loc = ("models", name)
    if name.startswith("@"):
        problems.add(loc, "model names must not start with '@' (reserved)")
    if _UNIT_RE.search(name):
        problems.add(loc, f"model names {_UNIT_NAME}")
    if problems.at((*loc, "adapter")):
        return None  # neither an adapter nor a server
    if m.is_adapter:
        return m.model_copy(update={"name": name})
    if "cmd" not in m.model_fields_set and not problems.at((*loc, "cmd")):
        problems.add((*loc, "cmd"), "required (the command that starts the model's server), or adapter:")
    util = gpu_utilization(m.cmd)
    if util is not None and not 0 < util <= 1:
        problems.add((*loc, "cmd"), f"--gpu-memory-utilization must be in (0, 1], got {util:g}")
    env = dict(m.env)
    if m.sleep_level:
        if m.cmd and "--enable-sleep-mode" not in m.cmd:
            problems.add((*loc, "cmd"), "must include --enable-sleep-mode (sleep: is set)")
        env.setdefault("VLLM_SERVER_DEV_MODE", "1")  # vLLM serves /sleep and /wake_up only in dev mode
    if m.replicas.min > m.replicas.max:
        problems.add((*loc, "replicas", "min"), f"must be <= max ({m.replicas.max}), got {m.replicas.min}")
    update: dict[str, object] = {"name": name, "env": env}
    loras = max_loras(m.cmd)
    if "max_adapters" not in m.model_fields_set and loras is not None:
        update["max_adapters"] = loras
    parallel = parallel_size(m.cmd, problems, (*loc, "cmd"))
    if "gpu_count" not in m.model_fields_set:
        update["gpu_count"] = len(m.gpus) if m.gpus is not None else parallel
    elif m.gpus is not None and m.gpu_count != len(m.gpus):
        problems.add((*loc, "gpu_count"), f"must equal the number of gpus ({len(m.gpus)}) when both are set, "
                                          f"got {m.gpu_count}")
    return m.model_copy(update=update)


def flag_value(cmd: tuple[str, ...], *names: str) -> str | None:
    """The value of an option in a command, as vLLM's parser reads it: ``--name V`` or ``--name=V`` (a long
    name also spelled with underscores), under any of ``names``; the last one given wins; "" when the value
    is missing."""
    found = None
    for i, arg in enumerate(cmd):
        flag, eq, value = arg.partition("=")
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("_", "-")
        if flag in names:
            found = value if eq else (cmd[i + 1] if i + 1 < len(cmd) else "")
    return found


def max_loras(cmd: tuple[str, ...]) -> int | None:
    """``--max-loras N`` in a command: the default for ``max_adapters``."""
    value = flag_value(cmd, "--max-loras")
    return int(value) if value is not None and value.isdecimal() and int(value) > 0 else None


def parallel_size(cmd: tuple[str, ...], problems: Problems, loc: Loc) -> int:
    """The GPUs the command's server spreads over: ``--tensor-parallel-size`` (``-tp``) x
    ``--pipeline-parallel-size`` (``-pp``), 1 for each not given: the default for ``gpu_count``."""
    size = 1
    for names in _PARALLEL:
        value = flag_value(cmd, *names)
        if value is None:
            continue
        if not value.isdecimal() or int(value) < 1:
            problems.add(loc, f"{names[0]} must be an integer >= 1, got {value!r}")
        else:
            size *= int(value)
    return size


def check_aliases(models: Mapping[str, ModelConfig], problems: Problems) -> None:
    """An alias may name one model only, never another model's name, and never look like a replica's."""
    owner: dict[str, str] = {}
    for m in models.values():
        for i, alias in enumerate(m.aliases):
            loc: Loc = ("models", m.name, "aliases", i)
            if _UNIT_RE.search(alias):
                problems.add(loc, f"{alias!r} {_UNIT_NAME}")
            elif alias in m.aliases[:i]:
                problems.add(loc, f"duplicate alias {alias!r}")
            elif alias in models:
                problems.add(loc, f"{alias!r} is already a model name")
            elif owner.setdefault(alias, m.name) != m.name:
                problems.add(loc, f"{alias!r} is already an alias of {owner[alias]!r}")


def check_adapters(models: dict[str, ModelConfig], endpoints: tuple[str, ...], problems: Problems) -> None:
    """Adapters need a base the router starts, with ``--enable-lora`` (the router adds the environment
    variable vLLM needs to load them at run time); in endpoint mode (``endpoints``: the engines' URLs) they
    load on the engines instead."""
    engines = f"engine at {endpoints[0]}" if len(endpoints) == 1 else f"engines at {', '.join(endpoints)}"
    for m in models.values():
        if not m.is_adapter:
            continue
        loc: Loc = ("models", m.name, "base")
        if endpoints and m.base is not None:
            problems.add(loc, f"endpoint mode (no model has a cmd) has no managed bases; adapters load on the "
                              f"{engines}")
        elif not endpoints and m.base is None:
            problems.add(loc, "required (the model this adapter is loaded on)")
        elif not endpoints and m.base is not None:
            base = models.get(m.base)
            if base is None:
                problems.add(loc, f"unknown model {m.base!r}")
            elif base.is_adapter:
                problems.add(loc, f"{m.base!r} is an adapter, not a base model")
            elif not any(a == "--enable-lora" or a.startswith("--enable-lora=") for a in base.cmd):
                problems.add(("models", m.base, "cmd"), f"must include --enable-lora (adapter {m.name!r} is "
                                                        f"loaded on it at run time)")
    for name in {m.base for m in models.values() if m.is_adapter and m.base is not None} & set(models):
        base = models[name]
        if not base.is_adapter and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in base.env:
            models[name] = base.model_copy(update={"env": {**base.env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}})


def check_fit(models: Mapping[str, ModelConfig], budget: float | None, problems: Problems) -> None:
    """A model that needs more than the whole memory budget could never be loaded."""
    if budget is None:
        return
    for m in models.values():
        if m.memory_gb > budget:
            problems.add(("models", m.name, "memory_gb"),
                         f"{m.memory_gb:g} GB can never fit in capacity.memory_gb ({budget:g} GB)")


def check_cluster(cluster: Cluster, models: Mapping[str, ModelConfig], budget: float | None,
                  problems: Problems, host_budget: float | None = None) -> None:
    """What the backend (``cluster.backend``) asks of the rest: ``resources`` are Ray placement constraints,
    meaningless for servers started here; the ray backend starts servers, which endpoint mode (no model
    with a cmd) has none of; the router cannot read the nodes' GPUs, so it needs each GPU's memory (Ray
    counts GPUs, not their memory) and each model's ``memory_gb`` (a share of a GPU it cannot measure); and
    ``capacity.host_memory_gb`` (``host_budget``) is one machine's RAM, which level-1 sleepers spread over
    the nodes would not be held to (see :func:`check_cluster_sleep`)."""
    started = [m for m in models.values() if not m.is_adapter]
    if not cluster.ray:
        for m in started:
            if m.resources:
                problems.add(("models", m.name, "resources"), "resources are Ray placement constraints: only "
                                                              "with cluster.backend ray")
        return
    if not started:
        problems.add(("cluster", "backend"), "the ray backend starts the models' servers on the cluster; endpoint "
                                             "mode (no model has a cmd) fronts engines that are already running")
    elif cluster.gpu_memory_gb is None:
        problems.add(("cluster", "gpu_memory_gb"), "required with backend ray (Ray counts GPUs, not their "
                                                   "memory)")
    for m in started:
        if m.memory_gb <= 0:
            problems.add(("models", m.name, "memory_gb"), "required with backend ray: the router cannot read "
                                                          "the nodes' GPUs to derive it from "
                                                          "--gpu-memory-utilization")
        if cluster.gpu_memory_gb is not None and m.memory_gb > cluster.gpu_memory_gb:
            problems.add(("models", m.name, "memory_gb"), f"{m.memory_gb:g} GB can never fit on a GPU of "
                                                          f"cluster.gpu_memory_gb ({cluster.gpu_memory_gb:g} GB)")
    check_cluster_sleep(started, host_budget, problems)


def check_cluster_sleep(started: list[ModelConfig], host_budget: float | None, problems: Problems) -> None:
    """On the cluster a level-1 sleeper keeps its weights in the RAM of the node it runs on, but the host
    budget is one number, checked against the sum over every node: read as one node's RAM (what it means on
    one machine) it stops sleepers that would fit, read as the cluster's RAM it lets one node take it all.
    Neither is what an operator sizing a node asked for, so the two are refused together: level 2 keeps
    nothing in host RAM, and without a budget the nodes' RAM is sized by the operator."""
    if host_budget is None:
        return
    level1 = [m.name for m in started if m.sleep_level == 1]
    if level1:
        problems.add(("capacity", "host_memory_gb"),
                     f"not with cluster.backend ray while a model sleeps at level 1 ({', '.join(level1)}): it is "
                     f"one machine's budget, and each sleeper keeps its weights in the RAM of its own node; "
                     f"remove it (and size each node's RAM for its sleepers), or give them sleep: {{level: 2}}")
