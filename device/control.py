"""Control socket speaking QMP: queries, fault injection and asynchronous events.

Compatible with ``qemu.qmp.QMPClient`` and ``qmp-shell``. Several clients may be connected
at once; each gets its own reader thread and a writer thread fed by a bounded queue, so a
slow client never blocks the device.

Layers as in qemu.qmp (protocol -> client): what the server writes is framed by
pinlab.common.jsonlines (one object per line, ``\r\n`` as QEMU ends them). What it reads
is not line-framed: QMP input is a stream of JSON values (QEMU's json-streamer accepts
several per line, or one across lines), so ``ControlClient._read_loop`` decodes it with
``json.JSONDecoder.raw_decode`` under the bounds of limits.py; ``dispatch`` and
``ControlServer.run`` are the QMP layer on top.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pinlab.common import jsonlines

from .device import Device
from .limits import (
    MAX_CONTROL_CLIENTS,
    MAX_JSON_DEPTH,
    MAX_QMP_INPUT,
    MAX_QMP_QUEUE,
    JsonDepthError,
    check_json_depth,
)
from .sched import device_thread
from .sockets import listen_unix, readable, remove_socket

log = logging.getLogger("pinlab.device.control")

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "pinlab-device"}
MAX_BUFFER = MAX_QMP_INPUT
EVENT_QUEUE = MAX_QMP_QUEUE
DIE_EXIT_CODE = 99
QMP_EOL = b"\r\n"


class QmpError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _int_arg(args: dict[str, Any], name: str, default: int | None, lo: int = 0,
             hi: int = 1 << 63) -> int | None:
    value = args.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise QmpError(f"Parameter '{name}' expects an integer in {lo}..{hi}")
    return value


class ControlClient:
    def __init__(self, server: ControlServer, conn: socket.socket) -> None:
        self.server = server
        self.conn = conn
        self.negotiated = False
        self.closed = False
        self.dropped_events = 0
        self.out: queue.Queue[bytes | None] = queue.Queue(EVENT_QUEUE)
        self.reader = threading.Thread(target=self._read_loop, name="qmp-reader", daemon=True)
        self.writer = threading.Thread(target=self._write_loop, name="qmp-writer", daemon=True)

    def start(self) -> None:
        self.writer.start()
        self.reader.start()

    def send(self, obj: dict[str, Any]) -> None:
        data = jsonlines.encode(obj, compact=True, eol=QMP_EOL)
        try:
            self.out.put_nowait(data)
        except queue.Full:
            self.dropped_events += 1

    def event(self, name: str, data: dict[str, Any], when: float) -> None:
        if self.negotiated and not self.closed:
            secs = int(when)
            self.send({"event": name, "data": data,
                       "timestamp": {"seconds": secs, "microseconds": int((when - secs) * 1e6)}})

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.dev.events.unsubscribe(self.event)
        with contextlib.suppress(queue.Full):
            self.out.put_nowait(None)
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)

    def _write_loop(self) -> None:
        device_thread()  # real-time while it holds the interpreter lock (sched.py)
        try:
            while (data := self.out.get()) is not None:
                self.conn.sendall(data)
        except OSError:
            pass
        finally:
            self.close()

    def _read_loop(self) -> None:
        device_thread()  # real-time while it holds the interpreter lock (sched.py)
        decoder = json.JSONDecoder()
        buf = ""
        self.send({"QMP": {"version": VERSION, "capabilities": []}})
        self.server.dev.events.subscribe(self.event)
        skipping = False  # dropping the rest of a refused (too deep) line
        try:
            while not self.closed:
                data = self.conn.recv(65536)
                if not data:
                    break
                text = data.decode("utf-8", errors="replace")
                if skipping:
                    if "\n" not in text:
                        continue
                    text = text.partition("\n")[2]
                    skipping = False
                buf += text
                if len(buf) > MAX_BUFFER:
                    self.send({"error": {"class": "GenericError", "desc": "input too long"}})
                    buf = ""
                try:
                    check_json_depth(buf)
                except JsonDepthError as exc:
                    self.send({"error": {"class": "GenericError", "desc":
                                         f"JSON nested deeper than {MAX_JSON_DEPTH} levels"}})
                    # one error per offending command: drop input to the end of its line
                    # (commands before it are lost with it: they were not complete JSON)
                    rest = buf[exc.pos:]
                    skipping = "\n" not in rest
                    buf = "" if skipping else rest.partition("\n")[2]
                while buf := buf.lstrip():
                    try:
                        obj, end = decoder.raw_decode(buf)
                    except RecursionError:  # not reached after check_json_depth; still safe
                        self.send({"error": {"class": "GenericError",
                                             "desc": "JSON nested too deep"}})
                        buf = ""
                        break
                    except json.JSONDecodeError as exc:
                        if ((exc.pos >= len(buf) or exc.msg.startswith("Unterminated"))
                                and "\n" not in buf[exc.pos:]):
                            break  # incomplete: wait for more input
                        self.send({"error": {"class": "GenericError",
                                             "desc": f"JSON parse error, {exc.msg}"}})
                        buf = ""
                        break
                    buf = buf[end:]
                    self.dispatch(obj)
        except OSError:
            pass
        finally:
            self.close()
            with contextlib.suppress(OSError):
                self.conn.close()
            self.server.forget(self)

    def dispatch(self, obj: object) -> None:
        if not isinstance(obj, dict) or "execute" not in obj:
            self.send({"error": {"class": "GenericError",
                                 "desc": "QMP input must be a JSON object with 'execute'"}})
            return
        reply: dict[str, Any]
        after: Callable[[], None] | None = None
        try:
            cmd = obj["execute"]
            args = obj.get("arguments", {})
            if not isinstance(cmd, str) or not isinstance(args, dict):
                raise QmpError("'execute' must be a string and 'arguments' an object")
            result, after = self.server.run(self, cmd, args)
            reply = {"return": result}
        except QmpError as exc:
            reply = {"error": {"class": exc.cls, "desc": exc.desc}}
        except Exception as exc:  # a control bug must not kill the connection
            log.exception("control command failed")
            reply = {"error": {"class": "GenericError", "desc": f"internal error: {exc}"}}
        if "id" in obj:
            reply["id"] = obj["id"]
        self.send(reply)
        if after is not None:
            after()


def _refuse(conn: socket.socket) -> None:
    """Tell a client over the limit why, without waiting for it, and hang up."""
    msg = {"error": {"class": "GenericError",
                     "desc": f"too many control clients (at most {MAX_CONTROL_CLIENTS})"}}
    with contextlib.suppress(OSError):
        conn.setblocking(False)
        conn.send(jsonlines.encode(msg, compact=True, eol=QMP_EOL))
    conn.close()


class ControlServer:
    def __init__(self, device: Device, path: str) -> None:
        self.dev = device
        self.path = path
        self.sock, self._ident = listen_unix(path, 8)
        self._lock = threading.Lock()
        self._clients: list[ControlClient] = []
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self.refused = 0  # connections refused: MAX_CONTROL_CLIENTS were connected
        self.thread = threading.Thread(target=self._accept_loop, name="qmp-accept", daemon=True)
        self.commands: dict[str, Callable[[dict[str, Any]], Any]] = {
            "query-status": self.query_status, "query-regions": self.query_regions,
            "query-audit": self.query_audit, "query-violations": self.query_violations,
            "set-fault": self.set_fault, "clear-fault": self.clear_fault,
            "query-commands": self.query_commands, "query-version": lambda a: VERSION,
        }

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self.thread.is_alive():
            self.thread.join(5)
        self.sock.close()
        with contextlib.suppress(OSError):
            remove_socket(self.path, self._ident)
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            c.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def forget(self, client: ControlClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    def _accept_loop(self) -> None:
        device_thread()  # real-time while it holds the interpreter lock (sched.py)
        while not self._stopping:
            r = readable([self.sock.fileno(), self._wake_r])
            if self._stopping:
                break
            if self.sock.fileno() in r:
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    continue
                with self._lock:
                    full = len(self._clients) >= MAX_CONTROL_CLIENTS
                if full:  # bounded: each client costs two threads
                    self.refused += 1
                    _refuse(conn)
                    continue
                client = ControlClient(self, conn)
                with self._lock:
                    self._clients.append(client)
                client.start()

    # --- commands -------------------------------------------------------------------
    def run(self, client: ControlClient, cmd: str, args: dict[str, Any]
            ) -> tuple[Any, Callable[[], None] | None]:
        if cmd == "qmp_capabilities":
            if client.negotiated:
                raise QmpError("Capabilities negotiation is already complete, command ignored",
                               "CommandNotFound")
            if args.get("enable"):
                raise QmpError("This server offers no QMP capabilities")
            client.negotiated = True
            return {}, None
        if not client.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           "CommandNotFound")
        fn = self.commands.get(cmd)
        if fn is None:
            raise QmpError(f"The command {cmd} has not been found", "CommandNotFound")
        if cmd == "set-fault" and args.get("die") is True:
            self.set_fault({k: v for k, v in args.items() if k != "die"})
            return {}, self._die
        return fn(args), None

    @staticmethod
    def _die() -> None:
        log.error("set-fault die: exiting now")
        time.sleep(0.2)  # let the writer thread flush the reply
        os._exit(DIE_EXIT_CODE)

    def query_commands(self, args: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": n} for n in ["qmp_capabilities", *self.commands]]

    def query_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.dev.status()

    def query_regions(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return self.dev.engine.region_list()

    def query_audit(self, args: dict[str, Any]) -> dict[str, Any]:
        since = _int_arg(args, "since", 0)
        region = _int_arg(args, "region", None, 0, 0xFFFFFFFF)
        limit = _int_arg(args, "limit", 1000, 1, 100000)
        kind = args.get("kind")
        if kind is not None and not isinstance(kind, str):
            raise QmpError("Parameter 'kind' expects a string")
        unknown = set(args) - {"since", "region", "limit", "kind"}
        if unknown:
            raise QmpError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
        records = self.dev.audit.query(since or 0, region, limit or 1000, kind)
        return {"records": records, "stats": self.dev.audit.stats()}

    def query_violations(self, args: dict[str, Any]) -> dict[str, Any]:
        since = _int_arg(args, "since", 0)
        limit = _int_arg(args, "limit", 1000, 1, 100000)
        found = self.dev.audit.violations(since or 0, limit or 1000)
        return {"violations": found, "count": self.dev.audit.stats()["violations"]}

    def set_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            self.dev.faults.update(args)
        except ValueError as exc:
            raise QmpError(str(exc)) from exc
        return self.dev.faults.as_dict()

    def clear_fault(self, args: dict[str, Any]) -> dict[str, Any]:
        names = args.get("names")
        if names is not None:
            if not isinstance(names, list) or not all(n in self.dev.faults.names()
                                                      for n in names):
                raise QmpError(f"'names' must be a list of: {', '.join(self.dev.faults.names())}")
            names = [n.replace("-", "_") for n in names]
        self.dev.faults.clear(names)
        return self.dev.faults.as_dict()
