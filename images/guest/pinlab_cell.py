"""One matrix cell, run step by step in the guest: `workload.py cell --mode M --backing B
--event E`.  Standard library only (Python 3.13 in the guest).

The report is raw observations, never a verdict: registration errno, the state of every
page seen through the mapping / the file / the disk (which device generation is there),
PFNs from /proc/self/pagemap, /proc/vmstat deltas, memcg charge, timings and the driver's
QUERY output.  The host (orchestrator/scenario.py) turns it into an outcome class.

Every cell cleans up after itself (munmap, close, remove files, unmount, swapoff, leave
the cgroup, restore nr_hugepages) so the next cell starts from the same guest state.
The environment (scratch filesystems, swap, cgroups, huge pages) comes from pinlab_env and
the /proc readers from pinlab_mm: the guest API that ``pinlab run`` scripts use too.
``ready_cell()`` stops a cell before its event, for a human (``pinlab up --cell``).

Page states (see scan()): "g<N>" the whole page holds generation N of this region's
pattern, "zero", "partial-g<N>" (starts with gen N but differs later), "other".
Scans are run-length encoded: [[state, first_page, count], ...].
"""
import contextlib
import errno
import fcntl
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import time

import pinlab_dax
import pinlab_ioctl
from pinlab_env import CGCELL, cell_environment, mount_scratch, mount_tmpfs, oom_cgroup
from pinlab_mm import (
    F_ADD_SEALS,
    F_GET_SEALS,
    F_SEAL_WRITE,
    HPAGE,
    MADV_DONTFORK,
    MADV_DONTNEED,
    MADV_NOHUGEPAGE,
    MADV_PAGEOUT,
    MADV_SOFT_OFFLINE,
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_HUGETLB,
    PAGE,
    delta,
    drop_caches,
    madvise,
    pagemap,
    punch_hole,
    read_file,
    vmstat,
    write_file,
)

NPAGES = 16                 # 64 KiB: enough for truncate halves, holes, partial pages
CONTROL_PAGES = 4           # unregistered pages after the region (swap reclaim cells)
# cells whose reclaim must be shown to reach the mapping: an unregistered control page of
# the same mapping has to go to swap, or the cell proves nothing (classify.py)
SWAP_CONTROL = {("anon", "pageout"), ("anon", "memcg-reclaim"),
                ("private-file", "pageout"), ("private-file", "memcg-reclaim")}
SOFT_OFFLINE_PAGES = 4
DAX_BACKINGS = pinlab_dax.DAX_BACKINGS   # MAP_SHARED files on fsdax (pinlab_dax.py)
READY_FILE = "/tmp/pinlab-cell.ready"


# ------------------------------------------------------------------ small helpers
def errname(e):
    return errno.errorcode.get(e, str(e))


def now_ms():
    return time.monotonic() * 1000.0


def rle(states):
    out = []
    for i, st in enumerate(states):
        if out and out[-1][0] == st:
            out[-1][2] += 1
        else:
            out.append([st, i, 1])
    return out


