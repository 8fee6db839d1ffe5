"""fsdax in the guest: ext4 and xfs on emulated persistent memory, mounted -o dax=always,
the proof that a mapping really is DAX, and the helpers that measure how long a truncate
or hole punch waits for the driver's pins.

Guest API (standard library only). Used by pinlab_env.cell_environment (mount) and by
pinlab_cell.py (the ext4-dax and xfs-dax backings: Mapping, Cell.prepare's evidence,
Cell.layout_step for the truncate and hole-punch events of guest/events/).

    from pinlab.guest import pinlab_dax
    mnt = pinlab_dax.mount_dax("ext4-dax")        # /mnt/pinlab-ext4-dax, mkfs on first use
    pinlab_dax.dax_evidence(path, addr, npages)   # statx, mount options, VmFlags, pmem ranges
    pinlab_dax.release_after(rep, "ftruncate_shrink", os.ftruncate, (fd, n), release, 2.0)

Persistent memory: the kernel's legacy e820 pmem (``memmap=SIZE!START`` on the kernel
command line, orchestrator/guestenv.py PMEM) carves ranges out of guest RAM;
``modprobe nd_e820 nd_pmem`` gives one /dev/pmemN per range ("Persistent Memory (legacy)"
in /proc/iomem, queue/dax 1: the legacy region has struct pages, ND_REGION_PAGEMAP).
The devices are told apart by size (pinlab.common.vocab.PMEM_MIB). ext4 needs 4 KiB
blocks for DAX (mkfs would pick 1 KiB on a small device: "unsupported blocksize for
DAX"); mkfs.xfs refuses devices under 300 MiB, and reflink is turned off (older kernels
refuse dax with reflink).

DAX is proven per file, never assumed: STATX_ATTR_DAX from statx(2) (the file is accessed
through DAX, Documentation/filesystems/dax.rst "Enabling DAX on xfs and ext4"), the
mount's dax option, the VMA's VmFlags, and the PFNs of the mapping inside a pmem range
(/proc/iomem). The classifier (orchestrator/classify.py) requires them.

Errors: RuntimeError when no pmem device of the size exists, CalledProcessError when
modprobe, mkfs or mount fail, OSError from statx and /proc reads.
"""
import contextlib
import ctypes
import os
import select
import signal
import subprocess
import threading
import time

from pinlab.common.vocab import DAX_BACKINGS, PMEM_MIB, SCRATCH_MOUNT, Key
from pinlab.guest.pinlab_mm import pagemap, read_file, smaps

__all__ = ["DAX_BACKINGS", "dax_evidence", "mount_dax", "release_after", "task_wait",
           "watch_never_released"]

FS = {"ext4-dax": "ext4", "xfs-dax": "xfs"}
MKFS = {"ext4": ["mkfs.ext4", "-F", "-q", "-b", "4096"],
        "xfs": ["mkfs.xfs", "-f", "-q", "-m", "reflink=0"]}
STATX_ATTR_DAX = 0x00200000          # include/uapi/linux/stat.h
AT_FDCWD = -100
SYS_STATX = 332                      # x86-64
HOLD_S = 2.0                         # the helper deregisters after this long
NEVER_S = 4.0                        # never-unpin cells: how long the truncate is watched
# functions in which a truncate / hole punch of a DAX file waits for page references:
# 6.1/6.12 ext4_break_layouts, xfs_break_dax_layouts (dax_layout_busy_page finds the page);
# 6.15+ dax_break_layout (fs/dax.c)
LAYOUT_WAIT_FUNCS = ("ext4_break_layouts", "xfs_break_dax_layouts", "xfs_break_layouts",
                     "dax_break_layout", "dax_layout_busy_page", "ext4_wait_dax_page",
                     "xfs_wait_dax_page", "wait_page_idle")

_libc = ctypes.CDLL(None, use_errno=True)


def pmem_devices():
    """{size in MiB: /dev/pmemN} of the pmem block devices (nd_e820 + nd_pmem loaded)."""
    out = {}
    for dev in sorted(os.listdir("/sys/block")):
        if dev.startswith("pmem"):
            mib = int(read_file(f"/sys/block/{dev}/size")) * 512 >> 20
            out[mib] = f"/dev/{dev}"
    return out


def pmem_ranges():
    """[[first_pfn, last_pfn], ...] of the "Persistent Memory" ranges in /proc/iomem."""
    out = []
    for ln in read_file("/proc/iomem").splitlines():
        if "Persistent Memory" in ln and not ln.startswith(" "):
            lo, hi = ln.split(":", 1)[0].strip().split("-")
            out.append([int(lo, 16) >> 12, int(hi, 16) >> 12])
    return out


