"""Three shards of a matrix slice, run as separate ``pinlab matrix --shard I/3`` processes
with their own result directories and their own warm guests (as on three machines), then
``pinlab merge``d, give the same cells and the same verdicts as the unsharded run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from avocado import Test

KERNEL = "6.12"
# the baseline without its option cells (dma-write+readonly, +fast): 40 cells
TAG = "event:dma-write,-option"
SLICE = ["--kernel", KERNEL, "--tags", TAG]
RUN_DEADLINE = 900     # seconds; past this a matrix process is hung


def outcome(doc: dict[str, Any]) -> dict[str, tuple[str, str, str]]:
    """cell id -> (expected, observed, verdict)."""
    from pinlab.orchestrator.verdicts import cell_of
    return {cell_of(v).name: (str(v["expected"]), str(v["observed"]), v["verdict"])
            for v in doc["verdicts"]}


class ShardsTest(Test):
    """:avocado: tags=kernel:6.12,shard"""

    timeout = 1150

    def setUp(self) -> None:
        self.out = Path(self.logdir) / "runs"
        self.out.mkdir()
        # pool sockets need short paths (108 bytes), so the pools live under /tmp
        self.pools = Path(tempfile.mkdtemp(prefix="pinlab-shards-"))
        self.procs: list[subprocess.Popen[bytes]] = []

    def matrix(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PINLAB_POOL_DIR": str(self.pools / name)}
        for k in ("PINLAB_SHARD", "CI_NODE_INDEX", "CI_NODE_TOTAL", "JOB_COMPLETION_INDEX"):
            env.pop(k, None)
        log = (self.out / f"{name}.log").open("wb")
        p = subprocess.Popen([sys.executable, "-m", "pinlab.cli", "matrix", *SLICE,
                              "--out", str(self.out / name), *extra], stdout=log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        log.close()
        self.procs.append(p)
        return p

    def finish(self, p: subprocess.Popen[bytes], name: str) -> dict[str, Any]:
        try:
            rc = p.wait(timeout=RUN_DEADLINE)
        except subprocess.TimeoutExpired:
            self.fail(f"pinlab matrix {name} hung; log {self.out / f'{name}.log'}")
        # 0: every cell matched; 1: some did not (compared below). Anything else: a crash.
        self.assertIn(rc, (0, 1), f"{name} exited {rc}; log {self.out / f'{name}.log'}")
        doc = json.loads((self.out / name / "verdicts.json").read_text())
        doc["rc"] = rc
        return doc

    def test_three_shards_merge_to_the_unsharded_run(self) -> None:
        names = [f"shard-{i}" for i in (1, 2, 3)]
        running = [self.matrix(n, "--shard", f"{i}/3") for i, n in enumerate(names, 1)]
        shards = [self.finish(p, n) for p, n in zip(running, names, strict=True)]
        whole = self.finish(self.matrix("whole"), "whole")

        from pinlab.orchestrator.cells import all_cells, select
        want = sorted(c.name for c in select(all_cells(KERNEL), [TAG]))
        self.assertEqual(sorted(whole["cells"]), want)
        for i, doc in enumerate(shards, 1):
            self.assertEqual(doc["selection"]["shard"], {"index": i, "total": 3})
            self.assertTrue(0 < len(doc["cells"]) < len(whole["cells"]), doc["cells"])
        merged_dir = self.out / "merged"
        res = subprocess.run([sys.executable, "-m", "pinlab.cli", "merge",
                              *[str(self.out / n) for n in names], "--out", str(merged_dir)],
                             capture_output=True, text=True, timeout=300, check=False)
        self.log.info("merge: rc %d\n%s%s", res.returncode, res.stdout, res.stderr)
        self.assertIn(res.returncode, (0, 1), res.stdout + res.stderr)
        merged = json.loads((merged_dir / "verdicts.json").read_text())

        self.assertEqual(sorted(merged["cells"]), sorted(whole["cells"]))
        self.assertEqual(len(merged["cells"]), len(set(merged["cells"])))
        got, want = outcome(merged), outcome(whole)
        diff = {c: (got.get(c), want.get(c)) for c in set(got) | set(want)
                if got.get(c) != want.get(c)}
        self.assertEqual(diff, {}, "merged shards differ from the unsharded run "
                         "(cell: (merged, unsharded))")
        self.assertEqual(res.returncode, whole["rc"])
        self.assertTrue((merged_dir / "junit.xml").is_file())
        self.assertTrue((merged_dir / "html" / "index.html").is_file())
        # every shard and the whole run booted their own guest, and none is left running
        for n in [*names, "whole"]:
            self.assertTrue(list((self.pools / n / KERNEL).glob("boot-*")), n)
        left = subprocess.run(["pgrep", "-f", f"--dir {self.pools}"], capture_output=True,
                              text=True, check=False).stdout.split()
        self.assertEqual(left, [], "pool processes left behind")

    def tearDown(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # keep the guests' artifacts with the test's logs, then drop the socket dirs
        for d in self.pools.glob("*"):
            shutil.copytree(d, self.out / f"pools-{d.name}", ignore=shutil.ignore_patterns(
                "*.sock", "*.img", "*.qcow2"), dirs_exist_ok=True)
        shutil.rmtree(self.pools, ignore_errors=True)
