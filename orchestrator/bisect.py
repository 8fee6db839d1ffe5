"""``pinlab bisect``: which commit changed one matrix cell's outcome (``git bisect run``).

The user's tree is cloned (``git clone --shared``) into the cache and bisected there, so
their checkout is untouched; each step builds the clone in place (only what the checkout
changed is recompiled) and runs the cell on the built kernel through a warm-guest pool.
The step script's exit status follows ``git bisect run``: 0 when the cell shows the
outcome it shows on ``--good``, 1 when it shows another one, 125 (skip) when the kernel
does not build or the run fails for infrastructure reasons (pool, boot, an ``ERROR``
observation) — the rule syzbot and kci-dev's bisect use: a build or boot failure never
decides a step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pinlab.images.cache import Cache, digest
from pinlab.images.kbuild import BuildSpec, ConfigSpec, build_kernel
from pinlab.images.kerrors import KernelBuildError
from pinlab.images.ksource import SourceSpec, parse_source, resolve

from .expectations import Cell
from .poolclient import PoolError, run_cell, stop_all

GOOD, BAD, SKIP = 0, 1, 125
INFRA_OUTCOMES = {"ERROR"}   # an experiment that did not complete: no verdict either way


def parse_cell(text: str) -> tuple[str, str, str]:
    """``mode/backing/event`` (a leading ``kernel/`` is allowed and ignored)."""
    parts = text.strip("/").split("/")
    if len(parts) == 4:
        parts = parts[1:]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"cell {text!r}: expected MODE/BACKING/EVENT, e.g. "
                         "longterm/ext4/truncate")
    return parts[0], parts[1], parts[2]


def observe(kernel: str, cell: tuple[str, str, str], artifacts: Path) -> tuple[str, Any]:
    """Run one cell on ``kernel`` (a Debian name or a built id) in that kernel's pool and
    stop the pool. Returns (observed outcome class, the pool's answer). Raises
    :class:`PoolError` when the pool or guest fails."""
    try:
        resp = run_cell(Cell(kernel, *cell), artifacts)
    finally:
        stop_all([kernel])
    return str(resp["observed"]), resp


def step_status(observed: str, good_outcome: str) -> int:
    """``git bisect run``'s status for a step whose cell showed ``observed``: 0 (good)
    when it is the good end's outcome, 125 (skip) for an infrastructure outcome, 1 (bad)
    for any other outcome."""
    if observed in INFRA_OUTCOMES:
        return SKIP
    return GOOD if observed == good_outcome else BAD


@dataclass
class State:
    """What each ``git bisect run`` step needs, kept as JSON beside the clone."""

    clone: str
    cell: tuple[str, str, str]
    config: str
    good_outcome: str
    bad_outcome: str
    artifacts: str
    jobs: int


def build_here(cache: Cache, clone: Path, config: ConfigSpec, jobs: int) -> str:
    """Build the clone's HEAD in place; returns the kernel id."""
    commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    src = SourceSpec("git", commit, clone, commit=commit)
    return build_kernel(cache, BuildSpec(src, [], config), tree=clone, jobs=jobs)


def step(state_path: Path) -> int:
    """One ``git bisect run`` step in the clone (the current directory's HEAD)."""
    st = State(**json.loads(state_path.read_text()))
    cache = Cache.default()
    clone = Path(st.clone)
    try:
        kernel = build_here(cache, clone, ConfigSpec(base=st.config), st.jobs)
    except KernelBuildError as exc:
        print(f"pinlab bisect: build failed, skipping: {exc}", file=sys.stderr)
        return SKIP
    art = Path(st.artifacts) / f"{kernel.split(':')[1]}-{int(time.time())}"
    try:
        observed, _ = observe(kernel, tuple(st.cell), art)  # type: ignore[arg-type]
    except (PoolError, OSError) as exc:
        print(f"pinlab bisect: run failed, skipping: {exc}", file=sys.stderr)
        return SKIP
    verdict = step_status(observed, st.good_outcome)
    print(f"pinlab bisect: {kernel} shows {observed} -> "
          f"{ {GOOD: 'good', BAD: 'bad', SKIP: 'skip'}[verdict]}", flush=True)
    return verdict


def bisect(tree: Path, good: str, bad: str, cell: tuple[str, str, str], *,
           config: str = "small", jobs: int | None = None,
           artifacts: Path | None = None) -> int:
    """Bisect ``good..bad`` in a clone of ``tree`` on ``cell``'s outcome. Returns 0 when
    a first bad commit was found, 2 when the input does not allow a bisection (unknown
    revision, a kernel that does not build at the ends, the same outcome at both ends)."""
    cache = Cache.default()
    try:
        g = resolve(cache, parse_source(good, tree))
        b = resolve(cache, parse_source(bad, tree))
    except KernelBuildError as exc:
        print(f"pinlab bisect: {exc}", file=sys.stderr)
        return 2
    clone = cache.path("kbuild", "bisect", digest(str(tree.resolve()), g.commit, b.commit))
    out = artifacts or clone.with_name(clone.name + "-runs")
    out.mkdir(parents=True, exist_ok=True)
    if not (clone / ".git").exists():
        subprocess.run(["git", "clone", "-q", "--shared", "--no-checkout", str(tree),
                        str(clone)], check=True)
    git = ["git", "-C", str(clone)]
    subprocess.run([*git, "bisect", "reset", "-q"], capture_output=True, check=False)
    cfg = ConfigSpec(base=config)
    outcomes = {}
    for label, rev in (("good", g), ("bad", b)):
        subprocess.run([*git, "checkout", "-q", "--force", "--detach", rev.commit], check=True)
        try:
            kernel = build_here(cache, clone, cfg, jobs or 2)
            outcomes[label], _ = observe(kernel, cell, out / label)
        except (KernelBuildError, PoolError) as exc:
            print(f"pinlab bisect: the {label} end ({rev.rev}) cannot be tested: {exc}",
                  file=sys.stderr)
            return 2
        print(f"pinlab bisect: {label} {rev.rev} ({rev.commit[:12]}): {outcomes[label]}")
    if outcomes["good"] == outcomes["bad"] or outcomes["good"] in INFRA_OUTCOMES:
        print(f"pinlab bisect: {'/'.join(cell)} shows {outcomes['good']} at both ends "
              f"(or an infrastructure error): nothing to bisect", file=sys.stderr)
        return 2
    state = clone.with_name(clone.name + ".json")
    state.write_text(json.dumps(asdict(State(str(clone), cell, config, outcomes["good"],
                                             outcomes["bad"], str(out), jobs or 2))))
    subprocess.run([*git, "bisect", "start", b.commit, g.commit], check=True)
    try:
        r = subprocess.run([*git, "bisect", "run", sys.executable, "-m",
                            "pinlab.orchestrator.bisect", str(state)], cwd=clone, text=True,
                           capture_output=True, check=False)
        (out / "bisect-run.log").write_text(r.stdout + r.stderr)
        log = subprocess.run([*git, "bisect", "log"], capture_output=True, text=True,
                             check=False).stdout
        (out / "bisect.log").write_text(log)
    finally:
        subprocess.run([*git, "bisect", "reset", "-q"], capture_output=True, check=False)
    found = [ln for ln in r.stdout.splitlines() if "is the first bad commit" in ln]
    print(r.stdout[-3000:])
    if r.returncode != 0 or not found:
        print(f"pinlab bisect: git bisect run ended with {r.returncode}; see {out}",
              file=sys.stderr)
        return 2
    print(f"pinlab bisect: {found[0]} ({outcomes['good']} -> {outcomes['bad']}); "
          f"logs in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pinlab.orchestrator.bisect",
                                description="one git bisect run step (used by pinlab bisect)")
    p.add_argument("state", type=Path)
    a = p.parse_args(argv)
    return step(a.state)


if __name__ == "__main__":
    sys.exit(main())
