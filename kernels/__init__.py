"""numba kernels of batchmmu (imported as ``batchmmu.kernels``); never imports ``batchmmu``.

numba's on-disk cache is keyed on each function's own source file, so a change to an inlined helper
in another module would leave stale machine code behind.  The cache therefore lives in a directory
named after a hash of every kernel source file: any edit (or upgrade) compiles afresh.  It is in the
user's cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``, then ``batchmmu/numba-<hash>``), not in
the installed package, so a read-only install works; ``NUMBA_CACHE_DIR`` wins when set.

Debug mode: ``BATCHMMU_BOUNDSCHECK=1`` compiles every kernel with bounds checking (an index out of
range raises IndexError instead of reading or writing past an array).  numba's cache key does not
include that option, so the mode gets its own cache directory.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import numba

_HERE = Path(__file__).resolve().parent
SOURCE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.py")))).hexdigest()[:16]
BOUNDSCHECK = os.environ.get("BATCHMMU_BOUNDSCHECK", "") not in ("", "0")
if BOUNDSCHECK:
    numba.config.BOUNDSCHECK = 1  # read when each kernel is compiled (BaseContext.enable_boundscheck)
_SUFFIX = "-boundscheck" if BOUNDSCHECK else ""


def _user_cache_dir():
    """``$XDG_CACHE_HOME/batchmmu/numba-<hash>`` (default ``~/.cache``); a temp dir if that is not writable."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs = [Path(base) / "batchmmu" / f"numba-{SOURCE_HASH}{_SUFFIX}",
            Path(tempfile.gettempdir()) / f"batchmmu-{os.getuid()}" / f"numba-{SOURCE_HASH}{_SUFFIX}"]
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK):
            return d
    return dirs[0]  # nowhere writable: numba falls back to its own locations


if os.environ.get("NUMBA_CACHE_DIR"):
    # one subdirectory per source hash there too: numba keys entries on each function's own file only, and a
    # checkout without kernels/jit.py's patches cannot read the link-only entries of one with them
    CACHE_DIR = Path(os.environ["NUMBA_CACHE_DIR"]) / f"batchmmu-{SOURCE_HASH}{_SUFFIX}"
    numba.config.CACHE_DIR = str(CACHE_DIR)
else:
    CACHE_DIR = _user_cache_dir()
    numba.config.CACHE_DIR = str(CACHE_DIR)
