"""``pinlab bench device``: device figures, each a ratio against a baseline from the same run.

* ``stream_<size>``: streaming write throughput (STREAM_START, interval 0) into a memfd the
  size of guest RAM, through the in-process vfio-user test client, vs. a plain host copy
  (``mmap`` slice assignment) of the same chunk size over the same span of the same memfd.
* ``revoke_p50/p99/max``: INVALIDATE latency (doorbell write to the completion's MSI-X
  eventfd firing) while a 64 KiB stream runs on the same region, vs. the same with no
  stream: the device's figure. The benchmark's client thread stands in for the guest's
  vCPU and driver; a running vCPU is not made to wait for a host time slice, so the
  client runs SCHED_FIFO 1 while it times (where permitted). The goal (p99 < 1 ms)
  applies to this figure.
* ``revoke_e2e_p50/p99/max``: the same with the client at normal priority: end to end as
  a benchmark process sees it; under load it includes the client's own wake-up behind the
  load (no goal). Every revoke figure has ``sched``: the scheduling the client and the
  device got (the device real-time where permitted, device/sched.py).
* ``audit_file_<chunk>``: the audit path's cost per access: microseconds per stream chunk
  (one audited access of ``chunk`` bytes) with the ``--audit`` JSONL file vs. the same
  stream with the in-memory audit only, in two devices side by side. The file has one
  JSON line (about 130 bytes) per page accessed, so its cost grows with the chunk; the
  in-memory audit keeps one entry per run of chunks, and the baseline's 4 MiB region
  stays in the CPU cache.
* ``unsealed_<chunk>``: microseconds per stream chunk into guest RAM whose memfd is not
  sealed against shrinking (accessed with pwrite, SIGBUS-safe) vs. a sealed one (mmap).
* ``mmio_read``: one read of a BAR0 register from inside a TCG guest, from the mapped
  mirror page (BAR0 + 0x1000, device/REGISTERS.md), vs. one read of a register of a
  device QEMU emulates itself (a virtio-pci BAR, the same Python loop over the sysfs
  resource mmap); ``mmio_read_trapped``: the same register through page 0 (a vfio-user
  message per read). Needs a guest image; skipped with --no-guest.

Every figure is measured ``--repeats`` times: ``value``, ``baseline`` and ``ratio`` are the
medians, ``spread`` the lowest and highest ratio, ``runs`` the values of each run. Each
figure is measured twice: alone (``<name>``) and under a CPU load the benchmark makes
itself (``<name>_load``: ``--load-procs`` busy processes, one per core by default), so
figures taken on a machine shared with others compare across runs. ``loadavg`` is the
host's 1-minute load average when the figure was taken, ``met`` whether the goal held.

No figure is asserted anywhere; the goals are printed next to the measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pinlab.common import uapi as U
from pinlab.common.vocab import GUEST_RUN_DIR
from pinlab.device import engine as E
from pinlab.device.mirror import MIRROR_OFFSET
from pinlab.device.testclient import Driver, GuestRam, Rig, VfioUserClient

KiB, MiB = 1024, 1 << 20
CHUNKS = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
Figure = dict[str, Any]


def figure(value: float, baseline: float, unit: str, goal: str,
           ratio: float | None = None) -> Figure:
    if ratio is None and baseline:
        ratio = value / baseline
    # a baseline measured as 0 (a read time below the loop's noise) has no ratio: null in
    # the JSON, never Infinity (not JSON)
    return {"value": round(value, 6), "baseline": round(baseline, 6),
            "ratio": None if ratio is None else round(ratio, 4), "unit": unit, "goal": goal}


def goal_met(f: Figure) -> bool | None:
    """Whether a figure meets its goal ("< 1 ms" on the value, ">= 0.5x"/"<= 3x" on the
    ratio); None when it has none."""
    goal = str(f["goal"]).replace(" ", "")
    for op, fn in (("<=", lambda a, b: a <= b), (">=", lambda a, b: a >= b),
                   ("<", lambda a, b: a < b), (">", lambda a, b: a > b)):
        if goal.startswith(op):
            rest = goal[len(op):]
            if rest.endswith("x"):
                return None if f["ratio"] is None else bool(fn(f["ratio"], float(rest[:-1])))
            return bool(fn(f["value"], float(rest.rstrip("ms").rstrip("u") or "nan")))
    return None


def combine(runs: list[dict[str, Figure]]) -> dict[str, Figure]:
    """Medians of several runs of the same figures, with the spread of the ratio."""
    out: dict[str, Figure] = {}
    for key in runs[0]:
        fs = [r[key] for r in runs if key in r]
        f = dict(fs[0])
        for field in ("value", "baseline"):
            f[field] = round(statistics.median(x[field] for x in fs), 6)
        ratios = [x["ratio"] for x in fs if x["ratio"] is not None]
        f["ratio"] = round(statistics.median(ratios), 6) if ratios else None
        f["spread"] = [min(ratios), max(ratios)] if ratios else None
        f["runs"] = [x["value"] for x in fs]
        f["loadavg"] = round(os.getloadavg()[0], 2)
        f["met"] = goal_met(f)
        out[key] = f
    return out


class CpuLoad:
    """``procs`` busy processes (plain Python loops, nice 0) for the duration of a
    ``with`` block: the competing load the figures named ``*_load`` are taken under."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        self._p: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> CpuLoad:
        for _ in range(self.procs):
            self._p.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self._p:
            p.terminate()
        for p in self._p:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._p.clear()


