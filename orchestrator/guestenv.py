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
from pinlab.common.vocab import guest_python

from .session import GuestSession
from .vm import GuestConfig

IRQ_MODES = ("msi", "msix")
# serial -> MiB (pinlab_env.DISKS, pinlab_env.SWAP_DISK); swap: a disk of its own, see
# pinlab_env's docstring for why not zram or a swap file
SCRATCH_DISKS = {"pinlab-ext4": 512, "pinlab-xfs": 512, "pinlab-btrfs": 512,
                 "pinlab-swap": 128}
CMDLINE = "page_poison=1"
HOTPLUG_MB = 512


def guest_config(irq: str = "msi") -> GuestConfig:
    """A matrix guest: scratch disks for the filesystems and swap, page poisoning, room for a
    hot-added DIMM (mem-offline cells), and the device with MSI instead of MSI-X:
    QEMU 11.1's vfio-user-pci aborts on device_del of an MSI-X device, and the hot-unplug
    cells need device_del to work. Raises ValueError for an unknown ``irq``."""
    if irq not in IRQ_MODES:
        raise ValueError(f"irq must be one of {', '.join(IRQ_MODES)}, not {irq!r}")
    return GuestConfig(scratch_disks=dict(SCRATCH_DISKS), cmdline=CMDLINE,
                       device_args=["--irq", irq], hotplug_mb=HOTPLUG_MB)


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
