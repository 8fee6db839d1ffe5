"""SSH into a guest with paramiko, against the host key pinned at image build time."""

from __future__ import annotations

import base64
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import paramiko


class SSHError(RuntimeError):
    pass


@dataclass
class Result:
    cmd: str
    rc: int
    out: str
    err: str

    def check(self) -> Result:
        if self.rc != 0:
            raise SSHError(f"guest command failed (exit {self.rc}): {self.cmd}\n"
                           f"stdout: {self.out[-2000:]}\nstderr: {self.err[-2000:]}")
        return self


class GuestSSH:
    def __init__(self, host: str, port: int, client_key: Path, host_key_pub: Path) -> None:
        self.host, self.port = host, port
        self.key = paramiko.Ed25519Key.from_private_key_file(str(client_key))
        kind, b64 = host_key_pub.read_text().split()[:2]
        self.host_key = paramiko.PKey.from_type_string(kind, base64.b64decode(b64))
        self.client: paramiko.SSHClient | None = None

    def connect(self, timeout: float) -> None:
        """Connect, retrying until ``timeout`` (sshd may still be starting)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self._banner(min(5.0, max(0.5, deadline - time.monotonic()))):
                time.sleep(0.3)
                continue
            c = paramiko.SSHClient()
            name = f"[{self.host}]:{self.port}"
            c.get_host_keys().add(name, self.host_key.get_name(), self.host_key)
            c.set_missing_host_key_policy(paramiko.RejectPolicy())
            try:
                left = max(1.0, deadline - time.monotonic())
                c.connect(self.host, self.port, username="root", pkey=self.key,
                          timeout=min(10, left), banner_timeout=min(30, left),
                          auth_timeout=min(30, left), allow_agent=False, look_for_keys=False)
                tr = c.get_transport()
                if tr:
                    tr.set_keepalive(5)
                self.client = c
                return
            except paramiko.BadHostKeyException:
                c.close()
                raise
            except (OSError, paramiko.SSHException, EOFError) as exc:
                last = exc
                c.close()
                time.sleep(0.5)
        raise SSHError(f"ssh root@{self.host}:{self.port} not reachable within "
                       f"{timeout:.0f}s: {last!r}")

    def _banner(self, timeout: float) -> bool:
        """True once sshd answers with its banner (paramiko logs noisy tracebacks before)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                s.settimeout(timeout)
                return s.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def run(self, cmd: str, timeout: float = 120, check: bool = False,
            stdin: bytes | None = None) -> Result:
        if not self.client:
            raise SSHError("not connected")
        try:
            chan_in, chan_out, chan_err = self.client.exec_command(cmd, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
                chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            rc = chan_out.channel.recv_exit_status()
        except TimeoutError as exc:
            raise SSHError(f"guest command timed out after {timeout:.0f}s: {cmd}") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SSHError(f"ssh failed during: {cmd}: {exc!r}") from exc
        res = Result(cmd, rc, out, err)
        return res.check() if check else res

    def stream(self, cmd: str, out: BinaryIO, err: BinaryIO, timeout: float = 3600) -> int:
        """Run ``cmd``, copying its stdout and stderr to ``out``/``err`` as they arrive;
        returns its exit status. Raises SSHError when the connection fails or the command
        runs longer than ``timeout`` seconds (the channel is closed then)."""
        chan = self.open_channel(cmd)
        deadline = time.monotonic() + timeout
        try:
            while True:
                busy = False
                if chan.recv_ready():
                    out.write(chan.recv(65536))
                    out.flush()
                    busy = True
                if chan.recv_stderr_ready():
                    err.write(chan.recv_stderr(65536))
                    err.flush()
                    busy = True
                if not busy:
                    if chan.exit_status_ready() and not chan.recv_ready() \
                            and not chan.recv_stderr_ready():
                        return chan.recv_exit_status()
                    if chan.closed and not chan.exit_status_ready():
                        raise SSHError(f"ssh channel closed during: {cmd}")
                    if time.monotonic() > deadline:
                        raise SSHError(f"guest command timed out after {timeout:.0f}s: {cmd}")
                    time.sleep(0.02)
        finally:
            chan.close()

    def open_channel(self, cmd: str) -> paramiko.Channel:
        """A long-lived exec channel running ``cmd`` (for a guest agent)."""
        tr = self.client.get_transport() if self.client else None
        if not tr or not tr.is_active():
            raise SSHError("not connected")
        try:
            chan = tr.open_session(timeout=30)
            chan.exec_command(cmd)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise SSHError(f"ssh failed to start: {cmd}: {exc!r}") from exc
        return chan

    def put(self, local: Path | bytes, remote: str, mode: int = 0o644) -> None:
        if not self.client:
            raise SSHError("not connected")
        sftp = self.client.open_sftp()
        try:
            if isinstance(local, bytes):
                with sftp.open(remote, "wb") as fh:
                    fh.write(local)
            else:
                sftp.put(str(local), remote)
            sftp.chmod(remote, mode)
        finally:
            sftp.close()

    def close(self) -> None:
        if self.client:
            self.client.close()
            self.client = None
