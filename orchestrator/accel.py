"""Choosing the accelerator: TCG unless a short functional KVM boot succeeds.

On these machines ``/dev/kvm`` opens fine but Linux guests hang after decompression, so
"is /dev/kvm accessible" is not a test. The probe boots the guest kernel under KVM and
waits a few seconds for it to reach its initramfs; the answer is cached per host boot.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from pinlab.images.build import GuestImages
from pinlab.images.cache import Cache

from .procs import Child

PROBE_SECONDS = 12.0
MARKER = "Run /init as init process"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm(images: GuestImages, timeout: float = PROBE_SECONDS) -> tuple[bool, str]:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    with tempfile.TemporaryDirectory(prefix="pinlab-kvm-") as d:
        con = Path(d, "console.log")
        child = Child("qemu-kvm-probe", images.qemu.command(
            "-machine", "q35", "-accel", "kvm", "-cpu", "host", "-m", "512M", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(images.kernel.vmlinuz), "-initrd", str(images.kernel.initramfs),
            "-append", "console=ttyS0 panic=-1",
            "-chardev", f"file,id=con,path={con}", "-serial", "chardev:con",
        ), Path(d, "qemu.log"), env=images.qemu.env)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and child.alive():
                if MARKER in con.read_text(errors="replace") if con.exists() else False:
                    return True, "kernel reached /init under KVM"
                time.sleep(0.2)
            if not child.alive():
                return False, f"QEMU exited: {child.tail(5).strip()}"
            return False, f"no '{MARKER}' within {timeout:.0f}s under KVM"
        finally:
            child.stop(grace=1)


def choose_accel(images: GuestImages, cache: Cache | None = None) -> tuple[str, str]:
    """('tcg'|'kvm', reason). ``PINLAB_ACCEL`` = tcg | kvm | auto (default auto).

    With ``auto``, the probe's answer is kept in ``$PINLAB_CACHE/kvm-probe.json`` per
    (host boot, QEMU version, kernel release), one entry per kernel in ``probes``, so
    runs that alternate between kernels (``validate``: a base and a candidate) probe each
    once per host boot. The last answer is also kept in the top-level ``key``/``ok``/
    ``reason`` fields that older pinlab versions read."""
    want = os.environ.get("PINLAB_ACCEL", "auto")
    if want in ("tcg", "kvm"):
        return want, f"PINLAB_ACCEL={want}"
    cache = cache or Cache.default()
    f = cache.path("kvm-probe.json")
    boot = _boot_id()
    key = f"{boot} {images.qemu.version} {images.kernel.release}"
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError):
        saved = {}
    probes = saved.get("probes") if isinstance(saved, dict) else None
    probes = probes if isinstance(probes, dict) else {}
    if isinstance(saved, dict) and saved.get("key") == key and "ok" in saved:
        probes.setdefault(key, {"ok": saved["ok"], "reason": saved.get("reason", "")})
    hit = probes.get(key)
    if isinstance(hit, dict) and "ok" in hit:
        return ("kvm" if hit["ok"] else "tcg"), f"cached probe: {hit.get('reason')}"
    ok, reason = probe_kvm(images)
    probes = {k: v for k, v in probes.items() if k.startswith(boot + " ")}
    probes[key] = {"ok": ok, "reason": reason}
    tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "ok": ok, "reason": reason, "probes": probes}))
    tmp.replace(f)
    return ("kvm" if ok else "tcg"), f"probe: {reason}"
