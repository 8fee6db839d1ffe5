"""Comparing a base and a candidate kernel cell by cell: the policy of ``pinlab validate``.

Pure functions on recorded attempts (no guest), so the policy is unit-tested on real,
recorded verdicts (tests/data/validate/). An attempt is one run of one cell on one kernel,
as ``validate.py`` records it::

    {"observed": "WRITES_LOST_SILENTLY", "error_signatures": ["WARNING:at_fs/ext4/...:#f"],
     "signatures": {"WARNING:at_...": 1}, "fresh": true, "why": "rerun", ...}

Policy (also in README.md, "Validating a kernel change"):

* An attempt whose class is infrastructure (harm.toml ``[infra]``: ERROR, QEMU_CRASHED,
  INCONCLUSIVE(...), ...) says nothing about the kernel: it is retried (``INFRA_RETRIES``
  times) and never compared. A side with no other attempt left makes the cell
  ``infra-error``, never a regression.
* A cell whose first attempts differ (class, or kernel-log error signatures) is re-run
  ``reruns`` times on a freshly booted guest on both kernels. It is ``regression`` /
  ``fix`` / ``changed`` only if every attempt on each side agrees; otherwise ``flaky``.
* A kernel-log error signature (WARN/BUG/Oops/hung task/ext4 buffers, harm.toml
  ``[dmesg]``) that the candidate shows and no base attempt did is a ``regression`` even if
  it appeared once: a WARN_ON_ONCE fires once per boot (include/asm-generic/bug.h, its
  static __warned flag), and syzbot and the 0-day robot count a single crash.
* Same class on both sides: ``unchanged``, unless an error signature the base showed every
  time is gone from every candidate attempt (``fix``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from .harm import HarmTable

RESULTS = ("regression", "fix", "changed", "unchanged", "flaky", "infra-error")
INFRA_RETRIES = 2
RERUNS = 3

Attempt = dict[str, Any]


def is_infra(a: Attempt, table: HarmTable) -> bool:
    return table.is_infra(str(a.get("observed", "ERROR")))


def valid(attempts: Iterable[Attempt], table: HarmTable) -> list[Attempt]:
    """The attempts that say something about the kernel (not infrastructure)."""
    return [a for a in attempts if not is_infra(a, table)]


def error_signatures(attempts: Iterable[Attempt]) -> set[str]:
    return {s for a in attempts for s in a.get("error_signatures", [])}


def differs(base: list[Attempt], candidate: list[Attempt], table: HarmTable) -> bool:
    """Do the sides' valid attempts so far differ (class or error signatures)? Such a cell
    is re-run on fresh guests. False while either side has no valid attempt."""
    vb, vc = valid(base, table), valid(candidate, table)
    if not vb or not vc:
        return False
    return ({a["observed"] for a in vb} != {a["observed"] for a in vc}
            or error_signatures(base) != error_signatures(candidate))


def needs_infra_retry(attempts: list[Attempt], table: HarmTable,
                      retries: int = INFRA_RETRIES) -> bool:
    """The last attempt was infrastructure and fewer than ``retries`` retries were made."""
    if not attempts or not is_infra(attempts[-1], table):
        return False
    return sum(a.get("why") == "infra-retry" for a in attempts) < retries


def _tally(attempts: list[Attempt]) -> str:
    c = Counter(a["observed"] for a in attempts)
    return ", ".join(f"{k} {n}/{len(attempts)}" for k, n in c.most_common())


def decide(base: list[Attempt], candidate: list[Attempt], table: HarmTable) -> dict[str, Any]:
    """The result of one cell from all its attempts on both kernels.

    Returns ``{"result": one of RESULTS, "reason": str, "base": class or None,
    "candidate": class or None, "base_harm": int|None, "candidate_harm": int|None,
    "new_signatures": [...], "gone_signatures": [...]}``.
    Raises harm.UnknownClass for a class harm.toml does not rank."""
    vb, vc = valid(base, table), valid(candidate, table)
    out: dict[str, Any] = {"base": None, "candidate": None, "base_harm": None,
                           "candidate_harm": None, "new_signatures": [],
                           "gone_signatures": []}
    for a in vb + vc:            # an unranked class is an error, whatever the comparison
        table.harm(a["observed"])
    if not vb or not vc:
        side = " and ".join(s for s, v in (("base", vb), ("candidate", vc)) if not v)
        last = [a["observed"] for a in (base if not vb else candidate)][-1:]
        return {**out, "result": "infra-error",
                "reason": f"no usable attempt on the {side} after "
                          f"{len(base) if not vb else len(candidate)} tries (last: "
                          f"{last[0] if last else 'none'})"}
    new = sorted(error_signatures(candidate) - error_signatures(base))
    always_base = set.intersection(*(set(a.get("error_signatures", [])) for a in vb))
    gone = sorted(always_base - error_signatures(candidate))
    out.update(new_signatures=new, gone_signatures=gone)
    classes_b = {a["observed"] for a in vb}
    classes_c = {a["observed"] for a in vc}
    if len(classes_b) == 1:
        out.update(base=next(iter(classes_b)), base_harm=table.harm(next(iter(classes_b))))
    if len(classes_c) == 1:
        out.update(candidate=next(iter(classes_c)),
                   candidate_harm=table.harm(next(iter(classes_c))))
    if new:
        seen = sum(bool(set(a.get("error_signatures", [])) & set(new)) for a in candidate)
        return {**out, "result": "regression",
                "reason": f"new kernel-log signature on the candidate ({seen}/{len(candidate)} "
                          f"attempts): {', '.join(new)}"}
    if len(classes_b) > 1 or len(classes_c) > 1:
        return {**out, "result": "flaky",
                "reason": f"not reproducible: base {_tally(vb)}; candidate {_tally(vc)}"}
    b, c = out["base"], out["candidate"]
    hb, hc = out["base_harm"], out["candidate_harm"]
    n = f"(base {len(vb)}/{len(vb)}, candidate {len(vc)}/{len(vc)})"
    if b == c:
        if gone:
            return {**out, "result": "fix",
                    "reason": f"{b} on both, but the candidate no longer logs "
                              f"{', '.join(gone)} {n}"}
        some_base = error_signatures(vb) - error_signatures(candidate)
        if some_base:
            return {**out, "result": "flaky",
                    "reason": f"{b} on both; the base logged {', '.join(sorted(some_base))} "
                              "in some attempts only"}
        return {**out, "result": "unchanged", "reason": f"{b} on both {n}"}
    lb, lc = table.level(b).name, table.level(c).name
    if hc > hb:
        kind, word = "regression", "more"
    elif hc < hb:
        kind, word = "fix", "less"
    else:
        kind, word = "changed", "equally"
    return {**out, "result": kind,
            "reason": f"{b} ({lb}) -> {c} ({lc}): {word} harmful, every attempt {n}"}


def exit_code(results: Iterable[str]) -> int:
    """0 no regression, 1 a regression, 2 incomplete (an infra-error left after retries).
    A regression wins over incomplete: it is a definite finding whatever else failed."""
    rs = list(results)
    if "regression" in rs:
        return 1
    if "infra-error" in rs:
        return 2
    return 0
