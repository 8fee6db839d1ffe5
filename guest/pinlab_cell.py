"""One matrix cell, run step by step in the guest: `python3 -m pinlab.guest.workload cell
--mode M --backing B --event E`.  Standard library only (Python 3.13 in the guest).

This module is the cell's frame and toolkit (environment, mapping, registration,
generation 1, release, the final file check; DMA, scans, steps); the event's own steps
are ``guest/events/ev_<event>.py`` (``Cell.event`` runs them).

The report is raw observations, never a verdict: registration errno, the state of every
page seen through the mapping / the file / the disk (which device generation is there),
PFNs from /proc/self/pagemap, /proc/vmstat deltas, memcg charge, timings and the driver's
QUERY output.  The host (orchestrator/classify.py and the event's classifier,
orchestrator/events/ev_<event>.py) turns it into an outcome class.

Every cell cleans up after itself (munmap, close, remove files, unmount, swapoff, leave
the cgroup, restore nr_hugepages) so the next cell starts from the same guest state.
The environment (scratch filesystems, swap, cgroups, huge pages) comes from pinlab_env and
the /proc readers from pinlab_mm: the guest API that ``pinlab run`` scripts use too.
``ready_cell()`` stops a cell before its event, for a human (``pinlab up --cell``).

Page states (see scan()): "g<N>" the whole page holds generation N of this region's
pattern, "cpu" the process's own write of the ``cpu-write-after`` step (cpu_word), "zero",
"partial-g<N>" (starts with gen N but differs later), "other".
Scans are run-length encoded: [[state, first_page, count], ...].
"""
import contextlib
import errno
import mmap
import os
import select
import signal
import struct
import subprocess
import time

from pinlab.common import jsonlines
from pinlab.common.vocab import (
    CPU_WRITE_OPTION,
    DAX_BACKINGS,
    DISK_BACKINGS,
    NOTIFY_FD_ENV,
    READY_FILE,
    SCRATCH_MOUNT,
    THP_BACKINGS,
    Key,
    split_options,
)
from pinlab.guest import events, pinlab_dax, pinlab_ioctl, pinlab_thp
from pinlab.guest.pinlab_env import CGCELL, cell_environment, mount_scratch, mount_tmpfs, oom_cgroup
from pinlab.guest.pinlab_mm import (
    HPAGE,
    MADV_DONTFORK,
    MADV_HUGEPAGE,
    MADV_NOHUGEPAGE,
    MFD_ALLOW_SEALING,
    MFD_CLOEXEC,
    MFD_HUGETLB,
    PAGE,
    AlignedMapping,
    drop_caches,
    pagemap,
    punch_hole,
    read_file,
    vmstat,
    write_file,
)

NPAGES = 16                 # 64 KiB: enough for truncate halves, holes, partial pages
CONTROL_PAGES = 4           # unregistered pages after the region (swap reclaim cells)
SOFT_OFFLINE_PAGES = 4


# ------------------------------------------------------------------ small helpers
def errname(e):
    return errno.errorcode.get(e, str(e))


def now_ms():
    return time.monotonic() * 1000.0


def mview(mm):
    """A memoryview of bytes over a mapping: an mmap.mmap or a pinlab_mm.AlignedMapping."""
    return mm.view() if isinstance(mm, AlignedMapping) else memoryview(mm).cast("B")


def rle(states):
    out = []
    for i, st in enumerate(states):
        if out and out[-1][0] == st:
            out[-1][2] += 1
        else:
            out.append([st, i, 1])
    return out


CPU_TAG = 0xC9C9          # the top 16 bits of cpu_word(): never a region id the driver gives


def cpu_word(i):
    """The 64-bit word that fills page ``i`` of the region after the ``cpu-write-after``
    step (Cell.cpu_write_after): a CPU pattern no device generation and no control page
    has."""
    return (CPU_TAG << 48) | (0xC0DE << 32) | i


