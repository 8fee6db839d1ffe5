"""``pinlab bench device``: device figures, each a ratio against a baseline from the same run.

* ``stream_<size>``: streaming write throughput (STREAM_START, interval 0) into a memfd the
  size of guest RAM, through the in-process vfio-user test client, vs. a plain host copy
  (``mmap`` slice assignment) of the same chunk size over the same span of the same memfd.
* ``revoke_p50/p99/max``: INVALIDATE latency (doorbell write to the completion's MSI-X
  eventfd firing) while a stream runs on the same region, vs. the same with no stream.
* ``audit_file_<chunk>``: the audit path's cost per access: microseconds per stream chunk
  (one audited access of ``chunk`` bytes) with the ``--audit`` JSONL file vs. the same
  stream with the in-memory audit only, in two devices side by side.
* ``unsealed_<chunk>``: microseconds per stream chunk into guest RAM whose memfd is not
  sealed against shrinking (accessed with pwrite, SIGBUS-safe) vs. a sealed one (mmap).
* ``mmio_read``: one BAR0 register read from inside a TCG guest through vfio-user vs. one
  read of a register QEMU emulates itself (needs a guest image; skipped with --no-guest).

No figure is asserted anywhere; the goals are printed next to the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pinlab.device import engine as E
from pinlab.device.testclient import Driver, GuestRam, Rig, VfioUserClient

KiB, MiB = 1024, 1 << 20
CHUNKS = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
Figure = dict[str, Any]


def figure(value: float, baseline: float, unit: str, goal: str,
           ratio: float | None = None) -> Figure:
    if ratio is None:
        ratio = value / baseline if baseline else float("inf")
    return {"value": round(value, 6), "baseline": round(baseline, 6),
            "ratio": round(ratio, 4), "unit": unit, "goal": goal}


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


def bench_audit(seconds: float, rounds: int = 3) -> dict[str, Figure]:
    """Three devices side by side (in-memory audit only, audit file, unsealed RAM with
    the in-memory audit), measured in turns, ``rounds`` times: the best of each is kept,
    so load from other processes shifts them all alike."""
    rigs = {"base": _StreamRig(False, True), "file": _StreamRig(True, True),
            "unsealed": _StreamRig(False, False)}
    best: dict[tuple[str, int], float] = {}
    try:
        for _ in range(rounds):
            for chunk in AUDIT_CHUNKS:
                for name, r in rigs.items():
                    if name == "unsealed" and chunk < KiB:
                        continue
                    us = r.chunk_us(chunk, seconds)
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
    pinlab.device``), as under QEMU: the client's threads do not compete for its GIL."""

    def __init__(self, ram_size: int) -> None:
        self.tmp = tempfile.mkdtemp(prefix="pinlab-bench-")
        sock, self.ctl = os.path.join(self.tmp, "vfio.sock"), os.path.join(self.tmp, "ctl")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pinlab.device", "--socket", sock, "--control", self.ctl,
             "--log-level", "WARNING"])
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

    def violations(self) -> int:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(self.ctl)
            f = c.makefile("rwb")
            f.write(b'{"execute":"qmp_capabilities"}\r\n{"execute":"query-violations"}\r\n')
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg and "count" in msg["return"]:
                    return int(msg["return"]["count"])
                if "error" in msg:
                    raise RuntimeError(str(msg["error"]))

    def close(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
            self.driver.close()
            self.ram.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _revoke_latencies(n: int, stream: bool) -> list[float]:
    rig = ProcessRig(64 * MiB)
    try:
        d = rig.driver
        npages = 1024
        d.cmd(E.OP_CREATE_REGION, 1, npages, 1)
        pages = rig.pages(npages)
        rig.map_pages(1, 0, pages)
        if stream:
            comp = d.cmd(E.OP_STREAM_START, 1, 0, npages * 4096, 1, 64 * KiB, 0)
            if comp.status != E.OK:
                raise RuntimeError("STREAM_START failed")
            time.sleep(0.05)
        lat: list[float] = []
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
        if stream:
            comp = d.cmd(E.OP_STREAM_STOP, 1)
            if comp.result0 < 10:
                raise RuntimeError(f"the stream hardly ran ({comp.result0} chunks)")
        if rig.violations():
            raise RuntimeError("audit violations during the revoke benchmark")
        return lat
    finally:
        rig.close()


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def bench_revoke(n: int) -> dict[str, Figure]:
    idle = _revoke_latencies(n, stream=False)
    busy = _revoke_latencies(n, stream=True)
    out = {}
    for name, fn, goal in (("p50", lambda x: _pct(x, 50), "-"),
                           ("p99", lambda x: _pct(x, 99), "< 1 ms"),
                           ("max", max, "-")):
        out[f"revoke_{name}"] = figure(fn(busy) * 1e3, fn(idle) * 1e3, "ms", goal)
    return out


# --- MMIO read from inside a guest ------------------------------------------------------
GUEST_HELPER = r'''
import mmap, os, struct, sys, time
def bar(path, off, n):
    fd = os.open(path, os.O_RDWR | os.O_SYNC)
    m = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
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
    return v, (dt - empty) / n
def pio(port, n):  # CMOS/RTC index 0x0d (register D, read-only status) via /dev/port
    fd = os.open("/dev/port", os.O_RDWR)
    os.pwrite(fd, b"\x0d", 0x70)
    t0 = time.perf_counter()
    for _ in range(n):
        os.pread(fd, 1, 0x71)
    dt = time.perf_counter() - t0
    return (dt) / n
mode, n = sys.argv[1], int(sys.argv[2])
if mode == "bar":
    v, t = bar(sys.argv[3], int(sys.argv[4], 0), n)
    print(f"{v:#x} {t!r}")
else:
    print(f"0 {pio(0x71, n)!r}")
'''


def _ssh(s: Any, cmd: str) -> str:
    res = s.guest.ssh.run(cmd, timeout=600)
    if res.rc:
        raise RuntimeError(f"guest: {cmd}: exit {res.rc}: {res.err[-2000:]}")
    return str(res.out)


def bench_mmio(artifacts: Path, kernel: str, n: int) -> dict[str, Figure]:
    from pinlab.orchestrator.session import GuestSession

    with GuestSession.boot(kernel, artifacts, module=False) as s:
        s.guest.ssh.put(GUEST_HELPER.encode(), "/root/mmio_bench.py")
        lspci = _ssh(s, "lspci -Dn")
        ours = [ln.split()[0] for ln in lspci.splitlines() if "1de5:0001" in ln]
        if not ours:
            raise RuntimeError(f"pinlab device not found in lspci:\n{lspci}")
        bdf = ours[0]
        _ssh(s, f"setpci -s {bdf} COMMAND=0x02:0x02")
        res = f"/sys/bus/pci/devices/{bdf}/resource0"
        v, ours_t = _ssh(s, f"python3 /root/mmio_bench.py bar {n} {res} 0x0").split()
        if int(v, 16) != E.ID_VALUE:
            raise RuntimeError(f"BAR0 ID read {v}")
        _, base_t = _ssh(s, f"python3 /root/mmio_bench.py pio {n}").split()
    us, bs = float(ours_t) * 1e6, float(base_t) * 1e6
    return {"mmio_read": figure(us, bs, "us/read", "-")}


# --- main -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Figure]:
    out: dict[str, Figure] = {}
    out.update(bench_stream(args.ram_mib * MiB, args.seconds))
    out.update(bench_audit(args.seconds))
    out.update(bench_revoke(args.revokes))
    if not args.no_guest:
        try:
            out.update(bench_mmio(Path(args.artifacts), args.kernel, args.mmio_reads))
        except Exception as exc:  # a missing image must not lose the other figures
            print(f"mmio benchmark skipped: {exc}", file=sys.stderr)
    return out


def table(res: dict[str, Figure]) -> str:
    rows = [("figure", "value", "baseline", "ratio", "unit", "goal")]
    for k, f in res.items():
        rows.append((k, f"{f['value']:.4g}", f"{f['baseline']:.4g}", f"{f['ratio']:.3g}",
                     f["unit"], f["goal"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pinlab bench device")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--ram-mib", type=int, default=1024, help="guest RAM memfd size")
    ap.add_argument("--seconds", type=float, default=0.5, help="per throughput point")
    ap.add_argument("--revokes", type=int, default=1000)
    ap.add_argument("--no-guest", action="store_true", help="skip the in-guest MMIO figure")
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--artifacts", default="artifacts/bench")
    ap.add_argument("--mmio-reads", type=int, default=2000)
    args = ap.parse_args(argv)
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
