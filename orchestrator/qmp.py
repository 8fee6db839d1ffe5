"""QMP for the orchestrator: qemu.qmp's QMPClient behind a synchronous face.

Every call has a deadline (qemu.qmp's legacy wrapper has none on connect), and every
message is appended to a log kept with the run's artifacts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient

T = TypeVar("T")


class QMPError(RuntimeError):
    pass


class QMP:
    def __init__(self, path: Path, log: Path | None = None, timeout: float = 30,
                 name: str = "pinlab") -> None:
        self.path = path
        self.log = log
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._events = self._client.events

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout or self.timeout))

    def connect(self) -> dict[str, Any]:
        try:
            self._run(self._client.connect(str(self.path)))
        except Exception as exc:
            raise QMPError(f"QMP connect to {self.path} failed: {exc!r}") from exc
        greeting = self._client.greeting
        g = greeting._raw if greeting is not None and hasattr(greeting, "_raw") else {}
        self._note("greeting", g)
        return dict(g)

    def cmd(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        self._note("->", {"execute": name, "arguments": args})
        try:
            ret = self._run(self._client.execute(name, args or None), timeout)
        except ExecuteError as exc:
            self._note("<-", {"error": str(exc)})
            raise QMPError(f"QMP {name}: {exc}") from exc
        except TimeoutError as exc:
            raise QMPError(f"QMP {name}: no reply within {timeout or self.timeout:.0f}s") from exc
        except Exception as exc:
            raise QMPError(f"QMP {name}: {exc!r}") from exc
        self._note("<-", ret)
        return ret

    def hmp(self, command: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": command}))

    def events(self) -> list[dict[str, Any]]:
        """Events received so far (drained)."""
        with contextlib.suppress(Exception):
            self._run(asyncio.sleep(0), 1)  # let the reader task run
        evs = [dict(e) for e in self._events.clear()]
        for ev in evs:
            self._note("event", ev)
        return evs

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5)
        with contextlib.suppress(Exception):
            self._loop.close()

    def _note(self, tag: str, obj: Any) -> None:
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(f"{time.time():.6f} {tag} {json.dumps(obj, default=str)}\n")