# --- streaming throughput ---------------------------------------------------------------
def _host_copy_rate(rig: Rig, base: int, span: int, chunk: int, seconds: float) -> float:
    """Bytes per second of a plain host copy of ``chunk``-sized blocks over the span."""
    mm = rig.ram.mm
    src = os.urandom(chunk)
    done, off = 0, 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(16):
            mm[base + off:base + off + chunk] = src
            done += chunk
            off = (off + chunk) % span
        if (now := time.perf_counter()) >= deadline:
            return done / (now - t0)


def _stream_rate(rig: Rig, rid: int, span: int, chunk: int, seconds: float) -> float:
    d = rig.driver
    t0 = time.perf_counter()
    comp = d.cmd(E.OP_STREAM_START, rid, 0, span, 1, chunk, 0)
    if comp.status != E.OK:
        raise RuntimeError(f"STREAM_START: status {comp.status}")
    time.sleep(seconds)
    comp = d.cmd(E.OP_STREAM_STOP, rid)
    elapsed = time.perf_counter() - t0
    return comp.result0 * chunk / elapsed


def bench_stream(ram_size: int, seconds: float) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    rig = Rig(ram_size=ram_size)
    try:
        span = min(64 * MiB, ram_size - 16 * MiB)
        npages = span // 4096
        d = rig.driver
        if d.cmd(E.OP_CREATE_REGION, 1, npages, 1).status != E.OK:
            raise RuntimeError("CREATE_REGION failed")
        pages = rig.pages(npages)
        if rig.map_pages(1, 0, pages).status != E.OK:
            raise RuntimeError("MAP_PAGES failed")
        base = pages[0]  # contiguous in the memfd
        for chunk in CHUNKS:
            host = _host_copy_rate(rig, base, span, chunk, seconds)
            dev = _stream_rate(rig, 1, span, chunk, seconds)
            goal = ">= 0.5x" if chunk >= 64 * KiB else "-"
            out[f"stream_{chunk // KiB}k"] = figure(dev / MiB, host / MiB, "MiB/s", goal)
    finally:
        rig.close()
    return out


# --- audit path and unsealed guest RAM ---------------------------------------------------
AUDIT_CHUNKS = (8, 4 * KiB, 64 * KiB)


class _StreamRig:
    """A rig with one 4 MiB writable region mapped, ready to stream."""

    NPAGES = 1024

    def __init__(self, audit: bool, seal: bool) -> None:
        self.rig = Rig(ram_size=64 * MiB, audit=audit, seal=seal)
        d = self.rig.driver
        if d.cmd(E.OP_CREATE_REGION, 1, self.NPAGES, 1).status != E.OK:
            raise RuntimeError("CREATE_REGION failed")
        if self.rig.map_pages(1, 0, self.rig.pages(self.NPAGES)).status != E.OK:
            raise RuntimeError("MAP_PAGES failed")

    def chunk_us(self, chunk: int, seconds: float) -> float:
        """Microseconds per stream chunk (one audited access)."""
        d = self.rig.driver
        t0 = time.perf_counter()
        if d.cmd(E.OP_STREAM_START, 1, 0, self.NPAGES * 4096, 1, chunk, 0).status != E.OK:
            raise RuntimeError("STREAM_START failed")
        time.sleep(seconds)
        comp = d.cmd(E.OP_STREAM_STOP, 1)
        return (time.perf_counter() - t0) / max(comp.result0, 1) * 1e6


