"""numba kernels of batchmmu (imported as ``batchmmu.kernels``); never imports ``batchmmu``.

numba's on-disk cache is keyed on each function's own source file, so a change to an inlined helper
in another module would leave stale machine code behind.  The cache therefore lives in a directory
named after a hash of every kernel source file: any edit (or upgrade) compiles afresh.

Debug mode: ``BATCHMMU_BOUNDSCHECK=1`` compiles every kernel with bounds checking (an index out of
range raises IndexError instead of reading or writing past an array).  numba's cache key does not
include that option, so the mode gets its own cache directory.
"""

import hashlib
import os
from pathlib import Path

import numba

_HERE = Path(__file__).resolve().parent
SOURCE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.py")))).hexdigest()[:16]
BOUNDSCHECK = os.environ.get("BATCHMMU_BOUNDSCHECK", "") not in ("", "0")
if BOUNDSCHECK:
    numba.config.BOUNDSCHECK = 1  # read when each kernel is compiled (BaseContext.enable_boundscheck)
_SUFFIX = "-boundscheck" if BOUNDSCHECK else ""
if not os.environ.get("NUMBA_CACHE_DIR"):
    CACHE_DIR = _HERE / "__pycache__" / f"numba-{SOURCE_HASH}{_SUFFIX}"
else:
    CACHE_DIR = Path(os.environ["NUMBA_CACHE_DIR"]) / f"batchmmu{_SUFFIX}" if BOUNDSCHECK \
        else Path(os.environ["NUMBA_CACHE_DIR"])
numba.config.CACHE_DIR = str(CACHE_DIR)
