"""pinlab.common.uapi is the twin of kmod/pinlab.h and kmod/pinlab_uapi.h: the C headers
are parsed (``#define`` values, enums, struct layouts, ``_IOWR`` numbers) and every value
must be the same in Python. The guest's ioctl module is checked against the twin too.

A C name maps to its twin by dropping ``PINLAB_``; a struct ``pinlab_x`` to ``X``.
"""

from __future__ import annotations

import importlib.util
import re
import struct
import unittest
from pathlib import Path
from types import ModuleType

from pinlab.common import uapi

ROOT = Path(__file__).resolve().parents[2]
HEADERS = (ROOT / "kmod" / "pinlab_uapi.h", ROOT / "kmod" / "pinlab.h")

# Driver-internal names with no meaning outside pinlab.ko (ring sizes the driver picks,
# its bookkeeping, its own state enums). Anything else a header defines needs a twin.
DRIVER_ONLY = {
    "DRV_NAME", "SQ_ENTRIES", "CQ_ENTRIES", "EQ_ENTRIES", "NSLOTS", "CID_SLOT_BITS",
    "CID_SLOT_MASK", "LIVENESS_MS", "NR_EVENTS_STATS", "LAT_BUCKETS",
    "DEV_RUNNING", "DEV_RESETTING", "DEV_DEAD", "REGION_ACTIVE", "REGION_GONE",
}
# structs of the device contract and of the ioctl ABI (the rest of pinlab.h is internal)
STRUCTS = {"pinlab_register": "REGISTER", "pinlab_region_op": "REGION_OP",
           "pinlab_dma": "DMA", "pinlab_stream": "STREAM", "pinlab_query": "QUERY",
           "pinlab_sqe": "SQE", "pinlab_cqe": "CQE", "pinlab_eqe": "EQE"}
C_SIZES = {"u8": 1, "__u8": 1, "u16": 2, "__u16": 2, "__le16": 2, "u32": 4, "__u32": 4,
           "__le32": 4, "u64": 8, "__u64": 8, "__le64": 8}
PY_SIZES = {"B": 1, "H": 2, "I": 4, "Q": 8}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


Layout = list[tuple[int, int]]  # (offset, size) of every scalar, arrays expanded