def _file_chunk_us(chunk: int, seconds: float) -> float:
    """Microseconds per chunk of a stream into a device with a fresh audit file, measured
    before the file reaches its bound (past it nothing more is written, and the figure
    would be the in-memory audit's): a run that reached it is measured again, shorter."""
    while True:
        r = _StreamRig(True, True)
        try:
            us = r.chunk_us(chunk, seconds)
            truncated = r.rig.device.audit.stats()["file_truncated_at"]
        finally:
            r.rig.close()  # and its file
        if not truncated:
            return us
        seconds /= 2
        if seconds < 0.005:
            raise RuntimeError("the audit file reaches its bound in 5 ms")


def bench_audit(seconds: float, rounds: int = 3) -> dict[str, Figure]:
    """Three devices side by side (in-memory audit only, audit file, unsealed RAM with
    the in-memory audit), measured in turns, ``rounds`` times: the best of each is kept,
    so load from other processes shifts them all alike. The audit file's device is a new
    one for every measurement, with an empty file (:func:`_file_chunk_us`)."""
    rigs = {"base": _StreamRig(False, True), "unsealed": _StreamRig(False, False)}
    best: dict[tuple[str, int], float] = {}
    try:
        for _ in range(rounds):
            for chunk in AUDIT_CHUNKS:
                for name in ("base", "file", "unsealed"):
                    if name == "unsealed" and chunk < KiB:
                        continue
                    us = (_file_chunk_us(chunk, seconds) if name == "file"
                          else rigs[name].chunk_us(chunk, seconds))
                    best[name, chunk] = min(best.get((name, chunk), us), us)
    finally:
        for r in rigs.values():
            r.rig.close()
    out: dict[str, Figure] = {}
    for chunk in AUDIT_CHUNKS:
        name = f"{chunk}b" if chunk < KiB else f"{chunk // KiB}k"
        out[f"audit_file_{name}"] = figure(best["file", chunk], best["base", chunk],
                                           "us/access", "<= 1.5x")
    for chunk in AUDIT_CHUNKS[1:]:
        out[f"unsealed_{chunk // KiB}k"] = figure(best["unsealed", chunk],
                                                  best["base", chunk], "us/access", "-")
    return out


# --- revoke latency ---------------------------------------------------------------------
def _wait_cq(rig: Any, timeout: float = 10.0) -> Any:
    """Block on the CQ vector's eventfd (like an interrupt), then consume one completion."""
    d = rig.driver
    fd = d.vectors[E.VEC_CQ]
    deadline = time.monotonic() + timeout
    while True:
        raw = rig.ram.read(d.cq + d.cq_head * 32, 32)
        if struct.unpack_from("<I", raw, 4)[0] & 1 == d.cq_phase:
            return d.poll(0)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no completion")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            d.irq_count(E.VEC_CQ)


