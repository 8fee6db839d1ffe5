"""ioctl fuzzer for pinlab.ko: boot a guest, run images/guest/ioctl_fuzz.py, judge the kernel."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.session import GuestSession

log = logging.getLogger(__name__)

GUEST_FUZZ = Path(__file__).resolve().parent.parent / "images" / "guest" / "ioctl_fuzz.py"
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
    """Returns 0 if the kernel stayed clean (no pinlab WARN/BUG/Oops, no pin leak)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with GuestSession.boot(kernel, artifacts) as s:
        g = s.guest
        g.ssh.put(GUEST_FUZZ, "/root/pinlab/ioctl_fuzz.py")
        base = _outstanding(g.ssh.run(VMSTAT, timeout=60, check=True).out)
        res = g.ssh.run(f"python3 /root/pinlab/ioctl_fuzz.py --iterations {int(iterations)} "
                        f"--threads {int(threads)} --seed {int(seed)}",
                        timeout=max(300, iterations))
        (artifacts / "fuzz-stdout.txt").write_text(res.out + "\n--- stderr\n" + res.err)
        if res.rc != 0:
            problems.append(f"fuzzer exited {res.rc}: {res.err[-500:]}")
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
    for cls, lines in rep.severe().items():
        if _pinlab_related(lines, text):
            problems.append(f"{cls}: {lines[0]}")
    (artifacts / "fuzz-verdict.json").write_text(json.dumps(
        {"kernel": kernel, "iterations": iterations, "problems": problems,
         "dmesg": rep.summary()}, indent=2))
    for p in problems:
        log.error("fuzz: %s", p)
    return 1 if problems else 0


if __name__ == "__main__":
    import sys
    logging.basicConfig(level=logging.INFO)
    sys.exit(run_fuzz(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
