"""``./pinlab.sh test``: build images, run every Avocado test, fail loudly.

Prints avocado's own output, then one plain closing line ``N passed, N failed`` and exits
non-zero if any test failed or errored, if no test ran, or if any QEMU or device-server
process outlived the run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pinlab.images.build import ensure_images
from pinlab.images.kernel import DEFAULT_KERNEL, KERNELS
from pinlab.orchestrator import pool
from pinlab.orchestrator.artifacts import run_dir

REPO = Path(__file__).resolve().parent.parent
SUITES = ["tests/unit", "tests/functional", "tests/matrix"]
# Untagged tests (unit tests) always run; of the tagged ones, everything on the default
# kernel plus the smoke slice of the matrix on the other kernels.
DEFAULT_TAGS = [f"kernel:{DEFAULT_KERNEL}", "smoke"]


def leftover_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True,
                         check=False).stdout
    me = str(os.getpid())
    return [ln.strip() for ln in out.splitlines()
            if any(k in ln for k in ("qemu-system", "pinlab.device", "pinlab.orchestrator.pool"))
            and not ln.strip().startswith(me)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pinlab.sh test")
    p.add_argument("references", nargs="*", help=f"tests to run (default: {' '.join(SUITES)})")
    p.add_argument("--tags", action="append", default=[], help="avocado tag filter")
    args = p.parse_args(argv)

    before = set(leftover_processes())
    kernels = list(KERNELS)
    for k in kernels:
        ensure_images(k)
    results = run_dir("tests")
    tags = args.tags or ([] if args.references else DEFAULT_TAGS)
    cmd = [sys.executable, "-m", "avocado", "--config", str(REPO / "tests/avocado.conf"),
           "run", "--max-parallel-tasks", "1", "--job-results-dir", str(results),
           "--disable-sysinfo", *[f"--filter-by-tags={t}" for t in tags],
           *(["--filter-by-tags-include-empty"] if tags else []),
           *(args.references or [str(REPO / s) for s in SUITES])]
    print("$ " + " ".join(cmd), flush=True)
    pool.stop_all(kernels)
    try:
        rc = subprocess.run(cmd, cwd=REPO, check=False).returncode
    finally:
        pool.stop_all(kernels)

    found = sorted(results.glob("job-*/results.json"))
    if not found:
        print(f"pinlab: avocado wrote no results (exit {rc})", file=sys.stderr)
        print("0 passed, 1 failed")
        return 1
    res = json.loads(found[-1].read_text())
    passed = res.get("pass", 0)
    failed = res.get("failures", 0) + res.get("errors", 0) + res.get("interrupt", 0)
    skipped = res.get("skip", 0) + res.get("cancel", 0)
    for t in res.get("tests", []):
        if t.get("status") not in ("PASS", "SKIP", "CANCEL"):
            print(f"  {t.get('status')}: {t.get('id')}: {t.get('fail_reason')}\n"
                  f"      logs: {t.get('logdir')}")
    left = [p for p in leftover_processes() if p not in before]
    if left:
        print("pinlab: processes left behind by the tests:\n  " + "\n  ".join(left))
        failed += 1
    print(f"results: {found[-1]}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    if passed == 0 and failed == 0:
        print("pinlab: no test ran", file=sys.stderr)
        return 1
    return 0 if failed == 0 and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