class ProcessRig:
    """Like :class:`Rig`, but the device runs in its own process (``python -m
    pinlab.device``), as under QEMU: the client's threads do not compete for its GIL.
    ``audit``: the device keeps its audit file (``self.audit``) in the rig's directory."""

    def __init__(self, ram_size: int, audit: bool = False) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pinlab-bench-")
        sock, self.ctl = os.path.join(self.tmp, "vfio.sock"), os.path.join(self.tmp, "ctl")
        self.audit = os.path.join(self.tmp, "audit.jsonl") if audit else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pinlab.device", "--socket", sock, "--control", self.ctl,
             "--log-level", "WARNING", *(("--audit", self.audit) if self.audit else ())])
        deadline = time.monotonic() + 30
        while not (os.path.exists(sock) and os.path.exists(self.ctl)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("device process did not start")
            time.sleep(0.02)
        self.ram = GuestRam(ram_size)
        self.client = VfioUserClient(sock)
        self.client.bring_up(self.ram)
        self.driver = Driver(self.client, self.ram, entries=64)
        self.driver.setup_msix()
        self.driver.enable()
        self._next_page = 0x800000

    pages = Rig.pages
    map_pages = Rig.map_pages

    def query(self, command: str, args: dict[str, Any] | None = None) -> Any:
        """One command on the device's control socket (QMP), with ``args``; returns its
        ``return``. Raises RuntimeError for a QMP error."""
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(self.ctl)
            f = c.makefile("rwb")
            f.write(b'{"execute":"qmp_capabilities","id":0}\r\n'
                    + json.dumps({"execute": command, "id": 1, **({"arguments": args} if args
                                                                   else {})}).encode()
                    + b"\r\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if msg.get("id") == 1 and "return" in msg:
                    return msg["return"]
                if "error" in msg:
                    raise RuntimeError(str(msg["error"]))

    def violations(self) -> int:
        return int(self.query("query-violations")["count"])

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the device's compiled stream loop is loaded: loading it holds the
        interpreter lock (0.5 s from numba's cache), which is not what a revoke costs."""
        deadline = time.monotonic() + timeout
        while not self.query("query-status")["engine"]["stream_loop_ready"]:
            if time.monotonic() > deadline:
                raise RuntimeError("device stream loop not ready")
            time.sleep(0.1)

    def stop(self) -> None:
        """Disconnect and end the device process (SIGTERM: it flushes its audit file);
        the rig's directory stays. Idempotent."""
        if hasattr(self, "client"):
            self.client.close()
            self.driver.close()
            self.ram.close()
            del self.client
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _client_realtime() -> str:
    """Make the calling thread SCHED_FIFO 1 (a running vCPU thread, which the host does not
    make wait for a time slice); returns the scheduling it got."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):
        return "SCHED_OTHER (real-time not permitted)"
    return "SCHED_FIFO 1"


def _client_normal() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def _device_sched(rig: ProcessRig) -> str:
    """The device's scheduling as it reports it (query-status: engine.scheduling)."""
    sched = rig.query("query-status")["engine"].get("scheduling", {})
    threads = sched.get("threads", {})
    got = sum(1 for t in threads.values() if t["realtime"])
    if not sched.get("realtime"):
        return "SCHED_OTHER (real-time not enabled)"
    if got == len(threads):
        return f"SCHED_FIFO {sched.get('priority')} ({got} threads)"
    if not got:
        return "SCHED_OTHER (real-time not permitted)"
    return f"SCHED_FIFO {sched.get('priority')} ({got} of {len(threads)} threads)"


def _revoke_latencies(n: int, stream: bool, client_rt: bool) -> tuple[list[float], dict[str, str]]:
    """``n`` INVALIDATE latencies in seconds, and the scheduling the client and the device
    got (``client_rt``: the benchmark's client thread runs SCHED_FIFO 1 while it times)."""
    rig = ProcessRig(64 * MiB)
    try:
        rig.wait_ready()
        d = rig.driver
        npages = 1024
        d.cmd(E.OP_CREATE_REGION, 1, npages, 1)
        pages = rig.pages(npages)
        rig.map_pages(1, 0, pages)
        sched = {"device": _device_sched(rig), "client": "SCHED_OTHER"}
        if stream:
            comp = d.cmd(E.OP_STREAM_START, 1, 0, npages * 4096, 1, 64 * KiB, 0)
            if comp.status != E.OK:
                raise RuntimeError("STREAM_START failed")
            time.sleep(0.05)
        lat: list[float] = []
        if client_rt:
            sched["client"] = _client_realtime()
        try:
            _timed_revokes(rig, n, npages, pages, lat)
        finally:
            _client_normal()
        if stream:
            comp = d.cmd(E.OP_STREAM_STOP, 1)
            if comp.result0 < 10:
                raise RuntimeError(f"the stream hardly ran ({comp.result0} chunks)")
        if rig.violations():
            raise RuntimeError("audit violations during the revoke benchmark")
        return lat, sched
    finally:
        rig.close()


def _timed_revokes(rig: ProcessRig, n: int, npages: int, pages: list[int],
                   lat: list[float]) -> None:
    d = rig.driver
    for i in range(n):
        first = (i * 16) % npages
        d.irq_count(E.VEC_CQ)
        t0 = time.perf_counter()
        cid = d.submit(E.OP_INVALIDATE, 1, first, 16)
        comp = _wait_cq(rig)
        lat.append(time.perf_counter() - t0)
        if comp.cid != cid or comp.status != E.OK:
            raise RuntimeError(f"INVALIDATE: {comp}")
        rig.map_pages(1, first, pages[first:first + 16])  # not timed
        d.events()  # drain PAGE_FAULT events of the paused stream


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def bench_revoke(n: int) -> dict[str, Figure]:
    """``revoke_*``: the device's figure, its client thread (the guest's vCPU and driver)
    real-time where permitted, so the figure is the device's, not the host's scheduling
    of the client; the goal applies to it. ``revoke_e2e_*``: the same with the client at
    normal priority, as a benchmark process on a busy host sees it (no goal: under load it
    includes the client's own wake-up). Each figure says which scheduling it got
    (``sched``: client, device)."""
    out = {}
    for prefix, client_rt, goal99 in (("revoke", True, "< 1 ms"), ("revoke_e2e", False, "-")):
        idle, _ = _revoke_latencies(n, stream=False, client_rt=client_rt)
        busy, sched = _revoke_latencies(n, stream=True, client_rt=client_rt)
        for name, fn, goal in (("p50", lambda x: _pct(x, 50), "-"),
                               ("p99", lambda x: _pct(x, 99), goal99),
                               ("max", max, "-")):
            f = figure(fn(busy) * 1e3, fn(idle) * 1e3, "ms", goal)
            f["sched"] = sched
            out[f"{prefix}_{name}"] = f
    return out


# --- MMIO read from inside a guest ------------------------------------------------------
HELPER = f"{GUEST_RUN_DIR}/mmio_bench.py"   # where the guest keeps GUEST_HELPER
GUEST_HELPER = r'''
import mmap, os, sys, time
def bar(path, off, n):
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    mv = memoryview(m).cast("I")
    idx = off // 4
    v = mv[idx]
    t0 = time.perf_counter()
    for _ in range(n):
        mv[idx]
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(n):
        pass
    empty = time.perf_counter() - t0
    return v, max(dt - empty, 0.0) / n
def emulated():  # a memory BAR of a virtio-pci device: registers QEMU emulates itself
    base = "/sys/bus/pci/devices"
    for dev in sorted(os.listdir(base)):
        if open(f"{base}/{dev}/vendor").read().strip() != "0x1af4":
            continue
        lines = open(f"{base}/{dev}/resource").read().split("\n")
        for i, line in enumerate(lines[:6]):
            start, end, flags = (int(x, 16) for x in line.split())
            if flags & 0x200 and end > start and os.path.exists(f"{base}/{dev}/resource{i}"):
                return f"{base}/{dev}/resource{i}"
    raise SystemExit("no virtio-pci memory BAR")
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "bar":
    v, t = bar(sys.argv[3], int(sys.argv[4], 0), n)
else:
    v, t = bar(emulated(), 0, n)
print(f"{v:#x} {t!r}")
'''


def _ssh(s: Any, cmd: str) -> str:
    res = s.guest.ssh.run(cmd, timeout=600)
    if res.rc:
        raise RuntimeError(f"guest: {cmd}: exit {res.rc}: {res.err[-2000:]}")
    return str(res.out)


def _mmio_once(s: Any, res: str, n: int) -> dict[str, Figure]:
    v, mapped = _ssh(s, f"python3 {HELPER} bar {n} {res} {MIRROR_OFFSET:#x}").split()
    if int(v, 16) != U.ID_MAGIC:
        raise RuntimeError(f"BAR0 mirror ID read {v}")
    v, trapped = _ssh(s, f"python3 {HELPER} bar {n} {res} 0x0").split()
    if int(v, 16) != U.ID_MAGIC:
        raise RuntimeError(f"BAR0 ID read {v}")
    _, base = _ssh(s, f"python3 {HELPER} emulated {n}").split()
    b = float(base) * 1e6
    return {"mmio_read": figure(float(mapped) * 1e6, b, "us/read", "<= 3x"),
            "mmio_read_trapped": figure(float(trapped) * 1e6, b, "us/read", "-")}


def bench_mmio(artifacts: Path, kernel: str, n: int, repeats: int,
               load_procs: int) -> dict[str, Figure]:
    from pinlab.orchestrator.session import GuestSession
    from pinlab.orchestrator.vm import GuestConfig

    cfg = GuestConfig(device_args=["--bar0-mirror"])
    with GuestSession.boot(kernel, artifacts, module=False, config=cfg) as s:
        s.guest.ssh.run(f"mkdir -p {GUEST_RUN_DIR}", check=True)
        s.guest.ssh.put(GUEST_HELPER.encode(), HELPER)
        lspci = _ssh(s, "lspci -Dn")
        ours = [ln.split()[0] for ln in lspci.splitlines() if "1de5:0001" in ln]
        if not ours:
            raise RuntimeError(f"pinlab device not found in lspci:\n{lspci}")
        bdf = ours[0]
        _ssh(s, f"setpci -s {bdf} COMMAND=0x02:0x02")
        res = f"/sys/bus/pci/devices/{bdf}/resource0"
        out = combine([_mmio_once(s, res, n) for _ in range(repeats)])
        with CpuLoad(load_procs):
            loaded = combine([_mmio_once(s, res, n) for _ in range(repeats)])
    out.update({f"{k}_load": f for k, f in loaded.items()})
    return out


# --- main -------------------------------------------------------------------------------
def _host_figures(args: argparse.Namespace) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    out.update(combine([bench_stream(args.ram_mib * MiB, args.seconds)
                        for _ in range(args.repeats)]))
    out.update(combine([bench_audit(args.seconds, rounds=2)
                        for _ in range(max(1, args.repeats - 1))]))
    out.update(combine([bench_revoke(args.revokes) for _ in range(args.repeats)]))
    return out


def run(args: argparse.Namespace) -> dict[str, Figure]:
    out = _host_figures(args)
    with CpuLoad(args.load_procs):
        loaded = _host_figures(args)
    out.update({f"{k}_load": f for k, f in loaded.items()})
    if not args.no_guest:
        try:
            out.update(bench_mmio(Path(args.artifacts), args.kernel, args.mmio_reads,
                                  args.repeats, args.load_procs))
        except Exception as exc:  # a missing image must not lose the other figures
            print(f"mmio benchmark skipped: {exc}", file=sys.stderr)
    return dict(sorted(out.items()))


def table(res: dict[str, Figure]) -> str:
    rows = [("figure", "value", "baseline", "ratio", "spread", "unit", "goal", "met", "load")]
    for k, f in res.items():
        spread = f.get("spread")
        met = {True: "yes", False: "NO", None: ""}[f.get("met")]
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.3g}"
        rows.append((k, f"{f['value']:.4g}", f"{f['baseline']:.4g}", ratio,
                     f"{spread[0]:.3g}-{spread[1]:.3g}" if spread else "-", f["unit"],
                     f["goal"], met,
                     f"{f.get('loadavg', 0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    notes = sorted({f"{k.removesuffix('_load').rsplit('_', 1)[0]}_*: client "
                    f"{f['sched']['client']}, device {f['sched']['device']}"
                    for k, f in res.items() if "sched" in f})
    return "\n".join([*("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                       for r in rows), *notes])


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pinlab bench device")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--ram-mib", type=int, default=1024, help="guest RAM memfd size")
    ap.add_argument("--seconds", type=float, default=0.5, help="per throughput point")
    ap.add_argument("--revokes", type=int, default=500, help="INVALIDATEs per run")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every figure (median)")
    ap.add_argument("--load-procs", type=int, default=os.cpu_count() or 2,
                    help="busy processes of the competing load (*_load figures)")
    ap.add_argument("--no-guest", action="store_true", help="skip the in-guest MMIO figure")
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--artifacts", default="artifacts/bench")
    ap.add_argument("--mmio-reads", type=int, default=2000)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.load_procs < 0:
        ap.error("--repeats must be >= 1 and --load-procs >= 0")
    old = sys.getswitchinterval()
    sys.setswitchinterval(E.SWITCH_INTERVAL)  # as the device process does (serve.main)
    try:
        res = run(args)
    finally:
        sys.setswitchinterval(old)
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
