"""The base of Avocado tests that boot their own guest."""

from __future__ import annotations

import json
from pathlib import Path

from avocado import Test

from .procs import process_alive
from .session import GuestSession


class GuestTest(Test):
    """Keeps artifacts under the test's logdir and fails if a guest process outlives it.

    :avocado: disable
    """

    timeout = 900

    def setUp(self) -> None:
        self.kernel = self.params.get("kernel", default="6.12")
        self.pids: list[int] = []
        self.artifacts = Path(self.logdir) / "guest"
        self.artifacts.mkdir(parents=True, exist_ok=True)

    def remember(self, s: GuestSession) -> None:
        """Note the guest's processes (checked in tearDown) and its versions."""
        g = s.guest
        self.pids = [c.pid for c in (g.qemu, g.device) if c is not None]
        self.whiteboard = json.dumps({"kernel": g.images.kernel.release, "accel": g.cfg.accel,
                                      "boot_seconds": round(g.boot_seconds, 2),
                                      "qemu": g.images.qemu.version})

    def tearDown(self) -> None:
        left = [p for p in self.pids if process_alive(p)]
        if left:
            self.fail(f"processes left behind after the guest was torn down: {left}")
