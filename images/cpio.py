"""A minimal writer for the newc cpio format the kernel unpacks as an initramfs."""

from __future__ import annotations

import gzip
import io
import stat
from pathlib import Path


class Newc:
    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", nlink: int = 1) -> None:
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08X}" for v in (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, 0, 0, len(namez), 0))
        self._ino += 1
        self._buf.write(hdr.encode() + namez)
        self._buf.write(b"\0" * (-(110 + len(namez)) % 4))
        self._buf.write(data)
        self._buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def write(self, path: Path) -> None:
        self._entry("TRAILER!!!", 0)
        tmp = path.with_suffix(".tmp")
        with gzip.GzipFile(tmp, "wb", compresslevel=6, mtime=0) as gz:
            gz.write(self._buf.getvalue())
        tmp.replace(path)
