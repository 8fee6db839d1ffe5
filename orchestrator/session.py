"""A guest ready for experiments: booted, device bound, module loaded, tools pushed."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from pinlab.common.vocab import GUEST_HOME, GUEST_SUBPACKAGES
from pinlab.images.build import ensure_images
from pinlab.images.kernel import DEFAULT_KERNEL

from .accel import choose_accel
from .agent import AgentError, GuestAgent
from .qmp import QMP
from .ssh import GuestSSH
from .vm import GUEST_MODULE, Guest, GuestConfig

# the guest's own minimal package root: the host's pinlab/__init__.py is not pushed
GUEST_PACKAGE_INIT = b'"""pinlab in a guest: pinlab.common and pinlab.guest only."""\n'


def guest_files() -> dict[str, bytes]:
    """Every file the guest receives, by path below GUEST_HOME: ``pinlab/__init__.py``
    (GUEST_PACKAGE_INIT), ``pinlab/common/*.py`` and ``pinlab/guest/**/*.py`` (with its
    ``events/`` subpackage)."""
    out = {"pinlab/__init__.py": GUEST_PACKAGE_INIT}

    def walk(d: Any, rel: str) -> None:
        for f in sorted(d.iterdir(), key=lambda f: f.name):
            if f.is_dir() and f.name != "__pycache__":
                walk(f, f"{rel}/{f.name}")
            elif f.name.endswith(".py"):
                out[f"{rel}/{f.name}"] = f.read_bytes()

    for sub in GUEST_SUBPACKAGES:
        walk(resources.files(f"pinlab.{sub}"), f"pinlab/{sub}")
    return out


def push_guest_files(ssh: GuestSSH) -> None:
    """Copy guest_files() into GUEST_HOME (replacing what an earlier push left there).
    Raises SSHError."""
    files = guest_files()
    dirs = " ".join(sorted({f"{GUEST_HOME}/{rel.rsplit('/', 1)[0]}" for rel in files}))
    ssh.run(f"rm -rf {GUEST_HOME}/pinlab && mkdir -p {dirs}", check=True)
    for rel, data in files.items():
        ssh.put(data, f"{GUEST_HOME}/{rel}")


def _workload_cmd(args: tuple[str, ...]) -> str:
    """How an error message names a workload command."""
    return "pinlab.guest.workload " + shlex.join(args)


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
        push_guest_files(self.guest.ssh)

    @property
    def agent(self) -> GuestAgent:
        """The guest agent (started on first use, restarted if it died)."""
        if self._agent is None or not self._agent.alive:
            if self._agent is not None:
                self._agent.close()
            self._agent = GuestAgent(self.guest.ssh, self.guest.artifacts / "agent.log")
            self._agent.start()
        return self._agent

    def workload(self, *args: str, timeout: float = 300) -> dict[str, Any]:
        """Run one guest workload command in a fresh process forked by the agent.
        Returns its report; raises WorkloadError."""
        resp = self._agent_call("run", args, wait=timeout + 30, argv=list(args),
                                timeout=timeout)
        return self._report(args, resp)

    def workload_start(self, *args: str, timeout: float = 300) -> int:
        """Start a workload command (agent ``start``) and return its job number at once;
        ``workload_ready`` and ``workload_wait`` follow. Raises WorkloadError."""
        resp = self._agent_call("start", args, wait=60, argv=list(args), timeout=timeout)
        if "error" in resp:
            raise WorkloadError(f"{_workload_cmd(args)}: {resp['error']}")
        return int(resp["job"])

    def workload_ready(self, job: int, *args: str, timeout: float = 60) -> float:
        """Wait (at most ``timeout`` s) until the job notified that it reached its event
        (pinlab_cell.notify_ready); returns when, in ms after its start. Raises
        WorkloadError when it ended or was killed first (with its report's error)."""
        resp = self._agent_call("wait", args, wait=timeout + 30, job=job, until="ready",
                                timeout=timeout)
        if resp.get("ready"):
            return float(resp["ms"])
        if resp.get("stuck"):
            self.broken = f"{_workload_cmd(args)} is stuck in the kernel"
        report = resp.get("report")
        why = report.get("error") if isinstance(report, dict) else None
        raise WorkloadError(f"{_workload_cmd(args)} ended before it was ready: "
                            f"{resp.get('error') or why or 'no error given'}\n"
                            f"output: {str(resp.get('output', ''))[-3000:]}")

    def workload_wait(self, job: int, *args: str, timeout: float = 300) -> dict[str, Any]:
        """The report of a started job (agent ``wait`` until done), within ``timeout`` s
        of host time. Raises WorkloadError (AgentError inside when the guest went)."""
        resp = self._agent_call("wait", args, wait=timeout, job=job, until="done")
        return self._report(args, resp)

    def _agent_call(self, op: str, args: tuple[str, ...], wait: float,
                    **req: Any) -> dict[str, Any]:
        try:
            return self.agent.request(op, wait=wait, **req)
        except AgentError as exc:
            self.broken = f"guest agent failed: {exc}"
            raise WorkloadError(f"{_workload_cmd(args)}: {exc}") from exc

    def _report(self, args: tuple[str, ...], resp: dict[str, Any]) -> dict[str, Any]:
        cmd = _workload_cmd(args)
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
