"""The audit file's access lines of one access run, formatted by compiled code (numba).

An access run of ``n`` pages (``audit.AuditLog.access_run``) becomes ``n`` JSON lines
that differ only in ``page``, ``gpa``, ``len`` and ``seq``. Formatting them with Python
``%`` cost about 0.5 us a line, so the audit file's cost per access grew with the bytes
accessed (a 64 KiB stream chunk is 16 lines: 11-13x the in-memory audit). Here the
constant parts are built once per run in Python and the decimal numbers are written by
:func:`format_run`, without the interpreter lock; the text is byte for byte what
``json.dumps`` of the records gives (``audit._run_lines``, which the tests compare).
"""

from __future__ import annotations

import numpy as np
from numba import njit

PAGE_SIZE = 4096
_GPA = np.frombuffer(b',"gpa":', dtype=np.uint8)
_LEN = np.frombuffer(b',"len":', dtype=np.uint8)
MAX_DIGITS = 20  # a uint64 in decimal


_POW10 = np.array([10 ** i for i in range(MAX_DIGITS)], dtype=np.uint64)


@njit(nogil=True, cache=True)
def _put(out, pos, text):  # pragma: no cover - compiled
    for i in range(text.shape[0]):
        out[pos + i] = text[i]
    return pos + text.shape[0]


@njit(nogil=True, cache=True)
def _num(out, pos, v):  # pragma: no cover - compiled
    """Write the uint64 ``v`` in decimal at ``out[pos]``; returns the end."""
    n = 1
    while n < MAX_DIGITS and v >= _POW10[n]:
        n += 1
    i = pos + n - 1
    while True:
        out[i] = np.uint8(48) + np.uint8(v % np.uint64(10))
        v = v // np.uint64(10)
        if v == 0:
            break
        i -= 1
    return pos + n


@njit(nogil=True, cache=True)
def format_run(out, pre, mid, tail, gpa_key, len_key, page0, bases, po, first_len,
               total, seq0, starts):  # pragma: no cover - compiled
    """Write the lines of one run into ``out`` (uint8, big enough: :func:`capacity`);
    ``starts[i]`` gets the offset of line i and ``starts[n]`` the end. Line i is
    ``pre`` page ``gpa_key`` gpa ``len_key`` len ``mid`` seq ``tail``."""
    pos = 0
    done = 0
    mask = ~np.uint64(PAGE_SIZE - 1)
    for i in range(bases.shape[0]):
        starts[i] = pos
        if i == 0:
            gpa = (bases[0] & mask) + np.uint64(po)
            length = first_len
        else:
            gpa = bases[i] & mask
            length = min(PAGE_SIZE, total - done)
        done += length
        pos = _put(out, pos, pre)
        pos = _num(out, pos, np.uint64(page0 + i))
        pos = _put(out, pos, gpa_key)
        pos = _num(out, pos, gpa)
        pos = _put(out, pos, len_key)
        pos = _num(out, pos, np.uint64(length))
        pos = _put(out, pos, mid)
        pos = _num(out, pos, np.uint64(seq0 + i))
        pos = _put(out, pos, tail)
    starts[bases.shape[0]] = pos
    return pos


def run_text(rid: int, inst: int, page0: int, bases: np.ndarray, po: int, first_len: int,
             total: int, d: str, gen: int, seq0: int, t: int) -> tuple[bytes, np.ndarray]:
    """The JSONL lines of an access run (``audit.Entry`` fields; ``bases`` uint64, one
    page-table entry per page) as ASCII bytes, and the offsets of the lines (n + 1 int64:
    line i is ``text[starts[i]:starts[i+1]]``)."""
    pre = np.frombuffer(f'{{"kind":"access","region":{rid},"inst":{inst},"page":'.encode(),
                        dtype=np.uint8)
    mid = np.frombuffer(f',"dir":"{d}","gen":{gen},"seq":'.encode(), dtype=np.uint8)
    tail = np.frombuffer(f',"t":{t}}}\n'.encode(), dtype=np.uint8)
    n = bases.shape[0]
    per = len(pre) + len(mid) + len(tail) + len(_GPA) + len(_LEN) + 4 * MAX_DIGITS
    out = np.empty(n * per, dtype=np.uint8)
    starts = np.empty(n + 1, dtype=np.int64)
    end = format_run(out, pre, mid, tail, _GPA, _LEN, page0, bases, po, first_len, total,
                     seq0, starts)
    return out[:end].tobytes(), starts
