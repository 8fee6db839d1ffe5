"""vfio-user server: Unix socket, one client at a time, messages handled strictly in order."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Callable

from . import protocol as P
from .device import Device
from .limits import MESSAGE_TIMEOUT, check_json_depth
from .mirror import MIRROR_OFFSET, PAGE
from .protocol import Message, MessageError, ProtocolError
from .sched import device_thread
from .sockets import listen_unix, readable, remove_socket

log = logging.getLogger("pinlab.device.server")

Reply = tuple[bytes, list[int]]
# VERSION capabilities we understand and the JSON type each must have (spec: "Version")
CAPABILITY_TYPES: dict[str, type] = {
    "max_msg_fds": int, "max_data_xfer_size": int, "pgsizes": int, "max_dma_maps": int,
    "migration": dict, "twin_socket": dict, "write_multiple": bool,
}


def version_reply_json() -> bytes:
    caps = {"capabilities": {"max_msg_fds": P.MAX_MSG_FDS, "max_data_xfer_size": P.MAX_DATA_XFER,
                             "pgsizes": P.PGSIZE, "max_dma_maps": P.MAX_DMA_MAPS}}
    return json.dumps(caps, separators=(",", ":")).encode() + b"\0"


class Session:
    """The state of one client connection and its message handlers."""

    def __init__(self, device: Device) -> None:
        self.dev = device
        self.negotiated = False
        self.reply_fds: list[int] = []  # fds the next reply carries (not ours to close)
        self.handlers: dict[int, Callable[[Message], bytes]] = {
            P.VERSION: self.version, P.DMA_MAP: self.dma_map, P.DMA_UNMAP: self.dma_unmap,
            P.DEVICE_GET_INFO: self.get_info, P.DEVICE_GET_REGION_INFO: self.region_info,
            P.DEVICE_GET_IRQ_INFO: self.irq_info, P.DEVICE_SET_IRQS: self.set_irqs,
            P.REGION_READ: self.region_read, P.REGION_WRITE: self.region_write,
            P.DEVICE_RESET: self.device_reset,
        }

    def handle(self, msg: Message) -> bytes | None:
        """Handle one command; returns the reply bytes, or None when none may be sent."""
        try:
            handler = self.handlers.get(msg.command)
            if handler is None:
                raise MessageError(errno.ENOSYS, f"unsupported command {msg.command}")
            if not self.negotiated and msg.command != P.VERSION:
                raise MessageError(errno.EINVAL, f"{msg.name()} before VERSION")
            out = handler(msg)
        except MessageError as exc:
            log.warning("%s (id %d): %s", msg.name(), msg.msg_id, exc)
            out = P.error_reply(msg, exc.errno)
        except Exception:
            log.exception("%s (id %d) failed", msg.name(), msg.msg_id)
            out = P.error_reply(msg, errno.EIO)
        finally:
            msg.close_fds()  # handlers take the fds they keep
        return None if msg.no_reply else out  # P1

    # --- handlers -------------------------------------------------------------------
    def version(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, 5, at_least=True)
        major = int.from_bytes(msg.payload[0:2], "little")
        minor = int.from_bytes(msg.payload[2:4], "little")
        if major != 0:
            raise MessageError(errno.ENOTSUP, f"protocol major {major}")
        text = msg.payload[4:]
        if not text.endswith(b"\0"):
            raise MessageError(errno.EINVAL, "VERSION JSON not NUL-terminated")
        try:
            raw = text[:-1].decode()
            check_json_depth(raw)
            body = json.loads(raw or "{}")
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # JsonDepthError too
            raise MessageError(errno.EINVAL, f"VERSION JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise MessageError(errno.EINVAL, "VERSION JSON is not an object")
        check_capabilities(body)
        log.info("client version %d.%d %s", major, minor, body)
        # P2: the reply must fit QEMU's buffer (the request's size): the full capabilities,
        # else none, else the minimal valid payload "{}" (a request can be no smaller)
        head = (0).to_bytes(2, "little") * 2
        for json_text in (version_reply_json(), b'{"capabilities":{}}\0', b"{}\0"):
            payload = head + json_text
            if P.HDR_SIZE + len(payload) <= msg.size:
                break
        else:
            raise MessageError(errno.EINVAL, "VERSION request too small for a reply")
        self.negotiated = True
        return P.reply(msg, payload)

    def dma_map(self, msg: Message) -> bytes:
        P.expect_size(msg, P.DMA_MAP_S.size)
        argsz, flags, offset, iova, size = P.DMA_MAP_S.unpack(msg.payload)
        fds = msg.take_fds()
        if len(fds) > 1 or flags & ~(P.DMA_FLAG_READ | P.DMA_FLAG_WRITE) or argsz < 32:
            for fd in fds:
                P.close_quietly(fd)
            raise MessageError(errno.EINVAL, f"bad DMA_MAP flags={flags:#x} fds={len(fds)}")
        fd = fds[0] if fds else None
        try:
            # fd-less and read-only maps are accepted (P8: QEMU never sends a RAM map we
            # could refuse); an fd we cannot map, an overlap or one map too many is not
            self.dev.memory.map(iova, size, flags, offset, fd)
        except OSError as exc:
            raise MessageError(exc.errno or errno.EINVAL,
                               f"DMA_MAP {iova:#x}+{size:#x}: {exc}") from exc
        except (ValueError, OverflowError) as exc:
            raise MessageError(errno.EINVAL, f"DMA_MAP {iova:#x}+{size:#x}: {exc}") from exc
        log.debug("DMA_MAP iova=%#x size=%#x flags=%d offset=%#x fd=%s", iova, size, flags,
                  offset, fd is not None)
        return P.reply(msg)

    def dma_unmap(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, P.DMA_UNMAP_S.size)
        argsz, flags, iova, size = P.DMA_UNMAP_S.unpack(msg.payload)
        if flags & ~P.DMA_UNMAP_FLAG_ALL or argsz < 24:
            raise MessageError(errno.EINVAL, f"bad DMA_UNMAP flags={flags:#x}")
        if flags & P.DMA_UNMAP_FLAG_ALL:
            self.dev.memory.unmap_all()
        elif size == 0 or iova + size > 1 << 64:
            raise MessageError(errno.EINVAL, f"DMA_UNMAP range {iova:#x}+{size:#x}")
        elif not self.dev.memory.unmap(iova, size):
            raise MessageError(errno.ENOENT, f"DMA_UNMAP {iova:#x}+{size:#x}: not mapped")
        return P.reply(msg, msg.payload)  # echo, as libvfio-user does

    def get_info(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, P.DEVICE_INFO_S.size)
        return P.reply(msg, P.DEVICE_INFO_S.pack(
            16, P.DEVICE_FLAGS_RESET | P.DEVICE_FLAGS_PCI, P.PCI_NUM_REGIONS, P.PCI_NUM_IRQS))

    def region_info(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, P.REGION_INFO_S.size)
        argsz, _flags, index, _cap, _size, _off = P.REGION_INFO_S.unpack(msg.payload)
        if argsz < P.REGION_INFO_S.size:
            raise MessageError(errno.EINVAL, f"REGION_INFO argsz {argsz}")
        flags, size = self.dev.pci.region_info(index)
        if not flags & P.REGION_INFO_FLAG_CAPS:
            return P.reply(msg, P.REGION_INFO_S.pack(P.REGION_INFO_S.size, flags, index, 0, size,
                                                     0))
        # BAR0: one sparse mmap area, the register mirror page, backed by the fd sent with
        # the reply (the client maps fd offset info.offset + area.offset)
        caps = (P.CAP_HEADER_S.pack(P.REGION_INFO_CAP_SPARSE_MMAP, 1, 0)
                + P.SPARSE_MMAP_S.pack(1, 0) + P.SPARSE_AREA_S.pack(MIRROR_OFFSET, PAGE))
        need = P.REGION_INFO_S.size + len(caps)
        self.reply_fds = [self.dev.engine.mirror.fd]
        if argsz < need:  # VFIO rule: say how much room the caps need; the client retries
            # (no CAPS flag without caps: QEMU refuses a cap_offset outside the reply)
            return P.reply(msg, P.REGION_INFO_S.pack(need, flags & ~P.REGION_INFO_FLAG_CAPS,
                                                     index, 0, size, 0))
        return P.reply(msg, P.REGION_INFO_S.pack(need, flags, index, P.REGION_INFO_S.size,
                                                 size, 0) + caps)

    def irq_info(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, P.IRQ_INFO_S.size)
        argsz, _flags, index, _count = P.IRQ_INFO_S.unpack(msg.payload)
        if argsz < 16:
            raise MessageError(errno.EINVAL, f"IRQ_INFO argsz {argsz}")
        flags, count = self.dev.irq.info(index)
        return P.reply(msg, P.IRQ_INFO_S.pack(16, flags, index, count))

    def set_irqs(self, msg: Message) -> bytes:
        fds = msg.take_fds()
        if len(msg.payload) < P.IRQ_SET_S.size:
            for fd in fds:
                P.close_quietly(fd)
            raise MessageError(errno.EINVAL, "SET_IRQS too short")
        argsz, flags, index, start, count = P.IRQ_SET_S.unpack_from(msg.payload)
        data = msg.payload[P.IRQ_SET_S.size:]
        if argsz < 20 or argsz > len(msg.payload):
            for fd in fds:
                P.close_quietly(fd)
            raise MessageError(errno.EINVAL, f"SET_IRQS argsz {argsz}")
        self.dev.irq.set_irqs(flags, index, start, count, fds, data)
        return P.reply(msg)

    def region_read(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, P.REGION_RW_S.size)
        offset, index, count = P.REGION_RW_S.unpack(msg.payload)
        if count > P.MAX_DATA_XFER:
            raise MessageError(errno.E2BIG, f"REGION_READ count {count}")
        data = self.dev.pci.read(index, offset, count)
        return P.reply(msg, msg.payload + data)

    def region_write(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, P.REGION_RW_S.size, at_least=True)
        offset, index, count = P.REGION_RW_S.unpack_from(msg.payload)
        data = msg.payload[P.REGION_RW_S.size:]
        if count != len(data):
            raise MessageError(errno.EINVAL, f"REGION_WRITE count {count} != {len(data)}")
        self.dev.pci.write(index, offset, data)
        return P.reply(msg, msg.payload[:P.REGION_RW_S.size])

    def device_reset(self, msg: Message) -> bytes:
        P.expect_no_fds(msg)
        P.expect_size(msg, 0)
        self.dev.reset("vfio-user")
        return P.reply(msg)


def check_capabilities(body: dict[str, object]) -> None:
    """Refuse (EINVAL) VERSION capabilities of the wrong JSON type. Unknown names are
    ignored, as the spec asks."""
    caps = body.get("capabilities", {})
    if not isinstance(caps, dict):
        raise MessageError(errno.EINVAL, "VERSION 'capabilities' is not an object")
    for name, value in caps.items():
        want = CAPABILITY_TYPES.get(name)
        if want is None:
            continue
        ok = isinstance(value, want) and (want is bool or not isinstance(value, bool))
        if not ok or (want is int and value < 0):  # type: ignore[operator]
            raise MessageError(errno.EINVAL, f"VERSION capability {name!r}: {value!r}")


class VfioUserServer:
    """Listens on a Unix socket; serves one client at a time until :meth:`stop`."""

    def __init__(self, device: Device, path: str) -> None:
        self.dev = device
        self.path = path
        self.sock, self._ident = listen_unix(path, 1)
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._conn: socket.socket | None = None
        self.failed: list[str] = []  # why connections were failed by the device
        device.fail_client = self.fail_connection
        self.thread = threading.Thread(target=self.serve_forever, name="vfio-user",
                                       daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(10)
        self.sock.close()
        with contextlib.suppress(OSError):
            remove_socket(self.path, self._ident)
        for fd in (self._wake_r, self._wake_w):
            P.close_quietly(fd)

    def fail_connection(self, why: str) -> None:
        """Disconnect the current client (it broke its contract, e.g. its guest RAM file
        shrank). Never blocks: callable from any thread, under any lock."""
        conn = self._conn
        if conn is None:
            return
        if len(self.failed) < 100:
            self.failed.append(why)
        log.error("failing the vfio-user connection: %s", why)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_RDWR)

    def _wait_readable(self, sock: socket.socket) -> bool:
        return not self._stopping and sock.fileno() in readable([sock.fileno(), self._wake_r])

    def serve_forever(self) -> None:
        device_thread()
        while not self._stopping:
            try:
                if not self._wait_readable(self.sock):
                    continue
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._stopping:
                    break
                log.error("accept failed: %s", exc)
                continue
            self.dev.connections += 1
            self.dev.connected = True
            log.info("client %d connected", self.dev.connections)
            self._conn = conn
            try:
                self.serve_client(conn)
            finally:
                self._conn = None
                conn.close()
                self.dev.connected = False
                self.dev.disconnect_cleanup()
                log.info("client disconnected; DMA maps and irq fds released")

    def serve_client(self, conn: socket.socket) -> None:
        session = Session(self.dev)
        while not self._stopping:
            if not self._wait_readable(conn):
                continue
            conn.settimeout(MESSAGE_TIMEOUT)
            try:
                msg = P.recv_message(conn)
                if msg is None:
                    return
                if msg.msg_type == P.TYPE_REPLY:  # we never send commands: stray reply
                    log.warning("unexpected reply id %d cmd %d ignored", msg.msg_id, msg.command)
                    msg.close_fds()
                    continue
                out = session.handle(msg)
                fds, session.reply_fds = session.reply_fds, []
                if out is not None:
                    P.send_message(conn, out, fds)
            except (ProtocolError, TimeoutError) as exc:
                log.warning("closing connection: %s", exc)
                return
            except OSError as exc:
                log.warning("connection error: %s", exc)
                return
            finally:
                conn.settimeout(None)
