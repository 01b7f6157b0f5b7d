"""How much memory each model needs, per GPU, and where that figure came from.

Sources, in order: ``memory_gb`` as declared; ``--gpu-memory-utilization U`` in the model's command x
the total memory of the GPU it runs on (vLLM reserves exactly that); with no GPU detected, U x
``capacity.memory_gb``; otherwise nothing is counted. A model on several GPUs (``gpu_count``, tensor or
pipeline parallel) needs that much on each of them. ``check-config`` and ``/admin/models`` show the
source next to the figure, because a wrong figure is the usual reason for an OOM or a needless eviction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vllm_model_router.config import ModelConfig, RouterConfig
from vllm_model_router.gpu.probe import GpuMemory


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    gb: float  # per GPU the model is placed on (or in the single pool when no GPU is known)
    source: str


def model_need(m: ModelConfig, config: RouterConfig, devices: list[GpuMemory]) -> MemoryNeed:
    if m.is_adapter:
        return MemoryNeed(0.0, f"adapter: shares the memory of {m.base or 'the engine'}")
    if config.cluster.ray and m.gpu_count > 1 and not m.sleep_level:
        # Ray reserves an actor's GPUs whole above one: nothing else can go beside it there in Ray's books,
        # so nothing does in the router's (placed there, it would wait out the placement timeout and fail)
        return MemoryNeed(cluster_gpu_budget(config), f"its {m.gpu_count} GPUs whole: Ray reserves a unit of "
                                                      f"several GPUs whole (memory_gb {m.memory_gb:g} declared)")
    if m.memory_gb > 0:
        return MemoryNeed(m.memory_gb, "memory_gb (declared)")
    util = m.gpu_memory_utilization
    if util is not None:
        candidates = [d for d in devices if m.gpus is None or d.index in m.gpus]
        if candidates:
            gpu = max(candidates, key=lambda d: d.total_gb)
            return MemoryNeed(util * gpu.total_gb,
                              f"--gpu-memory-utilization {util:g} x {gpu.total_gb:.1f} GB (GPU {gpu.index})")
        if config.memory_gb is not None:
            return MemoryNeed(util * config.memory_gb,
                              f"--gpu-memory-utilization {util:g} x capacity.memory_gb {config.memory_gb:g} GB "
                              f"(no GPU detected)")
        return MemoryNeed(0.0, f"--gpu-memory-utilization {util:g}: not counted (no GPU detected and no "
                               f"capacity.memory_gb)")
    return MemoryNeed(0.0, "not declared: not counted (set memory_gb or --gpu-memory-utilization)")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_path(cmd: tuple[str, ...]) -> str | None:
    """The model a vLLM command serves: ``vllm serve PATH``, ``--model PATH`` or ``--model=PATH``."""
    for i, arg in enumerate(cmd):
        if arg == "--model" and i + 1 < len(cmd):
            return cmd[i + 1]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1]
        if arg == "serve" and i + 1 < len(cmd) and not cmd[i + 1].startswith("-"):
            return cmd[i + 1]
    return None


def weights_need(m: ModelConfig, need: MemoryNeed) -> MemoryNeed:
    """Host RAM a level-1 sleeper holds: its weights, declared or summed from a local model folder."""
    if m.weights_gb is not None:
        return MemoryNeed(m.weights_gb, "weights_gb (declared)")
    path = model_path(m.cmd)
    if path is not None and os.path.isdir(path):
        size = 0
        for root, _, files in os.walk(path):
            size += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(WEIGHT_SUFFIXES))
        if size:
            return MemoryNeed(size / 1024**3, f"size of the weight files in {path}")
    return MemoryNeed(need.gb, "not known: assumed as large as its GPU memory need")


def cluster_gpu_budget(config: RouterConfig) -> float:
    """What the models may reserve on each GPU of the cluster: ``cluster.gpu_memory_gb`` (Ray counts GPUs, not
    their memory), or ``capacity.memory_gb`` where it is lower, as on one machine, where it is each GPU's
    budget once GPUs are known."""
    size = config.cluster.gpu_memory_gb or 1.0  # required with this backend (config/rules.py)
    return min(size, config.memory_gb) if config.memory_gb is not None else size


def resolve_needs(config: RouterConfig, devices: list[GpuMemory]) -> dict[str, MemoryNeed]:
    return {name: model_need(m, config, devices) for name, m in config.models.items()}


def gpu_budgets(config: RouterConfig, devices: list[GpuMemory]) -> dict[int, float] | None:
    """Per-GPU budgets when GPUs are detected: capacity.memory_gb (per GPU) or total x memory_fraction."""
    if not devices:
        return None
    return {d.index: config.memory_gb if config.memory_gb is not None else d.total_gb * config.memory_fraction
            for d in devices}


def check_fit(config: RouterConfig, devices: list[GpuMemory], needs: dict[str, MemoryNeed]) -> list[str]:
    """Problems that make a model impossible to place on the detected GPUs (this machine's: the router
    places a model's ``gpu_count`` GPUs on one machine, so more than it has can never be found)."""
    problems: list[str] = []
    budgets = gpu_budgets(config, devices)
    if budgets is None:
        return problems
    for name, m in config.models.items():
        if m.is_adapter:
            continue
        if m.gpus is not None:
            missing = [g for g in m.gpus if g not in budgets]
            if missing:
                problems.append(f"models.{name}.gpus: no GPU {missing} (detected: {sorted(budgets)})")
                continue
            best = min(budgets[g] for g in m.gpus)
        elif m.gpu_count > len(budgets):
            problems.append(f"models.{name}.gpu_count: needs {m.gpu_count} GPUs, this machine has {len(budgets)}")
            continue
        else:  # the gpu_count roomiest GPUs: it needs its memory on each
            best = sorted(budgets.values(), reverse=True)[m.gpu_count - 1]
        if needs[name].gb > best + 1e-9:
            problems.append(f"models.{name}: needs {needs[name].gb:.1f} GB per GPU ({needs[name].source}), more "
                            f"than the budget of its GPUs ({best:.1f} GB)")
    return problems
