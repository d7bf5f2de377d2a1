"""The decorators of every compiled (not inlined) kernel, and what makes numba compile them faster.

numba builds two wrappers around each compiled function: a CPython wrapper that unboxes every array
of its arguments from Python objects, and a cfunc wrapper for first-class function use.  With a
bundle of arrays each costs about a second of cold compile; nothing here is used as a first-class
function, and helpers called only from other kernels need no CPython entry either.
"""

import copy
from collections import defaultdict

import llvmlite.binding as ll
from numba import njit
from numba.core import (
    analysis,
    codegen,
    inline_closurecall,
    ir,
    ir_utils,
    postproc,
    ssa,
    targetconfig,
    transforms,
    typed_passes,
)

# called from Python (batchmmu/, tests, bench): one CPython entry, no cfunc wrapper
kernel = njit(cache=True, _nrt=False, no_cfunc_wrapper=True)
# called only from other kernels: no wrapper at all (calling one from Python crashes the interpreter)
helper = njit(cache=True, _nrt=False, no_cfunc_wrapper=True, no_cpython_wrapper=True)


def _ours(func):
    """Whether ``func`` (a Python function, or None) is one of this package's kernels: the patches below change
    numba's behaviour for those only."""
    return getattr(func, "__module__", "").startswith(__package__ + ".")


# numba's IR inliner (``inline="always"``) runs the untyped front end of the callee again at every call
# site, nested inlines included, so a helper inlined at n sites of a tree is rebuilt n times and a deep
# tree grows with the product of its fan-outs.  The inliner deep-copies what it gets before changing it,
# so the callee's IR of one kernel module can be built once per process and handed out again.
_untyped_ir = {}
_run_untyped_passes = inline_closurecall.InlineWorker.run_untyped_passes


def _memo_run_untyped_passes(self, func, enable_ssa=False):
    """InlineWorker.run_untyped_passes, built once per (function, SSA) for functions of this package."""
    if not _ours(func):
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
        self._memo, self._scope, self._seen, self._made = {}, None, set(), None

    def __getattr__(self, name):
        return getattr(copy, name)

    def deepcopy(self, x, memo=None):
        if memo is not None or not isinstance(x, ir.Block):
            return copy.deepcopy(x, memo)
        if x.scope is self._made:
            # inline_ir copies its fresh copy once more, only to return it unchanged, and both of numba's
            # callers drop it: that copy is not made
            return x
        if x.scope is not self._scope or id(x) in self._seen:   # a new IR copy begins
            self._memo, self._scope, self._seen = {}, x.scope, set()
        self._seen.add(id(x))
        y = copy.deepcopy(x, self._memo)
        self._made = y.scope
        return y


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


def _bits_to_names(v, names):
    """The set of ``names[i]`` for every bit i set in the int ``v``."""
    s = bin(v)[:1:-1]   # least significant bit first
    out = set()
    i = s.find("1")
    while i >= 0:
        out.add(names[i])
        i = s.find("1", i + 1)
    return out


def _live_map(cfg, blocks, var_use_map, var_def_map):
    """analysis.compute_live_map (variables live at the entry of each block) with every set of variables held
    as the bits of one int.  numba's version unions sets of names until a fix point; in a big kernel each
    set holds thousands of names and the passes that ask for it run hundreds of times (a tenth of a cold
    compile).  Same equations, same least fix point, so the same result."""
    index = {}

    def bits(names):
        v = 0
        for name in names:
            b = index.get(name)
            if b is None:
                b = index[name] = len(index)
            v |= 1 << b
        return v

    use = {off: bits(var_use_map[off]) for off in blocks}
    defs = {off: bits(var_def_map[off]) for off in blocks}
    topo = cfg.topo_order()
    reach = {}   # definitions reachable at each block's entry
    changed = True
    while changed:
        changed = False
        for off in topo:
            old = reach.get(off, 0)
            v = old | use[off] | defs[off]
            if v != old:
                reach[off], changed = v, True
            for out, _ in cfg.successors(off):
                o = reach.get(out, 0)
                if v | o != o:
                    reach[out], changed = v | o, True
    live = dict(use)
    changed = True
    while changed:
        changed = False
        for off in reversed(topo):
            v = live[off]
            for inc, _ in cfg.predecessors(off):
                add = v & reach.get(inc, 0) & ~defs[inc]
                if add & ~live[inc]:
                    live[inc] |= add
                    changed = True
    names = list(index)
    return {off: _bits_to_names(live[off], names) for off in blocks}