def page_state(mv, region, off):
    """State of the page at byte `off` of the region, whose bytes are mv[0:PAGE]."""
    (w,) = struct.unpack_from("<Q", mv, 0)
    r, g, o = pinlab_ioctl.decode_word(w)
    if r == (region & 0xFFFF) and o == off and g:
        base = ((region & 0xFFFF) << 48) | ((g & 0xFFFF) << 32)
        first = base + (off >> 3)
        exp = struct.pack(f"<{PAGE // 8}Q", *range(first, first + PAGE // 8))
        return f"g{g}" if bytes(mv) == exp else f"partial-g{g}"
    if not any(bytes(mv)):
        return "zero"
    return "other"


def scan(buf, region, npages, first_page=0):
    """RLE page states of buf (region pages [first_page, first_page+npages))."""
    mv = memoryview(buf).cast("B")
    states = [page_state(mv[i * PAGE:(i + 1) * PAGE], region, (first_page + i) * PAGE)
              for i in range(npages)]
    return rle(states)


def timed(rep, name, fn, *a):
    """Run one step; record its errno and duration. Returns fn's value or None."""
    t0 = now_ms()
    st = {"step": name}
    try:
        val = fn(*a)
        st["errno"] = 0
        if isinstance(val, (int, str)) and not isinstance(val, bool):
            st["value"] = val
    except OSError as exc:
        val = None
        st["errno"] = exc.errno
        st["errno_name"] = errname(exc.errno or 0)
        st["msg"] = str(exc)
        st["status"] = getattr(exc, "status", None)
        res = getattr(exc, "result", None)
        if res is not None and hasattr(res, "bytes"):
            st["bytes"] = res.bytes
    st["ms"] = round(now_ms() - t0, 1)
    rep["steps"].append(st)
    return val


def last_step(rep, name):
    for st in reversed(rep["steps"]):
        if st["step"] == name:
            return st
    return None


def memcg_events(cg):
    out = {}
    with contextlib.suppress(OSError):
        for line in read_file(f"{cg}/memory.events").splitlines():
            k, v = line.split()
            out[k] = int(v)
    return out


def driver_stat(name, dev="pinlab0"):
    """A counter from the driver's debugfs stats (None when unavailable)."""
    with contextlib.suppress(OSError, ValueError):
        for line in read_file(f"/sys/kernel/debug/pinlab/{dev}/stats").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return int(parts[1])
    return None


def _read_line(fd, timeout):
    buf, deadline = b"", time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError("the victim process did not report")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"the victim process exited early: {buf[-500:]!r}")
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def _wait_child(pid, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return _wait_child(pid, 5) if timeout > 5 else None


def _victim_child(args, kind, cg, info_w, go_r):
    """In the victim process: register, stream, report, then die as told."""
    code = 0
    try:
        if cg:
            write_file(f"{cg}/cgroup.procs", "0")
        with contextlib.ExitStack() as st:
            vrep = {"steps": []}
            m = Mapping(st, kind, vrep, tag="victim")
            dev = pinlab_ioctl.PinlabDevice(args.device)
            rid = dev.register(m.addr, m.size, args.mode)
            dev.dma_write(rid, 0, m.size, 1)
            dev.stream_start(rid, 0, m.size, 1, PAGE, 500)
            os.write(info_w, json.dumps({"region": rid, "npages": m.npages,
                                         "pfns": m.pfns()}).encode() + b"\n")
            os.read(go_r, 1)
            if cg:
                hog = []
                while True:           # until the OOM killer ends it
                    hog.append(b"\1" * (1 << 20))
            os.kill(os.getpid(), signal.SIGKILL)
    except BaseException as exc:  # noqa: BLE001 - the child must never return
        with contextlib.suppress(Exception):
            os.write(info_w, json.dumps({"error": repr(exc)}).encode() + b"\n")
        code = 1
    finally:
        os._exit(code)


MEMDIR = "/sys/devices/system/memory"


def zone_pages(zone):
    """managed pages of a zone (all nodes), from /proc/zoneinfo."""
    total, inside = 0, False
    for line in read_file("/proc/zoneinfo").splitlines():
        if line.startswith("Node "):
            inside = line.split()[-1] == zone
        elif inside and line.split()[:1] == ["managed"]:
            total += int(line.split()[1])
    return total


def wait_movable_memory(timeout, settle=0.5):
    """The host hot-added a DIMM; wait until the guest has onlined all of it as
    ZONE_MOVABLE: the zone's managed pages grow block by block, and the zonelists that
    let allocations use the new zone are rebuilt only after a block is online."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        n = zone_pages("Movable")
        if n != last:
            last, since = n, time.monotonic()
        elif n > 0 and time.monotonic() - since >= settle:
            return n
        if time.monotonic() > deadline:
            raise RuntimeError(f"ZONE_MOVABLE not settled {timeout} s after the hot-add "
                               f"({n} pages)")
        time.sleep(0.05)


def offline_block(block, timeout):
    """Offline one memory block; a blocked offline is interrupted after ``timeout`` s
    (offline_pages retries migration until a signal arrives)."""
    t0 = now_ms()
    try:
        r = subprocess.run(["sh", "-c", f"echo offline > {MEMDIR}/memory{block}/state"],
                           capture_output=True, text=True, timeout=timeout)
        result = "ok" if r.returncode == 0 else (r.stderr.strip()[-200:] or f"exit {r.returncode}")
    except subprocess.TimeoutExpired:
        result = "timeout"
    return {"block": block, "result": result, "ms": round(now_ms() - t0, 1),
            "state": read_file(f"{MEMDIR}/memory{block}/state").strip()}


def memcg_current():
    with contextlib.suppress(OSError):
        return int(read_file(f"{CGCELL}/memory.current"))
    return None


class Mapping:
    """One user mapping of a backing. `fd`/`path` are None for anonymous memory."""

    def __init__(self, stack, kind, rep, tag="cell", npages=NPAGES):
        self.kind = kind
        self.fd = None
        self.path = None
        self.npages = npages
        self.shared = kind not in ("anon", "private-file")
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if kind == "hugetlb":
            # two huge pages; pinlab_env.cell_environment() reserved them and one spare
            # (after truncate/punch the orphaned huge page stays allocated, and re-faulting
            # the range must not SIGBUS for want of a free huge page)
            self.npages = 2 * HPAGE // PAGE
        self.size = self.npages * PAGE
        if kind == "anon":
            self.mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                prot=prot)
        else:
            if kind == "memfd":
                self.fd = os.memfd_create(f"pinlab-{tag}", MFD_CLOEXEC | MFD_ALLOW_SEALING)
            elif kind == "hugetlb":
                self.fd = os.memfd_create(f"pinlab-{tag}", MFD_CLOEXEC | MFD_HUGETLB)
            else:
                d = (mount_tmpfs(stack) if kind == "tmpfs" else
                     pinlab_dax.mount_dax(kind, stack, rep) if kind in DAX_BACKINGS else
                     mount_scratch("ext4" if kind == "private-file" else kind, stack, rep))
                self.path = f"{d}/{tag}.dat"
                self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
                stack.callback(self._unlink)
            stack.callback(self._close_fd)
            os.ftruncate(self.fd, self.size)
            flags = mmap.MAP_SHARED if self.shared else mmap.MAP_PRIVATE
            self.mm = mmap.mmap(self.fd, self.size, flags=flags, prot=prot)
        stack.callback(self.unmap)
        if kind != "hugetlb":
            with contextlib.suppress(OSError):
                self.mm.madvise(MADV_NOHUGEPAGE)
        self.addr = pinlab_ioctl.buffer_address(self.mm)
        step = HPAGE if kind == "hugetlb" else PAGE
        for off in range(0, self.size, step):   # fault every page in, writable
            self.mm[off:off + 1] = b"\0"

    def _close_fd(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _unlink(self):
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def unmap(self):
        if self.mm is not None and not self.mm.closed:
            self.mm.close()

    def pfns(self):
        return pagemap(self.addr, self.npages)

    def read_file(self, direct=False):
        """The file's current contents: through the page cache, or O_DIRECT (disk)."""
        if direct:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            try:
                size = os.fstat(fd).st_size
                buf = mmap.mmap(-1, max(size, PAGE))   # page aligned for O_DIRECT
                n = os.preadv(fd, [buf], 0)
                data = bytes(buf[:n])
                buf.close()
                return data
            finally:
                os.close(fd)
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0)


def control_word(i):
    """The 64-bit word that fills control page ``i`` (never a device pattern, never 0)."""
    return 0xC0_7701_0000_0000 | i


class Control:
    """CONTROL_PAGES unregistered pages at the end of a mapping, filled with
    control_word(i) so they are not zero-filled (swap stores those without I/O on 6.12+)
    and their contents can be checked after swap-in."""

    def __init__(self, m, first):
        self.m, self.first = m, first
        mv = memoryview(m.mm).cast("B")
        for i in range(CONTROL_PAGES):
            off = (first + i) * PAGE
            mv[off:off + PAGE] = struct.pack("<Q", control_word(i)) * (PAGE // 8)
        mv.release()

    def pagemap(self):
        return pagemap(self.m.addr + self.first * PAGE, CONTROL_PAGES)

    def intact(self):
        """How many control pages still hold their words (reading faults them in)."""
        mv = memoryview(self.m.mm).cast("B")
        n = sum(1 for i in range(CONTROL_PAGES)
                if bytes(mv[(self.first + i) * PAGE:(self.first + i + 1) * PAGE])
                == struct.pack("<Q", control_word(i)) * (PAGE // 8))
        mv.release()
        return n


# ------------------------------------------------------------------ the cell
class Cell:
    def __init__(self, args, stack):
        self.a = args
        self.stack = stack
        self.rep = {"mode": args.mode, "backing": args.backing, "event": args.event,
                    "kernel": os.uname().release, "steps": [], "errno": 0}
        self.dev = None
        self.rid = None
        self.registered = False
        self.gen = 0

    # -- device wrappers
    def dma(self, gen, offset=0, length=None, name=None):
        length = self.m.size - offset if length is None else length
        return timed(self.rep, name or f"dma_write_g{gen}", self.dev.dma_write, self.rid,
                     offset, length, gen)

    def scan_map(self, first=0, n=None):
        n = self.m.npages - first if n is None else n
        return scan(memoryview(self.m.mm)[first * PAGE:(first + n) * PAGE], self.rid, n,
                    first)

    def deregister(self):
        if self.registered:
            self.rep["query_final"] = timed(self.rep, "query", self.dev.query, self.rid)
            timed(self.rep, "deregister", self.dev.deregister, self.rid)
            self.registered = False
        self.rep["vmstat_released"] = vmstat()

    def file_scan(self, key, direct=False):
        """Scan the file into rep[key]. A read that fails (btrfs: an O_DIRECT read first
        writes the range back, and writeback of a folio dirtied without ->page_mkwrite
        fails with EUCLEAN where 7ca3e84980ef is in) is recorded in rep[key + "_error"]
        and leaves rep[key] unset: the classifier then lacks that view."""
        try:
            data = self.m.read_file(direct=direct)
        except OSError as exc:
            self.rep[key + "_error"] = {"errno": exc.errno, "errno_name": errname(exc.errno or 0)}
            return
        self.rep[key] = scan(data, self.rid, len(data) // PAGE)
        self.rep[key + "_bytes"] = len(data)

    # -- main flow
    def run(self):
        """The whole cell: prepare(), the event, release, the final file check."""
        if self.prepare():
            self.event()
        return self.finish()

    def prepare(self):
        """Everything before the event: environment, mapping, registration, generation 1
        written by the device. Returns False when registration was refused (rep says
        why)."""
        a, rep = self.a, self.rep
        cell_environment(a.backing, a.event, self.stack, rep)
        if a.event == "mem-offline":
            rep["movable_pages"] = wait_movable_memory(30)
        npages = 64 if a.event == "migrate" else NPAGES
        ctl = (a.backing, a.event) in SWAP_CONTROL
        self.m = Mapping(self.stack, a.backing, rep,
                         npages=npages + (CONTROL_PAGES if ctl else 0))
        self.control = None
        if ctl:   # the region is the first npages; the rest of the mapping is the control
            self.control = Control(self.m, npages)
            self.m.npages, self.m.size = npages, npages * PAGE
            rep["control_pages"] = CONTROL_PAGES
        rep["npages"] = self.m.npages
        rep["pfns_before"] = self.m.pfns()
        if a.backing in DAX_BACKINGS:
            rep["dax"] = pinlab_dax.dax_evidence(self.m.path, self.m.addr, self.m.npages)
        rep["memcg_before"] = memcg_current() if a.event == "memcg-reclaim" else None
        self.dev = pinlab_ioctl.PinlabDevice(a.device)
        a.device = self.dev.path      # None: the node find_device() chose
        self.stack.callback(self.dev.close)
        self.stack.callback(self._safe_deregister)
        rep["vmstat_before"] = vmstat()
        t0 = now_ms()
        try:
            self.rid = self.dev.register(self.m.addr, self.m.size, a.mode)
        except OSError as exc:
            rep.update(errno=exc.errno, errno_name=errname(exc.errno), step="register",
                       register_ms=round(now_ms() - t0, 1))
            return False
        self.registered = True
        rep["register_ms"] = round(now_ms() - t0, 1)
        rep["region"] = self.rid
        rep["pfns_registered"] = self.m.pfns()
        rep["vmstat_registered"] = vmstat()
        rep["query_registered"] = self.dev.query(self.rid)
        self.dma(1)
        rep["map_g1"] = self.scan_map()
        return True

    def event(self):
        """The cell's event (ev_<event>), on a prepared cell."""
        getattr(self, "ev_" + self.a.event.replace("-", "_"))()

    def finish(self):
        """Release the region, check the file; returns the report."""
        if not self.registered and self.rid is None:
            return self.rep
        self.deregister()
        self.rep["pfns_after"] = self.m.pfns() if not self.m.mm.closed else None
        self.final_file_check()
        return self.rep

    def _safe_deregister(self):
        if self.registered:
            with contextlib.suppress(OSError):
                self.dev.deregister(self.rid)
            self.registered = False

    def final_file_check(self):
        """After release: what the file holds (disk files: unmap, sync, drop_caches)."""
        if self.m.kind in ("anon", "private-file") or self.m.fd is None:
            return
        if self.m.kind in ("ext4", "xfs", "btrfs", *DAX_BACKINGS):
            self.m.unmap()
            timed(self.rep, "fsync_final", os.fsync, self.m.fd)
            drop_caches()
        self.file_scan("file_after")

    # -- events
    def ev_dma_write(self):
        pass

    def ev_truncate(self):
        m, rep = self.m, self.rep
        half = m.size // 2
        rep["kept_pages"] = half // PAGE
        if not self._layout_step("ftruncate_shrink", os.ftruncate, m.fd, half):
            return
        self.dma(2)
        rep["map_kept_g2"] = self.scan_map(0, half // PAGE)
        rep["pfns_after_event"] = m.pfns()[: half // PAGE]
        timed(rep, "ftruncate_extend", os.ftruncate, m.fd, m.size)
        rep["map_after_extend"] = self.scan_map()

    def ev_truncate_never_unpin(self):
        """fsdax: truncate while the device never stops and the driver never unpins
        (pinlab_dax.watch_never_released); odp is revoked and goes on as ev_truncate."""
        self.ev_truncate()

    def _punch(self, off, length):
        return self._layout_step("punch_hole", punch_hole, self.m.fd, off, length)

    def _layout_step(self, name, fn, *args):
        """A truncate or hole punch. On DAX (pinlab_dax.py) it may wait for the driver's
        pins (the filesystem breaks its layouts first): a helper deregisters after
        pinlab_dax.HOLD_S, or, in a truncate-never-unpin cell, never (the step runs in a
        child that is watched, then killed). Returns False when the event cannot go on
        (the region is gone, or the step never returned)."""
        if self.m.kind not in DAX_BACKINGS:
            timed(self.rep, name, fn, *args)
            return True
        if self.a.event == "truncate-never-unpin":
            pinlab_dax.watch_never_released(self.rep, name, fn, args)
            return "returned_ms" in self.rep["blocked"]
        pinlab_dax.release_after(self.rep, name, fn, args, self._helper_release)
        return self.registered

    def _helper_release(self):
        """The helper thread's deregistration (pinlab_dax.release_after)."""
        self.rep["query_final"] = self.dev.query(self.rid)
        self.dev.deregister(self.rid)
        self.registered = False

    def ev_punch_hole(self):
        m, rep = self.m, self.rep
        unit = HPAGE if m.kind == "hugetlb" else 4 * PAGE
        first, count = unit // PAGE, unit // PAGE
        rep["hole_pages"] = [first, count]
        if not self._punch(unit, unit):
            return
        rep["map_after_punch"] = self.scan_map()
        self.dma(2)
        rep["map_g2"] = self.scan_map()

    def ev_punch_hole_partial(self):
        rep = self.rep
        page = 9
        rep["hole_bytes"] = [page * PAGE + 1024, 2048]
        if not self._punch(page * PAGE + 1024, 2048):
            return
        rep["map_after_punch"] = self.scan_map()
        self.dma(2)
        rep["map_g2"] = self.scan_map()

    def _after_reclaim(self):
        rep = self.rep
        rep["pagemap_after_event"] = self.m.pfns()
        if self.control is not None:
            rep["control_pagemap_after_event"] = self.control.pagemap()
        self.dma(2)
        rep["map_g2"] = self.scan_map()
        rep["pfns_after_touch"] = self.m.pfns()
        if self.control is not None:
            rep["control_intact"] = self.control.intact()

    def ev_pageout(self):
        v0 = vmstat()
        timed(self.rep, "madv_pageout", self.m.mm.madvise, MADV_PAGEOUT)
        self.rep["vmstat_event"] = delta(v0, vmstat())
        self._after_reclaim()

    def ev_memcg_reclaim(self):
        rep = self.rep
        rep["memcg_registered"] = memcg_current()
        v0 = vmstat()
        timed(rep, "memory_reclaim", write_file, f"{CGCELL}/memory.reclaim", "64M")
        rep["vmstat_event"] = delta(v0, vmstat())
        rep["memcg_after_reclaim"] = memcg_current()
        self._after_reclaim()

    def ev_drop_caches(self):
        # no sync first: writeback would itself be an event (PROTECTION_PAGE for odp)
        timed(self.rep, "drop_caches", drop_caches, False)
        self._after_reclaim()

    def ev_writeback(self):
        m, rep, dev = self.m, self.rep, self.dev
        timed(rep, "fsync_1", os.fsync, m.fd)
        timed(rep, "stream_start", dev.stream_start, self.rid, 0, m.size, 100, PAGE, 200)
        for i in range(3):
            time.sleep(0.2)
            timed(rep, f"fsync_stream_{i}", os.fsync, m.fd)
        rep["stream_chunks"] = timed(rep, "stream_stop", dev.stream_stop, self.rid)
        self.dma(2)
        rep["map_g2"] = self.scan_map()
        timed(rep, "fsync_registered", os.fsync, m.fd)
        self.file_scan("disk_registered", direct=True)
        self.deregister()
        timed(rep, "fsync_released", os.fsync, m.fd)
        self.file_scan("disk_released", direct=True)

    def ev_2018(self):
        m, rep = self.m, self.rep
        timed(rep, "fsync", os.fsync, m.fd)
        timed(rep, "madv_pageout", m.mm.madvise, MADV_PAGEOUT)
        rep["pagemap_after_event"] = m.pfns()
        self.dma(2)
        rep["dirty_pages"] = timed(rep, "dirty", self.dev.dirty, self.rid)
        self.deregister()
        timed(rep, "sync", os.sync)

    def ev_migrate(self):
        rep = self.rep
        ctl = Mapping(self.stack, self.m.kind, rep, tag="control", npages=self.m.npages)
        rep["control_pfns_before"] = ctl.pfns()
        pb = self.m.pfns()
        v0 = vmstat()
        timed(rep, "compact_memory", write_file, "/proc/sys/vm/compact_memory", "1")
        # compaction only reaches pages below where its scanners meet; soft offline
        # (migrate_pages(MR_MEMORY_FAILURE)) migrates exactly the pages it is given, so
        # the first pages of both mappings get a deterministic migration attempt
        for tag, mp in (("control", ctl), ("registered", self.m)):
            for i in range(SOFT_OFFLINE_PAGES):
                timed(rep, f"soft_offline_{tag}_{i}", madvise, mp.addr + i * PAGE, PAGE,
                      MADV_SOFT_OFFLINE)
        rep["vmstat_event"] = delta(v0, vmstat())
        pa = self.m.pfns()
        ca = ctl.pfns()
        rep["pfns_after_event"] = pa
        rep["control_pfns_after"] = ca
        rep["pinned_moved"] = sum(1 for x, y in zip(pb, pa, strict=True) if x != y)
        rep["control_moved"] = sum(1 for x, y in zip(rep["control_pfns_before"], ca,
                                                     strict=True) if x != y)
        self.dma(2)
        rep["map_g2"] = self.scan_map()

    def _fork(self, dontfork):
        m, rep = self.m, self.rep
        if dontfork:
            timed(rep, "madv_dontfork", m.mm.madvise, MADV_DONTFORK)
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:   # child: wait, look at its own view of the range, report, exit
            code = 0
            try:
                os.close(go_w)
                os.close(res_r)
                os.read(go_r, 1)
                if dontfork:
                    out = {"mapped": False, "pagemap": pagemap(m.addr, m.npages)}
                else:
                    out = {"mapped": True, "map": self.scan_map(),
                           "pfns": pagemap(m.addr, m.npages)}
                os.write(res_w, json.dumps(out).encode())
            except BaseException as exc:  # noqa: BLE001 - the child must never return
                with contextlib.suppress(Exception):
                    os.write(res_w, json.dumps({"error": repr(exc)}).encode())
                code = 1
            finally:
                os._exit(code)
        os.close(go_r)
        os.close(res_w)
        rep["child_pid"] = pid
        # the parent writes to its mapping (the same words: the pattern stays valid);
        # this is the write that COW-breaks a page shared with the child
        mv = memoryview(m.mm).cast("B")
        for i in range(m.npages):
            mv[i * PAGE:i * PAGE + 8] = bytes(mv[i * PAGE:i * PAGE + 8])
        mv.release()
        rep["pfns_parent_after_write"] = m.pfns()
        self.dma(2)
        rep["map_parent_g2"] = self.scan_map()
        os.write(go_w, b"x")
        os.close(go_w)
        chunks = []
        while True:
            b = os.read(res_r, 65536)
            if not b:
                break
            chunks.append(b)
        os.close(res_r)
        _, status = os.waitpid(pid, 0)
        rep["child_status"] = status
        try:
            rep["child"] = json.loads(b"".join(chunks) or b"{}")
        except ValueError:
            rep["child"] = {"error": "bad child report"}

    def ev_fork(self):
        self._fork(False)

    def ev_fork_dontfork(self):
        self._fork(True)

    def _remap(self):
        """A fresh mapping of the same file (after munmap)."""
        m = self.m
        flags = mmap.MAP_SHARED if m.shared else mmap.MAP_PRIVATE
        mm = mmap.mmap(m.fd, m.size, flags=flags, prot=mmap.PROT_READ)
        self.stack.callback(mm.close)
        return mm

    def ev_munmap(self):
        m, rep = self.m, self.rep
        timed(rep, "munmap", m.unmap)
        self.dma(2)
        if m.fd is not None:
            mm = self._remap()
            rep["remap_g2"] = scan(mm, self.rid, m.npages)
            mm.close()

    def ev_dontneed(self):
        rep = self.rep
        timed(rep, "madv_dontneed", self.m.mm.madvise, MADV_DONTNEED)
        rep["pagemap_after_event"] = self.m.pfns()
        self.dma(2)
        rep["map_g2"] = self.scan_map()
        rep["pfns_after_touch"] = self.m.pfns()

    def ev_seal_write(self):
        m, rep = self.m, self.rep
        # a writable shared mapping alone makes F_SEAL_WRITE fail (mapping_deny_writable);
        # unmap first so only the driver's page references can make it fail
        timed(rep, "munmap", m.unmap)
        timed(rep, "seal_write", fcntl.fcntl, m.fd, F_ADD_SEALS, F_SEAL_WRITE)
        rep["seals"] = fcntl.fcntl(m.fd, F_GET_SEALS)
        self.dma(2)
        self.file_scan("file_g2")

    def ev_odirect_write(self):
        """An O_DIRECT write over part of the registered, cached, mapped range: the kernel
        writes back and invalidates the page cache there (invalidate_inode_pages2), pin or
        no pin (docs/pinning-semantics.md row 13). Then the device writes generation 2 over
        everything."""
        m, rep = self.m, self.rep
        first, count = 4, 4
        rep["odirect_pages"] = [first, count]
        buf = mmap.mmap(-1, count * PAGE)          # page aligned, zero filled
        fd = os.open(m.path, os.O_WRONLY | os.O_DIRECT)
        try:
            timed(rep, "odirect_write", os.pwritev, fd, [buf], first * PAGE)
        finally:
            os.close(fd)
            buf.close()
        rep["pagemap_after_event"] = m.pfns()
        rep["map_after_odirect"] = self.scan_map()
        self.dma(2)
        rep["map_g2"] = self.scan_map()
        rep["pfns_after_touch"] = m.pfns()

    def ev_mem_offline(self):
        """Offline the ZONE_MOVABLE memory blocks (of a DIMM the host hot-added) that held
        the mapping's pages when they were first touched
        (docs/pinning-semantics.md rows 26-28)."""
        m, rep = self.m, self.rep
        bs = int(read_file(f"{MEMDIR}/block_size_bytes").strip(), 16)
        blocks = sorted({p * PAGE // bs for p in rep["pfns_before"] if isinstance(p, int)})
        zones = {b: read_file(f"{MEMDIR}/memory{b}/valid_zones").strip() for b in blocks}
        rep["blocks"] = zones
        movable = [b for b in blocks if zones[b].startswith("Movable")]
        rep["offline"] = [offline_block(b, 3) for b in movable]
        rep["pfns_after_event"] = m.pfns()
        self.dma(2)
        rep["map_g2"] = self.scan_map()
        rep["pfns_after_touch"] = m.pfns()

    def ev_exit(self):
        self._victim(oom=False)

    def ev_oom(self):
        self._victim(oom=True)

    def _victim(self, oom):
        """A second process registers a region of the same backing, has the device stream
        into it, and dies without deregistering: SIGKILL (exit) or the memcg OOM killer
        (oom, whose reaper invalidates without blocking). The driver's teardown is what is
        observed (docs/pinning-semantics.md rows 37-38); this cell's own
        region is the control."""
        rep = self.rep
        info_r, info_w = os.pipe()
        go_r, go_w = os.pipe()
        cg = None
        if oom:
            cg = oom_cgroup(self.stack, rep)
        rep["vmstat_before_victim"] = vmstat()
        pid = os.fork()
        if pid == 0:
            os.close(info_r)
            os.close(go_w)
            _victim_child(self.a, self.m.kind, cg, info_w, go_r)   # never returns
        os.close(info_w)
        os.close(go_r)
        rep["victim_pid"] = pid
        try:
            info = _read_line(info_r, 30)
            rep["victim"] = info
            rep["vmstat_victim_registered"] = vmstat()
            rep["nonblock_refused_before"] = driver_stat("invalidations_nonblock_refused")
            t0 = now_ms()
            os.write(go_w, b"x")
            status = _wait_child(pid, 60)
            rep["victim_exit_ms"] = round(now_ms() - t0, 1)
        finally:
            os.close(go_w)
            os.close(info_r)
        if status is None:
            rep["victim_status"] = "did not die within 60 s"
            return
        rep["victim_status"] = status
        rep["victim_signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        time.sleep(0.2)        # the file's release() and the device's destroy are done
        rep["vmstat_victim_gone"] = vmstat()
        rep["nonblock_refused_after"] = driver_stat("invalidations_nonblock_refused")
        if cg:
            rep["oom_events"] = memcg_events(cg)
        self.dma(2)
        rep["map_g2"] = self.scan_map()

    def ev_no_ack(self):
        """odp: the host made the device never acknowledge INVALIDATE; revoke by DONTNEED."""
        rep = self.rep
        timed(rep, "madv_dontneed", self.m.mm.madvise, MADV_DONTNEED)
        rep["query_after_event"] = timed(rep, "query_event", self.dev.query, self.rid)
        self.dma(2)
        rep["map_g2"] = self.scan_map()

    def ev_pci_remove(self):
        self.ev_hot_unplug()

    def ev_hot_unplug(self):
        """Stream, tell the host (READY_FILE), wait until the device is gone."""
        rep, dev = self.rep, self.dev
        timed(rep, "stream_start", dev.stream_start, self.rid, 0, self.m.size, 100, PAGE, 1000)
        write_file(READY_FILE, str(os.getpid()))
        self.stack.callback(lambda: os.path.exists(READY_FILE) and os.unlink(READY_FILE))
        t0 = now_ms()
        gone = None
        while now_ms() - t0 < 60000:
            try:
                q = dev.query(self.rid)
                if q["state"] != pinlab_ioctl.STATE_ACTIVE:
                    gone = {"how": "state", "query": q}
                    break
            except OSError as exc:
                gone = {"how": "errno", "errno": exc.errno, "errno_name": errname(exc.errno)}
                break
            time.sleep(0.05)
        rep["gone"] = gone
        rep["gone_after_ms"] = round(now_ms() - t0, 1)
        rep["dev_node_exists"] = os.path.exists(self.a.device)
        self.dma(2)
        timed(rep, "stream_stop", dev.stream_stop, self.rid)
        rep["map_after"] = self.scan_map()


def ready_cell(mode, backing, event, device=None):
    """A matrix cell stopped just before its event, for a human: the cell's environment
    set up, its mapping made (``c.m.mm``, ``c.m.addr``, ``c.m.path``), registered
    (``c.dev``, ``c.rid``) and written once by the device. ``c.event()`` runs the event,
    ``c.finish()`` returns the report, ``c.close()`` undoes everything. ``python3 -i
    pinlab_cell.py ready MODE BACKING EVENT`` opens a Python prompt with ``c`` set.
    When the driver refuses the registration (what some cells observe, e.g. EFAULT for
    longterm on ext4), ``c.registered`` is False and ``c.rep`` has errno/errno_name; the
    mapping is still there. Raises what the environment setup raises (pinlab_env)."""
    import argparse

    stack = contextlib.ExitStack()
    c = Cell(argparse.Namespace(mode=mode, backing=backing, event=event, device=device),
             stack)
    c.close = stack.close
    try:
        c.prepare()
    except BaseException:
        stack.close()
        raise
    return c


def cmd_cell(args):
    with contextlib.ExitStack() as stack:
        c = Cell(args, stack)
        t0 = now_ms()
        try:
            rep = c.run()
        except Exception as exc:  # noqa: BLE001 - report, the host reads the JSON
            c.rep["error"] = f"{type(exc).__name__}: {exc}"
            rep = c.rep
        rep["cell_ms"] = round(now_ms() - t0, 1)
    rep["vmstat_end"] = vmstat()
    rep["swaps"] = read_file("/proc/swaps").count("\n") - 1
    rep["leftover_mounts"] = [ln.split()[1] for ln in read_file("/proc/mounts").splitlines()
                              if "/mnt/pinlab-" in ln.split()[1]]
    return rep


EVENTS = ["dma-write", "truncate", "punch-hole", "punch-hole-partial", "pageout",
          "memcg-reclaim", "drop-caches", "writeback", "2018", "migrate", "fork",
          "fork-dontfork", "munmap", "dontneed", "seal-write", "hot-unplug", "pci-remove",
          "no-ack", "odirect-write", "exit", "oom", "mem-offline", "truncate-never-unpin"]
BACKINGS = ["anon", "memfd", "tmpfs", "ext4", "xfs", "btrfs", "private-file", "hugetlb",
            *DAX_BACKINGS]


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["ready"] or len(sys.argv) != 5:
        sys.exit("usage: python3 -i pinlab_cell.py ready MODE BACKING EVENT")
    c = ready_cell(*sys.argv[2:5])
    where = (f"region {c.rid}, generation 1 written" if c.registered else
             f"registration refused: {c.rep['errno_name']} (as in the cell)")
    print(f"cell {'/'.join(sys.argv[2:5])} ready before its event: mapping c.m at "
          f"{c.m.addr:#x} ({c.m.npages} pages, {c.m.path or c.m.kind}), {where}.\n"
          "  c.event() runs the event; c.finish() releases and returns the report; c.rep "
          "is the report so far; c.dev is the open /dev/pinlab0")
