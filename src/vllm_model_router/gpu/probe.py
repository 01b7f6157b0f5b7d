"""What the GPUs really hold: total, used and free memory per device, and memory per process.

Behind a small interface so that tests inject a fake and a machine without an NVIDIA GPU runs with
no probe at all (memory is then accounted from the configuration's declarations only). The NVML
implementation uses ``nvidia-ml-py`` (``import pynvml``), loaded lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("vllm_model_router.gpu")
GIB = 1024**3


@dataclass(frozen=True, slots=True)
class GpuMemory:
    index: int
    name: str
    total_gb: float
    used_gb: float
    free_gb: float


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_gb: float


class GpuProbe(Protocol):
    def devices(self) -> list[GpuMemory]: ...

    def processes(self, index: int) -> list[GpuProcess]: ...


class NvmlProbe:
    """NVIDIA GPUs through NVML. ``NvmlProbe.create()`` returns None when there is no usable GPU."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._count = int(nvml.nvmlDeviceGetCount())

    @classmethod
    def create(cls) -> NvmlProbe | None:
        try:
            import pynvml  # type: ignore[import-not-found, import-untyped, unused-ignore]

            pynvml.nvmlInit()
            probe = cls(pynvml)
        except Exception as e:  # no library, no driver, no device: all mean "no probe"
            log.debug("NVML unavailable: %r", e)
            return None
        return probe if probe._count > 0 else None

    def devices(self) -> list[GpuMemory]:
        out = []
        for i in range(self._count):
            h = self._nvml.nvmlDeviceGetHandleByIndex(i)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(h)
            name = self._nvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            out.append(GpuMemory(i, name, mem.total / GIB, mem.used / GIB, mem.free / GIB))
        return out

    def processes(self, index: int) -> list[GpuProcess]:
        h = self._nvml.nvmlDeviceGetHandleByIndex(index)
        seen: dict[int, float] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                procs = getattr(self._nvml, getter)(h)
            except Exception:
                continue
            for p in procs:
                used = getattr(p, "usedGpuMemory", None) or 0
                seen[int(p.pid)] = seen.get(int(p.pid), 0.0) + used / GIB
        return [GpuProcess(pid, gb) for pid, gb in sorted(seen.items())]


@dataclass
class FakeGpu:
    name: str
    total_gb: float
    processes: dict[int, float] = field(default_factory=dict)  # pid -> GB
    other_gb: float = 0.0  # used by something not listed as a process


class FakeProbe:
    """A programmable probe for tests: set what each GPU holds, per process."""

    def __init__(self, totals: list[float]) -> None:
        self.gpus = [FakeGpu(f"Fake GPU {i}", t) for i, t in enumerate(totals)]

    def devices(self) -> list[GpuMemory]:
        out = []
        for i, g in enumerate(self.gpus):
            used = sum(g.processes.values()) + g.other_gb
            out.append(GpuMemory(i, g.name, g.total_gb, used, max(0.0, g.total_gb - used)))
        return out

    def processes(self, index: int) -> list[GpuProcess]:
        return [GpuProcess(pid, gb) for pid, gb in sorted(self.gpus[index].processes.items())]


def process_name(pid: int) -> str:
    """A short description of a process, for messages about memory held by others."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({cmd[:120]})" if cmd else f"pid {pid}"
