"""The shape of the code (docs/architecture.md): module sizes and the record layouts' column maps."""

from pathlib import Path

import numpy as np
import pytest
from batchmmu.kernels import mmu_internal as MI
from batchmmu.kernels import state as S

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.nojit
def test_no_module_over_800_lines():
    sizes = {p.relative_to(ROOT).as_posix(): sum(1 for _ in open(p))
             for d in ("batchmmu", "kernels") for p in (ROOT / d).glob("*.py")}
    assert {f: n for f, n in sizes.items() if n > 800} == {}


@pytest.mark.nojit
@pytest.mark.parametrize("mod, prefix, width, widths", [
    (S, "SP_", S.NSP, {"SP_UBITMAP": 8}), (S, "VM_", S.NVMF, {}), (S, "VC_", S.NVCF, {}),
    (S, "SL_", S.NSLF, {"SL_LPAGE_OFF": 2, "SL_RMAP_OFF": 3}),
    (S, "VR_", S.NVRF, {"VR_PDPTR": 4, "VR_PREV_ROOT": 3, "VR_PREV_PGD": 3, "VR_PAE_ROOT": 4, "VR_L1_CR0": 4,
                        "VR_L1_PDPTR": 4, "VR_ALT_ROOT": 8}),
    (S, "RG_", S.NRGF, {}), (S, "RM_", S.NRMF, {}), (S, "GMH_", S.NGMH, {}), (S, "NODE_", 2, {}),
    (MI, "EV_", MI.NEVF, {}), (MI, "RES_", MI.NRESF, {}),
    (S, ("HOST_", "CFG_"), S.NHOST, {}),
])
def test_record_columns_tile_the_record(mod, prefix, width, widths):
    """Every column of a record belongs to exactly one field (no overlap, no gap, nothing past the width)."""
    cols = {n: v for n, v in vars(mod).items() if n.startswith(prefix) and isinstance(v, int)
            and n not in ("VM_R", "VM_W", "VM_X")}
    used = np.zeros(width + 8, np.int64)
    for n, c in cols.items():
        used[c:c + widths.get(n, 1)] += 1
    assert used.tolist() == [1] * width + [0] * 8, cols


@pytest.mark.nojit
def test_field_views_write_the_records():
    vt = S.VMTable(rec=np.zeros((3, S.NVMF), np.int64), stats=np.zeros((3, S.NSTAT), np.int64))
    vt.root[1] = 7
    vt.hash_off[2] = 9
    vr = S.VcpuRegs(rec=np.zeros((2, S.NVRF), np.int64))
    vr.pdptr[1, 3] = 5
    assert vt.rec[1, S.VM_ROOT] == 7 and vt.rec[2, S.VM_HASH_OFF] == 9 and vr.rec[1, S.VR_PDPTR + 3] == 5
    assert int(vt.rec.sum()) == 16 and int(vr.rec.sum()) == 5
    gm = S.GuestMem(hash=np.zeros((4, S.NGMH), np.int64), page=None, free=None, ctl=None)
    gm.key[2], gm.row[2] = 11, 3
    sh = S.ShadowState(*[None] * 6, ctl=np.zeros(S.SH_SCRATCH + MI.SC_SIZE, np.int64))
    sh.scratch[MI.SC_RUNNING_VCPU] = 4
    assert gm.hash[2].tolist() == [11, 3] and sh.ctl[S.SH_SCRATCH + MI.SC_RUNNING_VCPU] == 4


@pytest.mark.nojit
def test_walker_block_of_the_scratch():
    """The walker's words, the OOM gpa, the walker's table-row cache and the running vCPU do not overlap, and
    all of it lies below the next scratch array."""
    from batchmmu.kernels import guest_walk as G
    spans = [(MI.SC_WK, MI.SC_WK + G.WK_SIZE), (MI.SC_OOM_GPA, MI.SC_OOM_GPA + 1), (G.WKC_VM, G.WKC_END),
             (MI.SC_RUNNING_VCPU, MI.SC_RUNNING_VCPU + 1)]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)) and spans[-1][1] <= MI.SC_PVEC_SP
    assert G.WKC_GEN == G.WKC_VM + 1 and G.WKC_GFN + 6 <= G.WKC_KEY and G.WKC_KEY + 6 <= G.WKC_SLOT \
        and G.WKC_SLOT + 6 <= G.WKC_END


def _spt_stores():
    """{(file, function)} of every store into a page-table array (``spt[...] = / &= / |=``) in kernels/."""
    import ast
    out = set()
    for p in sorted((ROOT / "kernels").glob("*.py")):
        for fn in ast.walk(ast.parse(p.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for n in ast.walk(fn):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AugAssign) else []
                for t in targets:
                    v = t.value if isinstance(t, ast.Subscript) else None
                    name = v.attr if isinstance(v, ast.Attribute) else v.id if isinstance(v, ast.Name) else None
                    if name == "spt":
                        out.add((p.name, fn.name))
    return out


@pytest.mark.nojit
def test_spte_stores_go_through_each_mmus_chokepoint():
    """One SPTE chokepoint per MMU: besides it, only what KVM (or the processor) also does around it."""
    assert _spt_stores() == {
        ("tdp.py", "tdp_set_spte"),                  # tdp_mmu_set_spte + handle_changed_spte
        ("tdp.py", "tdp_clear_spte_bits"),           # tdp_mmu_clear_spte_bits (same leaf, same pfn)
        ("tdp.py", "_wrprot_leaf_run"),              # the same, a run of 4K leaves at once
        ("tdp.py", "tdp_mmu_alloc_sp"),              # a fresh page's fill (the memory cache's init value)
        ("tdp.py", "tdp_mmu_split_huge_page"),       # the new child's SPTEs, before it is linked
        ("fault.py", "fast_pf_fix_direct_spte"),     # KVM's cmpxchg, no bookkeeping (TDP and direct shadow pages)
        ("fault.py", "tdp_hw_walk_from"),            # the processor setting A/D
        ("shadow_mmu.py", "mmu_spte_update_no_track"),   # the shadow MMU's mmu_spte_* family
        ("shadow_mmu.py", "alloc_shadow_page"),      # a fresh page's fill
        ("hw.py", "shadow_hw_walk"),                 # the processor setting A/D
    }
