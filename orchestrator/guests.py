"""How many warm guests a run uses: per kernel and in total, from the host's cores and
memory, or from ``--jobs``.

A matrix guest is a TCG (or KVM) QEMU with ``GuestConfig.cpus`` vCPUs; under TCG each vCPU
is a host thread (MTTCG), so a guest runs at full speed only with that many host cores to
itself. Its memory is ``memory_mb`` plus the hot-add room of the mem-offline cells, plus
QEMU's and the device server's own. The default budget is therefore
``min(cores // cpus, available memory // GUEST_MEMORY_MB)``, and never fewer guests than
kernels: the kernels have always run at the same time, one guest each, so on a small host
(this project's 2 cores) the plan is exactly that, and a large host gets more guests per
kernel. A kernel gets no more guests than ``ceil(cells / MIN_CELLS_PER_GUEST)``: a guest
must run enough cells to pay for its boot.

Each guest is a pool (``pool.py``) in its own directory, ``<kernel>`` for the first guest of
a kernel and ``<kernel>+<slot>`` for the others, and runs the cells of one Avocado job.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from .expectations import Cell
from .pool import guest_config
from .shard import BOOT_COST, split

MIN_CELLS_PER_GUEST = 4 * BOOT_COST   # a boot is then at most a fifth of a guest's time
OVERHEAD_MB = 512                     # QEMU itself and the device server, per guest


def guest_memory_mb() -> int:
    """Host memory one matrix guest needs (MiB): RAM, hot-add room and overhead."""
    cfg = guest_config()
    return cfg.memory_mb + cfg.hotplug_mb + OVERHEAD_MB


def host_cores() -> int:
    """Cores this process may run on (its affinity mask; a container's CPU set)."""
    return len(os.sched_getaffinity(0))


def host_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` in MiB (what can be used without swapping)."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"no MemAvailable in {meminfo}")


def guest_budget(cores: int | None = None, memory_mb: int | None = None) -> int:
    """How many guests the host runs at full speed at once: at least 1."""
    cores = host_cores() if cores is None else cores
    memory_mb = host_memory_mb() if memory_mb is None else memory_mb
    by_cpu = cores // guest_config().cpus
    by_mem = memory_mb // guest_memory_mb()
    return max(1, min(by_cpu, by_mem))


@dataclass(frozen=True)
class GuestSlot:
    """One warm guest: its kernel, its slot (1 = the kernel's first guest) and its cells."""

    kernel: str
    slot: int
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        """The pool's name: the kernel for slot 1, ``<kernel>+<slot>`` otherwise."""
        return self.kernel if self.slot == 1 else f"{self.kernel}+{self.slot}"


@dataclass(frozen=True)
class GuestPlan:
    """The guests of a run and how many of them run at once (``concurrent``)."""

    slots: tuple[GuestSlot, ...]
    concurrent: int

    def per_kernel(self) -> dict[str, int]:
        """Kernel -> number of warm guests, in plan order."""
        out: dict[str, int] = {}
        for s in self.slots:
            out[s.kernel] = out.get(s.kernel, 0) + 1
        return out


def plan_guests(cells: list[Cell], jobs: int | None = None, budget: int | None = None
                ) -> GuestPlan:
    """Spread ``cells`` over warm guests.

    ``jobs``: the total number of guests (``--jobs``), overriding the host's ``budget``
    (default ``guest_budget()``). With fewer jobs than kernels every kernel still gets one
    guest, and only ``jobs`` guests run at once. Otherwise the guests go to the kernels in
    proportion to their cells (largest remainder; at least one each, at most
    ``ceil(cells / MIN_CELLS_PER_GUEST)`` each unless ``jobs`` asks for more), and a
    kernel's cells are split between its guests with ``shard.split``.
    Raises ValueError if ``jobs`` < 1."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs {jobs}: need at least 1")
    by_kernel: dict[str, list[Cell]] = {}
    for c in cells:
        by_kernel.setdefault(c.kernel, []).append(c)
    if not by_kernel:
        return GuestPlan((), 1)
    kernels = list(by_kernel)
    total = jobs if jobs is not None else max(len(kernels),
                                              guest_budget() if budget is None else budget)
    cap = {k: (len(by_kernel[k]) if jobs is not None
               else math.ceil(len(by_kernel[k]) / MIN_CELLS_PER_GUEST)) for k in kernels}
    count = {k: 1 for k in kernels}
    spare = min(total, sum(cap.values())) - len(kernels)
    while spare > 0:       # one more guest to the kernel with the most cells per guest
        k = max((k for k in kernels if count[k] < cap[k]),
                key=lambda k: (len(by_kernel[k]) / count[k], -kernels.index(k)))
        count[k] += 1
        spare -= 1
    slots = [GuestSlot(k, i + 1, tuple(part))
             for k in kernels for i, part in enumerate(split(by_kernel[k], count[k])) if part]
    return GuestPlan(tuple(slots), max(1, min(total, len(slots))))
