"""Newline-delimited JSON ("JSON Lines", https://jsonlines.org/): one JSON value per line,
UTF-8, each line ended by ``\\n``.

The framing layer of pinlab's request/response channels: the pool client and server
(orchestrator/poolclient.py, pool.py), the ``pinlab up`` control socket
(orchestrator/workbench.py), the guest agent and its host side (pinlab_agent.py,
orchestrator/agent.py) and the replies of the device's QMP control socket
(device/control.py). Standard library only: the guest imports it too, under the same
name (``pinlab.common.jsonlines``), from the files the host pushes.

Layers, as in qemu.qmp (protocol -> client): ``encode``/``decode`` and ``Splitter`` frame
bytes; ``Reader`` adds a byte source (a socket's ``recv``, ``os.read``); ``send``/
``recv_object``/``request``/``serve`` are one-request-per-connection client and server
helpers for Unix sockets. What a request means is left to the caller.

Every line is bounded (``max_line`` bytes, default ``MAX_LINE``): a longer one raises
``LineTooLong`` and is skipped up to its newline, so the stream stays usable. A line
that is not JSON raises ``MalformedLine``; an end of input after part of a line raises
``Truncated``. All three are ``FramingError`` (a ``ValueError``).
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

MAX_LINE = 64 << 20     # bytes; a pool answer carries a cell's evidence (a few MiB at most)
EOL = b"\n"


class FramingError(ValueError):
    """A line could not be framed or decoded."""


class LineTooLong(FramingError):
    """A line exceeded ``max_line`` bytes (without its newline)."""


class MalformedLine(FramingError):
    """A complete line that is not JSON (or not the expected type)."""


class Truncated(FramingError):
    """The input ended after part of a line."""


def encode(obj: Any, *, default: Callable[[Any], Any] | None = None,
           compact: bool = False, eol: bytes = EOL) -> bytes:
    """``obj`` as one line of UTF-8 JSON, ending with ``eol``.

    ``default`` is json.dumps's (e.g. ``str`` for paths); ``compact`` drops the spaces
    after separators; ``eol`` is ``b"\\r\\n"`` for QMP. Raises TypeError/ValueError for
    values JSON cannot hold. The encoding never contains a raw newline (json escapes it).
    """
    sep = (",", ":") if compact else None
    return json.dumps(obj, default=default, separators=sep).encode() + eol


def decode(line: bytes | str) -> Any:
    """One line (with or without its ending) as a JSON value. Raises MalformedLine."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError) as exc:   # UnicodeDecodeError is a ValueError
        raise MalformedLine(f"not a JSON line: {exc} in {line[:200]!r}") from exc


def decode_object(line: bytes | str) -> dict[str, Any]:
    """``decode`` for a line that must hold a JSON object. Raises MalformedLine."""
    obj = decode(line)
    if not isinstance(obj, dict):
        raise MalformedLine(f"a JSON object was expected, got {type(obj).__name__}")
    return obj


