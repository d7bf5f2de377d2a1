"""numba kernels of batchmmu (imported as ``batchmmu.kernels``); never imports ``batchmmu``."""
