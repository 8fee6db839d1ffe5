"""Audit log: the test oracle for every DMA access the device makes into region pages.

The log keeps its *own* view of each region instance (which pages had an invalidate
acknowledged, whether the region was destroyed), independent from the engine's page
tables, and flags a **violation** for any access to a page after its invalidate was
acknowledged (until it is re-mapped) or to any page of a destroyed region.

Memory is bounded: the newest records live in a ring; every record is also appended to a
JSONL file when one is given. Violations are additionally kept in their own bounded list.
The file is bounded too (``file_max`` bytes, :data:`~pinlab.device.limits.AUDIT_FILE_MAX`
by default): the record that would pass the bound is replaced by one ``"kind":
"truncated"`` line (its ``seq`` is the first record not written) and nothing more is
written; the in-memory ring, the counters and the violations carry on. The file is
created 0600 and never through a symlink (O_NOFOLLOW).

Hot path: the engine records the pages of one DMA chunk with one :meth:`AuditLog.access_run`
call. When no page of the run can be a violation (the usual case, checked with one
``bytearray.find``) the run is kept as one compact tuple, and its per-page records (dicts
or JSON lines) are only built when queried or written to the file, which happens in
batches. Query results and the file are exactly what per-page recording gives, except
that the pages of one run share one ``t``.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

import numpy as np

from .auditfmt import run_text
from .fastpath import ready as fastpath_ready
from .limits import AUDIT_FILE_MAX

Record = dict[str, Any]
# A ring entry: (seq, 1, record) for a record kept as a dict, or an access run
# (seq0, n, rid, inst, bases, po, first_len, total, dir, gen, t): n pages from page0 =
# ``bases`` index 0.. (page-table entries: page address | flag bits), the first page
# accessed from byte ``po`` for ``first_len`` bytes, ``total`` bytes in all.
Entry = tuple[Any, ...]
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
FILE_BATCH = 4096  # records formatted and written to the JSONL file at once
MARKER_RESERVE = 512  # bytes kept free below the file bound for the "truncated" line


def open_audit_file(path: str) -> IO[bytes]:
    """Open ``path`` for appending: created 0600, never through a symlink, regular files
    only. Raises OSError (ELOOP for a symlink, EINVAL for a non-regular file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, "audit log is not a regular file", path)
        return os.fdopen(fd, "ab", buffering=1 << 20)  # ASCII lines, written as bytes
    except BaseException:
        os.close(fd)
        raise


class RegionTrack:
    """The audit's view of one region instance (a re-created id is a new instance)."""

    __slots__ = ("rid", "inst", "npages", "revoked", "destroyed")

    def __init__(self, rid: int, inst: int, npages: int) -> None:
        self.rid = rid
        self.inst = inst
        self.npages = npages
        self.revoked = bytearray(npages)  # 1 = invalidate acknowledged, not re-mapped
        self.destroyed = False


INDEX_EVERY = 1024


