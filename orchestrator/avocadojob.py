"""Running Avocado jobs: one at a time with avocado's own output, or several at once (one
per kernel: each kernel's cells go to that kernel's warm guest, so the guests work in
parallel) with their output in log files and a progress line per job.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "avocado.conf"
# " (12/214) tests/matrix/test_cells.py:Kernel6_12.test_pin__anon__dma_write: PASS (0.93 s)"
RESULT = re.compile(r"^ \((\d+)/(\d+)\) (\S+): +(PASS|FAIL|ERROR|SKIP|CANCEL|WARN|INTERRUPTED)")
console = Console()


@dataclass
class Job:
    name: str
    results_dir: Path
    references: list[str]
    tags: list[str] = field(default_factory=list)
    include_untagged: bool = False
    parallel_tasks: int = 1
    env: dict[str, str] = field(default_factory=dict)   # added to this process's environment
    rc: int | None = None
    log: Path | None = None

    def cmd(self) -> list[str]:
        return [sys.executable, "-m", "avocado", "--config", str(CONFIG), "run",
                "--max-parallel-tasks", str(self.parallel_tasks),
                "--job-results-dir", str(self.results_dir), "--disable-sysinfo",
                *[f"--filter-by-tags={t}" for t in self.tags],
                *(["--filter-by-tags-include-empty"] if self.include_untagged else []),
                *self.references]

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def results(self) -> Path | None:
        found = sorted(self.results_dir.glob("job-*/results.json"))
        return found[-1] if found else None


def run_one(job: Job) -> Job:
    """Run a job in the foreground, with avocado's own output."""
    job.results_dir.mkdir(parents=True, exist_ok=True)
    console.print("$ " + " ".join(job.cmd()), highlight=False)
    job.rc = subprocess.run(job.cmd(), cwd=REPO, env=job.environ(), check=False).returncode
    return job


def run_concurrently(jobs: list[Job], poll: float = 1.0, limit: int | None = None
                     ) -> list[Job]:
    """Run the jobs, at most ``limit`` (default: all) at the same time, in list order;
    avocado's output goes to ``<results_dir>/avocado.log``.

    Shows a progress bar per job on a terminal; elsewhere (CI logs) a status line per job
    every minute. Every non-PASS result is printed as soon as it is seen.
    """
    if len(jobs) == 1:
        return [run_one(jobs[0])]
    limit = len(jobs) if limit is None else max(1, limit)
    procs: list[subprocess.Popen[bytes] | None] = [None] * len(jobs)

    def start(i: int) -> None:
        job = jobs[i]
        job.results_dir.mkdir(parents=True, exist_ok=True)
        job.log = job.results_dir / "avocado.log"
        console.print(f"$ {' '.join(job.cmd())}  > {job.log}", highlight=False)
        with job.log.open("wb") as out:
            procs[i] = subprocess.Popen(job.cmd(), cwd=REPO, env=job.environ(), stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    try:
        _watch(jobs, procs, poll, start, limit)
    finally:
        for p in procs:   # interrupted: avocado's own SIGTERM handling tears tests down
            if p is not None and p.poll() is None:
                p.terminate()
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for job, p in zip(jobs, procs, strict=True):
        job.rc = p.returncode if p is not None else None
    return jobs


def _watch(jobs: list[Job], procs: list[subprocess.Popen[bytes] | None], poll: float,
           start: Callable[[int], None], limit: int) -> None:
    seen = [0] * len(jobs)     # lines already parsed per job
    done = [0] * len(jobs)
    total = [0] * len(jobs)
    bad = [0] * len(jobs)
    live = console.is_terminal
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[bad]}"), TimeElapsedColumn(),
                        console=console, disable=not live)
    last_status = time.monotonic()
    with progress:
        tasks = [progress.add_task(j.name, total=None, bad="") for j in jobs]
        while True:
            waiting = [i for i, p in enumerate(procs) if p is None]
            active = sum(p is not None and p.poll() is None for p in procs)
            for i in waiting[:max(0, limit - active)]:
                start(i)
            running = [p is None or p.poll() is None for p in procs]
            for i, job in enumerate(jobs):
                if job.log is None:
                    continue
                lines = job.log.read_text(errors="replace").splitlines()
                # the last line may still be being written: parse it on a later pass
                complete = lines if not running[i] else lines[:-1]
                for line in complete[seen[i]:]:
                    m = RESULT.match(line)
                    if not m:
                        continue
                    done[i], total[i] = int(m.group(1)), int(m.group(2))
                    if m.group(4) not in ("PASS", "SKIP"):
                        bad[i] += 1
                        progress.console.print(f"[red]{job.name}[/]: {line.strip()}",
                                               highlight=False)
                seen[i] = max(seen[i], len(complete))
                progress.update(tasks[i], completed=done[i], total=total[i] or None,
                                bad=f"[red]{bad[i]} not passed[/]" if bad[i] else "")
            if not live and time.monotonic() - last_status > 60:
                last_status = time.monotonic()
                console.print("  ".join(f"{j.name}: {done[i]}/{total[i] or '?'}"
                                        f"{f' ({bad[i]} not passed)' if bad[i] else ''}"
                                        for i, j in enumerate(jobs)), highlight=False)
            if not any(running):
                break
            time.sleep(poll)
    for i, job in enumerate(jobs):
        rc = procs[i].returncode if procs[i] is not None else None
        console.print(f"{job.name}: {done[i]}/{total[i]} done, {bad[i]} not passed "
                      f"(exit {rc}); log {job.log}", highlight=False)