def load_pmem():
    """modprobe the legacy pmem driver and wait (5 s at most) for its block devices.
    Returns pmem_devices(); RuntimeError when none appears."""
    if not pmem_devices():
        subprocess.run(["modprobe", "-a", "nd_e820", "nd_pmem"], check=True,
                       capture_output=True)
        for _ in range(50):
            if pmem_devices():
                break
            time.sleep(0.1)
    devs = pmem_devices()
    if not devs:
        raise RuntimeError("no /dev/pmem*: is memmap=SIZE!START on the kernel command line?")
    return devs


def mount_dax(backing, stack=None, rep=None):
    """Mount the pmem device of ``backing`` ("ext4-dax" or "xfs-dax") at /mnt/pinlab-<backing>
    with -o dax=always (mkfs on first use; rep[Key.NOTES] records it). With ``stack`` it is
    unmounted when the stack closes. Returns the mount point."""
    mnt = SCRATCH_MOUNT.format(backing)
    os.makedirs(mnt, exist_ok=True)
    if os.path.ismount(mnt):
        return mnt
    devs = load_pmem()
    dev = devs.get(PMEM_MIB[backing])
    if dev is None:
        raise RuntimeError(f"no {PMEM_MIB[backing]} MiB pmem device for {backing}: {devs}")
    fs = FS[backing]
    cmd = ["mount", "-t", fs, "-o", "dax=always", dev, mnt]
    if subprocess.run(cmd, capture_output=True).returncode:
        subprocess.run([*MKFS[fs], dev], check=True, capture_output=True)
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        if rep is not None:
            rep.setdefault(Key.NOTES, []).append(f"mkfs {fs} {dev}")
    if stack is not None:
        stack.callback(subprocess.run, ["umount", mnt], capture_output=True)
    return mnt


def statx_attributes(path):
    """(stx_attributes, stx_attributes_mask) of ``path`` from statx(2)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.syscall(SYS_STATX, AT_FDCWD, path.encode(), 0, 0xFFF, buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    attrs = int.from_bytes(buf.raw[8:16], "little")
    mask = int.from_bytes(buf.raw[56:64], "little")
    return attrs, mask


def mount_options(path):
    """The /proc/mounts options of the mount that holds ``path`` (longest prefix)."""
    best, opts = "", ""
    for ln in read_file("/proc/mounts").splitlines():
        _dev, mnt, _fs, o = ln.split()[:4]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
            best, opts = mnt, o
    return opts


def dax_evidence(path, addr, npages):
    """What shows that ``path``, mapped at ``addr`` (``npages`` pages), is accessed through
    DAX: statx_dax (STATX_ATTR_DAX set and supported), mount_options, vmflags of the VMA,
    pmem_ranges (PFNs), pfns_in_pmem (how many of the mapping's present pages are inside
    one), and the pmem device's queue/dax."""
    attrs, mask = statx_attributes(path)
    ranges = pmem_ranges()
    pfns = pagemap(addr, npages)
    inside = sum(1 for p in pfns if isinstance(p, int)
                 and any(lo <= p <= hi for lo, hi in ranges))
    try:
        vmflags = smaps(addr).get("VmFlags", [])
    except LookupError:
        vmflags = None
    qdax = {}
    for dev in sorted(os.listdir("/sys/block")):
        if dev.startswith("pmem"):
            with contextlib.suppress(OSError):
                qdax[dev] = read_file(f"/sys/block/{dev}/queue/dax").strip()
    return {Key.PATH: path, Key.STATX_DAX: bool(attrs & mask & STATX_ATTR_DAX),
            Key.STATX_ATTRIBUTES: attrs, Key.MOUNT_OPTIONS: mount_options(path),
            Key.VMFLAGS: vmflags, Key.PMEM_RANGES: ranges, Key.PFNS_IN_PMEM: inside,
            Key.NPAGES: npages, Key.QUEUE_DAX: qdax}


def task_wait(pid, tid=None):
    """Where a task sleeps: state (from stat), wchan and the kernel stack (root)."""
    base = f"/proc/{pid}" + (f"/task/{tid}" if tid else "")
    out = {}
    with contextlib.suppress(OSError):
        out[Key.STATE] = read_file(f"{base}/stat").rsplit(")", 1)[1].split()[0]
    with contextlib.suppress(OSError):
        out[Key.WCHAN] = read_file(f"{base}/wchan").strip()
    with contextlib.suppress(OSError):
        out[Key.STACK] = [ln.split("]", 1)[-1].strip() for ln in
                        read_file(f"{base}/stack").splitlines()][:24]
    out[Key.IN_LAYOUT_WAIT] = any(f in s for s in [out.get(Key.WCHAN, ""),
                                                   *out.get(Key.STACK, [])]
                                  for f in LAYOUT_WAIT_FUNCS)
    return out


