"""What a matrix guest looks like, for the matrix's warm guests (pool.py) and for
``pinlab up`` (workbench.py): one definition, so a guest booted by hand is the guest a
cell ran in.

The host side is a GuestConfig (scratch disks, kernel command line, device IRQ mode, room
for a hot-added DIMM); the guest side is ``pinlab_env.py`` (guest/), which the
matrix's cell code calls per cell and ``up`` calls once after boot (``setup_guest``).
"""

from __future__ import annotations

from typing import Any

from pinlab.common import jsonlines
from pinlab.common.vocab import PMEM_MIB, guest_python

from .session import GuestSession
from .vm import GuestConfig

IRQ_MODES = ("msi", "msix")
# serial -> MiB (pinlab_env.DISKS, pinlab_env.SWAP_DISK); swap: a disk of its own, see
# pinlab_env's docstring for why not zram or a swap file
SCRATCH_DISKS = {"pinlab-ext4": 512, "pinlab-xfs": 512, "pinlab-btrfs": 512,
                 "pinlab-swap": 128}
# fsdax (guest/pinlab_dax.py): the kernel's legacy e820 pmem, two ranges carved out
# of guest RAM by memmap=SIZE!START (Documentation/admin-guide/kernel-parameters.txt,
# "memmap=nn[KMG]!ss[KMG]"; CONFIG_X86_PMEM_LEGACY=m in Debian's 6.1, 6.12 and 7 kernels,
# nd_e820). Backing -> (MiB, start MiB), the sizes vocab.PMEM_MIB (the guest finds its
# device by size); the ranges need RAM between them or e820 merges them
# into one device. ext4-dax needs 4 KiB blocks, xfs at least 300 MiB (mkfs.xfs). The guest
# gets PMEM_RAM_MB more RAM so that what the other cells have stays as it was (1 GiB and a
# little more). The top 48 MiB stay RAM: QEMU's loader puts the initramfs and the
# firmware its tables at the top of low RAM. Not a QEMU nvdimm: a label-less NFIT
# namespace has no struct pages (no ND_REGION_PAGEMAP), so its queue/dax is 0 without
# ndctl, which the rootfs does not have.
PMEM = {"ext4-dax": (PMEM_MIB["ext4-dax"], 1024), "xfs-dax": (PMEM_MIB["xfs-dax"], 1168)}
PMEM_RAM_MB = 512
MEMORY_MB = 1024 + PMEM_RAM_MB
# numa-hint (guest/events/ev_numa_hint.py): a second NUMA node of NUMA_MB MiB with no
# CPU (vm.GuestConfig.numa_mb). Every guest has it, so the matrix keeps one warm guest per
# kernel; node 0 keeps MEMORY_MB and both CPUs, so a cell that does not ask for node 1
# allocates where it did in a one-node guest. Two nodes turn NUMA balancing on by
# default (CONFIG_NUMA_BALANCING_DEFAULT_ENABLED=y in the three Debian kernels), so
# every guest boots with numa_balancing=disable and only numa-hint cells turn it on
# (kernel.numa_balancing, Documentation/admin-guide/sysctl/kernel.rst).
NUMA_MB = 256
# cma-pin (guest/events/ev_cma_pin.py): a CMA area where the kernel has CONFIG_CMA (7.x:
# CMA=y, CMA_SIZE_MBYTES=0, so none without cma=; 6.1 and 6.12: CMA not set, where the
# kernel passes the unknown parameter on to init's environment and nothing uses it).
# Documentation/admin-guide/kernel-parameters.txt, "cma=nn[MG]".
CMA_MB = 64
CMDLINE = ("page_poison=1 " + " ".join(f"memmap={mib}M!{start}M"
                                       for mib, start in PMEM.values())
           + f" numa_balancing=disable cma={CMA_MB}M")
HOTPLUG_MB = 512


def guest_config(irq: str = "msi") -> GuestConfig:
    """A matrix guest: scratch disks for the filesystems and swap, page poisoning, two
    legacy pmem ranges for the fsdax backings (PMEM, MEMORY_MB of RAM), a CPU-less
    second NUMA node (NUMA_MB; NUMA balancing off until a numa-hint cell turns it on), a
    CMA area where the kernel has CMA (CMA_MB), room for a hot-added DIMM (mem-offline
    cells), and the device with MSI instead of MSI-X:
    QEMU 11.1's vfio-user-pci aborts on device_del of an MSI-X device, and the hot-unplug
    cells need device_del to work. Raises ValueError for an unknown ``irq``."""
    if irq not in IRQ_MODES:
        raise ValueError(f"irq must be one of {', '.join(IRQ_MODES)}, not {irq!r}")
    return GuestConfig(scratch_disks=dict(SCRATCH_DISKS), cmdline=CMDLINE,
                       device_args=["--irq", irq], hotplug_mb=HOTPLUG_MB,
                       memory_mb=MEMORY_MB, numa_mb=NUMA_MB)


def irq_of(device_args: list[str]) -> str:
    """The device's interrupts (IRQ_MODES) that a device server started with
    ``device_args`` uses: its ``--irq``, else the server's default, msix
    (device/device.py)."""
    return device_args[device_args.index("--irq") + 1] if "--irq" in device_args else "msix"


def setup_command(*, swap: bool = False, hugepages: int = 0, cell: str | None = None) -> str:
    """The guest command that sets an ``up`` guest up like a matrix guest: the scratch
    filesystems (ext4, xfs, btrfs), tmpfs and hugetlbfs mounted, optionally swap and huge
    pages, and the environment of one cell (``MODE/BACKING/EVENT``)."""
    argv = ["setup", "--fs", "ext4,xfs,btrfs", "--tmpfs", "--hugetlbfs"]
    if swap:
        argv.append("--swap")
    if hugepages:
        argv += ["--hugepages", str(hugepages)]
    if cell:
        argv += ["--cell", cell]
    return guest_python("pinlab_env", *argv)


def setup_guest(s: GuestSession, **kw: Any) -> dict[str, Any]:
    """Run setup_command(**kw) in the guest; returns its JSON report (mounts, swap,
    nr_hugepages, cgroups). Raises SSHError when the setup fails, MalformedLine when its
    last line is not a JSON object."""
    out = s.guest.ssh.run(setup_command(**kw), timeout=180, check=True).out
    return jsonlines.decode_object(out.strip().splitlines()[-1])
