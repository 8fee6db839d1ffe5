"""Event ``hot-unplug``.

QMP device_del of the device mid-stream. The backing does not matter for device
removal; anon is the simplest. Judges kernel errors and the audit itself.
"""

from __future__ import annotations

from pinlab.common.vocab import Key, Outcome

from ..classify import Inconclusive, Judge, step
from . import Event


def classify(j: Judge) -> str:
    """hot-unplug / pci-remove: kernel errors first, then the removal itself."""
    rep, dm = j.rep, j.dm
    sev = dm.severe()
    if sev or dm.lines.get("PAGE_POISON"):
        j.f["severe"] = {k: v[:5] for k, v in sev.items()}
        return Outcome.KERNEL_ERROR
    j.f.update({k: rep.get(k) for k in ("gone", "gone_after_ms", "dev_node_exists")})
    j.f["deregister"] = step(rep, "deregister")
    j.f["removed_line"] = [ln for ln in dm.pinlab_lines if "removed" in ln][:2]
    if "gone" not in rep:
        raise Inconclusive("the workload did not report the removal wait")
    if not rep.get(Key.GONE):
        return Outcome.DEVICE_NOT_REMOVED
    a = j.need_audit()
    if a["violations"]:
        j.f["violations"] = a.get("violation_samples")
        return Outcome.DMA_AFTER_REVOKE
    if not a.get("resets") and not a.get("kinds", {}).get("destroy"):
        raise Inconclusive("audit shows neither a reset nor the region's destroy")
    if j.pins_leaked():
        return Outcome.PINS_LEAKED
    return Outcome.DEVICE_GONE_CLEAN


EVENT = Event(
    "hot-unplug",
    order=16,
    backings=("anon",),
    classify=classify,
    scenario="hot_unplug",
    shared_checks=False,
)