class Splitter:
    """Cuts a byte stream fed in pieces of any size into lines.

    ``feed(data)`` then ``line()`` until it returns None. ``line()`` raises LineTooLong
    once the pending partial line passes ``max_line`` bytes, and drops the rest of that
    line as it arrives (the next ``line()`` is the line after it). ``eof()`` raises
    Truncated when input ended in the middle of a line.
    """

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.max_line = max_line
        self._buf = bytearray()
        self._skipping = False   # dropping the rest of a line that was too long

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a line."""
        return len(self._buf)

    def line(self) -> bytes | None:
        """The next complete line without its ``\\n`` (a trailing ``\\r`` is kept), or
        None when none is complete yet. Raises LineTooLong (see the class)."""
        while True:
            nl = self._buf.find(b"\n")
            if self._skipping:
                if nl < 0:
                    self._buf.clear()
                    return None
                del self._buf[:nl + 1]
                self._skipping = False
                continue
            if nl < 0:
                if len(self._buf) > self.max_line:
                    size = len(self._buf)
                    self._buf.clear()
                    self._skipping = True
                    raise LineTooLong(f"line longer than {self.max_line} bytes "
                                      f"({size} so far without a newline)")
                return None
            if nl > self.max_line:
                del self._buf[:nl + 1]
                raise LineTooLong(f"line of {nl} bytes, longer than {self.max_line}")
            out = bytes(self._buf[:nl])
            del self._buf[:nl + 1]
            return out

    def eof(self) -> None:
        """The input ended. Raises Truncated when part of a line is pending."""
        if self._buf and not self._skipping:
            n = len(self._buf)
            self._buf.clear()
            raise Truncated(f"input ended after {n} bytes of an unfinished line")


class Reader:
    """Lines and JSON values from a blocking byte source ``recv(n) -> bytes`` (b"" at end
    of input): a socket's ``recv``, ``lambda n: os.read(fd, n)``.

    Errors of ``recv`` (OSError, TimeoutError) propagate; the framing errors are those of
    ``Splitter``. Empty lines are skipped by ``read``/``read_object``.
    """

    def __init__(self, recv: Callable[[int], bytes], max_line: int = MAX_LINE,
                 chunk: int = 65536) -> None:
        self.recv, self.chunk = recv, chunk
        self.splitter = Splitter(max_line)

    def read_line(self) -> bytes | None:
        """The next line, or None at a clean end of input. Raises Truncated, LineTooLong."""
        while (line := self.splitter.line()) is None:
            data = self.recv(self.chunk)
            if not data:
                self.splitter.eof()
                return None
            self.splitter.feed(data)
        return line

    def read(self) -> Any:
        """The next non-empty line's JSON value; raises EOFError at a clean end of input,
        and the framing errors."""
        while True:
            line = self.read_line()
            if line is None:
                raise EOFError("end of input")
            if line.strip():
                return decode(line)

    def read_object(self) -> dict[str, Any]:
        """``read`` for a JSON object. Raises MalformedLine for another value."""
        obj = self.read()
        if not isinstance(obj, dict):
            raise MalformedLine(f"a JSON object was expected, got {type(obj).__name__}")
        return obj


# ----------------------------------------------------------------------- Unix sockets
def send(conn: socket.socket, obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as one line. Raises OSError from the socket."""
    conn.sendall(encode(obj, default=default))


def recv_object(conn: socket.socket, max_line: int = MAX_LINE) -> dict[str, Any]:
    """Read one JSON object line from ``conn`` (its own timeout applies). Raises
    EOFError, FramingError or OSError."""
    return Reader(conn.recv, max_line).read_object()


def request(path: str, req: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Connect to the Unix socket ``path``, send ``req``, return the one object answered.
    Every step is bounded by ``timeout`` seconds. Raises OSError (no server, timeout),
    EOFError (closed without an answer) or FramingError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(timeout)
        c.connect(path)
        send(c, req)
        return recv_object(c)


def serve(srv: socket.socket, handle: Callable[[dict[str, Any]], dict[str, Any]], *,
          running: Callable[[], bool], on_bad: Callable[[Exception], None],
          conn_timeout: float = 30.0, poll: float = 1.0) -> None:
    """Answer one request per connection on the listening socket ``srv`` until
    ``running()`` is false: read one object, write ``handle(req)`` back as one line
    (``default=str``), close. ``running`` is checked at least every ``poll`` seconds and
    after each request (``handle`` may make it false: a "stop" request). A request that
    cannot be read goes to ``on_bad`` and is not answered; exceptions of ``handle``
    propagate (a server that must keep going catches them there). A client that
    hangs up before the answer is ignored."""
    srv.settimeout(poll)
    while running():
        try:
            conn, _ = srv.accept()
        except (TimeoutError, InterruptedError):
            continue
        with conn:
            conn.settimeout(conn_timeout)
            try:
                req = recv_object(conn)
            except (OSError, EOFError, FramingError) as exc:
                on_bad(exc)
                continue
            resp = handle(req)
            with contextlib.suppress(OSError):
                send(conn, resp, default=str)


def wait_line(splitter: Splitter, recv: Callable[[float], bytes], deadline: float
              ) -> bytes | None:
    """The next line from ``splitter``, receiving with ``recv(seconds_left)`` (which
    returns b"" at end of input, and may raise TimeoutError for a quiet interval) until
    the monotonic ``deadline``. Returns None when the deadline passed; raises EOFError
    at the end of input (Truncated if it ended mid-line) and LineTooLong."""
    while (line := splitter.line()) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            data = recv(left)
        except TimeoutError:
            continue
        if not data:
            splitter.eof()
            raise EOFError("end of input")
        splitter.feed(data)
    return line
