"""Which cells the matrix has: every applicable (mode, backing, event) per kernel, from the
event registry (``orchestrator/events/``)."""

from __future__ import annotations

from pinlab.common import vocab
from pinlab.images.kernel import KERNELS, is_kernel_id

from . import events
from .expectations import Cell

MODES = list(vocab.MODES)
BACKINGS = list(vocab.BACKINGS)


def pairs() -> list[tuple[str, str]]:
    """Every (backing, event) pair of the matrix, in its order: the events of the registry
    (``orchestrator/events/``, by order), each with its backings. Why an event has the
    backings it has is in its module's docstring."""
    return [(b, e.name) for e in events.events() for b in e.backings]


# One cell per event is the smoke slice CI runs on the non-default kernels.
SMOKE_MODE_ORDER = ["pin", "odp", "longterm", "gup"]
# backings the smoke slice takes only for events no other backing has (btrfs sorts before
# ext4, and the smoke slice keeps ext4 for truncate, 2018, writeback, ...)
SMOKE_BACKINGS_LAST = ("btrfs",)


def kernel_version(kernel: str) -> tuple[int, int] | None:
    """(major, minor) of a Debian kernel's name (``"6.1"`` -> (6, 1), ``"7"`` -> (7, 0));
    None for any other name (a built kernel, ``build:<key>``: the cell list does not
    know its version)."""
    parts = kernel.split(".")
    if kernel not in KERNELS or not all(p.isdigit() for p in parts) or len(parts) > 2:
        return None
    return int(parts[0]), int(parts[1]) if len(parts) == 2 else 0


def backing_applies(backing: str, kernel: str) -> bool:
    """Whether ``kernel`` has ``backing``: it is at least the backing's minimum version
    (vocab.BACKING_MIN_KERNEL; e.g. anon-mthp needs multi-size THP, 6.8+). A kernel whose
    version is unknown (a built one) gets every backing; if it lacks one, the cell's
    environment setup fails and says so (guest/pinlab_thp.py setup)."""
    need = vocab.BACKING_MIN_KERNEL.get(backing)
    have = kernel_version(kernel)
    return need is None or have is None or have >= need


def all_cells(kernel: str, known_only: bool = True) -> list[Cell]:
    """Every cell of the matrix on ``kernel``: a Debian kernel (KERNELS) or a built one
    (``build:<key>``, images/kbuild.py), without the backings ``kernel`` does not have
    (:func:`backing_applies`). Raises ValueError for anything else unless ``known_only``
    is false."""
    if known_only and kernel not in KERNELS and not is_kernel_id(kernel):
        raise ValueError(f"unknown kernel {kernel!r}")
    return [Cell(kernel, m, b, e.name, v) for e in events.events() for v in e.variants
            for b in e.variant_backings(v) if backing_applies(b, kernel) and e.applies(b, kernel)
            for m in e.variant_modes(v)]


#: The main job's default slice when no --tags are given (``pinlab matrix`` without
#: ``--full``; ``./pinlab.sh test``'s default kernel): every cell without options, and of
#: the cells with options (readonly, fast, cpu-write-after: the full set) only the smoke
#: cells, one per event variant. Avocado filters, ORed; ``-option`` negates the key
#: (Avocado cannot negate a key:value), ``option,smoke`` is any option and smoke.
DEFAULT_FILTERS = ["-option", "option,smoke"]


def cell_tags(cell: Cell, smoke_set: set[Cell]) -> list[str]:
    """The Avocado tags of a cell's test, in the order the cell tests carry them (celltest.py):
    ``matrix``, ``kernel:``, ``mode:``, ``backing:``, ``event:``, one ``option:`` per option
    of the cell (``option:fast`` selects the fast-path cells, ``-option`` leaves out every
    cell with options) and ``smoke`` if the cell is in ``smoke_set``."""
    return (["matrix", f"kernel:{cell.kernel}", f"mode:{cell.mode}", f"backing:{cell.backing}",
             f"event:{cell.event}"] + [f"option:{o}" for o in cell.option_names]
            + (["smoke"] if cell in smoke_set else []))


