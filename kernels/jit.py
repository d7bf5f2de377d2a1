"""The decorators of every compiled (not inlined) kernel.

numba builds two wrappers around each compiled function: a CPython wrapper that unboxes every array
of its arguments from Python objects, and a cfunc wrapper for first-class function use.  With a
bundle of arrays each costs about a second of cold compile; nothing here is used as a first-class
function, and helpers called only from other kernels need no CPython entry either.
"""

import copy

from numba import njit
from numba.core import inline_closurecall, ir, targetconfig

# called from Python (batchmmu/, tests, bench): one CPython entry, no cfunc wrapper
kernel = njit(cache=True, _nrt=False, no_cfunc_wrapper=True)
# called only from other kernels: no wrapper at all (calling one from Python crashes the interpreter)
helper = njit(cache=True, _nrt=False, no_cfunc_wrapper=True, no_cpython_wrapper=True)


# numba's IR inliner (``inline="always"``) runs the untyped front end of the callee again at every call
# site, nested inlines included, so a helper inlined at n sites of a tree is rebuilt n times and a deep
# tree grows with the product of its fan-outs.  The inliner deep-copies what it gets before changing it,
# so the callee's IR of one kernel module can be built once per process and handed out again.
_untyped_ir = {}
_run_untyped_passes = inline_closurecall.InlineWorker.run_untyped_passes


def _memo_run_untyped_passes(self, func, enable_ssa=False):
    """InlineWorker.run_untyped_passes, built once per (function, SSA) for functions of this package."""
    if not getattr(func, "__module__", "").startswith(__package__ + "."):
        return _run_untyped_passes(self, func, enable_ssa)
    self.flags.enable_ssa = enable_ssa   # the original sets it on the caller's flags
    key = (func, enable_ssa)
    func_ir = _untyped_ir.get(key)
    if func_ir is None:
        func_ir = _untyped_ir[key] = _run_untyped_passes(self, func, enable_ssa)
    return func_ir


inline_closurecall.InlineWorker.run_untyped_passes = _memo_run_untyped_passes


class _OneMemoPerIRCopy:
    """The ``copy`` module as numba's inliner sees it.  The inliner copies a callee's IR block by block, each
    with its own ``copy.deepcopy``, and every block holds the function's whole variable scope: a callee of b
    blocks and v variables costs b * v copies, twice per call site (most of a cold compile of the fault
    paths).  Here the blocks of one IR copy share one memo, so the scope is copied once; the result is the
    same IR, with variables shared between blocks as the front end made them."""

    def __init__(self):
        self._memo, self._scope, self._seen = {}, None, set()

    def __getattr__(self, name):
        return getattr(copy, name)

    def deepcopy(self, x, memo=None):
        if memo is not None or not isinstance(x, ir.Block):
            return copy.deepcopy(x, memo)
        if x.scope is not self._scope or id(x) in self._seen:   # a new IR copy begins
            self._memo, self._scope, self._seen = {}, x.scope, set()
        self._seen.add(id(x))
        return copy.deepcopy(x, self._memo)


if getattr(inline_closurecall, "copy", None) is copy:
    inline_closurecall.copy = _OneMemoPerIRCopy()


_option_defaults = {}


def _config_values(self):
    """TargetConfig.values without a property call per option (numba compares compile flags this way in every
    overload-cache lookup of type inference): the defaults, overridden by the options set."""
    cls = type(self)
    d = _option_defaults.get(cls)
    if d is None:
        d = _option_defaults[cls] = {k: opt.default for k, opt in cls.options.items()}
    return {**d, **self._values}


if hasattr(targetconfig.TargetConfig, "values") and hasattr(targetconfig.TargetConfig, "options"):
    targetconfig.TargetConfig.values = _config_values
