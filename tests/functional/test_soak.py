"""Soak: a long odp stream under truncates and reclaims, in a guest (issue 14).

Not in the default set (its tags have no ``kernel:`` and no ``smoke``): run it with
``./pinlab.sh test --tags soak``. The duration comes from the ``soak_seconds`` parameter
(default 60). The device runs with a small audit bound so that the bound is exercised:
the audit file must stay within it, with zero violations and zero data mismatches.
"""

from __future__ import annotations

import json

from pinlab.common.vocab import guest_python
from pinlab.orchestrator.dmesg import classify
from pinlab.orchestrator.guesttest import GuestTest
from pinlab.orchestrator.session import GuestSession
from pinlab.orchestrator.vm import GuestConfig

AUDIT_MAX = 1 << 20  # a 60 s soak on TCG writes ~3 MB of audit records: the bound is hit


class SoakTest(GuestTest):
    """:avocado: enable"""

    timeout = 1800

    def test_odp_stream_soak(self) -> None:
        """
        :avocado: tags=guest,soak,mode:odp
        """
        seconds = float(self.params.get("soak_seconds", default=60))
        cfg = GuestConfig(device_args=["--audit-max-bytes", str(AUDIT_MAX)])
        with GuestSession.boot(self.kernel, self.artifacts, config=cfg) as s:
            self.remember(s)
            g = s.guest
            booted = len(g.dmesg("dmesg-before-soak.txt").splitlines())  # judge the soak only
            res = g.ssh.run(guest_python("odp_soak", "--seconds", f"{seconds:.0f}"),
                            timeout=seconds + 300)
            self.log.info("soak rc=%d\n%s\n%s", res.rc, res.out, res.err[-3000:])
            self.assertEqual(res.rc, 0, res.err[-2000:])
            guest = json.loads(res.out.strip().splitlines()[-1])
            status = s.device("query-status")
            violations = s.device("query-violations")["count"]
            audit = status["audit"]
            dm = classify("\n".join(g.dmesg().splitlines()[booted:]))
        audit_bytes = (self.artifacts / "audit.jsonl").stat().st_size
        figures = {"seconds": guest["seconds"], "accesses": audit["writes"] + audit["reads"],
                   "stream_chunks": guest["stream_chunks"], "actions": guest["actions"],
                   "revokes": audit["invalidate_acks"],
                   "kernel_invalidations": guest["invalidations"],
                   "violations": violations, "mismatches": guest["mismatches"],
                   "audit_bytes": audit_bytes, "audit_max": AUDIT_MAX,
                   "audit_truncated_at": audit["file_truncated_at"]}
        (self.artifacts / "soak.json").write_text(json.dumps(figures, indent=2))
        self.whiteboard = json.dumps(figures)
        self.log.info("soak figures: %s", figures)
        self.assertEqual(violations, 0, "device accessed pages after their revoke")
        self.assertEqual(guest["mismatches"], 0, "data mismatches in the odp region")
        self.assertLessEqual(audit_bytes, AUDIT_MAX, "audit file passed its bound")
        self.assertGreater(audit["invalidate_acks"], 0, "no revoke happened")
        if audit["file_truncated_at"]:  # the bound was reached: the file ends with a marker
            with open(self.artifacts / "audit.jsonl", "rb") as f:
                f.seek(max(0, audit_bytes - 4096))
                last = json.loads(f.read().splitlines()[-1])
            self.assertEqual(last["kind"], "truncated")
        self.assertEqual(dm.severe(), {}, f"kernel complained: {dm.severe()}")
