"""pinlab.common.jsonlines: the framing of every JSON-lines channel (pool, workbench, guest
agent, the device's QMP replies). Real sockets and pipes, no mocks."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import unittest
from pathlib import Path
from typing import Any

from pinlab.common import jsonlines as jl


class Encode(unittest.TestCase):
    def test_one_line_whatever_the_value(self) -> None:
        obj = {"text": "a\nb\r\nc", "n": [1, 2.5, None], "ü": "\u2028"}
        data = jl.encode(obj)
        self.assertTrue(data.endswith(b"\n"))
        self.assertEqual(data.count(b"\n"), 1)
        self.assertEqual(jl.decode(data), obj)

    def test_qmp_style(self) -> None:
        self.assertEqual(jl.encode({"a": 1, "b": [1, 2]}, compact=True, eol=b"\r\n"),
                         b'{"a":1,"b":[1,2]}\r\n')

    def test_default(self) -> None:
        self.assertEqual(jl.decode(jl.encode({"p": Path("/x")}, default=str)), {"p": "/x"})
        with self.assertRaises(TypeError):
            jl.encode({"p": Path("/x")})


class Split(unittest.TestCase):
    def test_partial_reads_byte_by_byte(self) -> None:
        objs = [{"op": "run", "i": i, "s": "x" * i} for i in range(5)]
        stream = b"".join(jl.encode(o) for o in objs)
        sp = jl.Splitter()
        got = []
        for i in range(len(stream)):
            sp.feed(stream[i:i + 1])
            while (line := sp.line()) is not None:
                got.append(jl.decode(line))
        self.assertEqual(got, objs)
        self.assertEqual(sp.pending, 0)
        sp.eof()   # nothing pending: no error

    def test_several_lines_in_one_chunk_and_crlf(self) -> None:
        sp = jl.Splitter()
        sp.feed(b'{"a":1}\r\n{"b":2}\n{"c"')
        self.assertEqual(jl.decode(sp.line()), {"a": 1})   # json ignores the \r
        self.assertEqual(jl.decode(sp.line()), {"b": 2})
        self.assertIsNone(sp.line())
        sp.feed(b":3}\n")
        self.assertEqual(jl.decode(sp.line()), {"c": 3})

    def test_oversize_line_is_refused_and_skipped(self) -> None:
        sp = jl.Splitter(max_line=16)
        sp.feed(b'{"big": "' + b"y" * 40)   # no newline yet, already too long
        with self.assertRaises(jl.LineTooLong) as cm:
            sp.line()
        self.assertIn("16 bytes", str(cm.exception))
        sp.feed(b"y" * 100)                   # the rest of the long line is dropped
        self.assertIsNone(sp.line())
        sp.feed(b'"}\n{"ok":1}\n')
        self.assertEqual(jl.decode(sp.line()), {"ok": 1})
        self.assertEqual(sp.pending, 0)

    def test_oversize_complete_line(self) -> None:
        sp = jl.Splitter(max_line=8)
        sp.feed(b'{"aaaaaaaaaa":1}\n{"b":2}\n')
        with self.assertRaises(jl.LineTooLong):
            sp.line()
        self.assertEqual(jl.decode(sp.line()), {"b": 2})

    def test_exactly_max_line_is_accepted(self) -> None:
        line = b'{"a":"' + b"z" * 10 + b'"}'
        sp = jl.Splitter(max_line=len(line))
        sp.feed(line)
        self.assertIsNone(sp.line())         # complete only with its newline
        sp.feed(b"\n")
        self.assertEqual(sp.line(), line)

    def test_eof_mid_line(self) -> None:
        sp = jl.Splitter()
        sp.feed(b'{"op": "pi')
        self.assertIsNone(sp.line())
        with self.assertRaises(jl.Truncated):
            sp.eof()

    def test_malformed(self) -> None:
        for bad in (b"{not json", b'{"a": 1', b"\xff\xfe", b"[1,", b""):
            with self.subTest(bad=bad), self.assertRaises(jl.MalformedLine):
                jl.decode(bad)
        with self.assertRaises(jl.MalformedLine):
            jl.decode_object(b"[1, 2]")
        self.assertTrue(issubclass(jl.MalformedLine, ValueError))


class ReadFromPipe(unittest.TestCase):
    def reader(self, chunks: list[bytes], max_line: int = jl.MAX_LINE) -> jl.Reader:
        r, w = os.pipe()

        def write() -> None:
            for c in chunks:
                os.write(w, c)
                time.sleep(0.01)   # separate reads on the other side
            os.close(w)

        t = threading.Thread(target=write)
        t.start()
        self.addCleanup(t.join)
        self.addCleanup(os.close, r)
        return jl.Reader(lambda n: os.read(r, n), max_line)

    def test_objects_across_writes_then_clean_eof(self) -> None:
        rd = self.reader([b'{"a":', b'1}\n\n{"b"', b":2}\n"])
        self.assertEqual(rd.read_object(), {"a": 1})
        self.assertEqual(rd.read_object(), {"b": 2})   # the empty line is skipped
        with self.assertRaises(EOFError):
            rd.read()

    def test_eof_mid_line(self) -> None:
        rd = self.reader([b'{"a":1}\n{"b":'])
        self.assertEqual(rd.read(), {"a": 1})
        with self.assertRaises(jl.Truncated):
            rd.read()

    def test_oversize_then_next(self) -> None:
        rd = self.reader([b"[" + b"1," * 600, b"1]\n", b'{"after":1}\n'], max_line=256)
        with self.assertRaises(jl.LineTooLong):
            rd.read()
        self.assertEqual(rd.read_object(), {"after": 1})

    def test_not_an_object(self) -> None:
        rd = self.reader([b"42\n"])
        with self.assertRaises(jl.MalformedLine):
            rd.read_object()


class WaitLine(unittest.TestCase):
    def test_deadline_and_eof(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(a.close)

        def recv(left: float) -> bytes:
            a.settimeout(min(left, 0.05))
            return a.recv(4096)

        sp = jl.Splitter()
        self.assertIsNone(jl.wait_line(sp, recv, time.monotonic() + 0.2))   # silence
        b.sendall(b'{"x":1}\n{"y"')
        self.assertEqual(jl.wait_line(sp, recv, time.monotonic() + 5), b'{"x":1}')
        b.close()
        with self.assertRaises(jl.Truncated):
            jl.wait_line(sp, recv, time.monotonic() + 5)


class Server(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)
        self.path = os.path.join(self.dir.name, "s.sock")
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(self.srv.close)
        self.srv.bind(self.path)
        self.srv.listen(4)
        self.stop = threading.Event()
        self.bad: list[Exception] = []

        def handle(req: dict[str, Any]) -> dict[str, Any]:
            if req.get("op") == "stop":
                self.stop.set()
            if req.get("op") == "path":
                return {"p": Path("/tmp/x")}      # answered with default=str
            return {"echo": req}

        self.thread = threading.Thread(
            target=jl.serve, args=(self.srv, handle),
            kwargs={"running": lambda: not self.stop.is_set(), "on_bad": self.bad.append,
                    "poll": 0.1, "conn_timeout": 2})
        self.thread.start()
        self.addCleanup(self.thread.join, 10)
        self.addCleanup(self.stop.set)

    def raw(self, data: bytes, shut: bool = True) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(5)
            c.connect(self.path)
            c.sendall(data)
            if shut:
                c.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := c.recv(65536):
                out += chunk
            return out

    def test_request_answer_and_stop(self) -> None:
        self.assertEqual(jl.request(self.path, {"op": "ping", "n": 1}, 5),
                         {"echo": {"op": "ping", "n": 1}})
        self.assertEqual(jl.request(self.path, {"op": "path"}, 5), {"p": "/tmp/x"})
        jl.request(self.path, {"op": "stop"}, 5)
        self.thread.join(5)
        self.assertFalse(self.thread.is_alive())

    def test_bad_requests_are_not_answered_and_the_server_goes_on(self) -> None:
        self.assertEqual(self.raw(b"{not json}\n"), b"")
        self.assertEqual(self.raw(b'{"op": "half'), b"")   # hung up mid-line
        self.assertEqual(self.raw(b"[1]\n"), b"")
        self.assertEqual(len(self.bad), 3, self.bad)
        self.assertIsInstance(self.bad[0], jl.MalformedLine)
        self.assertIsInstance(self.bad[1], jl.Truncated)
        self.assertEqual(json.loads(self.raw(jl.encode({"op": "ok"}))),
                         {"echo": {"op": "ok"}})

    def test_no_server(self) -> None:
        with self.assertRaises(OSError):
            jl.request(os.path.join(self.dir.name, "none.sock"), {"op": "x"}, 1)


if __name__ == "__main__":
    unittest.main()