class AuditLog:
    def __init__(self, path: str | None = None, ring: int = 65536, max_violations: int = 10000,
                 on_violation: Callable[[Record], None] | None = None,
                 file_max: int = AUDIT_FILE_MAX) -> None:
        self._lock = threading.Lock()
        self._ring: deque[Entry] = deque()
        self._ring_max = ring
        self._ring_records = 0  # records in _ring (>= ring once full; runs are not split)
        self._violations: deque[Record] = deque(maxlen=max_violations)
        self._path = path
        self._file: IO[bytes] | None = open_audit_file(path) if path else None
        self._file_start = self._file.tell() if self._file is not None else 0  # earlier runs
        self._file_max = max(file_max, 2 * MARKER_RESERVE)
        self._truncated_at = 0  # seq of the first record not written (0: none)
        self._to_file = self._file is not None  # records still go to the file
        if self._to_file and self._file_start + MARKER_RESERVE >= self._file_max:
            self._to_file = False  # an earlier run filled it; its marker is already there
            self._truncated_at = 1
        # entries not written to the file yet (written in batches of FILE_BATCH records)
        self._unwritten: list[Entry] = []
        self._unwritten_records = 0
        # sparse index into the file: _index_seq[i] is the seq of a record that starts at
        # byte _index_off[i], one entry every INDEX_EVERY records (records are ASCII)
        self._file_end = self._file_start
        self._index_seq: list[int] = []
        self._index_off: list[int] = []
        self._seq = 0
        self._inst = 0
        self.on_violation = on_violation
        self.counters: dict[str, int] = dict.fromkeys(
            ("records", "reads", "writes", "bytes_read", "bytes_written", "maps",
             "invalidates", "invalidate_acks", "destroys", "resets", "violations"), 0)

    # --- storage (caller holds the lock) ----------------------------------------------
    def _append(self, entry: Entry, n: int) -> None:
        ring = self._ring
        ring.append(entry)
        self._ring_records += n
        while self._ring_records - ring[0][1] >= self._ring_max:  # keep >= ring records
            self._ring_records -= ring.popleft()[1]
        self.counters["records"] += n
        if self._to_file:
            self._unwritten.append(entry)
            self._unwritten_records += n
            if self._unwritten_records >= FILE_BATCH:
                self._write_unwritten()

    def _write_unwritten(self) -> None:
        """Format the pending entries and append them to the (buffered) file. The lines of
        an access run of several pages are formatted by compiled code (auditfmt.py) once
        it is loaded (``fastpath.ready``)."""
        assert self._file is not None
        write = self._file.write
        end = self._file_end
        index_seq, index_off = self._index_seq, self._index_off
        compiled = fastpath_ready()
        for entry in self._unwritten:
            seq0 = entry[0]
            starts: Sequence[int] | None = None  # offsets of the lines, for runs
            if len(entry) == 3:
                text = (json.dumps(entry[2], separators=(",", ":")) + "\n").encode()
            elif entry[1] == 1:  # a one-page run: the usual entry of small accesses
                text = (_LINE % (entry[2], entry[3], entry[4], (entry[5][0] & ~PAGE_MASK)
                                 + entry[6], entry[7], entry[9], entry[10], seq0,
                                 entry[11])).encode()
            elif compiled:
                _, _, rid, inst, page0, bases, po, first_len, total, d, gen, t = entry
                text, starts = run_text(rid, inst, page0, np.asarray(bases, np.uint64),
                                        po, first_len, total, d, gen, seq0, t)
            else:
                lines = _run_lines(entry)
                starts = [0, *itertools.accumulate(len(x) for x in lines)]
                text = "".join(lines).encode()
            nlines = 1 if starts is None else len(starts) - 1
            room = self._file_max - MARKER_RESERVE - end
            cut = -1
            if len(text) > room:  # the bound: keep the lines that fit, then the marker
                if starts is None:
                    starts = [0, len(text)]
                cut = bisect.bisect_right(starts, room) - 1  # lines 0..cut-1 fit
                text = text[:starts[cut]]
                nlines = cut
            k = (1 - seq0) % INDEX_EVERY  # first record of the entry with seq % E == 1
            for j in range(k, nlines, INDEX_EVERY):
                index_seq.append(seq0 + j)
                index_off.append(end + (int(starts[j]) if starts is not None else 0))
            write(text)
            end += len(text)
            if cut >= 0:
                self._file_end = end
                self._write_marker(seq0 + cut)
                break
        else:
            self._file_end = end
        self._unwritten.clear()
        self._unwritten_records = 0

    def _write_marker(self, seq: int) -> None:
        """End the file with the "truncated" line; caller holds the lock."""
        assert self._file is not None
        line = json.dumps({"kind": "truncated", "seq": seq, "t": time.monotonic_ns(),
                           "bytes": self._file_end, "file_max": self._file_max,
                           "why": "audit file reached its bound; later records are only "
                                  "in memory (query-audit, query-violations)"},
                          separators=(",", ":")) + "\n"
        self._file.write(line.encode())
        self._file.flush()
        self._file_end += len(line)
        self._to_file = False
        self._truncated_at = seq

    def _emit(self, rec: Record) -> Record:
        """Append under the lock. Returns the record (with seq and t filled in)."""
        self._seq += 1
        rec["seq"] = self._seq
        rec["t"] = time.monotonic_ns()
        self._append((self._seq, 1, rec), 1)
        return rec

    def _violation(self, track: RegionTrack | None, why: str, **fields: Any) -> Record:
        rec = self._emit({"kind": "violation", "region": track.rid if track else 0,
                          "inst": track.inst if track else 0, "why": why, **fields})
        self._violations.append(rec)
        self.counters["violations"] += 1
        return rec

    def region_created(self, rid: int, npages: int) -> RegionTrack:
        with self._lock:
            self._inst += 1
            track = RegionTrack(rid, self._inst, npages)
            self._emit({"kind": "create", "region": rid, "inst": track.inst, "npages": npages})
            return track

    def pages_mapped(self, track: RegionTrack, first: int, count: int) -> None:
        with self._lock:
            track.revoked[first:first + count] = bytes(count)
            self.counters["maps"] += 1
            self._emit({"kind": "map", "region": track.rid, "inst": track.inst,
                        "first": first, "count": count})

    def invalidate_request(self, track: RegionTrack, first: int, count: int) -> None:
        with self._lock:
            self.counters["invalidates"] += 1
            self._emit({"kind": "invalidate", "region": track.rid, "inst": track.inst,
                        "first": first, "count": count})

    def invalidate_ack(self, track: RegionTrack, first: int, count: int, mapped: int) -> None:
        with self._lock:
            track.revoked[first:first + count] = b"\x01" * count
            self.counters["invalidate_acks"] += 1
            self._emit({"kind": "invalidate_ack", "region": track.rid, "inst": track.inst,
                        "first": first, "count": count, "mapped": mapped})

    def region_destroyed(self, track: RegionTrack) -> None:
        with self._lock:
            track.destroyed = True
            self.counters["destroys"] += 1
            self._emit({"kind": "destroy", "region": track.rid, "inst": track.inst})

    def scratch(self, value: int) -> None:
        """A write of the SCRATCH register: a marker the guest can place in the log with a
        plain MMIO write (e.g. "the notifier has returned"), ordered with the accesses."""
        with self._lock:
            self._emit({"kind": "scratch", "value": value})

    def reset(self) -> None:
        with self._lock:
            self.counters["resets"] += 1
            self._emit({"kind": "reset"})

    def access(self, track: RegionTrack, page: int, gpa: int, length: int, write: bool,
               gen: int = 0) -> None:
        """Record one access to one page (call it after the copy, under the region lock)."""
        self.access_run(track, page, (gpa & ~PAGE_MASK,), gpa & PAGE_MASK, length, write, gen)

    def access_run(self, track: RegionTrack, page0: int, bases: Sequence[int], po: int,
                   total: int, write: bool, gen: int = 0) -> None:
        """Record an access to ``len(bases)`` consecutive pages from ``page0``: ``total``
        bytes starting at byte ``po`` of the first page, ``bases[i]`` the guest-physical
        page address of page ``page0 + i`` (low 12 bits are ignored). One record per page,
        as :meth:`access` makes. Call it after the copy, under the region lock."""
        n = len(bases)
        if not n:
            return
        first_len = min(PAGE_SIZE - po, total)
        d = "w" if write else "r"
        viols: list[Record] = []
        with self._lock:
            c = self.counters
            c["writes" if write else "reads"] += n
            c["bytes_written" if write else "bytes_read"] += total
            t = time.monotonic_ns()
            if not track.destroyed and track.revoked.find(1, page0, page0 + n) < 0:
                seq0 = self._seq + 1
                self._seq += n
                entry = (seq0, n, track.rid, track.inst, page0, bases, po, first_len, total,
                         d, gen, t)
                ring = self._ring
                ring.append(entry)  # _append, inlined for the hot path
                self._ring_records += n
                while self._ring_records - ring[0][1] >= self._ring_max:
                    self._ring_records -= ring.popleft()[1]
                c["records"] += n
                if self._to_file:
                    self._unwritten.append(entry)
                    self._unwritten_records += n
                    if self._unwritten_records >= FILE_BATCH:
                        self._write_unwritten()
            else:  # some page may be a violation: one record at a time, as it happens
                pos = 0
                for i in range(n):
                    page = page0 + i
                    gpa = (bases[i] & ~PAGE_MASK) + (po if i == 0 else 0)
                    length = first_len if i == 0 else min(PAGE_SIZE, total - pos)
                    self._seq += 1
                    self._append((self._seq, 1, track.rid, track.inst, page, (gpa,),
                                  gpa & PAGE_MASK, length, length, d, gen, t), 1)
                    pos += length
                    if track.destroyed:
                        viols.append(self._violation(track, "access to a destroyed region",
                                                     page=page, gpa=gpa, len=length, dir=d))
                    elif track.revoked[page]:
                        viols.append(self._violation(track, "access after invalidate ack",
                                                     page=page, gpa=gpa, len=length, dir=d))
        if self.on_violation is not None:
            for v in viols:
                self.on_violation(dict(v))

    # --- queries --------------------------------------------------------------------
    def query(self, since: int = 0, region: int | None = None, limit: int = 1000,
              kind: str | None = None) -> list[Record]:
        """Records with seq > since, oldest first. Records that already left the in-memory
        ring are read back from the JSONL file (when there is one)."""
        out: list[Record] = []
        limit = max(limit, 1)  # as ever: at least the first match is returned
        with self._lock:
            first = self._ring[0][0] if self._ring else self._seq + 1
            if since + 1 < first and self._file is not None and self._path:
                self._write_unwritten()
                self._file.flush()
                for rec in self._read_file(since, first):
                    if region is not None and rec.get("region") != region:
                        continue
                    if kind is not None and rec["kind"] != kind:
                        continue
                    out.append(rec)
                    if len(out) >= limit:
                        return out
            for entry in self._ring:
                seq0, n = entry[0], entry[1]
                if seq0 + n - 1 <= since:
                    continue
                if len(entry) == 3:
                    rec = entry[2]
                    if region is not None and rec.get("region") != region:
                        continue
                    if kind is not None and rec["kind"] != kind:
                        continue
                    out.append(dict(rec))
                    if len(out) >= limit:
                        break
                    continue
                if (region is not None and entry[2] != region) or kind not in (None, "access"):
                    continue
                for rec in _run_records(entry, since, limit - len(out)):
                    out.append(rec)
                if len(out) >= limit:
                    break
        return out

    def _read_file(self, since: int, first_in_ring: int) -> Iterator[Record]:
        """Records with since < seq < first_in_ring from the file (caller holds the lock
        and wrote the pending entries)."""
        assert self._path is not None
        i = bisect.bisect_right(self._index_seq, since + 1) - 1  # last entry <= since+1
        start = self._index_off[i] if i >= 0 else self._file_start
        fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd) as f:
            f.seek(start)
            for line in f:
                rec = json.loads(line)
                if rec["seq"] >= first_in_ring:
                    break
                if rec["seq"] > since:
                    yield rec

    def violations(self, since: int = 0, limit: int = 1000) -> list[Record]:
        with self._lock:
            return [dict(r) for r in self._violations if r["seq"] > since][:limit]

    def stats(self) -> dict[str, int]:
        with self._lock:
            first = self._ring[0][0] if self._ring else self._seq + 1
            return {**self.counters, "last_seq": self._seq, "first_seq_in_memory": first,
                    "file_bytes": self._file_end - self._file_start if self._file else 0,
                    "file_truncated_at": self._truncated_at}

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._write_unwritten()
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._write_unwritten()
                self._file.close()
                self._file = None


