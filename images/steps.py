"""Running build commands: logged to a file, shown as progress, failing loudly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


class BuildError(RuntimeError):
    """A build step failed; the message names the step and its log."""


def run(cmd: Sequence[str | os.PathLike[str]], *, log: Path, title: str,
        env: dict[str, str] | None = None, timeout: float = 3600) -> None:
    """Run ``cmd`` with its output appended to ``log``, showing a spinner with ``title``."""
    argv = [str(c) for c in cmd]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        with console.status(f"[bold]{title}[/] (log: {log})"):
            try:
                proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=full_env, timeout=timeout,
                                      check=False)
            except subprocess.TimeoutExpired as exc:
                raise BuildError(f"{title}: timed out after {timeout:.0f}s; see {log}") from exc
    took = time.monotonic() - start
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BuildError(f"{title}: exit {proc.returncode} after {took:.0f}s; see {log}\n{tail}")
    console.print(f"[green]✓[/] {title} ({took:.1f}s)")


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        sys.exit(f"pinlab: {what} needs root (mmdebstrap/chroot); run as root or use sudo")
