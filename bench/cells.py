"""``pinlab bench cells``: what one matrix cell costs in a warm guest, through the guest
agent against the plain-SSH path it replaced, both measured in the same guest in the same
run, interleaved.

Per cell, both paths do the same four things:

* ``ssh`` (baseline): ``rmmod && insmod`` over SSH, ``dmesg | wc -l`` to mark the log,
  ``python3 -m pinlab.guest.workload cell ...`` (a new interpreter in the guest), ``dmesg | tail``;
* ``agent``: the agent's ``reload``, ``dmesg-mark``, ``run`` (a child forked from the
  warm agent) and ``dmesg-since``.

Figures are medians over the rounds, per cell and overall, as ratios agent / ssh. Nothing
is asserted; the goal (at most half the time) is printed next to the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from pinlab.common.vocab import guest_python
from pinlab.orchestrator.artifacts import run_dir
from pinlab.orchestrator.guestenv import guest_config
from pinlab.orchestrator.session import GuestSession
from pinlab.orchestrator.vm import GUEST_MODULE

# representative cells: no WARN (the guest stays fresh), every kind of backing and step
CELLS = [("pin", "anon", "dma-write"), ("pin", "memfd", "truncate"),
         ("odp", "memfd", "pageout"), ("pin", "ext4", "punch-hole"),
         ("odp", "anon", "fork"), ("pin", "anon", "memcg-reclaim"),
         ("odp", "xfs", "writeback")]
GOAL = "<= 0.5 (agent at most half the SSH path's time)"


def _argv(mode: str, backing: str, event: str) -> list[str]:
    return ["cell", "--mode", mode, "--backing", backing, "--event", event]


def via_ssh(s: GuestSession, cell: tuple[str, str, str]) -> float:
    ssh = s.guest.ssh
    t0 = time.perf_counter()
    ssh.run(f"rmmod pinlab && insmod {GUEST_MODULE} && for i in $(seq 100); do "
            "[ -c /dev/pinlab0 ] && exit 0; sleep 0.1; done; exit 1", check=True, timeout=60)
    mark = int(ssh.run("dmesg | wc -l", check=True).out.strip() or 0)
    res = ssh.run(guest_python("workload", *_argv(*cell)), timeout=300)
    report = json.loads(res.out.strip().splitlines()[-1])
    if "error" in report:
        raise RuntimeError(f"ssh path: {cell}: {report['error']}")
    ssh.run(f"dmesg | tail -n +{mark + 1}", check=True)
    return time.perf_counter() - t0


def via_agent(s: GuestSession, cell: tuple[str, str, str]) -> float:
    t0 = time.perf_counter()
    s.reload_module()
    mark = s.dmesg_mark()
    report = s.workload(*_argv(*cell))
    if "error" in report:
        raise RuntimeError(f"agent path: {cell}: {report['error']}")
    s.dmesg_since(mark)
    return time.perf_counter() - t0


def run(kernel: str, rounds: int, artifacts: Path) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {}
    with GuestSession.boot(kernel, artifacts, config=guest_config()) as s:
        s.agent  # noqa: B018 - start it outside the measurement
        for _ in range(rounds):
            for cell in CELLS:
                name = "/".join(cell)
                t = times.setdefault(name, {"ssh": [], "agent": []})
                t["ssh"].append(via_ssh(s, cell))
                t["agent"].append(via_agent(s, cell))
        release = s.guest.images.kernel.release
    figures: dict[str, Any] = {}
    for name, t in times.items():
        a, b = statistics.median(t["agent"]), statistics.median(t["ssh"])
        figures[name] = {"value": round(a, 4), "baseline": round(b, 4),
                         "ratio": round(a / b, 3), "unit": "s", "goal": GOAL}
    a = statistics.median([x for t in times.values() for x in t["agent"]])
    b = statistics.median([x for t in times.values() for x in t["ssh"]])
    figures["all cells"] = {"value": round(a, 4), "baseline": round(b, 4),
                            "ratio": round(a / b, 3), "unit": "s", "goal": GOAL}
    return {"kernel": release, "rounds": rounds, "figures": figures}


def table(res: dict[str, Any]) -> str:
    lines = [f"cell cost on {res['kernel']}, median of {res['rounds']} rounds "
             "(agent vs. SSH baseline, same guest, interleaved)",
             f"{'cell':<28} {'agent s':>8} {'ssh s':>8} {'ratio':>6}  goal"]
    for name, f in res["figures"].items():
        lines.append(f"{name:<28} {f['value']:>8.3f} {f['baseline']:>8.3f} "
                     f"{f['ratio']:>6.2f}  {f['goal']}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pinlab bench cells")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--kernel", default="6.12")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    out = run_dir("bench-cells")
    res = run(args.kernel, args.rounds, out / "guest")
    (out / "cells.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2) if args.json else table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
