"""Event ``seal-write``.

F_SEAL_WRITE: only memfd has seals; memfd-thp is the memfd whose pages are one shmem THP
(memfd_wait_for_pins counts a THP's references per folio since f2b277c4d1c6;
docs/pinning-semantics.md row 58).
"""

from __future__ import annotations

from pinlab.common.vocab import Key, Outcome

from ..classify import F_SEAL_WRITE, Inconclusive, Judge, step, step_errno
from . import Event


def classify(j: Judge) -> str:
    st = step(j.rep, "seal_write")
    j.f["seal"] = st
    e = step_errno(j.rep, "seal_write")
    if e:
        return f"SEAL_REFUSED({st.get('errno_name') or e})"
    seals = j.rep.get(Key.SEALS)
    j.f["seals"] = seals
    if not isinstance(seals, int) or not seals & F_SEAL_WRITE:
        raise Inconclusive("F_GET_SEALS does not show F_SEAL_WRITE")
    return Outcome.SEAL_APPLIED


EVENT = Event(
    "seal-write",
    order=15,
    backings=("memfd", "memfd-thp"),
    classify=classify,
)