_compute_live_map = analysis.compute_live_map
if getattr(ir_utils, "compute_live_map", None) is _compute_live_map:
    analysis.compute_live_map = ir_utils.compute_live_map = _live_map


def _rewrite(blocks, states, handler, labels):
    """ssa._run_block_rewrite over the blocks in ``labels`` only; the others are kept as they are."""
    new = {}
    for label, blk in blocks.items():
        if label not in labels:
            new[label] = blk
            continue
        states["label"], states["block"] = label, blk
        nb = ir.Block(scope=blk.scope, loc=blk.loc)
        nb.body = list(ssa._run_ssa_block_pass(states, blk, handler))
        new[label] = nb
    return new


def _run_ssa(blocks):
    """ssa._run_ssa (numba's SSA reconstruction) rewriting, for each variable assigned more than once, only
    the blocks that mention it.  numba's version rebuilds every block of the function twice per such
    variable; no other block can change (a rewrite renames that one variable), so the IR is the same."""
    if not blocks:
        return {}
    cfg = ssa.compute_cfg_from_blocks(blocks)
    df_plus = ssa._iterated_domfronts(cfg)
    violators = ssa._find_defs_violators(blocks, cfg)
    cache_list_vars = ssa._CacheListVars()
    where = defaultdict(set)
    for label, blk in blocks.items():
        for stmt in blk.body:
            for var in stmt.list_vars():
                where[var.name].add(label)
    for varname in violators:
        labels = where[varname]
        states = ssa._make_states(blocks)
        states["varname"], states["defmap"] = varname, defaultdict(list)
        blocks = _rewrite(blocks, states, ssa._FreshVarHandler(), labels)   # _fresh_vars
        defmap = states["defmap"]
        states = ssa._make_states(blocks)   # _fix_ssa_vars
        states["varname"], states["defmap"] = varname, defmap
        states["phimap"] = phimap = defaultdict(list)
        states["cfg"] = cfg
        states["phi_locations"] = ssa._compute_phi_locations(df_plus, defmap)
        new = _rewrite(blocks, states, ssa._FixSSAVars(cache_list_vars), labels)
        for label, philist in phimap.items():
            blk = new[label]
            if label not in labels:   # kept as it was: the phis go into a new block
                new[label] = nb = ir.Block(scope=blk.scope, loc=blk.loc)
                nb.body = list(blk.body)
                blk = nb
            blk.body = philist + blk.body
        blocks = new
    if ssa.compute_cfg_from_blocks(blocks) != cfg:
        raise ssa.errors.CompilerError("CFG mutated in SSA pass")
    return blocks


_numba_run_ssa = getattr(ssa, "_run_ssa", None)
if _numba_run_ssa is not None and all(hasattr(ssa, n) for n in (
        "_iterated_domfronts", "_find_defs_violators", "_CacheListVars", "_make_states", "_run_ssa_block_pass",
        "_FreshVarHandler", "_FixSSAVars", "_compute_phi_locations")):
    ssa._run_ssa = _run_ssa


# A helper (no CPython entry) is only ever linked into its callers: numba copies its optimized LLVM module
# into every caller's module and makes machine code there.  numba also makes machine code for the helper's
# own module, which nothing runs (a tenth of a cold compile).  Helpers of this package are made
# "link only": their module is optimized as before and handed to callers, but never turned into machine
# code; the cache keeps that module as bitcode (docs/compile.md).
_LINK_ONLY = "batchmmu-link-only"
_Library = codegen.JITCodeLibrary
_finalize_final_module = _Library._finalize_final_module
_get_pointer_to_function = _Library.get_pointer_to_function
_serialize = _Library.serialize_using_object_code
_unserialize = _Library._unserialize.__func__
_native_lowering = typed_passes.BaseNativeLowering.run_pass
_codegen_set_env = codegen.JITCPUCodegen.set_env


