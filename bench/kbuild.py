"""``pinlab bench kbuild``: what a kernel build costs, cold against incremental, measured in
the same run on the same source and config.

* ``cold``: the base kernel (default Debian's 6.12 source, ``--config small``), built
  from the pristine source (a build already in the cache is reused: its figures are the
  ones recorded when it was built, in its ``kernel.json``);
* ``one-file``: the same source with a one-file patch (default: the comment-only
  ``mm/gup.c`` demonstration patch), seeded from the cold build's tree, so only what
  the patch touches is recompiled and vmlinux relinked.

Printed: both wall times, the compile step's, ccache's hits, and the ratio one-file /
cold. Nothing is asserted (performance is not a test).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pinlab.images import kbuild, ksource
from pinlab.images.cache import Cache
from pinlab.images.kerrors import KernelBuildError

DEMO = Path(__file__).resolve().parent.parent / "tests" / "data" / "patches"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pinlab bench kbuild")
    p.add_argument("--base", default="debian:6.12")
    p.add_argument("--tree")
    p.add_argument("--config", default="small")
    p.add_argument("--patch", default=str(DEMO / "6.12-gup-comment-only.patch"))
    p.add_argument("--jobs", type=int)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cache = Cache.default()
    cfg = kbuild.ConfigSpec(a.config)
    src = ksource.parse_source(a.base, a.tree)
    out: dict[str, dict[str, object]] = {}
    try:
        for label, patches in (("cold", []), ("one-file", [Path(a.patch)])):
            kid = kbuild.build_kernel(cache, kbuild.BuildSpec(src, patches, cfg), jobs=a.jobs)
            meta = kbuild.kernel_meta(cache, kid)
            out[label] = {"id": kid, "durations_s": meta.get("durations_s"),
                          "ccache": meta.get("ccache"), "seeded_from": meta.get("seeded_from")}
    except KernelBuildError as exc:
        print(f"pinlab bench kbuild: {exc}", file=sys.stderr)
        return 2
    cold = float(out["cold"]["durations_s"]["total"])  # type: ignore[index]
    inc = float(out["one-file"]["durations_s"]["total"])  # type: ignore[index]
    ratio = round(inc / cold, 3) if cold else None
    if a.json:
        print(json.dumps({**out, "ratio_one_file_to_cold": ratio}, indent=2))
    else:
        for label, r in out.items():
            print(f"{label:9} {r['id']}  {r['durations_s']}  ccache {r['ccache']}")
        print(f"one-file / cold = {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