def parse_structs(text: str) -> dict[str, Layout]:
    """``struct name { type field[N]; ... };`` with fixed-size integer types only, laid out
    with natural alignment (x86-64): name -> [(offset, size), ...]."""
    out: dict[str, Layout] = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{([^{}]*)\};", _strip_comments(text)):
        layout: Layout = []
        off, align = 0, 1
        for ctype, _field, count in re.findall(r"(\w+)\s+(\w+)\s*(?:\[(\d+)\])?\s*;", body):
            if ctype not in C_SIZES:
                break  # not a plain-integer struct
            size = C_SIZES[ctype]
            off = (off + size - 1) // size * size
            align = max(align, size)
            for _ in range(int(count or 1)):
                layout.append((off, size))
                off += size
        else:
            out[name] = layout
            out[name + ".size"] = [(0, (off + align - 1) // align * align)]
    return out


def py_layout(st: struct.Struct) -> Layout:
    fmt = st.format
    assert fmt[0] == "<", f"{fmt}: twin structs are little-endian, unaligned"
    layout: Layout = []
    off = 0
    for count, code in re.findall(r"(\d*)([A-Za-z])", fmt[1:]):
        for _ in range(int(count or 1)):
            layout.append((off, PY_SIZES[code]))
            off += PY_SIZES[code]
    return layout


def parse_defines(text: str, structs: dict[str, Layout]) -> dict[str, int]:
    """Object-like ``#define PINLAB_X value`` and ``enum`` members: name -> int. Values may
    be numbers (suffixes dropped), character constants, ``BIT(n)``, ``_IOWR(...)`` and
    expressions of earlier names."""
    text = _strip_comments(text)
    values: dict[str, int] = {}

    def evaluate(expr: str) -> int:
        expr = expr.strip()
        m = re.fullmatch(r"_IOWR\(\s*(\w+)\s*,\s*(\w+)\s*,\s*struct\s+(\w+)\s*\)", expr)
        if m:
            magic, nr = evaluate(m.group(1)), evaluate(m.group(2))
            size = structs[m.group(3) + ".size"][0][1]
            return 3 << 30 | size << 16 | magic << 8 | nr
        expr = re.sub(r"'(.)'", lambda c: str(ord(c.group(1))), expr)
        expr = re.sub(r"\bBIT\((\d+)\)", r"(1 << \1)", expr)
        expr = re.sub(r"\b(0[xX][0-9a-fA-F]+|\d+)[uUlL]+\b", r"\1", expr)
        expr = re.sub(r"\bPINLAB_(\w+)", lambda n: str(values[n.group(1)]), expr)
        if not re.fullmatch(r"[\s\d xXa-fA-F()<>+\-|&*~]*", expr):
            raise ValueError(f"cannot evaluate {expr!r}")
        return int(eval(expr, {"__builtins__": {}}))  # digits and operators only

    for name, value in re.findall(r"^#define\s+PINLAB_(\w+)[ \t]+(.+)$", text, flags=re.M):
        if value.strip().startswith('"'):
            values[name] = -1  # a string (the driver's name): no integer twin
            continue
        values[name] = evaluate(value)
    for body in re.findall(r"enum\s+\w+\s*\{([^}]*)\}", text):
        nxt = 0
        for item in filter(None, (i.strip() for i in body.split(","))):
            name, _, expr = item.partition("=")
            nxt = evaluate(expr) if expr else nxt
            values[name.strip().removeprefix("PINLAB_")] = nxt
            nxt += 1
    return values


def read_headers() -> tuple[dict[str, int], dict[str, Layout]]:
    text = "\n".join(h.read_text() for h in HEADERS)
    structs = parse_structs(text)
    return parse_defines(text, structs), structs


def load_guest_ioctl() -> ModuleType:
    """The guest's ioctl module (guest/pinlab_ioctl.py), loaded by file."""
    found = sorted(ROOT.glob("*/pinlab_ioctl.py")) + sorted(ROOT.glob("*/*/pinlab_ioctl.py"))
    if not found:
        raise AssertionError("no pinlab_ioctl.py in the repository")
    spec = importlib.util.spec_from_file_location("guest_pinlab_ioctl", found[0])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def twin_ints() -> dict[str, int]:
    return {k: v for k, v in vars(uapi).items()
            if k.isupper() and isinstance(v, int) and not k.startswith("_")}


class HeaderParserTest(unittest.TestCase):
    """The parser itself, on a made-up header, so a parse that finds nothing fails."""

    def test_parses_defines_enums_structs(self) -> None:
        text = ("#define PINLAB_A\t0x10U /* c */\n#define PINLAB_B\tBIT(3)\n"
                "#define PINLAB_C\t(PINLAB_A - 1)\n#define PINLAB_M\t'P'\n"
                "#define PINLAB_F(x)\t((x) >> 1)\n"
                "enum e { PINLAB_X, PINLAB_Y = 5, PINLAB_Z, };\n"
                "struct pinlab_s { __u32 a; __u64 b; __u16 c[3]; };\n"
                "#define PINLAB_IOC\t_IOWR(PINLAB_M, 2, struct pinlab_s)\n")
        structs = parse_structs(text)
        self.assertEqual(structs["pinlab_s"], [(0, 4), (8, 8), (16, 2), (18, 2), (20, 2)])
        self.assertEqual(structs["pinlab_s.size"], [(0, 24)])
        values = parse_defines(text, structs)
        self.assertEqual(values, {"A": 16, "B": 8, "C": 15, "M": 80, "X": 0, "Y": 5, "Z": 6,
                                  "IOC": 0xC0185002})


class UapiTwinTest(unittest.TestCase):
    def setUp(self) -> None:
        self.c, self.structs = read_headers()

    def test_headers_parsed(self) -> None:
        for name in ("REG_SCRATCH", "OP_FENCE", "STATUS_NO_SPACE", "EV_DEVICE_ERROR",
                     "IOC_QUERY", "MODE_ODP", "DEV_DEAD"):
            self.assertIn(name, self.c)
        for name in STRUCTS:
            self.assertIn(name, self.structs)

    def test_every_c_value_has_its_twin(self) -> None:
        twin = twin_ints()
        for name, value in sorted(self.c.items()):
            if name in DRIVER_ONLY:
                continue
            with self.subTest(name=name):
                self.assertIn(name, twin, f"PINLAB_{name} has no twin in pinlab.common.uapi")
                self.assertEqual(twin[name], value,
                                 f"PINLAB_{name}: C {value:#x}, Python {twin[name]:#x}")

    def test_twin_has_nothing_c_lacks(self) -> None:
        # Python-only: VERSION (C has only VERSION_MAJOR(v)), the sizes of the queue entries
        extra = set(twin_ints()) - set(self.c) - {"VERSION", "SQE_SIZE", "CQE_SIZE",
                                                   "EQE_SIZE"}
        self.assertEqual(extra, set())
        self.assertEqual(uapi.VERSION >> 16, 1)  # PINLAB_VERSION_MAJOR the driver accepts

    def test_struct_layouts(self) -> None:
        for cname, pyname in STRUCTS.items():
            with self.subTest(struct=cname):
                st = getattr(uapi, pyname)
                self.assertEqual(py_layout(st), self.structs[cname])
                self.assertEqual(st.size, self.structs[cname + ".size"][0][1])
        self.assertEqual((uapi.SQE_SIZE, uapi.CQE_SIZE, uapi.EQE_SIZE), (64, 32, 32))

    def test_status_names(self) -> None:
        for name, value in self.c.items():
            if name.startswith("STATUS_") and name not in ("STATUS_ENABLED", "STATUS_FATAL"):
                self.assertEqual(uapi.STATUS_NAMES[value], name.removeprefix("STATUS_"))
        self.assertEqual(len(uapi.STATUS_NAMES), 11)


class GuestIoctlTest(unittest.TestCase):
    """The guest's ioctl module (guest/pinlab_ioctl.py, which takes its numbers from the twin)
    agrees with the twin: the names it exports and its ctypes struct layouts."""

    def setUp(self) -> None:
        self.g = load_guest_ioctl()

    def test_constants(self) -> None:
        twin = twin_ints()
        compared = set()
        for name, value in vars(self.g).items():
            if not name.isupper() or not isinstance(value, int) or name.startswith("_"):
                continue
            key = name.removeprefix("PINLAB_")
            if key == "IOC_MAGIC":
                continue
            if key in twin:
                compared.add(key)
                with self.subTest(name=name):
                    self.assertEqual(value, twin[key], f"guest {name} {value:#x} "
                                                       f"!= twin {twin[key]:#x}")
        need = {k for k in twin if k.startswith(("MODE_", "STATE_", "IOC_"))
                and k != "IOC_MAGIC"} | {
            f"STATUS_{n}" for n in uapi.STATUS_NAMES.values()} | {"REG_READONLY",
                                                                   "MAX_REGION_BYTES"}
        self.assertEqual(need - compared, set(), "guest constants missing")
        self.assertEqual(self.g.STATUS_NAMES, uapi.STATUS_NAMES)
        self.assertEqual(self.g.MODES, {"gup": uapi.MODE_GUP, "pin": uapi.MODE_PIN,
                                        "longterm": uapi.MODE_LONGTERM, "odp": uapi.MODE_ODP})

    def test_struct_layouts(self) -> None:
        pairs = {"PinlabRegister": "REGISTER", "PinlabRegionOp": "REGION_OP",
                 "PinlabDma": "DMA", "PinlabStream": "STREAM", "PinlabQuery": "QUERY"}
        for cls_name, pyname in pairs.items():
            cls = getattr(self.g, cls_name)
            layout: Layout = []
            for fname, ftype in cls._fields_:
                desc = getattr(cls, fname)
                n = getattr(ftype, "_length_", 1)
                size = desc.size // n
                layout += [(desc.offset + i * size, size) for i in range(n)]
            with self.subTest(struct=cls_name):
                self.assertEqual(layout, py_layout(getattr(uapi, pyname)))


if __name__ == "__main__":
    unittest.main()
