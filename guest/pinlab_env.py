#!/usr/bin/env python3
"""The environment a matrix cell runs in: scratch filesystems, tmpfs, hugetlbfs, huge
pages, swap and memory cgroups. One implementation for the matrix's cells
(pinlab_cell.py) and for ``pinlab up`` guests, which run ``pinlab_env.py setup``.

Guest API (standard library only). Every function that changes the guest takes an optional
``stack`` (contextlib.ExitStack): with one, the change is undone when the stack closes (a
matrix cell cleans up after itself); without, it stays (an ``up`` guest keeps it). A
resource that already exists is reused and not undone by a later stack.

    mnt = pinlab_env.mount_scratch("ext4")     # "/mnt/pinlab-ext4", mkfs on first use
    pinlab_env.enable_swap()                   # the whole pinlab-swap disk as swap

The scratch disks are virtio-blk disks the host attaches with serial numbers
``pinlab-ext4``, ``pinlab-xfs``, ``pinlab-btrfs`` and ``pinlab-swap`` (orchestrator/vm.py,
GuestConfig.scratch_disks). Swap is a block device of its own, not a swap file on a
scratch filesystem (which would keep that filesystem busy, so it could not be unmounted
after its cells, and route every swap write through the filesystem's swap-file mapping)
and not zram (which compresses into the guest RAM that the reclaim is meant to free and
needs the zram module in the guest). Every matrix cell runs with it on (cell_environment):
"pageout" and "memcg-reclaim" of anonymous memory reclaim for real, and a swapped page
shows as a swap entry in /proc/PID/pagemap and as pswpout in /proc/vmstat
(Documentation/admin-guide/mm/pagemap.rst).
The fsdax backings (ext4-dax, xfs-dax) are mounted by pinlab_dax.py on the guest's legacy
pmem devices, not on scratch disks; ``setup --cell MODE/ext4-dax/EVENT`` mounts one.
Errors: RuntimeError when a disk or controller is missing, subprocess.CalledProcessError
when mkfs, mount, mkswap or swapon fail, OSError from /proc and /sys writes.

    python3 -m pinlab.guest.pinlab_env setup [--fs ext4,xfs] [--tmpfs] [--hugetlbfs] [--hugepages N]
                                [--swap] [--cell MODE/BACKING/EVENT]

prints one JSON object: what is mounted where, nr_hugepages, the swap file, the cgroup.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys
import time

from pinlab.common.vocab import DAX_BACKINGS, SCRATCH_MOUNT, THP_BACKINGS
from pinlab.guest import pinlab_dax, pinlab_thp
from pinlab.guest.pinlab_mm import read_file, write_file

DISKS = {"ext4": "pinlab-ext4", "xfs": "pinlab-xfs",   # filesystem -> disk serial
         "btrfs": "pinlab-btrfs"}
MKFS = {"ext4": ["mkfs.ext4", "-F", "-q"], "xfs": ["mkfs.xfs", "-f", "-q"],
        "btrfs": ["mkfs.btrfs", "-f", "-q"]}
MNT = SCRATCH_MOUNT                                     # mount point per filesystem
SWAP_DISK = "pinlab-swap"                               # serial of the swap disk
CGROOT = "/sys/fs/cgroup"
CGCELL = f"{CGROOT}/pinlab-cell"     # memcg-reclaim cells run in here
CGOOM = f"{CGROOT}/pinlab-oom"       # the victim of an "oom" cell runs in here
OOM_LIMIT = 48 << 20                 # bytes: memory.max of CGOOM
CELL_HUGEPAGES = 3                   # a hugetlb cell's mapping (2) and one spare
NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"


def _later(stack, fn, *args, **kwargs):
    if stack is not None:
        stack.callback(fn, *args, **kwargs)


def find_disk(serial):
    """/dev/vdX of the virtio disk whose serial is ``serial``; RuntimeError if none."""
    for dev in sorted(os.listdir("/sys/block")):
        with contextlib.suppress(OSError):
            if read_file(f"/sys/block/{dev}/serial").strip() == serial:
                return f"/dev/{dev}"
    raise RuntimeError(f"no scratch disk with serial {serial}")


def mount_scratch(fs, stack=None, rep=None):
    """Mount the scratch disk of ``fs`` ("ext4", "xfs" or "btrfs") at /mnt/pinlab-<fs> (mkfs on
    first use; rep["notes"] records it). Returns the mount point."""
    mnt = MNT.format(fs)
    os.makedirs(mnt, exist_ok=True)
    if os.path.ismount(mnt):
        return mnt
    dev = find_disk(DISKS[fs])
    if subprocess.run(["mount", "-t", fs, dev, mnt], capture_output=True).returncode:
        subprocess.run([*MKFS[fs], dev], check=True, capture_output=True)
        subprocess.run(["mount", "-t", fs, dev, mnt], check=True, capture_output=True)
        if rep is not None:
            rep.setdefault("notes", []).append(f"mkfs {fs} {dev}")
    _later(stack, subprocess.run, ["umount", mnt], capture_output=True)
    return mnt


def mount_tmpfs(stack=None, size="64m"):
    """A tmpfs at /mnt/pinlab-tmpfs (``size`` as mount -o size=). Returns the path."""
    mnt = MNT.format("tmpfs")
    os.makedirs(mnt, exist_ok=True)
    if not os.path.ismount(mnt):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt],
                       check=True)
        _later(stack, subprocess.run, ["umount", mnt], capture_output=True)
    return mnt


def mount_hugetlbfs(stack=None):
    """hugetlbfs (2 MiB pages) at /mnt/pinlab-hugetlbfs. Returns the path."""
    mnt = MNT.format("hugetlbfs")
    os.makedirs(mnt, exist_ok=True)
    if not os.path.ismount(mnt):
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", mnt],
                       check=True)
        _later(stack, subprocess.run, ["umount", mnt], capture_output=True)
    return mnt


def add_hugepages(n, stack=None, rep=None):
    """Raise vm.nr_hugepages by n (2 MiB pages); returns the new value (it may be lower
    than asked when memory is fragmented). rep["nr_hugepages"] records it."""
    old = int(read_file(NR_HUGEPAGES))
    write_file(NR_HUGEPAGES, str(old + n))
    now = int(read_file(NR_HUGEPAGES))
    if rep is not None:
        rep["nr_hugepages"] = now
    _later(stack, write_file, NR_HUGEPAGES, str(old))
    return now


def swap_active():
    """Number of active swap areas (/proc/swaps)."""
    return read_file("/proc/swaps").count("\n") - 1


def enable_swap(stack=None, rep=None):
    """Swap on the whole ``pinlab-swap`` disk (mkswap, swapon). Nothing when swap is
    already on. Returns the swap device or None; rep["swap"] records it. The disk is
    made blank for each boot, so mkswap is always safe here."""
    if swap_active() > 0:
        return None
    dev = find_disk(SWAP_DISK)
    subprocess.run(["mkswap", "-f", dev], check=True, capture_output=True)
    subprocess.run(["swapon", dev], check=True, capture_output=True)
    _later(stack, subprocess.run, ["swapoff", dev], capture_output=True)
    if rep is not None:
        rep["swap"] = dev
    return dev


def memory_cgroup(path):
    """Make a child cgroup of the root with the memory controller on (cgroup v2)."""
    if "memory" not in read_file(f"{CGROOT}/cgroup.controllers").split():
        raise RuntimeError("no memory controller in cgroup2")
    if "memory" not in read_file(f"{CGROOT}/cgroup.subtree_control").split():
        write_file(f"{CGROOT}/cgroup.subtree_control", "+memory")
    os.makedirs(path, exist_ok=True)


def remove_cgroup(path):
    """rmdir a cgroup, giving its last (exiting) process up to 5 s to leave."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.1)


