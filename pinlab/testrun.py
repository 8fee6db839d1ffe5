"""``./pinlab.sh test``: build images, run every Avocado test, fail loudly.

Runs the unit and guest tests as one Avocado job (its output shown as it goes), then the
matrix (the default kernel's main-job slice, cells.DEFAULT_FILTERS; the smoke slice of the
others) as one job per kernel at
the same time. Prints one plain closing line ``N passed, N failed, N skipped`` (skipped
counts Avocado's SKIP and CANCEL, each listed before it) and exits non-zero if any test
failed or errored, if a job ran no test, if any QEMU or device-server process outlived
the run, or, under CI (``CI`` set), if any test was skipped or cancelled.
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
from pinlab.orchestrator import poolclient
from pinlab.orchestrator.artifacts import run_dir
from pinlab.orchestrator.avocadojob import Job, run_concurrently, run_one
from pinlab.orchestrator.cells import DEFAULT_FILTERS
from pinlab.orchestrator.matrix import TASKS_PER_KERNEL

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
    if args.references or args.tags:
        tags = args.tags or []
        jobs = [Job("tests", results, args.references or [str(REPO / s) for s in SUITES],
                    tags=tags, include_untagged=bool(tags))]
    else:
        jobs = default_jobs(results)
    poolclient.stop_all(kernels)
    try:
        run_one(jobs[0])
        if len(jobs) > 1:
            run_concurrently(jobs[1:])
    finally:
        poolclient.stop_all(kernels)

    passed = failed = skipped = cancelled = 0
    strict = bool(os.environ.get("CI"))   # in CI a skipped or cancelled test is a failure
    for job in jobs:
        found = job.results()
        if not found:
            print(f"pinlab: {job.name}: avocado wrote no results (exit {job.rc})",
                  file=sys.stderr)
            failed += 1
            continue
        res = json.loads(found.read_text())
        bad = res.get("failures", 0) + res.get("errors", 0) + res.get("interrupt", 0)
        if job.rc != 0 and bad == 0:   # e.g. the job timed out, or avocado itself failed
            print(f"pinlab: {job.name}: avocado exited {job.rc}", file=sys.stderr)
            bad = 1
        if res.get("pass", 0) + bad == 0:
            print(f"pinlab: {job.name}: no test ran", file=sys.stderr)
            bad += 1
        passed += res.get("pass", 0)
        failed += bad
        skipped += res.get("skip", 0)
        cancelled += res.get("cancel", 0)
        for t in res.get("tests", []):
            if t.get("status") != "PASS":
                print(f"  {t.get('status')}: {t.get('id')}: {t.get('fail_reason')}\n"
                      f"      logs: {t.get('logdir')}")
        print(f"results ({job.name}): {found}")
    left = [p for p in leftover_processes() if p not in before]
    if left:
        print("pinlab: processes left behind by the tests:\n  " + "\n  ".join(left))
        failed += 1
    if skipped or cancelled:
        print(f"pinlab: {skipped} skipped and {cancelled} cancelled tests (listed above)"
              + (": a failure in CI" if strict else ""), file=sys.stderr)
        if strict:
            failed += skipped + cancelled
    print(f"{passed} passed, {failed} failed, {skipped + cancelled} skipped")
    if passed == 0 and failed == 0:
        print("pinlab: no test ran", file=sys.stderr)
        return 1
    return 0 if failed == 0 and all(j.rc == 0 for j in jobs) else 1


def default_jobs(results: Path) -> list[Job]:
    """Unit and guest tests first (one at a time: some measure timing), then the matrix:
    the default kernel's main-job slice (cells.DEFAULT_FILTERS) and the smoke slice of the
    others, one job per kernel, run at the same time (each kernel has its own warm
    guest)."""
    jobs = [Job("unit and guest tests", results / "tests",
                [str(REPO / "tests/unit"), str(REPO / "tests/functional")],
                tags=DEFAULT_TAGS, include_untagged=True)]
    for k in KERNELS:
        # the default kernel: the main job's slice (cells.DEFAULT_FILTERS)
        tags = ([f"matrix,kernel:{k},{f}" for f in DEFAULT_FILTERS] if k == DEFAULT_KERNEL
                else [f"matrix,kernel:{k},smoke"])
        jobs.append(Job(f"matrix {k}" + ("" if k == DEFAULT_KERNEL else " smoke"),
                        results / f"matrix-{k}", [str(REPO / "tests/matrix")], tags=tags,
                        parallel_tasks=TASKS_PER_KERNEL))
    return jobs


if __name__ == "__main__":
    sys.exit(main())
