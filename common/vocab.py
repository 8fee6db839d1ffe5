"""The words host and guest share: guest paths, modes, backings, events, outcome classes,
report keys and ready files. Standard library only: the guest imports it as
``from pinlab.common import vocab`` exactly as the host does.

Guest layout: everything pinlab puts into a guest lives under :data:`GUEST_HOME`, as a
Python import root::

    GUEST_HOME/pinlab/__init__.py     a minimal package (not the host's)
    GUEST_HOME/pinlab/common/*.py     this package
    GUEST_HOME/pinlab/guest/*.py      the guest code (agent, workload, cells, guest API)

and guest programs run as ``python3 -m pinlab.guest.<module>`` with GUEST_HOME on
PYTHONPATH (:func:`guest_python`).
"""

from __future__ import annotations

import shlex

# ------------------------------------------------------------------ guest paths
#: The guest's install directory: the one place that names it.
GUEST_HOME = "/root/pinlab"
#: Import name of the guest code.
GUEST_PACKAGE = "pinlab.guest"
#: The packages pushed into the guest, by import name (each below GUEST_HOME/pinlab/).
GUEST_SUBPACKAGES = ("common", "guest")
#: Where ``pinlab run`` copies a user's script.
GUEST_RUN_DIR = f"{GUEST_HOME}/run"


def guest_python(module: str, *args: str, unbuffered: bool = False,
                 interactive: bool = False) -> str:
    """The shell command that runs guest module ``pinlab.guest.<module>`` with ``args``
    (each shell-quoted) with GUEST_HOME on PYTHONPATH: ``env PYTHONPATH=<GUEST_HOME> python3
    -m pinlab.guest.kcheck ...``. Usable after ``nohup``, ``setsid`` or ``exec``."""
    flags = ("-u " if unbuffered else "") + ("-i " if interactive else "")
    return (f"env PYTHONPATH={GUEST_HOME} python3 {flags}-m {GUEST_PACKAGE}.{module}"
            + "".join(" " + shlex.quote(a) for a in args))


def guest_script(path: str, *args: str, unbuffered: bool = False) -> str:
    """The shell command that runs a script file in the guest with the guest packages
    importable (``pinlab run``)."""
    flags = "-u " if unbuffered else ""
    return (f"env PYTHONPATH={GUEST_HOME} python3 {flags}{shlex.quote(path)}"
            + "".join(" " + shlex.quote(a) for a in args))