def enter_cgroup(path=CGCELL, stack=None, rep=None):
    """Move this process into a child memory cgroup (made if missing); with a stack, move
    back to the root and remove it afterwards."""
    memory_cgroup(path)
    write_file(f"{path}/cgroup.procs", str(os.getpid()))

    def leave():
        write_file(f"{CGROOT}/cgroup.procs", str(os.getpid()))
        remove_cgroup(path)
    _later(stack, leave)
    if rep is not None:
        rep["cgroup"] = path


def oom_cgroup(stack=None, rep=None):
    """The cgroup where the victim of an "oom" cell runs out of memory: memory.max
    OOM_LIMIT bytes, no swap. Returns its path."""
    memory_cgroup(CGOOM)
    write_file(f"{CGOOM}/memory.max", str(OOM_LIMIT))
    with contextlib.suppress(OSError):
        write_file(f"{CGOOM}/memory.swap.max", "0")
    _later(stack, remove_cgroup, CGOOM)
    if rep is not None:
        rep["oom_cgroup"] = {"path": CGOOM, "memory.max": OOM_LIMIT}
    return CGOOM


def cell_environment(backing, event, stack=None, rep=None, enter=True):
    """Everything a matrix cell of (backing, event) sets up before it maps its memory:
    swap (on for every cell and left on: a matrix guest has swap), the memcg-reclaim
    cgroup (entered when ``enter``), the backing's filesystem, and huge pages for
    hugetlb, the THP knobs for the THP backings (pinlab_thp.setup). Returns a dict of
    what was done."""
    done = {} if rep is None else rep
    enable_swap(None, done)
    if event == "memcg-reclaim":
        if enter:
            enter_cgroup(CGCELL, stack, done)
        else:
            memory_cgroup(CGCELL)
            done["cgroup"] = CGCELL
    if backing in ("ext4", "xfs", "btrfs", "private-file"):
        done["mount"] = mount_scratch("ext4" if backing == "private-file" else backing,
                                      stack, done)
    elif backing in DAX_BACKINGS:
        done["mount"] = pinlab_dax.mount_dax(backing, stack, done)
    elif backing == "tmpfs":
        done["mount"] = mount_tmpfs(stack)
    elif backing == "hugetlb":
        add_hugepages(CELL_HUGEPAGES, stack, done)
    elif backing in THP_BACKINGS:
        pinlab_thp.setup(backing, stack, done)
    return done


