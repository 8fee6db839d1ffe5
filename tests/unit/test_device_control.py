"""QMP control socket, exercised with qemu.qmp's QMPClient and a raw socket."""

from __future__ import annotations

import asyncio
import json
import socket
import unittest

from qemu.qmp import ExecuteError, QMPClient

from pinlab.device import engine as E
from pinlab.device.testclient import Rig


class ControlTest(unittest.TestCase):
    def setUp(self) -> None:
        self.rig = Rig(audit=True)
        self.path = self.rig.server.control_path

    def tearDown(self) -> None:
        self.rig.close()

    def run_async(self, coro):  # noqa: ANN001, ANN201
        return asyncio.run(asyncio.wait_for(coro, 30))

    def test_qmpclient_commands(self) -> None:
        async def go() -> None:
            qmp = QMPClient("test")
            await qmp.connect(self.path)
            try:
                self.assertEqual(qmp.greeting.QMP.capabilities, [])
                names = {c["name"] for c in await qmp.execute("query-commands")}
                self.assertTrue({"query-status", "query-regions", "query-audit",
                                 "query-violations", "set-fault", "clear-fault",
                                 "query-commands"} <= names)
                st = await qmp.execute("query-status")
                self.assertTrue(st["connected"])
                self.assertTrue(st["engine"]["enabled"])
                self.assertIn("streams", st)
                self.assertEqual(await qmp.execute("query-regions"), [])
                f = await qmp.execute("set-fault", {"delay-irq-ms": 5, "drop-irq": True})
                self.assertEqual((f["delay-irq-ms"], f["drop-irq"]), (5, True))
                f = await qmp.execute("clear-fault", {"names": ["drop-irq"]})
                self.assertEqual((f["delay-irq-ms"], f["drop-irq"]), (5, False))
                await qmp.execute("clear-fault")
                for args in ({"bogus": 1}, {"drop-irq": 3}, {"delay-irq-ms": -1}):
                    with self.assertRaises(ExecuteError) as cm:
                        await qmp.execute("set-fault", args)
                    self.assertEqual(cm.exception.error_class, "GenericError")
                with self.assertRaises(ExecuteError) as cm:
                    await qmp.execute("no-such-command")
                self.assertEqual(cm.exception.error_class, "CommandNotFound")
                with self.assertRaises(ExecuteError):
                    await qmp.execute("query-audit", {"limit": "x"})
                with self.assertRaises(ExecuteError):
                    await qmp.execute("qmp_capabilities")
            finally:
                await qmp.disconnect()
        self.run_async(go())

    def test_audit_regions_and_events(self) -> None:
        d = self.rig.driver

        async def go() -> None:
            qmp = QMPClient("test")
            await qmp.connect(self.path)
            other = QMPClient("other")  # several clients at once
            await other.connect(self.path)
            try:
                with qmp.listener() as listener:
                    await asyncio.to_thread(d.cmd, E.OP_CREATE_REGION, 2, 4, 1)
                    pages = self.rig.pages(4)
                    await asyncio.to_thread(self.rig.map_pages, 2, 0, pages)
                    regions = await qmp.execute("query-regions")
                    self.assertEqual(regions[0]["region"], 2)
                    self.assertEqual(regions[0]["mapped_pages"], 4)
                    await asyncio.to_thread(d.cmd, E.OP_DMA_WRITE, 2, 0, 4 * 4096, 1)
                    await asyncio.to_thread(d.cmd, E.OP_INVALIDATE, 2, 0, 2)
                    await asyncio.to_thread(d.cmd, E.OP_DMA_WRITE, 2, 0, 8, 2)
                    await qmp.execute("set-fault", {"write-after-revoke": True})
                    await asyncio.to_thread(d.cmd, E.OP_INVALIDATE, 2, 2, 1)
                    await asyncio.to_thread(d.cmd, E.OP_FENCE)
                    await asyncio.to_thread(self.rig.client.reset)
                    names = []
                    while "DEVICE_RESET" not in names:
                        ev = await listener.get()
                        names.append(ev["event"])
                        self.assertIn("seconds", ev["timestamp"])
                        if ev["event"] == "VIOLATION":
                            self.assertEqual(ev["data"]["page"], 2)
                    self.assertEqual(names, ["INVALIDATE_ACK", "PAGE_FAULT", "INVALIDATE_ACK",
                                             "VIOLATION", "DEVICE_RESET"])
                audit = await other.execute("query-audit", {"region": 2, "kind": "access",
                                                            "limit": 3})
                self.assertEqual(len(audit["records"]), 3)
                self.assertTrue(all(r["region"] == 2 for r in audit["records"]))
                last = audit["records"][-1]["seq"]
                more = await other.execute("query-audit", {"since": last})
                self.assertTrue(all(r["seq"] > last for r in more["records"]))
                v = await other.execute("query-violations")
                self.assertEqual(v["count"], 1)
                self.assertEqual(v["violations"][0]["why"], "access after invalidate ack")
            finally:
                await qmp.disconnect()
                await other.disconnect()
        self.run_async(go())

    def test_raw_protocol(self) -> None:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(self.path)
        f = s.makefile("rwb")
        greeting = json.loads(f.readline())
        self.assertIn("version", greeting["QMP"])

        def call(text: bytes) -> dict:
            f.write(text)
            f.flush()
            return json.loads(f.readline())

        r = call(b'{"execute": "query-status", "id": 1}')
        self.assertEqual(r["error"]["class"], "CommandNotFound")  # before negotiation
        self.assertEqual(r["id"], 1)
        self.assertEqual(call(b'{"execute": "qmp_capabilities", "id": "a"}'),
                         {"return": {}, "id": "a"})
        self.assertEqual(call(b'[1, 2]\n')["error"]["class"], "GenericError")
        self.assertEqual(call(b'{"execute": 5}')["error"]["class"], "GenericError")
        self.assertEqual(call(b'{bad json}\n')["error"]["class"], "GenericError")
        f.write(b'{"execute": "query-')  # split across writes
        f.flush()
        r = call(b'regions", "id": {"x": [1]}}')
        self.assertEqual(r, {"return": [], "id": {"x": [1]}})
        s.close()


if __name__ == "__main__":
    unittest.main()
