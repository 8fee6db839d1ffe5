"""Audit log: the test oracle for every DMA access the device makes into region pages.

The log keeps its *own* view of each region instance (which pages had an invalidate
acknowledged, whether the region was destroyed), independent from the engine's page
tables, and flags a **violation** for any access to a page after its invalidate was
acknowledged (until it is re-mapped) or to any page of a destroyed region.

Memory is bounded: the newest records live in a ring; every record is also appended to a
JSONL file when one is given. Violations are additionally kept in their own bounded list.
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any

Record = dict[str, Any]


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
                 on_violation: Callable[[Record], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._ring: deque[Record] = deque(maxlen=ring)
        self._violations: deque[Record] = deque(maxlen=max_violations)
        self._path = path
        self._file: IO[str] | None = open(path, "a", buffering=1 << 20) if path else None  # noqa: SIM115
        self._file_start = self._file.tell() if self._file is not None else 0  # earlier runs
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

    # --- recording ------------------------------------------------------------------
    def _emit(self, rec: Record) -> Record:
        """Append under the lock. Returns the record (with seq and t filled in)."""
        self._seq += 1
        rec["seq"] = self._seq
        rec["t"] = time.monotonic_ns()
        self._ring.append(rec)
        self.counters["records"] += 1
        if self._file is not None:
            self._write(rec["seq"], json.dumps(rec, separators=(",", ":")) + "\n")
        return rec

    def _write(self, seq: int, line: str) -> None:
        assert self._file is not None
        if seq % INDEX_EVERY == 1:
            self._index_seq.append(seq)
            self._index_off.append(self._file_end)
        self._file.write(line)
        self._file_end += len(line)

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

    def reset(self) -> None:
        with self._lock:
            self.counters["resets"] += 1
            self._emit({"kind": "reset"})

    def access(self, track: RegionTrack, page: int, gpa: int, length: int, write: bool,
               gen: int = 0) -> None:
        """Record one access to one page (call it after the copy, under the region lock)."""
        viol = None
        with self._lock:
            self.counters["writes" if write else "reads"] += 1
            self.counters["bytes_written" if write else "bytes_read"] += length
            d = "w" if write else "r"
            self._seq += 1
            seq, t = self._seq, time.monotonic_ns()
            self._ring.append({"kind": "access", "region": track.rid, "inst": track.inst,
                               "page": page, "gpa": gpa, "len": length, "dir": d, "gen": gen,
                               "seq": seq, "t": t})
            self.counters["records"] += 1
            if self._file is not None:  # hot path: format by hand, same keys as json.dumps
                self._write(seq,
                            f'{{"kind":"access","region":{track.rid},"inst":{track.inst},'
                            f'"page":{page},"gpa":{gpa},"len":{length},"dir":"{d}",'
                            f'"gen":{gen},"seq":{seq},"t":{t}}}\n')
            if track.destroyed:
                viol = self._violation(track, "access to a destroyed region", page=page,
                                       gpa=gpa, len=length, dir=d)
            elif track.revoked[page]:
                viol = self._violation(track, "access after invalidate ack", page=page,
                                       gpa=gpa, len=length, dir=d)
        if viol is not None and self.on_violation is not None:
            self.on_violation(dict(viol))

    # --- queries --------------------------------------------------------------------
    def query(self, since: int = 0, region: int | None = None, limit: int = 1000,
              kind: str | None = None) -> list[Record]:
        """Records with seq > since, oldest first. Records that already left the in-memory
        ring are read back from the JSONL file (when there is one)."""
        out: list[Record] = []
        with self._lock:
            first = self._ring[0]["seq"] if self._ring else self._seq + 1
            source: Any = self._ring
            if since + 1 < first and self._file is not None and self._path:
                self._file.flush()
                source = self._read_file(since, first)
            for rec in source:
                if rec["seq"] <= since:
                    continue
                if region is not None and rec.get("region") != region:
                    continue
                if kind is not None and rec["kind"] != kind:
                    continue
                out.append(dict(rec))
                if len(out) >= limit:
                    break
        return out

    def _read_file(self, since: int, first_in_ring: int) -> Any:
        """Older records from the file, then the ring (caller holds the lock)."""
        assert self._path is not None
        i = bisect.bisect_right(self._index_seq, since + 1) - 1  # last entry <= since+1
        start = self._index_off[i] if i >= 0 else self._file_start
        with open(self._path) as f:
            f.seek(start)
            for line in f:
                rec = json.loads(line)
                if rec["seq"] >= first_in_ring:
                    break
                if rec["seq"] > since:
                    yield rec
        yield from self._ring

    def violations(self, since: int = 0, limit: int = 1000) -> list[Record]:
        with self._lock:
            return [dict(r) for r in self._violations if r["seq"] > since][:limit]

    def stats(self) -> dict[str, int]:
        with self._lock:
            first = self._ring[0]["seq"] if self._ring else self._seq + 1
            return {**self.counters, "last_seq": self._seq, "first_seq_in_memory": first}

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
