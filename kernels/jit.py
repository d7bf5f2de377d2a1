"""The decorators of every compiled (not inlined) kernel.

numba builds two wrappers around each compiled function: a CPython wrapper that unboxes every array
of its arguments from Python objects, and a cfunc wrapper for first-class function use.  With a
bundle of arrays each costs about a second of cold compile; nothing here is used as a first-class
function, and helpers called only from other kernels need no CPython entry either.
"""

from numba import njit

# called from Python (batchmmu/, tests, bench): one CPython entry, no cfunc wrapper
kernel = njit(cache=True, _nrt=False, no_cfunc_wrapper=True)
# called only from other kernels: no wrapper at all (calling one from Python crashes the interpreter)
helper = njit(cache=True, _nrt=False, no_cfunc_wrapper=True, no_cpython_wrapper=True)