def smoke(cells: list[Cell]) -> set[Cell]:
    """The first cell of each event variant (event and options), preferring the modes in
    SMOKE_MODE_ORDER, or the cell the event names (``Event.smoke``) when it is among
    ``cells``."""
    out: dict[str, Cell] = {}
    for c in cells:
        ev = events.event(c.event)
        if ev is not None and ev.smoke == (c.mode, c.backing):
            out.setdefault(c.variant, c)
    rank = {m: i for i, m in enumerate(SMOKE_MODE_ORDER)}
    for c in sorted(cells, key=lambda c: (c.variant, c.backing in SMOKE_BACKINGS_LAST,
                                          rank.get(c.mode, 99), c.backing)):
        out.setdefault(c.variant, c)
    return set(out.values())


def select(cells: list[Cell], filters: list[str] | None) -> list[Cell]:
    """The cells whose Avocado tags (:func:`cell_tags`) pass ``filters``, with Avocado's own
    semantics (``avocado.core.tags.filter_tags_on_runnables``): each filter is a
    comma-separated AND (``-tag`` negates), repeated filters are ORed; ``None`` or ``[]``:
    every cell. This is how ``pinlab matrix``, ``validate`` and ``up --cell`` choose cells,
    and what ``avocado run tests/matrix --filter-by-tags`` runs. Raises ValueError on an
    empty tag."""
    if not filters:
        return list(cells)
    for f in filters:
        if any(not w.strip() or w.strip() == "-" for w in f.split(",")):
            raise ValueError(f"empty tag in filter {f!r}")
    from types import SimpleNamespace

    from avocado.core.resolver import ReferenceResolutionResult  # only when filtering
    from avocado.core.tags import filter_tags_on_runnables

    # the smoke slice is defined over a kernel's whole matrix, whatever subset is given
    smoke_set = {s for k in {c.kernel for c in cells}
                 for s in smoke(all_cells(k, known_only=False))}
    runnables = []
    for c in cells:
        tag_map: dict[str, set[str] | None] = {}
        for t in cell_tags(c, smoke_set):
            key, sep, val = t.partition(":")
            if sep:
                tag_map[key] = (tag_map.get(key) or set()) | {val}
            else:
                tag_map[key] = None
        runnables.append(SimpleNamespace(tags=tag_map, cell=c))
    resolution = SimpleNamespace(result=ReferenceResolutionResult.SUCCESS,
                                 resolutions=runnables)
    kept = {id(r) for r in filter_tags_on_runnables([resolution], filters)}
    return [r.cell for r in runnables if id(r) in kept]


def parse_cell(text: str) -> Cell:
    """A cell from ``KERNEL/MODE/BACKING/EVENT[+OPTIONS]`` (a verdict's cell name, shown in
    the HTML report) or from its Avocado test id
    (``...test_cells.py:Kernel6_12.test_pin__ext4__2018``). Raises ValueError naming what
    does not exist."""
    text = text.strip()
    if ".test_" in text:
        cls, _, meth = text.rpartition(":")[2].partition(".test_")
        kernel = next((k for k in KERNELS
                       if "Kernel" + "".join(ch if ch.isalnum() else "_" for ch in k) == cls),
                      None)
        if kernel is None:
            raise ValueError(f"no kernel for test class {cls!r}")
        from .celltest import method_name

        found = [c for c in all_cells(kernel) if method_name(c) == f"{cls}.test_{meth}"]
        if not found:
            raise ValueError(f"no matrix cell is tested by {text!r}")
        return found[0]
    cell = Cell.parse(text)
    if cell.kernel not in KERNELS:
        raise ValueError(f"unknown kernel {cell.kernel!r} (known: {', '.join(KERNELS)})")
    if cell not in all_cells(cell.kernel):
        raise ValueError(f"{text} is not a matrix cell (see orchestrator/events/)")
    return cell
