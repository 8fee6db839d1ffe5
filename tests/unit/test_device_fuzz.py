"""Property test: well-framed messages with arbitrary payloads never break the server."""

from __future__ import annotations

import unittest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinlab.device import protocol as P
from pinlab.device.testclient import GuestRam, LocalServer


class FuzzTest(unittest.TestCase):
    def setUp(self) -> None:
        self.srv = LocalServer()
        self.ram = GuestRam(1 << 20)
        self.c = self.srv.client()
        self.c.bring_up(self.ram)

    def tearDown(self) -> None:
        self.c.close()
        self.srv.close()
        self.ram.close()

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(command=st.integers(0, 20), payload=st.binary(max_size=80),
           no_reply=st.booleans())
    def test_random_payloads_keep_the_stream_in_sync(self, command: int, payload: bytes,
                                                     no_reply: bool) -> None:
        flags = P.FLAG_NO_REPLY if no_reply else 0
        msg_id = self.c.send(command, payload, flags=flags)
        if not no_reply:
            rep = self.c.recv()
            self.assertEqual((rep.msg_id, rep.command, rep.msg_type), (msg_id, command, 1))
            if rep.flags & P.FLAG_ERROR:
                self.assertEqual(rep.size, 16)
                self.assertNotEqual(rep.error_no, 0)
            else:
                self.assertLessEqual(rep.size, max(16 + len(payload), 32 + 4096))
        # the connection is still in sync and the device still answers
        self.assertEqual(self.c.get_info()[2], 9)
        self.assertEqual(self.c.reg_read(0x000), 0x50494E4C)


if __name__ == "__main__":
    unittest.main()
