"""One warm-guest pool per kernel, however many clients start one at the same time."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from pathlib import Path
from typing import Any

from pinlab.orchestrator import poolclient


class PoolLockTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.old = os.environ.get("PINLAB_POOL_DIR")
        os.environ["PINLAB_POOL_DIR"] = self.tmp.name
        self.kernel = "6.12"

    def tearDown(self) -> None:
        poolclient.stop_all([self.kernel], wait=30)
        if self.old is None:
            os.environ.pop("PINLAB_POOL_DIR", None)
        else:
            os.environ["PINLAB_POOL_DIR"] = self.old
        self.tmp.cleanup()

    def _server(self) -> subprocess.Popen[bytes]:
        d = poolclient.pool_dir(self.kernel)
        return subprocess.Popen([sys.executable, "-m", "pinlab.orchestrator.pool", "--kernel",
                                 self.kernel, "--dir", str(d), "--idle", "60"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def test_a_second_pool_steps_aside(self) -> None:
        first = self._server()
        try:
            sock = poolclient.pool_dir(self.kernel) / "pool.sock"
            deadline = time.monotonic() + 60
            while not sock.exists() and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            pid = int(poolclient.request(self.kernel, {"op": "ping"}, timeout=30,
                                         start=False)["pid"])
            self.assertEqual(pid, first.pid)
            second = self._server()
            self.assertEqual(second.wait(timeout=60), poolclient.ANOTHER_POOL)
            self.assertEqual(poolclient.request(self.kernel, {"op": "ping"})["pid"], first.pid)
        finally:
            poolclient.stop_all([self.kernel], wait=30)
            first.wait(timeout=30)

    def test_concurrent_clients_share_one_pool(self) -> None:
        pids: list[Any] = []

        def ping() -> None:
            pids.append(poolclient.request(self.kernel, {"op": "ping"}, timeout=60)["pid"])

        threads = [threading.Thread(target=ping) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        self.assertEqual(len(pids), 4)
        self.assertEqual(len(set(pids)), 1, f"more than one pool answered: {pids}")
        self.assertTrue((Path(self.tmp.name) / self.kernel / "pool.sock").exists())

    def test_unknown_requests_are_errors(self) -> None:
        with self.assertRaises(poolclient.PoolError):
            poolclient.request(self.kernel, {"op": "frobnicate"}, timeout=30)
        with self.assertRaises(poolclient.PoolError):
            poolclient.request(self.kernel, {"op": "run", "cell": {
                "kernel": "6.1", "mode": "pin", "backing": "anon", "event": "dma-write"},
                "artifacts": self.tmp.name}, timeout=30)


if __name__ == "__main__":
    unittest.main()