def _run_lens(entry: Entry) -> Iterator[tuple[int, int, int]]:
    """(index, gpa, len) of each page of an access run."""
    _, n, _, _, _, bases, po, first_len, total, _, _, _ = entry
    yield 0, (bases[0] & ~PAGE_MASK) + po, first_len
    pos = first_len
    for i in range(1, n):
        length = min(PAGE_SIZE, total - pos)
        yield i, bases[i] & ~PAGE_MASK, length
        pos += length


def _run_records(entry: Entry, since: int, limit: int) -> Iterator[Record]:
    """The per-page records of an access run with seq > since (at most ``limit``)."""
    seq0, _, rid, inst, page0, _, _, _, _, d, gen, t = entry
    for i, gpa, length in _run_lens(entry):
        seq = seq0 + i
        if seq <= since:
            continue
        if limit <= 0:
            return
        limit -= 1
        yield {"kind": "access", "region": rid, "inst": inst, "page": page0 + i, "gpa": gpa,
               "len": length, "dir": d, "gen": gen, "seq": seq, "t": t}


_LINE = ('{"kind":"access","region":%d,"inst":%d,"page":%d,"gpa":%d,"len":%d,"dir":"%s",'
         '"gen":%d,"seq":%d,"t":%d}\n')


def _run_lines(entry: Entry) -> list[str]:
    """The JSONL lines of an access run (the same text as json.dumps of its records)."""
    seq0, _, rid, inst, page0, _, _, _, _, d, gen, t = entry
    tmpl = (f'{{"kind":"access","region":{rid},"inst":{inst},"page":%d,"gpa":%d,'
            f'"len":%d,"dir":"{d}","gen":{gen},"seq":%d,"t":{t}}}\n')
    return [tmpl % (page0 + i, gpa, length, seq0 + i) for i, gpa, length in _run_lens(entry)]
