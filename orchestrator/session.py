"""A guest ready for experiments: booted, device bound, module loaded, tools pushed."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from pinlab.images.build import ensure_images
from pinlab.images.kernel import DEFAULT_KERNEL

from .accel import choose_accel
from .qmp import QMP
from .vm import Guest, GuestConfig

GUEST_TOOLS = ("pinlab_ioctl.py", "pinlab_cell.py", "workload.py")
GUEST_DIR = "/root/pinlab"


class WorkloadError(RuntimeError):
    pass


class GuestSession:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.control: QMP | None = None
        self.audit_since = 0

    @classmethod
    @contextlib.contextmanager
    def boot(cls, kernel: str | None, artifacts: Path, *, device: bool = True,
             module: bool = True, config: GuestConfig | None = None) -> Iterator[GuestSession]:
        images = ensure_images(kernel or DEFAULT_KERNEL)
        cfg = config or GuestConfig()
        cfg.device = device
        accel, why = choose_accel(images)
        cfg.accel = accel
        (artifacts).mkdir(parents=True, exist_ok=True)
        (artifacts / "accel.txt").write_text(f"{accel}: {why}\n")
        with Guest(images, artifacts, cfg) as g:
            s = cls(g)
            try:
                if device:
                    s.control = QMP(g.control_sock, artifacts / "device-qmp.log")
                    s.control.connect()
                s.push_tools()
                if module:
                    g.load_module()
                yield s
            finally:
                if s.control:
                    s.control.close()

    def push_tools(self) -> None:
        self.guest.ssh.run(f"mkdir -p {GUEST_DIR}", check=True)
        for name in GUEST_TOOLS:
            data = resources.files("pinlab.images").joinpath("guest", name).read_bytes()
            self.guest.ssh.put(data, f"{GUEST_DIR}/{name}")

    def workload(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        """Run the guest workload; its last stdout line is its JSON report."""
        cmd = f"python3 {GUEST_DIR}/workload.py " + " ".join(shlex.quote(a) for a in args)
        res = self.guest.ssh.run(cmd, timeout=timeout)
        lines = [ln for ln in res.out.splitlines() if ln.strip()]
        try:
            report = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            report = None
        if not isinstance(report, dict):
            raise WorkloadError(f"workload gave no JSON report (exit {res.rc}): {cmd}\n"
                                f"stdout: {res.out[-2000:]}\nstderr: {res.err[-2000:]}")
        report.setdefault("exit", res.rc)
        if res.err:
            report.setdefault("stderr", res.err[-4000:])
        return report

    def mark(self) -> int:
        """Start a new experiment: later audit queries only see records from here on."""
        stats = self.device("query-audit", since=1 << 62, limit=1)["stats"]
        self.audit_since = int(stats["last_seq"])
        return self.audit_since

    def audit(self, **args: Any) -> list[dict[str, Any]]:
        """Audit records since the last mark (filters: region, kind, limit)."""
        args.setdefault("since", self.audit_since)
        args.setdefault("limit", 100_000)
        return list(self.device("query-audit", **args)["records"])

    def violations(self) -> list[dict[str, Any]]:
        return list(self.device("query-violations", since=self.audit_since,
                                limit=100_000)["violations"])

    def device(self, command: str, **args: Any) -> Any:
        if not self.control:
            raise RuntimeError("no device in this session")
        return self.control.cmd(command, **args)
