"""Checking of public-API arguments, in one place.

Every public entry of ``Host`` converts its arguments here before it changes anything.  Integers may
be Python ints or numpy integer scalars/arrays of any width; they are range-checked as exact Python
integers before any arithmetic.  ``bool`` where a number is meant, floats (even integral ones),
strings, None, NaN/inf, ragged or multi-dimensional sequences and out-of-range values raise
``BatchMMUError`` naming the argument (see docs/errors.md).
"""

import errno as _errno
import math
import os

import numpy as np

from .errors import BatchMMUError

I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1
U64_MAX = (1 << 64) - 1


def _err(field, value, why, errno=None):
    tail = f" ({_errno.errorcode[errno]})" if errno else ""
    return BatchMMUError(f"{field}={_show(value)}: {why}{tail}", field=field, value=value, errno=errno)


def _show(value):
    if isinstance(value, np.ndarray) and value.size > 8:
        return f"<{value.dtype} array of shape {value.shape}>"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    return repr(value)


def _range(lo, hi):
    if lo is not None and hi is not None:
        return f"must be an integer in [{lo:#x}, {hi:#x}]" if hi > 1 << 20 else f"must be an integer in [{lo}, {hi}]"
    if lo is not None:
        return f"must be an integer >= {lo}"
    return f"must be an integer <= {hi}"


def is_int(value):
    """True for Python ints and numpy integer scalars (not bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def exact_int(value, field, lo=None, hi=None, *, why=None, errno=None):
    """``value`` as a Python int in [lo, hi] (None: unbounded on that side)."""
    if not is_int(value):
        raise _err(field, value, "must be an integer" if why is None else why, errno)
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _err(field, value, why or _range(lo, hi), errno)
    return v


def opt_int(value, field, lo=None, hi=None, **kw):
    """``exact_int`` that lets None through."""
    return None if value is None else exact_int(value, field, lo, hi, **kw)


def flag_word(value, field, valid, errno=_errno.EINVAL):
    """A flags word: a non-negative integer with no bit outside ``valid``."""
    v = exact_int(value, field, 0, U64_MAX, errno=errno)
    if v & ~valid:
        raise _err(field, value, f"unknown flag bits {v & ~valid:#x} (valid: {valid:#x})", errno)
    return v


def bool_arg(value, field):
    """True/False (numpy bools, and the integers 0 and 1, too); anything else is refused."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if is_int(value) and int(value) in (0, 1):
        return bool(value)
    raise _err(field, value, "must be True or False")


def choice(value, field, options):
    """One of the strings ``options``."""
    if isinstance(value, str) and value in options:
        return value
    raise _err(field, value, "must be one of " + ", ".join(repr(o) for o in options))


def number(value, field, lo=0.0, hi=None):
    """A finite real number (int or float, not bool) in [lo, hi]; returns a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise _err(field, value, "must be a number")
    try:
        v = float(value)
    except OverflowError:
        v = math.inf
    if not math.isfinite(v):
        raise _err(field, value, "must be finite")
    if v < lo or (hi is not None and v > hi):
        raise _err(field, value, f"must be in [{lo}, {hi}]" if hi is not None else f"must be >= {lo}")
    return v


def _int_values(value, field):
    """A 1-D integer numpy array (int/uint of any width) or an object array of Python ints."""
    if isinstance(value, np.ndarray):
        a = value
    elif isinstance(value, (list, tuple, range)):
        try:
            a = np.asarray(value)
        except (ValueError, TypeError, OverflowError):
            a = None
        if a is None or a.dtype.kind in "Of" or a.ndim != 1:
            a = np.empty(len(value), object)  # ragged, mixed or beyond 64 bits: look at each item
            for i, x in enumerate(value):
                a[i] = x
        if a.dtype.kind in "iu" and any(isinstance(x, (bool, np.bool_)) for x in value):
            raise _err(field, value, "must be integers (not bool)")
    else:
        raise _err(field, value, "must be an integer or a 1-D array of integers")
    if a.ndim != 1:
        raise _err(field, value, f"must be a scalar or a 1-D array (got shape {a.shape})")
    if a.dtype.kind == "O":
        if not all(is_int(x) for x in a):
            raise _err(field, value, "must be integers")
    elif a.dtype.kind not in "iu" and a.size:
        raise _err(field, value, f"must be integers (got {a.dtype})")
    return a


def int_array(value, field, lo=I64_MIN, hi=I64_MAX, *, errno=None):
    """A scalar or 1-D sequence of integers in [lo, hi] as an int64 array (a scalar gives one item)."""
    if is_int(value):
        return np.array([exact_int(value, field, lo, hi, errno=errno)], np.int64)
    a = _int_values(value, field)
    if a.size == 0:
        return np.zeros(0, np.int64)
    mn, mx = (min(a), max(a)) if a.dtype.kind == "O" else (a.min(), a.max())
    for v in (mn, mx):
        if not lo <= int(v) <= hi:
            raise _err(field, int(v), _range(lo, hi), errno)
    return np.array(a, np.int64) if a.dtype.kind == "O" else a.astype(np.int64)


def u64_array(value, field):
    """64-bit words from integers in [-2**63, 2**64) (negative ones as two's complement): uint64 array."""
    if is_int(value):
        return np.array([exact_int(value, field, I64_MIN, U64_MAX) & U64_MAX], np.uint64)
    a = _int_values(value, field)
    if a.size == 0:
        return np.zeros(0, np.uint64)
    if a.dtype.kind == "O":
        for v in (min(a), max(a)):
            if not I64_MIN <= v <= U64_MAX:
                raise _err(field, v, "does not fit in 64 bits")
        return np.array([int(v) & U64_MAX for v in a], np.uint64)
    return a.astype(np.int64).view(np.uint64) if a.dtype.kind == "i" else a.astype(np.uint64)


def broadcast(arrays, fields):
    """Equal-length arrays: a one-item array stands for every event; returns the list."""
    n = max((a.size for a in arrays), default=1)
    out = []
    for a, f in zip(arrays, fields, strict=True):
        if a.size == n:
            out.append(a)
        elif a.size == 1:
            out.append(np.full(n, a[0], a.dtype))
        else:
            raise _err(f, f"length {a.size}", f"arrays must have equal lengths (or be scalars); expected {n}")
    return out


# ----------------------------------------------------------------------------- memory the simulator needs
def machine_bytes():
    """Physical memory of this machine (the ceiling for one Host's arrays); BATCHMMU_MAX_BYTES overrides."""
    env = os.environ.get("BATCHMMU_MAX_BYTES")
    if env:
        return int(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_alloc(nbytes, field, value, what):
    """Refuse (ENOMEM) before allocating when ``nbytes`` of simulator arrays cannot fit this machine."""
    from .units import format_size
    limit = machine_bytes()
    if nbytes > limit:
        raise _err(field, value, f"{what} would need about {format_size(nbytes)} of simulator memory; this "
                   f"machine has {format_size(limit)}", _errno.ENOMEM)
