"""Bounds on everything a client of the device can make it grow, in one place.

Each bound is documented in ``device/REGISTERS.md`` ("Bounds"). A client that reaches one
gets an error (vfio-user errno or QMP error), never a hang or a dead thread.
"""

from __future__ import annotations

import re

# vfio-user: DMA maps per connection; equal to the max_dma_maps we advertise (ENOSPC)
MAX_DMA_MAPS = 65535
# ... of which with an fd: each is an mmap (a VMA) or a kept fd (ENOSPC beyond)
MAX_FD_DMA_MAPS = 1024
# vfio-user: a client that does not read its replies (or stalls inside a message) for this
# long is disconnected; unread replies are thus bounded by the socket buffer
MESSAGE_TIMEOUT = 10.0
# JSON (VERSION payload, QMP input): deepest nesting of objects/arrays accepted
MAX_JSON_DEPTH = 32
# QMP: control clients connected at once (each has a reader and a writer thread)
MAX_CONTROL_CLIENTS = 16
# QMP: bytes of one unparsed command; replies and events queued per client
MAX_QMP_INPUT = 1 << 20
MAX_QMP_QUEUE = 10000
# audit: bytes of JSONL written to the --audit file before a "truncated" record ends it
AUDIT_FILE_MAX = 512 << 20

_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


class JsonDepthError(ValueError):
    """The text nests objects/arrays deeper than allowed; ``pos``: where it got too deep."""

    def __init__(self, why: str, pos: int) -> None:
        super().__init__(why)
        self.pos = pos


def check_json_depth(text: str, limit: int = MAX_JSON_DEPTH) -> None:
    """Raise :class:`JsonDepthError` if ``text`` (JSON, possibly incomplete or several
    values) nests ``[``/``{`` more than ``limit`` deep. Strings are skipped, so brackets
    inside them do not count. Linear in ``len(text)``; runs before ``json`` parses, whose
    C scanner would otherwise recurse to Python's recursion limit (RecursionError)."""
    if text.count("[") + text.count("{") <= limit:
        return  # the usual case: no scan needed
    depth = 0
    for m in _TOKENS.finditer(text):
        c = m.group()[0]
        if c in "[{":
            depth += 1
            if depth > limit:
                raise JsonDepthError(f"JSON nested deeper than {limit} levels", m.start())
        elif c in "]}":
            depth = max(depth - 1, 0)