def page_state(mv, region, off):
    """State of the page at byte `off` of the region, whose bytes are mv[0:PAGE]."""
    (w,) = struct.unpack_from("<Q", mv, 0)
    if w == cpu_word(off // PAGE) and bytes(mv) == struct.pack("<Q", w) * (PAGE // 8):
        return "cpu"
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
    st = {Key.STEP: name}
    try:
        val = fn(*a)
        st[Key.ERRNO] = 0
        if isinstance(val, (int, str)) and not isinstance(val, bool):
            st[Key.VALUE] = val
    except OSError as exc:
        val = None
        st[Key.ERRNO] = exc.errno
        st[Key.ERRNO_NAME] = errname(exc.errno or 0)
        st[Key.MSG] = str(exc)
        st[Key.STATUS] = getattr(exc, "status", None)
        res = getattr(exc, "result", None)
        if res is not None and hasattr(res, "bytes"):
            st[Key.BYTES] = res.bytes
    st[Key.MS] = round(now_ms() - t0, 1)
    rep[Key.STEPS].append(st)
    return val


def last_step(rep, name):
    for st in reversed(rep[Key.STEPS]):
        if st[Key.STEP] == name:
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
    """The victim's one JSON line on ``fd``, within ``timeout`` s. Raises RuntimeError."""
    lines = jsonlines.Splitter(1 << 20)

    def recv(left):
        if not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        return os.read(fd, 4096)

    try:
        line = jsonlines.wait_line(lines, recv, time.monotonic() + timeout)
    except (EOFError, jsonlines.Truncated) as exc:
        raise RuntimeError(f"the victim process exited early: {exc}") from exc
    if line is None:
        raise RuntimeError("the victim process did not report")
    return jsonlines.decode(line)


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
            vrep = {Key.STEPS: []}
            m = Mapping(st, kind, vrep, tag="victim")
            dev = pinlab_ioctl.PinlabDevice(args.device)
            rid = dev.register(m.addr, m.size, args.mode)
            dev.dma_write(rid, 0, m.size, 1)
            dev.stream_start(rid, 0, m.size, 1, PAGE, 500)
            os.write(info_w, jsonlines.encode({Key.REGION: rid, Key.NPAGES: m.npages,
                                               Key.PFNS: m.pfns()}))
            os.read(go_r, 1)
            if cg:
                hog = []
                while True:           # until the OOM killer ends it
                    hog.append(b"\1" * (1 << 20))
            os.kill(os.getpid(), signal.SIGKILL)
    except BaseException as exc:  # noqa: BLE001 - the child must never return
        with contextlib.suppress(Exception):
            os.write(info_w, jsonlines.encode({Key.ERROR: repr(exc)}))
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
    return {Key.BLOCK: block, Key.RESULT: result, Key.MS: round(now_ms() - t0, 1),
            Key.STATE: read_file(f"{MEMDIR}/memory{block}/state").strip()}


def memcg_current():
    with contextlib.suppress(OSError):
        return int(read_file(f"{CGCELL}/memory.current"))
    return None


class Mapping:
    """One user mapping of a backing. `fd`/`path` are None for anonymous memory.

    Every page is faulted in writable, holding zeros, unless ``fill`` is given (a function
    of the mapping's size in bytes returning at most that many bytes): then the mapping
    starts with those bytes. A MAP_PRIVATE
    file gets them in the file (pwrite) and is faulted in by reads only, so its PTEs map
    the page cache's pages and no private copy exists yet (what a read-only pin of a COW
    mapping meets); every other backing gets them written through the mapping.

    The THP backings (vocab.THP_BACKINGS) are mapped at an address aligned to their folio
    (pinlab_mm.AlignedMapping; a memfd from file offset 0) with MADV_HUGEPAGE before the
    first fault, so the first fault of each folio-sized range allocates one large folio
    (pinlab_thp); with ``small`` they are faulted and kept under MADV_NOHUGEPAGE (4 KiB
    pages, which khugepaged leaves alone until the event itself asks for MADV_HUGEPAGE and
    MADV_COLLAPSE). Every other backing is mapped with MADV_NOHUGEPAGE."""

    def __init__(self, stack, kind, rep, tag="cell", npages=NPAGES, fill=None, small=False):
        self.kind = kind
        self.fd = None
        self.path = None
        self.npages = npages
        self.shared = kind not in ("anon", "private-file", "anon-thp", "anon-mthp")
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if kind == "hugetlb":
            # two huge pages; pinlab_env.cell_environment() reserved them and one spare
            # (after truncate/punch the orphaned huge page stays allocated, and re-faulting
            # the range must not SIGBUS for want of a free huge page)
            self.npages = 2 * HPAGE // PAGE
        self.size = self.npages * PAGE
        fill = fill(self.size) if fill is not None else None
        if kind == "anon":
            self.mm = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                prot=prot)
        elif kind in ("anon-thp", "anon-mthp"):
            self.mm = AlignedMapping(self.size, pinlab_thp.FOLIO_PAGES[kind] * PAGE)
        else:
            if kind in ("memfd", "memfd-thp"):
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
            if fill is not None and kind == "private-file":
                os.pwrite(self.fd, fill, 0)
                os.fsync(self.fd)
            flags = mmap.MAP_SHARED if self.shared else mmap.MAP_PRIVATE
            if kind == "memfd-thp":
                self.mm = AlignedMapping(self.size, HPAGE, fd=self.fd)
            else:
                self.mm = mmap.mmap(self.fd, self.size, flags=flags, prot=prot)
        stack.callback(self.unmap)
        if kind in THP_BACKINGS:   # MADV_HUGEPAGE must work: the cell is about THP
            self.mm.madvise(MADV_NOHUGEPAGE if small else MADV_HUGEPAGE)
        elif kind != "hugetlb":
            with contextlib.suppress(OSError):
                self.mm.madvise(MADV_NOHUGEPAGE)
        self.addr = (self.mm.addr if isinstance(self.mm, AlignedMapping)
                     else pinlab_ioctl.buffer_address(self.mm))
        step = HPAGE if kind == "hugetlb" else PAGE
        if fill is not None and kind == "private-file":
            for off in range(0, self.size, step):   # read faults only: no COW copy
                _ = self.mm[off]
            return
        for off in range(0, self.size, step):   # fault every page in, writable
            self.mm[off:off + 1] = b"\0"
        if fill is not None:
            self.mm[:len(fill)] = fill

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
        mv = mview(m.mm)
        for i in range(CONTROL_PAGES):
            off = (first + i) * PAGE
            mv[off:off + PAGE] = struct.pack("<Q", control_word(i)) * (PAGE // 8)
        mv.release()

    def pagemap(self):
        return pagemap(self.m.addr + self.first * PAGE, CONTROL_PAGES)

    def intact(self):
        """How many control pages still hold their words (reading faults them in)."""
        mv = mview(self.m.mm)
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
        self.rep = {Key.MODE: args.mode, Key.BACKING: args.backing, Key.EVENT: args.event,
                    Key.KERNEL: os.uname().release, Key.STEPS: [], Key.ERRNO: 0}
        self.dev = None
        self.rid = None
        self.registered = False
        self.gen = 0
        self.cpu_write_pending = False

    # -- device wrappers
    def dma(self, gen, offset=0, length=None, name=None):
        """The device writes generation ``gen`` into [offset, offset+length) bytes of the
        region (step ``dma_write_g<gen>``). With the cell option ``cpu-write-after`` the
        first generation-2 write is preceded by the process's CPU write
        (:meth:`cpu_write_after`): every event issues generation 2 after its own steps, so
        this is "after the event" wherever the event writes it."""
        if gen == 2 and self.cpu_write_pending:
            self.cpu_write_pending = False
            self.cpu_write_after()
        length = self.m.size - offset if length is None else length
        return timed(self.rep, name or f"dma_write_g{gen}", self.dev.dma_write, self.rid,
                     offset, length, gen)

    def cpu_write_after(self):
        """The ``cpu-write-after`` step: the process writes cpu_word(i) over every word of
        every registered page i through its mapping (step ``cpu_write_after``), the write
        fault that may copy a page (COW) away from the driver's pin. Records the PFNs just
        before and after the write and a scan of the mapping after it (``Key.MAP_CPU``:
        "cpu" on every page when the write landed)."""
        m, rep = self.m, self.rep
        rep[Key.PFNS_BEFORE_CPU_WRITE] = m.pfns()

        def write():
            mv = memoryview(m.mm).cast("B")
            try:
                for i in range(m.npages):
                    mv[i * PAGE:(i + 1) * PAGE] = struct.pack("<Q", cpu_word(i)) * (PAGE // 8)
            finally:
                mv.release()

        timed(rep, "cpu_write_after", write)
        rep[Key.PFNS_AFTER_CPU_WRITE] = m.pfns()
        rep[Key.MAP_CPU] = self.scan_map()

    def scan_map(self, first=0, n=None):
        n = self.m.npages - first if n is None else n
        return scan(mview(self.m.mm)[first * PAGE:(first + n) * PAGE], self.rid, n,
                    first)

    def deregister(self):
        if self.registered:
            self.rep[Key.QUERY_FINAL] = timed(self.rep, "query", self.dev.query, self.rid)
            timed(self.rep, "deregister", self.dev.deregister, self.rid)
            self.registered = False
        self.rep[Key.VMSTAT_RELEASED] = vmstat()

    def file_scan(self, key, direct=False):
        """Scan the file into rep[key]. A read that fails (btrfs: an O_DIRECT read first
        writes the range back, and writeback of a folio dirtied without ->page_mkwrite
        fails with EUCLEAN where 7ca3e84980ef is in) is recorded in rep[key + "_error"]
        and leaves rep[key] unset: the classifier then lacks that view."""
        try:
            data = self.m.read_file(direct=direct)
        except OSError as exc:
            self.rep[key + Key.ERROR_SUFFIX] = {Key.ERRNO: exc.errno,
                                               Key.ERRNO_NAME: errname(exc.errno or 0)}
            return
        self.rep[key] = scan(data, self.rid, len(data) // PAGE)
        self.rep[key + Key.BYTES_SUFFIX] = len(data)

    # -- main flow
    def run(self):
        """The whole cell: prepare(), the event, release, the final file check."""
        if self.prepare():
            self.event()
        return self.finish()

    def prepare(self):
        """Everything before the event: environment, mapping, registration, generation 1
        written by the device (not for a read-only registration; no registration at all
        for an event with ``REGISTERS_ITSELF``). Returns False when registration was
        refused (rep says why)."""
        a, rep = self.a, self.rep
        ev = events.event(a.event)
        cell_environment(a.backing, a.event, self.stack, rep)
        if hasattr(ev, "before_mapping"):
            ev.before_mapping(self)
        npages = pinlab_thp.FOLIO_PAGES.get(a.backing) or getattr(ev, "NPAGES", NPAGES)
        ctl = a.backing in getattr(ev, "SWAP_CONTROL", ())
        # registration options: the event's (READONLY), the cell's (--options) or the
        # caller's (ready_cell)
        opts = split_options(getattr(a, "options", "") or "")
        self.readonly = bool(getattr(ev, "READONLY", False) or "readonly" in opts
                             or getattr(a, "readonly", False))
        self.fast = bool("fast" in opts or getattr(a, "fast", False))
        self.cpu_write_pending = bool(CPU_WRITE_OPTION in opts
                                      or getattr(a, "cpu_write_after", False))
        fill = getattr(ev, "fill", None)
        # the read-only flow (pinlab_readonly.py) of an event that has one (an event
        # without it registered read-only by hand runs its own steps)
        self.readonly_flow = (self.readonly and not getattr(ev, "READONLY", False)
                              and hasattr(ev, "run_readonly"))
        if self.readonly_flow:
            from pinlab.guest import pinlab_readonly
            fill = fill or pinlab_readonly.fill
        self.m = Mapping(self.stack, a.backing, rep,
                         npages=npages + (CONTROL_PAGES if ctl else 0), fill=fill,
                         small=bool(getattr(ev, "SMALL_FOLIOS", False)))
        self.control = None
        if ctl:   # the region is the first npages; the rest of the mapping is the control
            self.control = Control(self.m, npages)
            self.m.npages, self.m.size = npages, npages * PAGE
            rep[Key.CONTROL_PAGES] = CONTROL_PAGES
        rep[Key.NPAGES] = self.m.npages
        rep[Key.PFNS_BEFORE] = self.m.pfns()
        if a.backing in DAX_BACKINGS:
            rep[Key.DAX] = pinlab_dax.dax_evidence(self.m.path, self.m.addr, self.m.npages)
        rep[Key.MEMCG_BEFORE] = memcg_current() if getattr(ev, "MEMCG", False) else None
        self.dev = pinlab_ioctl.PinlabDevice(a.device)
        a.device = self.dev.path      # None: the node find_device() chose
        self.stack.callback(self.dev.close)
        self.stack.callback(self._safe_deregister)
        rep[Key.VMSTAT_BEFORE] = vmstat()
        rep[Key.REGISTER_OPTIONS] = {Key.READONLY: self.readonly, Key.FAST: self.fast}
        if getattr(ev, "REGISTERS_ITSELF", False):   # e.g. a child after fork registers
            return True
        t0 = now_ms()
        try:
            self.rid = self.dev.register(self.m.addr, self.m.size, a.mode,
                                         readonly=self.readonly, fast=self.fast)
        except OSError as exc:
            rep.update({Key.ERRNO: exc.errno, Key.ERRNO_NAME: errname(exc.errno),
                        Key.STEP: "register", Key.REGISTER_MS: round(now_ms() - t0, 1)})
            return False
        self.registered = True
        rep[Key.REGISTER_MS] = round(now_ms() - t0, 1)
        rep[Key.REGION] = self.rid
        rep[Key.PFNS_REGISTERED] = self.m.pfns()
        if a.backing in THP_BACKINGS:   # the proof that the registered range is one folio
            rep[Key.THP] = pinlab_thp.evidence(a.backing, self.m.addr,
                                               rep[Key.PFNS_REGISTERED])
        rep[Key.VMSTAT_REGISTERED] = vmstat()
        rep[Key.QUERY_REGISTERED] = self.dev.query(self.rid)
        if self.readonly:     # the device may not write a read-only region (EPERM)
            return True
        self.dma(1)
        rep[Key.MAP_G1] = self.scan_map()
        return True

    def event(self):
        """The cell's event (guest/events/ev_<event>.py ``run``), on a prepared cell; with
        the option ``readonly`` the read-only flow around the event's ``run_readonly``
        (pinlab_readonly.py)."""
        ev = events.event(self.a.event)
        if getattr(self, "readonly_flow", False):
            from pinlab.guest import pinlab_readonly
            pinlab_readonly.run(self, ev)
            return
        ev.run(self)

    def finish(self):
        """Release the region, check the file; returns the report."""
        if not self.registered and self.rid is None:
            return self.rep
        self.deregister()
        self.rep[Key.PFNS_AFTER] = self.m.pfns() if not self.m.mm.closed else None
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
        if self.m.kind in (*DISK_BACKINGS, *DAX_BACKINGS):
            self.m.unmap()
            timed(self.rep, "fsync_final", os.fsync, self.m.fd)
            drop_caches()
        self.file_scan(Key.FILE_AFTER)

    # -- events
    def punch(self, off, length):
        """FALLOC_FL_PUNCH_HOLE of [off, off+length) bytes of the file, as a step
        (layout_step). Returns False when the event cannot go on."""
        return self.layout_step("punch_hole", punch_hole, self.m.fd, off, length)

    def layout_step(self, name, fn, *args, never_unpin=False):
        """A step that changes the file's layout under the registration (a truncate or a
        hole punch), recorded as step ``name``. Outside DAX it just runs (timed). On DAX
        (pinlab_dax.py) the filesystem breaks its layouts first and may wait for the
        driver's page references: a helper thread deregisters after pinlab_dax.HOLD_S
        (release_after), or, with ``never_unpin`` (event truncate-never-unpin), nobody
        releases and the step runs in a child that is watched, then killed
        (watch_never_released); rep[Key.BLOCKED] records either. Returns False when the
        event cannot go on: the region is gone, or the step never returned."""
        if self.m.kind not in DAX_BACKINGS:
            timed(self.rep, name, fn, *args)
            return True
        if never_unpin:
            pinlab_dax.watch_never_released(self.rep, name, fn, args)
            return Key.RETURNED_MS in self.rep[Key.BLOCKED]
        pinlab_dax.release_after(self.rep, name, fn, args, self._helper_release)
        return self.registered

    def _helper_release(self):
        """The helper thread's deregistration (pinlab_dax.release_after)."""
        self.rep[Key.QUERY_FINAL] = self.dev.query(self.rid)
        self.dev.deregister(self.rid)
        self.registered = False

    def after_reclaim(self):
        """After a reclaim-like event: pagemap (and the control pages'), generation 2, the
        mapping scanned, PFNs after the touch, the control pages read back."""
        rep = self.rep
        rep[Key.PAGEMAP_AFTER_EVENT] = self.m.pfns()
        if self.control is not None:
            rep[Key.CONTROL_PAGEMAP_AFTER_EVENT] = self.control.pagemap()
        self.dma(2)
        rep[Key.MAP_G2] = self.scan_map()
        rep[Key.PFNS_AFTER_TOUCH] = self.m.pfns()
        if self.control is not None:
            rep[Key.CONTROL_INTACT] = self.control.intact()

    def fork_and_look(self, dontfork):
        """fork (after MADV_DONTFORK if ``dontfork``): the parent writes its mapping (COW),
        the device writes generation 2, the child reports its own view."""
        m, rep = self.m, self.rep
        if dontfork:
            timed(rep, "madv_dontfork", m.mm.madvise, MADV_DONTFORK)
        def child(go_r, res_w):   # wait, look at its own view of the range, report
            os.read(go_r, 1)
            if dontfork:
                out = {Key.MAPPED: False, Key.PAGEMAP: pagemap(m.addr, m.npages)}
            else:
                out = {Key.MAPPED: True, Key.MAP: self.scan_map(),
                       Key.PFNS: pagemap(m.addr, m.npages)}
            os.write(res_w, jsonlines.encode(out))

        pid, go_w, res_r = fork_child(child)
        rep[Key.CHILD_PID] = pid
        # the parent writes to its mapping (the same words: the pattern stays valid);
        # this is the write that COW-breaks a page shared with the child
        mv = mview(m.mm)
        for i in range(m.npages):
            mv[i * PAGE:i * PAGE + 8] = bytes(mv[i * PAGE:i * PAGE + 8])
        mv.release()
        rep[Key.PFNS_PARENT_AFTER_WRITE] = m.pfns()
        self.dma(2)
        rep[Key.MAP_PARENT_G2] = self.scan_map()
        rep[Key.CHILD_STATUS], rep[Key.CHILD] = release_child(pid, go_w, res_r)

    def remap(self):
        """A fresh mapping of the same file (after munmap)."""
        m = self.m
        flags = mmap.MAP_SHARED if m.shared else mmap.MAP_PRIVATE
        mm = mmap.mmap(m.fd, m.size, flags=flags, prot=mmap.PROT_READ)
        self.stack.callback(mm.close)
        return mm

    def victim(self, oom):
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
        rep[Key.VMSTAT_BEFORE_VICTIM] = vmstat()
        pid = os.fork()
        if pid == 0:
            os.close(info_r)
            os.close(go_w)
            _victim_child(self.a, self.m.kind, cg, info_w, go_r)   # never returns
        os.close(info_w)
        os.close(go_r)
        rep[Key.VICTIM_PID] = pid
        try:
            info = _read_line(info_r, 30)
            rep[Key.VICTIM] = info
            rep[Key.VMSTAT_VICTIM_REGISTERED] = vmstat()
            rep[Key.NONBLOCK_REFUSED_BEFORE] = driver_stat("invalidations_nonblock_refused")
            t0 = now_ms()
            os.write(go_w, b"x")
            status = _wait_child(pid, 60)
            rep[Key.VICTIM_EXIT_MS] = round(now_ms() - t0, 1)
        finally:
            os.close(go_w)
            os.close(info_r)
        if status is None:
            rep[Key.VICTIM_STATUS] = "did not die within 60 s"
            return
        rep[Key.VICTIM_STATUS] = status
        rep[Key.VICTIM_SIGNAL] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        time.sleep(0.2)        # the file's release() and the device's destroy are done
        rep[Key.VMSTAT_VICTIM_GONE] = vmstat()
        rep[Key.NONBLOCK_REFUSED_AFTER] = driver_stat("invalidations_nonblock_refused")
        if cg:
            rep[Key.OOM_EVENTS] = memcg_events(cg)
        self.dma(2)
        rep[Key.MAP_G2] = self.scan_map()

    def stream_until_removed(self):
        """Stream, tell the host (notify_ready), wait until the device is gone (hot-unplug,
        pci-remove: the host removes it)."""
        rep, dev = self.rep, self.dev
        timed(rep, "stream_start", dev.stream_start, self.rid, 0, self.m.size, 100, PAGE, 1000)
        notify_ready(self.stack)
        t0 = now_ms()
        gone = None
        while now_ms() - t0 < 60000:
            try:
                q = dev.query(self.rid)
                if q[Key.STATE] != pinlab_ioctl.STATE_ACTIVE:
                    gone = {Key.HOW: "state", Key.QUERY: q}
                    break
            except OSError as exc:
                gone = {Key.HOW: "errno", Key.ERRNO: exc.errno, Key.ERRNO_NAME: errname(exc.errno)}
                break
            time.sleep(0.05)
        rep[Key.GONE] = gone
        rep[Key.GONE_AFTER_MS] = round(now_ms() - t0, 1)
        rep[Key.DEV_NODE_EXISTS] = os.path.exists(self.a.device)
        self.dma(2)
        timed(rep, "stream_stop", dev.stream_stop, self.rid)
        rep[Key.MAP_AFTER] = self.scan_map()


def fork_child(body):
    """Fork a child that runs ``body(go_r, res_w)`` and exits (status 0, or 1 after writing
    ``{Key.ERROR: ...}`` on ``res_w`` when ``body`` raised; it never returns into the
    caller). Returns (pid, go_w, res_r): the parent's ends of the two pipes, for
    :func:`release_child`."""
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(go_w)
            os.close(res_r)
            body(go_r, res_w)
        except BaseException as exc:  # noqa: BLE001 - the child must never return
            with contextlib.suppress(Exception):
                os.write(res_w, jsonlines.encode({Key.ERROR: repr(exc)}))
            code = 1
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(res_w)
    return pid, go_w, res_r


def release_child(pid, go_w, res_r):
    """Let a forked child go on (one byte on ``go_w``), read its whole JSON report from
    ``res_r`` and reap it. Returns (wait status, report dict; ``{Key.ERROR: ...}`` when the
    report is not JSON). Closes both descriptors."""
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
    try:
        child = jsonlines.decode(b"".join(chunks) or b"{}")
    except jsonlines.MalformedLine:
        child = {Key.ERROR: "bad child report"}
    return status, child


def notify_ready(stack):
    """Tell the host the cell reached its event. Run by the guest agent: a "ready" line on
    the agent's notification pipe ($PINLAB_NOTIFY_FD), which answers the host's pending
    ``wait``. Run by hand (``pinlab run`` with ``pinlab replug --ready-file``): READY_FILE,
    removed when the cell ends."""
    fd = os.environ.get(NOTIFY_FD_ENV)
    if fd:
        os.write(int(fd), b"ready\n")
        return
    write_file(READY_FILE, str(os.getpid()))
    stack.callback(lambda: os.path.exists(READY_FILE) and os.unlink(READY_FILE))


def ready_cell(mode, backing, event, device=None, readonly=False, fast=False,
               cpu_write_after=False):
    """A matrix cell stopped just before its event, for a human: the cell's environment
    set up, its mapping made (``c.m.mm``, ``c.m.addr``, ``c.m.path``), registered
    (``c.dev``, ``c.rid``) and written once by the device. ``c.event()`` runs the event,
    ``c.finish()`` returns the report, ``c.close()`` undoes everything. ``python3 -i
    -m pinlab.guest.pinlab_cell ready MODE BACKING EVENT`` opens a Python prompt with ``c`` set.
    When the driver refuses the registration (what some cells observe, e.g. EFAULT for
    longterm on ext4), ``c.registered`` is False and ``c.rep`` has errno/errno_name; the
    mapping is still there. ``readonly``/``fast`` register read-only (no FOLL_WRITE; the
    device does not write generation 1) or through get/pin_user_pages_fast(), with any
    backing, mode and event (an event may ask for them itself: ev_cpu_write.py);
    ``cpu_write_after`` makes the event's generation-2 write follow the process's CPU write
    (Cell.cpu_write_after). Raises what the environment setup raises (pinlab_env)."""
    import argparse

    stack = contextlib.ExitStack()
    c = Cell(argparse.Namespace(mode=mode, backing=backing, event=event, device=device,
                                readonly=readonly, fast=fast,
                                cpu_write_after=cpu_write_after), stack)
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
            c.rep[Key.ERROR] = f"{type(exc).__name__}: {exc}"
            rep = c.rep
        rep[Key.CELL_MS] = round(now_ms() - t0, 1)
    rep[Key.VMSTAT_END] = vmstat()
    rep[Key.SWAPS] = read_file("/proc/swaps").count("\n") - 1
    rep[Key.LEFTOVER_MOUNTS] = [ln.split()[1] for ln in read_file("/proc/mounts").splitlines()
                              if ln.split()[1].startswith(SCRATCH_MOUNT.format(""))]
    return rep




if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["ready"] or len(sys.argv) != 5:
        sys.exit("usage: python3 -i -m pinlab.guest.pinlab_cell ready MODE BACKING "
                 "EVENT[+OPTIONS]")
    _event, _, _opts = sys.argv[4].partition("+")
    _opts = split_options(_opts)
    c = ready_cell(*sys.argv[2:4], _event, readonly="readonly" in _opts, fast="fast" in _opts,
                   cpu_write_after="cpu-write-after" in _opts)
    where = (f"region {c.rid}, generation 1 written" if c.registered else
             f"registration refused: {c.rep['errno_name']} (as in the cell)")
    print(f"cell {'/'.join(sys.argv[2:5])} ready before its event: mapping c.m at "
          f"{c.m.addr:#x} ({c.m.npages} pages, {c.m.path or c.m.kind}), {where}.\n"
          "  c.event() runs the event; c.finish() releases and returns the report; c.rep "
          "is the report so far; c.dev is the open /dev/pinlab0")
