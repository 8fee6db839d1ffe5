"""Host side of the guest agent (guest/pinlab_agent.py): JSON lines
(pinlab.common.jsonlines) over one SSH exec channel.

A TCG guest needs about 0.65 s to start Python and import the workload; a matrix cell's
experiment itself takes 40-300 ms.  The agent is started once per boot and forks a child
per command, and it also reloads pinlab.ko and reads /dev/kmsg, so a cell costs no SSH
command at all.  Every request has a deadline; a dead or silent agent is an AgentError
(the pool then reboots the guest).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import paramiko

from pinlab.common import jsonlines
from pinlab.common.vocab import guest_python

from .ssh import GuestSSH, SSHError

AGENT = "pinlab_agent"      # the guest module (pinlab.guest.pinlab_agent)
MAX_ANSWER = 64 << 20   # bytes in one answer line (a cell's report and its output tail)


class AgentError(RuntimeError):
    pass


class GuestAgent:
    def __init__(self, ssh: GuestSSH, log: Path | None = None) -> None:
        self.ssh, self.log = ssh, log
        self.chan: paramiko.Channel | None = None
        self.lines = jsonlines.Splitter(MAX_ANSWER)
        self.next_id = 0
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 60) -> dict[str, Any]:
        try:
            self.chan = self.ssh.open_channel("exec " + guest_python(AGENT))
        except SSHError as exc:
            raise AgentError(f"cannot start the guest agent: {exc}") from exc
        self.info = self._read(timeout, "start")
        if not self.info.get("ready"):
            raise AgentError(f"guest agent did not say ready: {self.info}")
        return self.info

    @property
    def alive(self) -> bool:
        return self.chan is not None and not self.chan.closed \
            and not self.chan.exit_status_ready()

    def request(self, op: str, wait: float = 60, **args: Any) -> dict[str, Any]:
        """Send one request and wait (at most ``wait`` s) for its answer."""
        if not self.alive:
            raise AgentError(f"guest agent is not running ({op}){self._stderr()}")
        assert self.chan is not None
        self.next_id += 1
        req = {"op": op, "id": self.next_id, **args}
        self._log(">", req)
        try:
            self.chan.sendall(jsonlines.encode(req))
        except (OSError, paramiko.SSHException) as exc:
            raise AgentError(f"guest agent: cannot send {op}: {exc!r}") from exc
        resp = self._read(wait, op)
        if resp.get("id") != self.next_id:
            raise AgentError(f"guest agent answered {resp.get('id')} to request "
                             f"{self.next_id} ({op})")
        return resp

    def checked(self, op: str, wait: float = 60, **args: Any) -> dict[str, Any]:
        resp = self.request(op, wait, **args)
        if "error" in resp:
            raise AgentError(f"guest agent {op}: {resp['error']}")
        return resp

    def _read(self, timeout: float, what: str) -> dict[str, Any]:
        chan = self.chan
        assert chan is not None

        def recv(left: float) -> bytes:
            chan.settimeout(min(left, 1.0))
            return chan.recv(65536)

        try:
            line = jsonlines.wait_line(self.lines, recv, time.monotonic() + timeout)
        except (EOFError, jsonlines.Truncated) as exc:
            raise AgentError(f"guest agent exited during {what}{self._stderr()}") from exc
        except jsonlines.LineTooLong as exc:
            raise AgentError(f"guest agent: answer to {what}: {exc}") from exc
        except (OSError, paramiko.SSHException) as exc:
            raise AgentError(f"guest agent: channel failed during {what}: {exc!r}") from exc
        if line is None:
            raise AgentError(f"guest agent: no answer to {what} within {timeout:.0f}s")
        try:
            resp = jsonlines.decode_object(line)
        except jsonlines.MalformedLine as exc:
            raise AgentError(f"guest agent: bad answer to {what}: {exc}") from exc
        self._log("<", resp)
        return resp

    def _stderr(self) -> str:
        if not self.chan:
            return ""
        data = b""
        while self.chan.recv_stderr_ready():
            data += self.chan.recv_stderr(65536)
        return f": {data.decode(errors='replace')[-2000:]}" if data else ""

    def _log(self, way: str, obj: dict[str, Any]) -> None:
        if self.log:
            with self.log.open("a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {way} "
                        f"{json.dumps(obj, default=str)[:2000]}\n")

    def close(self) -> None:
        if self.chan is None:
            return
        if self.alive:
            with contextlib.suppress(AgentError):
                self.request("exit", wait=5)
        self.chan.close()
        self.chan = None