def state():
    """What is set up now: mounts under /mnt/pinlab-*, nr_hugepages, swaps, cgroups."""
    mounts = {}
    for ln in read_file("/proc/mounts").splitlines():
        dev, mnt, fstype = ln.split()[:3]
        if mnt.startswith(SCRATCH_MOUNT.format("")):
            mounts[mnt] = {"fstype": fstype, "source": dev}
    return {"mounts": mounts, "nr_hugepages": int(read_file(NR_HUGEPAGES)),
            "swaps": [ln.split()[0] for ln in read_file("/proc/swaps").splitlines()[1:]],
            "cgroups": [p for p in (CGCELL, CGOOM) if os.path.isdir(p)]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="pinlab_env.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="set up a guest like a matrix guest (stays set up)")
    s.add_argument("--fs", default="", help="comma-separated: ext4,xfs,btrfs")
    s.add_argument("--tmpfs", action="store_true")
    s.add_argument("--hugetlbfs", action="store_true")
    s.add_argument("--hugepages", type=int, default=0, help="raise nr_hugepages by N")
    s.add_argument("--swap", action="store_true", help="swap on the pinlab-swap disk")
    s.add_argument("--cell", help="MODE/BACKING/EVENT[+OPTIONS]: that cell's environment too")
    sub.add_parser("state", help="print what is set up")
    a = p.parse_args(argv)
    out = {}
    if a.cmd == "setup":
        for fs in [f for f in a.fs.split(",") if f]:
            out.setdefault("scratch", {})[fs] = mount_scratch(fs, None, out)
        if a.tmpfs:
            out["tmpfs"] = mount_tmpfs()
        if a.hugetlbfs:
            out["hugetlbfs"] = mount_hugetlbfs()
        if a.hugepages:
            add_hugepages(a.hugepages, None, out)
        if a.swap:
            enable_swap(None, out)
        if a.cell:
            _mode, backing, event = a.cell.split("/")
            out["cell"] = cell_environment(backing, event.partition("+")[0], enter=False)
    out["state"] = state()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