def _link_only(lib):
    return getattr(lib, "_batchmmu_link_only", False)


def _lib_finalize_final_module(self):
    if _link_only(self) and any(gv.name.startswith(codegen.RuntimeLinker.PREFIX)
                                for gv in self._final_module.global_variables):
        self._batchmmu_link_only = False   # a recursive call, resolved only when the JIT links it: numba's way
    if not _link_only(self):
        return _finalize_final_module(self)
    self._finalize_dynamic_globals()
    self._verify_declare_only_symbols()
    self._finalized = True


def _lib_get_pointer_to_function(self, name):
    if not _link_only(self):
        return _get_pointer_to_function(self, name)
    self._ensure_finalized()
    return 0   # no machine code (a helper has no entry point Python could call)


def _lib_serialize(self):
    if not _link_only(self):
        return _serialize(self)
    return (self.name, _LINK_ONLY, self._get_module_for_linking().as_bitcode())


def _lib_unserialize(cls, codegen_, state):
    name, kind, data = state
    if kind != _LINK_ONLY:
        return _unserialize(cls, codegen_, state)
    self = codegen_.create_library(name)
    self._batchmmu_link_only = True
    self._final_module = self._shared_module = ll.parse_bitcode(data)
    self._finalize_final_module()
    return self


def _set_env(self, env_name, env):
    """JITCPUCodegen.set_env, skipping an environment whose global is in no machine code (a link-only helper's:
    no CPython entry; helpers must not need their environment either: no raise with run-time values, print or
    objmode, which tests/test_warmup.py checks)."""
    if self._engine.get_global_value_address(env_name):
        _codegen_set_env(self, env_name, env)


def _lowering_run_pass(self, state):
    flags = state.flags
    if state.library is None and flags.no_cpython_wrapper and flags.no_cfunc_wrapper and _ours(state.func_id.func):
        state.library = state.targetctx.codegen().create_library(state.func_id.func_qualname)
        state.library.enable_object_caching()
        state.library._batchmmu_link_only = True
    return _native_lowering(self, state)


if all(hasattr(codegen.CPUCodeLibrary, n) for n in (
        "_finalize_dynamic_globals", "_verify_declare_only_symbols", "_get_module_for_linking")):
    _Library._finalize_final_module = _lib_finalize_final_module
    _Library.get_pointer_to_function = _lib_get_pointer_to_function
    _Library.serialize_using_object_code = _lib_serialize
    _Library._unserialize = classmethod(_lib_unserialize)
    typed_passes.BaseNativeLowering.run_pass = _lowering_run_pass
    codegen.JITCPUCodegen.set_env = _set_env


# numba's PostProcessor runs after most front-end passes (1,400 times in the shadow group): it canonicalizes
# the CFG, then computes use/def sets, liveness, dead maps and each block's live variables.  Those feed only
# del insertion (asked for explicitly), object-mode lowering and generators; the variable lifetimes are
# computed lazily anyway.  For this package's (nopython, non-generator) functions, only the CFG work is done.
_postproc_run = postproc.PostProcessor.run


def _postproc(self, emit_dels=False, extend_lifetimes=False):
    fir = self.func_ir
    if emit_dels or fir.is_generator or not _ours(getattr(fir.func_id, "func", None)):
        return _postproc_run(self, emit_dels, extend_lifetimes)
    fir.blocks = transforms.canonicalize_cfg(fir.blocks)
    fir.variable_lifetime = postproc.VariableLifetime(fir.blocks)
    fir.generator_info = None


if hasattr(postproc, "VariableLifetime") and hasattr(transforms, "canonicalize_cfg"):
    postproc.PostProcessor.run = _postproc
