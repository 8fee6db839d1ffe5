"""``pinlab ssh`` and ``pinlab run``: a shell or a Python script in a running ``up`` guest.

``run`` copies the guest API (images/guest: pinlab_ioctl, pinlab_mm, pinlab_kmsg,
pinlab_env, pinlab_cell) and the script into GUEST_DIR, then runs the script there with
GUEST_DIR on PYTHONPATH, its output streamed as it comes, and returns its exit status.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

from .registry import GuestEntry
from .session import GUEST_DIR, push_guest_files
from .ssh import GuestSSH, SSHError

RUN_DIR = f"{GUEST_DIR}/run"


def ssh_argv(e: GuestEntry, command: list[str], tty: bool | None = None) -> list[str]:
    """OpenSSH's command line for the guest, against its pinned host key."""
    ssh = shutil.which("ssh")
    if not ssh:
        raise SSHError("no `ssh` client on this host (Debian: apt-get install "
                       "openssh-client); `pinlab run` works without it")
    tty = sys.stdin.isatty() if tty is None else tty
    return [ssh, "-i", e.client_key, "-p", str(e.ssh_port),
            "-o", f"UserKnownHostsFile={e.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR",
            *(["-t"] if tty and command else []), "root@127.0.0.1", *command]


def exec_ssh(e: GuestEntry, command: list[str]) -> None:
    """Replace this process by ssh into the guest (interactive shell without command)."""
    argv = ssh_argv(e, command)
    os.execv(argv[0], argv)


def connect(e: GuestEntry, timeout: float = 30) -> GuestSSH:
    ssh = GuestSSH("127.0.0.1", e.ssh_port, Path(e.client_key), Path(e.host_key_pub))
    ssh.connect(timeout)
    return ssh


def run_script(e: GuestEntry, script: Path, args: list[str], timeout: float = 3600) -> int:
    """Copy ``script`` and the guest API into the guest, run it, stream its stdout and
    stderr to ours; returns its exit status. Raises FileNotFoundError for a missing
    script, SSHError when the guest cannot be reached or the run exceeds ``timeout``."""
    if not script.is_file():
        raise FileNotFoundError(f"no script {script}")
    ssh = connect(e)
    try:
        ssh.run(f"mkdir -p {RUN_DIR}", check=True)
        push_guest_files(ssh)
        remote = f"{RUN_DIR}/{script.name}"
        ssh.put(script.read_bytes(), remote, mode=0o755)
        cmd = (f"cd {GUEST_DIR} && PYTHONPATH={GUEST_DIR} exec python3 -u "
               + " ".join(shlex.quote(a) for a in [remote, *args]))
        return ssh.stream(cmd, sys.stdout.buffer, sys.stderr.buffer, timeout=timeout)
    finally:
        ssh.close()