def release_after(rep, name, fn, args, release, hold_s=HOLD_S):
    """Run ``fn(*args)`` (a truncate or hole punch) in this thread as step ``name``; if it
    has not returned after ``hold_s`` seconds, a helper thread records where it waits
    (task_wait) and calls ``release()`` (the driver drops its pins). rep[Key.BLOCKED]
    records the step's duration (ms), when the release happened (released_at_ms, from the
    step's start; None when the step returned first) and whether the step returned after
    it. Returns fn's value; an OSError is recorded in the step, as pinlab_cell.timed does."""
    done = threading.Event()
    info = {Key.RELEASED_AT_MS: None}
    tid = threading.get_native_id()
    t0 = time.monotonic()

    def helper():
        if done.wait(hold_s):
            return
        info[Key.WAIT] = task_wait(os.getpid(), tid)
        info[Key.RELEASED_AT_MS] = round((time.monotonic() - t0) * 1000, 1)
        try:
            release()
            info[Key.RELEASE_ERRNO] = 0
        except OSError as exc:
            info[Key.RELEASE_ERRNO] = exc.errno
    th = threading.Thread(target=helper, daemon=True)
    th.start()
    st = {Key.STEP: name}
    val = None
    try:
        val = fn(*args)
        st[Key.ERRNO] = 0
    except OSError as exc:
        st[Key.ERRNO] = exc.errno
        st[Key.MSG] = str(exc)
    ms = round((time.monotonic() - t0) * 1000, 1)
    done.set()
    th.join(30)
    st[Key.MS] = ms
    rep[Key.STEPS].append(st)
    rel = info[Key.RELEASED_AT_MS]
    rep[Key.BLOCKED] = {Key.STEP: name, Key.MS: ms, Key.HOLD_MS: hold_s * 1000,
                        Key.NEVER: False, Key.RELEASED_AT_MS: rel,
                        Key.RELEASE_ERRNO: info.get(Key.RELEASE_ERRNO),
                        Key.RETURNED_AFTER_RELEASE: rel is not None and ms >= rel,
                        Key.WAIT: info.get(Key.WAIT)}
    return val


def watch_never_released(rep, name, fn, args, watch_s=NEVER_S):
    """The device never stops and the driver never unpins: run ``fn(*args)`` in a forked
    child (as step ``name``); if it has not returned after ``watch_s`` seconds, record where
    it waits (task_wait: state S is an interruptible wait, D would become a hung task),
    SIGKILL it and record how long it took to die (10 s at most; a child that does not die
    is left, rep[Key.BLOCKED][Key.STUCK], and the host reboots the guest).
    rep[Key.BLOCKED] records it all with never=True; the caller still holds its
    registration."""
    r, w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            try:
                fn(*args)
                os.write(w, b"0")
            except OSError as exc:
                os.write(w, str(exc.errno).encode())
        except BaseException:  # noqa: BLE001 - the child must never return
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    st = {Key.STEP: name}
    out = {Key.STEP: name, Key.NEVER: True, Key.WATCH_MS: watch_s * 1000, Key.PID: pid}
    ready = select.select([r], [], [], watch_s)[0]
    if ready:
        data = os.read(r, 64)
        st[Key.ERRNO] = int(data or b"-1")
        out[Key.RETURNED_MS] = round((time.monotonic() - t0) * 1000, 1)
        os.waitpid(pid, 0)
    else:
        out[Key.STILL_BLOCKED_AT_MS] = round((time.monotonic() - t0) * 1000, 1)
        out[Key.WAIT] = task_wait(pid)
        t_kill = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        status = None
        while time.monotonic() - t_kill < 10:
            done, s = os.waitpid(pid, os.WNOHANG)
            if done:
                status = s
                break
            time.sleep(0.01)
        out[Key.KILL_MS] = round((time.monotonic() - t_kill) * 1000, 1)
        out[Key.KILLED_STATUS] = status
        out[Key.KILLED_SIGNAL] = (os.WTERMSIG(status) if status is not None
                                  and os.WIFSIGNALED(status) else None)
        out[Key.STUCK] = status is None
        st[Key.ERRNO] = None    # never returned
    os.close(r)
    st[Key.MS] = round((time.monotonic() - t0) * 1000, 1)
    rep[Key.STEPS].append(st)
    rep[Key.BLOCKED] = out
