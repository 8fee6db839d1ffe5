"""The guest's steps of each matrix event, one module each: ``guest/events/ev_<event>.py``.

A module has ``NAME`` (the event's name, as on the host) and ``run(c)``: the event's steps
on a prepared :class:`pinlab.guest.pinlab_cell.Cell` (mapping made, registered, generation
1 written), recording raw observations in ``c.rep`` under :class:`pinlab.common.vocab.Key`
names, never a verdict. Optional: ``NPAGES`` (pages of the registered mapping, default
pinlab_cell.NPAGES), ``SWAP_CONTROL`` (backings whose mapping gets unregistered control
pages that reclaim must reach), ``MEMCG`` (record the cell cgroup's charge before
registration), ``before_mapping(c)`` (a step before the mapping is made), ``READONLY``
and ``FAST`` (register read-only / through get/pin_user_pages_fast()), ``fill(size)``
(the mapping's contents before registration; a MAP_PRIVATE file is then only
read-faulted), ``REGISTERS_ITSELF`` (the cell does not register: the event does, e.g.
in a child after fork) and ``SMALL_FOLIOS`` (a THP backing's mapping is faulted as 4 KiB
pages and kept VM_NOHUGEPAGE: madv-collapse) and ``run_readonly(c)`` (the event's steps
in the read-only flow of a ``readonly`` cell, guest/pinlab_readonly.py: no device write;
returns the bytes the process should see through its mapping afterwards, or None for the
old contents). The host side
of the same event is ``orchestrator/events/ev_<event>.py``.
"""

import importlib
import pkgutil

_LOADED = {}


def module_name(event):
    """``ev_`` + the event's name with ``-`` as ``_``."""
    return "ev_" + event.replace("-", "_")


def names():
    """Every event the guest has steps for (sorted module order)."""
    return sorted(_module(info.name).NAME for info in pkgutil.iter_modules(__path__)
                  if info.name.startswith("ev_"))


def _module(modname):
    if modname not in _LOADED:
        _LOADED[modname] = importlib.import_module(f"{__name__}.{modname}")
    return _LOADED[modname]


def event(name):
    """The module of event ``name``. Raises KeyError for an event without one."""
    modname = module_name(name)
    if not any(i.name == modname for i in pkgutil.iter_modules(__path__)):
        raise KeyError(f"no guest steps for event {name!r} (guest/events/{modname}.py)")
    mod = _module(modname)
    if getattr(mod, "NAME", None) != name:
        raise KeyError(f"guest/events/{modname}.py names event {getattr(mod, 'NAME', None)!r}")
    return mod
