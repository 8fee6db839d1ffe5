"""The artifact cache: where built images live (never in git), and its manifest.

Every build step records the key of its inputs (recipe version, parameters, source hash) in
``manifest.json``; a step whose key is unchanged and whose outputs exist is not rebuilt.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"


def cache_root() -> Path:
    """``$PINLAB_CACHE``, default ``~/.cache/pinlab``."""
    env = os.environ.get("PINLAB_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "pinlab"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


def digest(*parts: object) -> str:
    """A short stable hash of the given parts (strings, bytes, paths' contents)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            if part.is_dir():
                for f in sorted(p for p in part.rglob("*") if p.is_file()):
                    h.update(str(f.relative_to(part)).encode())
                    h.update(f.read_bytes())
            else:
                h.update(part.read_bytes())
        elif isinstance(part, bytes):
            h.update(part)
        else:
            h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


@dataclass
class Cache:
    root: Path

    @classmethod
    def default(cls) -> Cache:
        return cls(cache_root())

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def logs(self) -> Path:
        p = self.root / "logs"
        p.mkdir(exist_ok=True)
        return p

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise builders (two `pinlab` runs at once must not build the same thing)."""
        with open(self.root / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load(self) -> dict[str, dict[str, object]]:
        try:
            return json.loads((self.root / MANIFEST).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def entry(self, name: str) -> dict[str, object] | None:
        return self._load().get(name)

    def fresh(self, name: str, key: str, outputs: list[Path]) -> bool:
        e = self.entry(name)
        return bool(e and e.get("key") == key and all(p.exists() for p in outputs))

    def record(self, name: str, key: str, **info: object) -> None:
        data = self._load()
        data[name] = {"key": key, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      **info}
        tmp = self.root / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.root / MANIFEST)
