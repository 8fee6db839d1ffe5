"""``pinlab validate`` end to end on the prebuilt path: Debian 6.1 as base, 6.12 as
candidate, a small longterm slice. 6.5 refuses writable FOLL_LONGTERM pins of dirty-tracked
MAP_SHARED files (8ac268436e6d, mm/gup.c writable_file_mapping_allowed), so on 6.12 the
longterm ext4/xfs cells become PIN_REFUSED(EFAULT): the ones that lose data on 6.1 are a
``fix``, the ones that were coherent are ``changed``, the rest ``unchanged``; every class
must agree with each kernel's own row in expectations.toml (its matrix result).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from avocado import Test

from pinlab.orchestrator.expectations import Cell, expect, load
from pinlab.testrun import leftover_processes

# ext4 truncate loses data on 6.1 (fix), xfs dma-write is coherent (changed), memfd truncate
# loses data on both (unchanged). Cells without options only (-option: no +readonly/+fast).
SLICE = ["mode:longterm,backing:ext4,event:truncate,-option",
         "mode:longterm,backing:xfs,event:dma-write,-option",
         "mode:longterm,backing:memfd,event:truncate,-option"]
WANT = {"longterm/ext4/truncate": "fix", "longterm/xfs/dma-write": "changed",
        "longterm/memfd/truncate": "unchanged"}


class ValidatePrebuilt(Test):
    """:avocado: enable"""

    timeout = 1500

    def test_debian_6_1_to_6_12_longterm(self) -> None:
        """
        :avocado: tags=guest,validate,kernel:6.12,kernel:6.1,mode:longterm
        """
        out = Path(self.logdir) / "validate"
        # pools of their own (a short path: the pool's socket name must fit sun_path)
        pools = Path(tempfile.mkdtemp(prefix="pinlab-validate-"))
        env = {**os.environ, "PINLAB_POOL_DIR": str(pools)}
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "pinlab", "validate", "--base-kernel", "6.1",
               "--candidate-kernel", "6.12", "--out", str(out),
               *[f"--tags={t}" for t in SLICE]]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=1400, check=False)
        finally:
            for k in ("6.1", "6.12"):       # the pools' own logs join the test's
                log = pools / k / "pool.log"
                if log.exists():
                    shutil.copy(log, Path(self.logdir) / f"pool-{k}.log")
        wall = time.monotonic() - t0
        (Path(self.logdir) / "validate.out").write_text(proc.stdout + proc.stderr)
        self.whiteboard = json.dumps({"wall_seconds": round(wall, 1), "rc": proc.returncode})
        self.log.info("validate took %.1f s, exit %d", wall, proc.returncode)
        # this run's pools and guests name its pool directory on their command lines
        left = [p for p in leftover_processes() if str(pools) in p]
        self.assertEqual(left, [], "processes left behind by validate")
        shutil.rmtree(pools, ignore_errors=True)
        self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])

        doc = json.loads((out / "validate.json").read_text())
        got = {r["cell"]: r for r in doc["results"]}
        self.assertEqual({c: r["result"] for c, r in got.items()}, WANT)
        rules = load()
        for cid, r in got.items():
            mode, backing, event = cid.split("/")
            for role, kernel in (("base", "6.1"), ("candidate", "6.12")):
                exp = expect(Cell(kernel, mode, backing, event), rules)
                assert exp is not None
                for a in r["attempts"][role]:
                    if not a["infra"]:
                        self.assertEqual(a["observed"], exp.expected, f"{cid} on {kernel}")
            # a cell that differs is re-run on fresh guests on both kernels; every attempt
            # is recorded (with the infrastructure failures retried, if any)
            reruns = 3 if WANT[cid] != "unchanged" else 0
            for role in ("base", "candidate"):
                atts = [a for a in r["attempts"][role] if not a["infra"]]
                self.assertEqual(len(atts), 1 + reruns, r["attempts"][role])
                self.assertTrue(all(a["fresh"] for a in r["attempts"][role][1:]))
                self.assertEqual(len({a["boot"] for a in atts}), len(atts),
                                 "each rerun needs its own boot")
        self.assertEqual(got["longterm/ext4/truncate"]["base"], "WRITES_LOST_SILENTLY")
        self.assertEqual(got["longterm/ext4/truncate"]["candidate"], "PIN_REFUSED(EFAULT)")

        # the other reports, from the same run
        from kcidb_io.schema import LATEST

        LATEST.validate(json.loads((out / "kcidb.json").read_text()))
        suite = ET.parse(out / "junit.xml").getroot()
        self.assertEqual(suite.get("tests"), "3")
        self.assertEqual(suite.get("failures"), "0")
        ktap = (out / "ktap.txt").read_text().splitlines()
        self.assertEqual(ktap[0], "KTAP version 1")
        self.assertIn("1..3", ktap)
        summary = (out / "summary.md").read_text()
        self.assertIn("### fix: longterm/ext4/truncate", summary)
        self.assertIn("no regression (exit 0)", summary)
