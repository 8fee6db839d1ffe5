"""``pinlab validate``: run the matrix (or a tag slice) on a base and a candidate kernel
and say, cell by cell, what the candidate changes: regression, fix, changed, unchanged,
flaky or infra-error (policy in ``compare.py`` and README.md).

What is compared are *kernel ids*, the names the image cache and the warm-guest pools know:
``6.1``, ``6.12``, ``7`` (Debian's prebuilt kernels, ``images/kernel.py``), and
``build:<key>`` for kernels built from a tree, Debian source or patches
(``pinlab.images.kbuild``). ``resolve_subjects`` is the one place that turns the command
line into the two kernel ids; everything after it is the same for every kind of kernel.

Running: the cells go straight to each kernel's warm-guest pool (``pool.py``), one runner
thread per kernel, so the two guests work at the same time (two cores, 1 GiB each), as
``pinlab matrix`` runs one Avocado job per kernel. Infrastructure failures are retried on a
freshly booted guest; a cell that differs is re-run on freshly booted guests on both
kernels. Every attempt keeps its artifacts in ``<out>/<role>/<cell>/attempt-<n>/``.

The base's first pass is cached (``basecache.py``: what its key covers): a later run
against the same base, with the same cells, images, tables and cell code, copies the base's
first-pass attempts from ``$PINLAB_CACHE/validate-base/`` and runs only the candidate's;
reruns of the cells that differ still run on freshly booted guests on both kernels.
``--no-base-cache`` runs the base again and leaves the cache as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from pinlab.images.kernel import KERNELS

from . import compare, poolclient
from .basecache import BaseCache, base_parts
from .cells import all_cells, select
from .dmesg import classify
from .expectations import Cell, expect, load
from .harm import HarmTable
from .harm import load as load_harm
from .shard import Shard, split

console = Console(soft_wrap=True)
ROLES = ("base", "candidate")


class InputError(ValueError):
    """Bad input to ``validate``: the command exits 2 with this message, nothing booted."""


@dataclass(frozen=True)
class Subject:
    """One side of a comparison.

    ``kernel``: the kernel id the images and pools know ("6.1", "build:<key>").
    ``label``: how reports name it ("Debian 6.1 (prebuilt)").
    ``expectations``: which kernel's rows of expectations.toml apply (None: none do).
    ``source``: how the kernel was obtained, for the reports and KCIDB's checkout/build
    (prebuilt: {"kind": "debian-prebuilt", ...}; kbuild adds tree, revision, patches...).
    """
    role: str
    kernel: str
    label: str
    expectations: str | None
    source: dict[str, Any] = field(default_factory=dict)


def add_subject_arguments(p: argparse.ArgumentParser) -> None:
    """The options that say what to compare. The kernel-build half (--tree, --base,
    --candidate, --patch, --series, --base-image, --candidate-image) adds its options here
    and resolves them in ``resolve_subjects``."""
    g = p.add_argument_group("prebuilt kernels (Debian's, images/kernel.py)")
    g.add_argument("--base-kernel", metavar="K", help=f"base kernel: {', '.join(KERNELS)}")
    g.add_argument("--candidate-kernel", metavar="K",
                   help=f"candidate kernel: {', '.join(KERNELS)}")
    b = p.add_argument_group("kernels built from source (images/kbuild.py)")
    b.add_argument("--base", metavar="SRC", help="debian:6.1|6.12|7 (Debian's patched "
                   "source package), or a revision of --tree")
    b.add_argument("--tree", help="a git checkout of Linux (cloned, never modified)")
    b.add_argument("--candidate", metavar="REV", help="the candidate revision of --tree")
    b.add_argument("--patch", action="append", metavar="FILE",
                   help="a patch applied on the base for the candidate (repeatable, in order)")
    b.add_argument("--series", metavar="MBOX", help="an mbox of patches (git am) for the "
                   "candidate")
    b.add_argument("--config", default="small", help="small (the default), defconfig, "
                   "cloud (Debian's cloud-amd64) or a config file; pinlab's fragment is "
                   "merged and checked on top")
    i = p.add_argument_group("kernels you built (bzImage + modules + build tree)")
    for role in ("base", "candidate"):
        i.add_argument(f"--{role}-image", metavar="BZIMAGE", help=f"the {role}'s bzImage")
        i.add_argument(f"--{role}-modules", metavar="DIR|TAR",
                       help=f"the {role}'s lib/modules/<release> (directory or tarball)")
        i.add_argument(f"--{role}-build-dir", metavar="DIR",
                       help=f"the {role}'s build tree, to compile pinlab.ko against")


def prebuilt(role: str, name: str) -> Subject:
    """A Debian kernel that images/kernel.py downloads. Raises InputError if unknown."""
    spec = KERNELS.get(name)
    if spec is None:
        raise InputError(f"unknown {role} kernel {name!r} (prebuilt kernels: "
                         f"{', '.join(KERNELS)})")
    return Subject(role, name, f"Debian {name} (prebuilt)", name,
                   {"kind": "debian-prebuilt", "kernel": name, "package": spec.description,
                    "suite": spec.suite.name})


def built(role: str, kernel: str, label: str, source: dict[str, Any],
          expectations: str | None = None) -> Subject:
    """A kernel built from source by ``pinlab.images.kbuild``: ``kernel`` is its
    ``build:<key>`` id (which ``ensure_images`` boots), ``source`` what it was built from
    (tree, revision, patches, config; it becomes KCIDB's checkout/build ``misc``), and
    ``expectations`` the Debian kernel whose expectation rows apply, if any (a build of
    Debian's 6.12 source: "6.12")."""
    return Subject(role, kernel, label, expectations, {"kind": "kbuild", **source})


def resolve_subjects(args: argparse.Namespace) -> tuple[Subject, Subject]:
    """THE SEAM: what to build or boot -> (base, candidate) Subjects with kernel ids.

    Prebuilt Debian kernels are used as they are. Kernels built from source
    (``--tree/--base/--candidate/--patch/--series``, ``--base-image/--candidate-image``)
    are built (or found in the image cache) by ``pinlab.images.kbuild``, which returns
    ``build:<key>`` ids that ``ensure_images`` and the pools boot like any other kernel.
    Raises InputError on missing, unknown or identical kernels.

    The kernel-build half plugs in here: when its options are given it builds both kernels
    (exit 2 with the reason if a patch does not apply or a build fails, before anything
    boots) and returns ``built("base", ...), built("candidate", ...)``."""
    base_k = getattr(args, "base_kernel", None)
    cand_k = getattr(args, "candidate_kernel", None)
    if getattr(args, "base", None):
        base, cand = _build_subjects(args)
    elif getattr(args, "base_image", None) or getattr(args, "candidate_image", None):
        base, cand = _registered("base", args), _registered("candidate", args)
    elif base_k and cand_k:
        base, cand = prebuilt("base", base_k), prebuilt("candidate", cand_k)
    else:
        raise InputError("say what to compare: --base-kernel K --candidate-kernel K "
                         f"(K one of {', '.join(KERNELS)}), --base SRC with --candidate REV "
                         "or --patch/--series, or --base-image/--candidate-image")
    if base.kernel == cand.kernel:
        raise InputError(f"base and candidate are the same kernel ({base.kernel}); "
                         "a kernel's pool runs one guest, so they must differ")
    return base, cand


def _build_subjects(args: argparse.Namespace) -> tuple[Subject, Subject]:
    """--base SRC [--tree PATH] with --candidate REV or --patch/--series: both kernels
    built (or found in the image cache), the candidate seeded from the base's tree so that
    only what the change touches recompiles. Build errors become InputError (exit 2,
    nothing booted)."""
    from pinlab.images.cache import Cache
    from pinlab.images.kbuild import BuildSpec, ConfigSpec, build_kernel
    from pinlab.images.kerrors import KernelBuildError
    from pinlab.images.ksource import parse_source

    patches = [Path(p) for p in (args.patch or [])]
    if args.series:
        patches.append(Path(args.series))
    if bool(args.candidate) == bool(patches):
        raise InputError("with --base, give the candidate as --candidate REV (a --tree "
                         "revision) or as --patch FILE... / --series MBOX, not both")
    if args.base.startswith("debian:") and args.candidate:
        raise InputError("--candidate REV needs --tree; a Debian source takes --patch")
    cache = Cache.default()
    config = ConfigSpec(args.config)
    expectations = args.base.split(":", 1)[1] if args.base.startswith("debian:") else None
    try:
        base_src = parse_source(args.base, args.tree)
        base_spec = BuildSpec(base_src, [], config)
        cand_spec = (BuildSpec(parse_source(args.candidate, args.tree), [], config)
                     if args.candidate else BuildSpec(base_src, patches, config))
        base_id = build_kernel(cache, base_spec)
        cand_id = build_kernel(cache, cand_spec, seed=base_id)
    except KernelBuildError as exc:
        raise InputError(f"{type(exc).__name__}: {exc}") from exc
    what = {"tree": args.tree, "config": args.config}
    return (built("base", base_id, f"{args.base} ({base_id})",
                  {**what, "revision": args.base}, expectations),
            built("candidate", cand_id,
                  f"{args.candidate or args.base + ' + ' + ', '.join(p.name for p in patches)}"
                  f" ({cand_id})",
                  {**what, "revision": args.candidate or args.base,
                   "patches": [str(p) for p in patches]}, expectations))


def _registered(role: str, args: argparse.Namespace) -> Subject:
    """--ROLE-image with --ROLE-modules and --ROLE-build-dir: a kernel built elsewhere,
    registered in the image cache (pinlab.ko is compiled against its build tree)."""
    from pinlab.images.cache import Cache
    from pinlab.images.kbuild import register_prebuilt
    from pinlab.images.kerrors import KernelBuildError

    parts = [getattr(args, f"{role}_{k}", None) for k in ("image", "modules", "build_dir")]
    if not all(parts):
        raise InputError(f"a prebuilt {role} needs --{role}-image, --{role}-modules and "
                         f"--{role}-build-dir")
    try:
        kid = register_prebuilt(Cache.default(), *(Path(x) for x in parts))
    except KernelBuildError as exc:
        raise InputError(f"{role}: {type(exc).__name__}: {exc}") from exc
    return built(role, kid, f"{Path(parts[0]).name} ({kid})",
                 {"image": parts[0], "modules": parts[1], "build_dir": parts[2]})


# ------------------------------------------------------------------------ one attempt
def cell_id(c: Cell) -> str:
    """A cell without its kernel: "longterm/ext4/truncate" (with ``+OPTIONS`` if any)."""
    return c.short


def attempt_record(subject: Subject, cell: Cell, n: int, why: str, fresh: bool,
                   art: Path, resp: dict[str, Any] | None, error: str | None,
                   table: HarmTable) -> dict[str, Any]:
    """One attempt as validate.json keeps it: the pool's answer trimmed to what the
    comparison and the reports need, with the cell's kernel-log signatures (read from the
    attempt's dmesg.txt). The whole answer stays in ``<art>/attempt.json``."""
    rules = load()
    exp = expect(replace(cell, kernel=subject.expectations), rules) \
        if subject.expectations else None
    if resp is None:
        observed, evidence = "ERROR", {"pool_error": error}
    else:
        observed, evidence = str(resp.get("observed", "ERROR")), resp.get("evidence", {})
    dm_file = art / "dmesg.txt"
    if dm_file.exists():
        dm = classify(dm_file.read_text(errors="replace"))
        sigs, err = dm.signatures(), sorted(dm.signatures(table.regression_dmesg))
        classes = dm.summary()
    else:   # no kernel log for this attempt (pool error, QEMU gone): no signature known
        classes, sigs, err = dict(evidence.get("dmesg") or {}), {}, []
    rec = {"n": n, "why": why, "fresh": fresh, "kernel": subject.kernel,
           "observed": observed, "infra": table.is_infra(observed),
           "expected": exp.expected if exp else None,
           "dmesg": classes, "signatures": sigs, "error_signatures": err,
           "facts": evidence.get("facts"), "artifacts": str(art)}
    if resp is not None:
        rec.update({k: resp.get(k) for k in ("seconds", "boot", "guest", "release")})
    if error:
        rec["pool_error"] = error[-2000:]
    if isinstance(evidence, dict) and evidence.get("exception"):
        rec["exception"] = str(evidence["exception"])[:500]
    return rec


Runner = Callable[[Subject, Cell, Path, bool], tuple[dict[str, Any] | None, str | None]]


def pool_runner(subject: Subject, cell: Cell, art: Path,
                fresh: bool) -> tuple[dict[str, Any] | None, str | None]:
    """Run a cell in the subject's pool: (answer, None), or (None, error text) when the
    pool failed (boot, QEMU, SSH, device server): an infrastructure failure."""
    try:
        return poolclient.run_cell(replace(cell, kernel=subject.kernel), art,
                                   fresh=fresh), None
    except (poolclient.PoolError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------ the run
@dataclass
class Plan:
    base: Subject
    candidate: Subject
    cells: list[Cell]                # kernel-less templates (kernel field = base's id)
    tags: list[str] | None
    reruns: int = compare.RERUNS
    infra_retries: int = compare.INFRA_RETRIES
    concurrent: bool = True          # both kernels at once (one guest each)


class Validation:
    """Runs a Plan and keeps every attempt (``attempts[cell id][role]``, in order).
    ``runner`` runs one cell: the kernels' pools; the unit tests replay a recorded run
    through it to check the order and freshness of the attempts asked for.
    ``run`` raises RuntimeError if a runner thread failed (not an infrastructure failure
    of a cell, which is an attempt like any other).
    ``base_cache``: the base's cache entry (``basecache.BaseCache``), or None for no cache;
    after ``run``, ``cache_state`` says whether it was used or stored."""

    def __init__(self, plan: Plan, out: Path, table: HarmTable,
                 runner: Runner = pool_runner, base_cache: BaseCache | None = None) -> None:
        self.plan, self.out, self.table, self.runner = plan, out, table, runner
        self.base_cache = base_cache
        self.cache_state: dict[str, Any] | None = None if base_cache is None else {
            "key": base_cache.key, "path": str(base_cache.path), "used": False,
            "stored": False}
        self.attempts: dict[str, dict[str, list[dict[str, Any]]]] = {
            cell_id(c): {"base": [], "candidate": []} for c in plan.cells}
        self.lock = threading.Lock()
        self.failures: list[str] = []

    def subject(self, role: str) -> Subject:
        return self.plan.base if role == "base" else self.plan.candidate

    def attempt(self, role: str, cell: Cell, why: str, fresh: bool) -> dict[str, Any]:
        subject = self.subject(role)
        cid = cell_id(cell)
        n = len(self.attempts[cid][role]) + 1
        art = self.out / role / cid.replace("/", "__") / f"attempt-{n}"
        art.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        resp, err = self.runner(subject, cell, art, fresh)
        (art / "attempt.json").write_text(json.dumps(
            {"response": resp, "error": err, "why": why, "fresh": fresh}, indent=2,
            default=str))
        rec = attempt_record(subject, cell, n, why, fresh, art, resp, err, self.table)
        rec["wall_seconds"] = round(time.monotonic() - t0, 2)
        with self.lock:
            self.attempts[cid][role].append(rec)
        console.print(f"  {role:9} {subject.kernel:6} {cid:34} #{n} {why:11} "
                      f"{rec['observed']}" + (" [infra]" if rec["infra"] else ""),
                      highlight=False)
        return rec

    def _with_retries(self, role: str, cell: Cell, why: str, fresh: bool) -> None:
        self.attempt(role, cell, why, fresh)
        while compare.needs_infra_retry(self.attempts[cell_id(cell)][role], self.table,
                                        self.plan.infra_retries):
            self.attempt(role, cell, "infra-retry", True)

    def _side(self, role: str, cells: list[Cell], why: str, fresh: bool, times: int) -> None:
        try:
            for cell in cells:
                for _ in range(times):
                    self._with_retries(role, cell, why, fresh)
        except BaseException as exc:   # noqa: BLE001 - reported by run(), never swallowed
            self.failures.append(f"{role}: {exc!r}")
            raise

    def _both(self, cells: list[Cell], why: str, fresh: bool, times: int,
              roles: tuple[str, ...] = ROLES) -> None:
        if not self.plan.concurrent or len(roles) == 1:
            for r in roles:
                self._side(r, cells, why, fresh, times)
            return
        threads = [threading.Thread(target=self._side, args=(r, cells, why, fresh, times),
                                    name=f"validate-{r}", daemon=True) for r in roles]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.failures:
            raise RuntimeError("; ".join(self.failures))

    def run(self) -> list[dict[str, Any]]:
        """First pass on both kernels at once, infra retries, then reruns of the cells that
        differ on fresh guests on both. Returns one result per cell (compare.decide plus
        the cell, its attempts and the expectations)."""
        p = self.plan
        if self._restore_base():
            console.print(f"pass 1: {len(p.cells)} cells on {p.candidate.kernel}; the base's "
                          f"first pass from the cache ({self.cache_state})", highlight=False)
            self._both(p.cells, "first", False, 1, roles=("candidate",))
        else:
            console.print(f"pass 1: {len(p.cells)} cells on {p.base.kernel} and "
                          f"{p.candidate.kernel}")
            self._both(p.cells, "first", False, 1)
            self._store_base()
        differ = [c for c in p.cells
                  if compare.differs(*self._pair(c), self.table)]
        if differ and p.reruns > 0:
            console.print(f"pass 2: {len(differ)} cells differ; {p.reruns} reruns each on a "
                          "freshly booted guest, on both kernels")
            self._both(differ, "rerun", True, p.reruns)
        return [self.result(c) for c in p.cells]

    def _restore_base(self) -> bool:
        """Fill the base's first pass from the cache entry, if there is one for exactly
        these cells. Returns whether it did."""
        bc = self.base_cache
        doc = bc.load() if bc else None
        if bc is None or doc is None or self.cache_state is None:
            return False
        try:
            restored = {cell_id(c): bc.restore(doc, cell_id(c), self.out / "base" /
                                               cell_id(c).replace("/", "__"))
                        for c in self.plan.cells}
        except (KeyError, OSError) as exc:
            console.print(f"base cache {bc.key}: unusable ({exc!r}); running the base")
            return False
        for cid, recs in restored.items():
            self.attempts[cid]["base"] = recs
        self.cache_state.update(used=True, run=doc.get("run"), recorded=doc.get("recorded"))
        return True

    def _store_base(self) -> None:
        """Keep the base's first pass (every attempt so far) for the next run."""
        if self.base_cache is None or self.cache_state is None:
            return
        try:
            stored = self.base_cache.store(
                {cid: list(a["base"]) for cid, a in self.attempts.items()}, self.out,
                self.table.is_infra)
        except OSError as exc:
            console.print(f"base cache {self.base_cache.key}: not stored ({exc!r})")
            return
        self.cache_state["stored"] = stored
        if not stored:
            console.print("base cache: not stored (a base cell has no usable attempt)")

    def _pair(self, c: Cell) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        a = self.attempts[cell_id(c)]
        return a["base"], a["candidate"]

    def result(self, c: Cell) -> dict[str, Any]:
        base, cand = self._pair(c)
        d = compare.decide(base, cand, self.table)
        return {"cell": cell_id(c), "mode": c.mode, "backing": c.backing, "event": c.event,
                "options": c.options,
                **d, "expected": {"base": base[0]["expected"] if base else None,
                                  "candidate": cand[0]["expected"] if cand else None},
                "attempts": {"base": base, "candidate": cand}}


def run_validate(args: argparse.Namespace) -> int:
    """``pinlab validate``: resolve, run, compare, report. Returns the exit code:
    0 no regression, 1 regression, 2 incomplete (infra errors left, or bad input)."""
    from pinlab.images.build import ensure_images

    from .artifacts import run_dir
    from .validate_report import write_all

    try:
        base, cand = resolve_subjects(args)
        table = load_harm()
        try:
            cells = select(all_cells(base.kernel, known_only=False), args.tags)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
        if not cells:
            raise InputError(f"no cell matches the tags {args.tags}")
        if args.reruns < 1:
            raise InputError("--reruns must be at least 1")
        try:
            shard = Shard.resolve(getattr(args, "shard", None))
        except ValueError as exc:
            raise InputError(str(exc)) from exc
    except InputError as exc:
        console.print(f"[red]pinlab validate: {exc}[/]")
        return 2
    selected = len(cells)
    if shard is not None:
        # the same deterministic split as `pinlab matrix --shard` (shard.py), over the
        # base kernel's cells: every machine of a CI job matrix gets its own piece
        cells = split(cells, shard.total)[shard.index - 1]
        console.print(f"shard {shard}: {len(cells)} of {selected} selected cells",
                      highlight=False)
        if not cells:
            console.print("this shard has no cell: nothing to validate (exit 0)")
            return 0
    out = Path(args.out) if args.out else run_dir("validate")
    out.mkdir(parents=True, exist_ok=True)
    for s in (base, cand):
        ensure_images(s.kernel)
    plan = Plan(base, cand, cells, args.tags, args.reruns, compare.INFRA_RETRIES,
                concurrent=not args.serial)
    base_cache = None
    if not getattr(args, "no_base_cache", False):
        try:
            base_cache = BaseCache.for_parts(base_parts(
                base.kernel, base.expectations, [cell_id(c) for c in cells],
                plan.infra_retries))
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation only
            console.print(f"base cache: not used ({type(exc).__name__}: {exc})")
    kernels = [base.kernel, cand.kernel]
    started = time.time()
    t0 = time.monotonic()
    poolclient.stop_all(kernels)     # a pool left by an older run may hold older code
    try:
        validation = Validation(plan, out, table, base_cache=base_cache)
        results = validation.run()
    finally:
        poolclient.stop_all(kernels)
    seconds = time.monotonic() - t0
    code = compare.exit_code(r["result"] for r in results)
    doc = {"schema": "pinlab-validate/1", "base": asdict(base), "candidate": asdict(cand),
           "tags": args.tags, "selected": selected,
           "shard": {"index": shard.index, "total": shard.total} if shard else None,
           "reruns": plan.reruns, "infra_retries": plan.infra_retries,
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
           "seconds": round(seconds, 1), "exit_code": code,
           "base_cache": validation.cache_state, "results": results}
    for role in ROLES:
        rel = next((a.get("release") for r in results for a in r["attempts"][role]
                    if a.get("release")), None)
        doc[role]["release"] = rel
    paths = write_all(doc, out)
    with contextlib.suppress(Exception):
        console.print((out / "summary.md").read_text(), markup=False, highlight=False)
    for k, v in paths.items():
        console.print(f"{k:9} {v}", highlight=False)
    console.print(f"exit {code} ({['no regression', 'regression', 'incomplete'][code]}), "
                  f"{seconds:.0f} s")
    return code
