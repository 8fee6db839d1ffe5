"""ioctl fuzzer for pinlab.ko: boot a guest, run guest/ioctl_fuzz.py, judge the kernel.

While it runs, ``pinlab fuzz ioctl`` prints the guest's progress; at the end one summary
(iterations done, errors by errno, WARN/BUG/Oops found, pins outstanding before/after).
The guest side gets a deadline from the work asked for (:func:`fuzz_budget`), so a run
that cannot finish stops and says how far it got instead of running on unseen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from pinlab.common import jsonlines
from pinlab.common.vocab import guest_python
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.session import GuestSession

log = logging.getLogger(__name__)

# Guest-side cost model of the fuzzer under TCG (2000 iterations x 4 threads took 35 s):
# seconds per worker operation (one ioctl, registration or mm call) and per racer round
# (register, stream, 20 DMA writes of 32 pages, deregister/madvise, close: one every 50
# iterations). The budget is 3x the model plus a fixed start-up allowance.
SECONDS_PER_OP = 0.002
SECONDS_PER_RACE = 0.3
BUDGET_FACTOR = 3.0
BUDGET_BASE = 60.0
_ERRNO = re.compile(r"-(E[A-Z0-9]+|py|\d+)$")


def fuzz_budget(iterations: int, threads: int) -> float:
    """Seconds the guest fuzzer may run for ``iterations`` per thread on ``threads``
    worker threads plus the racer: linear in the operations it will perform."""
    ops = iterations * threads
    races = max(1, iterations // 50)
    return BUDGET_BASE + BUDGET_FACTOR * (ops * SECONDS_PER_OP + races * SECONDS_PER_RACE)


def errors_by_errno(counts: dict[str, int]) -> dict[str, int]:
    """Fold the fuzzer's ``<op>-<ERRNO>`` counters into totals per errno (``EINVAL``: n)."""
    out: dict[str, int] = {}
    for key, n in counts.items():
        m = _ERRNO.search(key)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summary_text(s: dict[str, Any]) -> str:
    """The human summary printed at the end of ``pinlab fuzz ioctl``."""
    errs = ", ".join(f"{k} {v}" for k, v in s["errors_by_errno"].items()) or "none"
    found = ", ".join(f"{k} {v}" for k, v in s["kernel"].items()) or "none"
    lines = [
        f"fuzz: {s['done']}/{s['total']} operations in {s['elapsed']:.0f} s"
        + (" (stopped at the deadline)" if s["deadline_hit"] else ""),
        f"fuzz: errors by errno: {errs}",
        f"fuzz: kernel WARN/BUG/Oops (pinlab-related): {found}",
        f"fuzz: pins outstanding before {s['pins_before']}, after {s['pins_after']}",
        f"fuzz: verdict: {'FAIL' if s['problems'] else 'PASS'}",
    ]
    lines += [f"fuzz:   problem: {p}" for p in s["problems"]]
    return "\n".join(lines)


def _json_lines(lines: jsonlines.Splitter) -> list[dict[str, Any]]:
    """The JSON objects among the complete lines ``lines`` holds; other lines (a
    traceback, a warning) are skipped."""
    found = []
    while True:
        try:
            ln = lines.line()
        except jsonlines.LineTooLong:
            continue
        if ln is None:
            return found
        with contextlib.suppress(jsonlines.MalformedLine):
            found.append(jsonlines.decode_object(ln))


def _run_streaming(ssh: Any, cmd: str, timeout: float) -> tuple[int | None, str, str]:
    """Run ``cmd`` in the guest, printing its JSON progress lines (stderr) as they come.
    Returns (rc or None on timeout, stdout, stderr)."""
    chan = ssh.open_channel(cmd)
    out, err = [], []
    progress = jsonlines.Splitter(1 << 20)   # stderr: JSON progress lines among others
    deadline = time.monotonic() + timeout
    last = 0.0
    try:
        while True:
            busy = False
            while chan.recv_ready():
                out.append(chan.recv(65536))
                busy = True
            while chan.recv_stderr_ready():
                data = chan.recv_stderr(65536)
                err.append(data)
                progress.feed(data)
                busy = True
            for p in _json_lines(progress):
                if "progress" in p and time.monotonic() - last >= 5:
                    last = time.monotonic()
                    pct = 100 * p["progress"] / max(p["total"], 1)
                    print(f"fuzz: {p['progress']}/{p['total']} operations ({pct:.0f}%), "
                          f"{p['elapsed']:.0f} s", flush=True)
            if (chan.exit_status_ready() and not busy and not chan.recv_ready()
                    and not chan.recv_stderr_ready()):
                rc = chan.recv_exit_status()
                break
            if time.monotonic() > deadline:
                rc = None
                break
            if not busy:
                time.sleep(0.2)
    finally:
        chan.close()
    return (rc, b"".join(out).decode(errors="replace"),
            b"".join(err).decode(errors="replace"))

