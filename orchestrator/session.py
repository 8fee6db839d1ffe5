"""A guest ready for experiments: booted, device bound, module loaded, tools pushed."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from pinlab.images.build import ensure_images
from pinlab.images.kernel import DEFAULT_KERNEL

from .accel import choose_accel
from .agent import AgentError, GuestAgent
from .qmp import QMP
from .vm import GUEST_MODULE, Guest, GuestConfig

# the guest API (pinlab_ioctl, pinlab_mm, pinlab_kmsg, pinlab_env) and the matrix's cell code
GUEST_TOOLS = ("pinlab_ioctl.py", "pinlab_mm.py", "pinlab_kmsg.py", "pinlab_env.py",
               "pinlab_dax.py",
               "pinlab_cell.py", "workload.py", "pinlab_agent.py")
GUEST_DIR = "/root/pinlab"


def guest_tool(name: str) -> bytes:
    """The bytes of one file of images/guest/ (a GUEST_TOOLS name)."""
    return resources.files("pinlab.images").joinpath("guest", name).read_bytes()


class WorkloadError(RuntimeError):
    pass


class GuestSession:
    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.control: QMP | None = None
        self.audit_since = 0
        self._agent: GuestAgent | None = None
        # why this guest should not run another experiment (set when a workload got stuck
        # in the kernel or the agent died); the pool reboots such a guest
        self.broken = ""

    @classmethod
    @contextlib.contextmanager
    def boot(cls, kernel: str | None, artifacts: Path, *, device: bool = True,
             module: bool = True, config: GuestConfig | None = None,
             faults: dict[str, Any] | None = None,
             extra_packages: list[str] | None = None) -> Iterator[GuestSession]:
        """Boot a guest and get it ready: device connected (``faults`` set on it through
        its control socket before the driver binds, as QMP set-fault arguments), guest
        tools pushed, pinlab.ko copied to GUEST_MODULE (also without a device) and loaded
        when ``module``. ``extra_packages`` rebuilds the cached rootfs with them."""
        images = ensure_images(kernel or DEFAULT_KERNEL, extra_packages=extra_packages)
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
                    if faults:
                        s.control.cmd("set-fault", **faults)
                s.push_tools()
                if module:
                    g.load_module()
                else:
                    g.push_module()
                yield s
            finally:
                if s._agent:
                    s._agent.close()
                if s.control:
                    s.control.close()

    def push_tools(self) -> None:
        self.guest.ssh.run(f"mkdir -p {GUEST_DIR}", check=True)
        for name in GUEST_TOOLS:
            self.guest.ssh.put(guest_tool(name), f"{GUEST_DIR}/{name}")

    @property
    def agent(self) -> GuestAgent:
        """The guest agent (started on first use, restarted if it died)."""
        if self._agent is None or not self._agent.alive:
            if self._agent is not None:
                self._agent.close()
            self._agent = GuestAgent(self.guest.ssh, GUEST_DIR,
                                     self.guest.artifacts / "agent.log")
            self._agent.start()
        return self._agent

    def workload(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        """Run one guest workload command in a fresh process forked by the agent."""
        cmd = "workload.py " + " ".join(shlex.quote(a) for a in args)
        try:
            resp = self.agent.request("run", wait=timeout + 30, argv=list(args),
                                      timeout=timeout)
        except AgentError as exc:
            self.broken = f"guest agent failed: {exc}"
            raise WorkloadError(f"{cmd}: {exc}") from exc
        if resp.get("stuck"):
            self.broken = f"{cmd} is stuck in the kernel (pid {resp.get('pid')})"
        report = resp.get("report")
        if "error" in resp or not isinstance(report, dict):
            raise WorkloadError(f"{cmd}: {resp.get('error', 'no report')}\n"
                                f"output: {str(resp.get('output', ''))[-3000:]}")
        report.setdefault("exit", resp.get("exit"))
        report.setdefault("agent_ms", resp.get("ms"))
        if resp.get("output"):
            report.setdefault("stderr", str(resp["output"])[-4000:])
        return report

    def reload_module(self) -> dict[str, Any]:
        """A fresh driver instance: rmmod + insmod pinlab.ko, wait for /dev/pinlab0."""
        return self.agent.checked("reload", wait=60, module=GUEST_MODULE)

    def dmesg_mark(self) -> int:
        """A point in the kernel log; dmesg_since() returns what was logged after it."""
        return int(self.agent.checked("dmesg-mark", wait=30)["mark"])

    def dmesg_since(self, mark: int) -> str:
        return str(self.agent.checked("dmesg-since", wait=60, mark=mark)["text"])

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
