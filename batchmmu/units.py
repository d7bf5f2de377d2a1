"""Byte sizes: ints or strings such as "512MiB", "4GiB", "1G", "4096"."""

import re
from fractions import Fraction

import numpy as np

from .errors import bad

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
          "tib": 1 << 40}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value, field="size"):
    """Return ``value`` in bytes; raise BatchMMUError naming ``field`` if it is not a size."""
    if isinstance(value, (bool, np.bool_)):
        raise bad(field, value, "not a size")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise bad(field, value, "must not be negative")
        return int(value)
    if isinstance(value, str):
        m = _RE.match(value)
        if m and m.group(2).lower() in _UNITS:
            n = Fraction(m.group(1)) * _UNITS[m.group(2).lower()]  # exact: no rounding through a float
            if n.denominator != 1:
                raise bad(field, value, "not a whole number of bytes")
            return int(n)
    raise bad(field, value, "not a size (use bytes or e.g. '512MiB', '4GiB')")


def format_size(n):
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n} B"
