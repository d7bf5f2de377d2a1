"""numba kernels of batchmmu (imported as ``batchmmu.kernels``); never imports ``batchmmu``.

numba's on-disk cache is keyed on each function's own source file, so a change to an inlined helper
in another module would leave stale machine code behind.  The cache therefore lives in a directory
named after a hash of every kernel source file: any edit (or upgrade) compiles afresh.
"""

import hashlib
import os
from pathlib import Path

import numba

_HERE = Path(__file__).resolve().parent
SOURCE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_HERE.glob("*.py")))).hexdigest()[:16]
if not os.environ.get("NUMBA_CACHE_DIR"):
    CACHE_DIR = _HERE / "__pycache__" / f"numba-{SOURCE_HASH}"
    numba.config.CACHE_DIR = str(CACHE_DIR)
else:
    CACHE_DIR = Path(os.environ["NUMBA_CACHE_DIR"])
