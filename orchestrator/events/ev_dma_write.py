"""Event ``dma-write``.

Every backing: the device writes generation 1 into the registered pages, nothing else
happens; the baseline every other event is read against.
"""

from __future__ import annotations

from pinlab.common.vocab import BACKINGS, Key

from ..classify import Judge
from . import Event


def classify(j: Judge) -> str:
    return j.outcome(j.views_g(j.file_views(Key.MAP_G1), 1), gen=1)


EVENT = Event(
    "dma-write",
    order=1,
    backings=BACKINGS,
    classify=classify,
    last_gen=1,
    # the read-only flow (orchestrator/readonly.py) and the fast path
    variants=("", "readonly", "fast"),
)