VMSTAT = ("echo 1 > /proc/sys/vm/stat_refresh; "
          "grep -E '^nr_foll_pin_(acquired|released) ' /proc/vmstat")


def _outstanding(text: str) -> int:
    v = dict(line.split() for line in text.splitlines() if line.strip())
    return int(v.get("nr_foll_pin_acquired", 0)) - int(v.get("nr_foll_pin_released", 0))


def _pinlab_related(lines: list[str], text: str) -> bool:
    """A severe line counts if pinlab is named in it or in the report that follows it."""
    if any("pinlab" in ln for ln in lines):
        return True
    all_lines = text.splitlines()
    for ln in lines:
        try:
            i = all_lines.index(ln)
        except ValueError:
            return True
        if any("pinlab" in x for x in all_lines[i:i + 60]):
            return True
    return False


def run_fuzz(kernel: str, iterations: int, artifacts: Path, *, threads: int = 4,
             seed: int = 1) -> int:
    """Returns 0 if the kernel stayed clean (no pinlab WARN/BUG/Oops, no pin leak) and the
    fuzzer finished its work within :func:`fuzz_budget`. Prints progress and a summary;
    keeps fuzz-stdout.txt, debugfs-stats.txt and fuzz-verdict.json in ``artifacts``."""
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    budget = fuzz_budget(iterations, threads)
    result: dict[str, Any] = {}
    t0 = time.monotonic()
    print(f"fuzz: {iterations} iterations x {threads} threads on {kernel}; guest deadline "
          f"{budget:.0f} s; artifacts in {artifacts}", flush=True)
    with GuestSession.boot(kernel, artifacts) as s:
        g = s.guest
        base = _outstanding(g.ssh.run(VMSTAT, timeout=60, check=True).out)
        cmd = guest_python("ioctl_fuzz", "--iterations", str(int(iterations)), "--threads",
                           str(int(threads)), "--seed", str(int(seed)), "--deadline",
                           f"{budget:.0f}")
        rc, out, err = _run_streaming(g.ssh, cmd, budget + 120)
        (artifacts / "fuzz-stdout.txt").write_text(out + "\n--- stderr\n" + err)
        if rc is None:
            problems.append(f"fuzzer still running {budget + 120:.0f} s after its start "
                            "(a hung ioctl?)")
        elif rc != 0:
            problems.append(f"fuzzer exited {rc}: {err[-500:]}")
        for line in out.splitlines():
            with_counts = line.strip().startswith("{") and '"counts"' in line
            if with_counts:
                result = jsonlines.decode_object(line)
        if result.get("deadline_hit"):
            problems.append(f"fuzzer stopped at its {budget:.0f} s deadline after "
                            f"{result.get('done')} of {result.get('total')} operations")
        # all files are closed: every pin must be back
        after = _outstanding(g.ssh.run(VMSTAT, timeout=60, check=True).out)
        if after != base:
            problems.append(f"pin counters leaked: outstanding {base} -> {after}")
        stats = g.ssh.run("cat /sys/kernel/debug/pinlab/*/stats", timeout=60).out
        (artifacts / "debugfs-stats.txt").write_text(stats)
        for line in stats.splitlines():
            k, _, v = line.partition(" ")
            if k in ("pins_held", "odp_mapped") and v.strip() != "0":
                problems.append(f"debugfs {k} = {v} after every file was closed")
        rm = g.ssh.run("rmmod pinlab", timeout=120)
        if rm.rc != 0:
            problems.append(f"rmmod pinlab failed: {rm.err.strip()}")
        text = g.dmesg()
    rep = classify(text)
    kernel_found: dict[str, int] = {}
    for cls, lines in rep.severe().items():
        if _pinlab_related(lines, text):
            problems.append(f"{cls}: {lines[0]}")
            kernel_found[cls] = len(lines)
    summary = {
        "kernel_version": kernel, "iterations": iterations, "threads": threads, "seed": seed,
        "done": result.get("done", 0), "total": result.get("total", iterations * threads),
        "elapsed": result.get("elapsed", time.monotonic() - t0),
        "deadline_s": round(budget), "deadline_hit": bool(result.get("deadline_hit")),
        "errors_by_errno": errors_by_errno(result.get("counts", {})),
        "kernel": kernel_found, "pins_before": base, "pins_after": after,
        "problems": problems,
    }
    (artifacts / "fuzz-verdict.json").write_text(json.dumps(
        {"kernel": kernel, "iterations": iterations, "problems": problems,
         "dmesg": rep.summary(), "summary": summary}, indent=2))
    print(summary_text(summary), flush=True)
    for p in problems:
        log.error("fuzz: %s", p)
    return 1 if problems else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(run_fuzz(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
