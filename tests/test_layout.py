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
    (S, "VR_", S.NVRF, {"VR_PDPTR": 4, "VR_PREV_ROOT": 3, "VR_PREV_PGD": 3, "VR_PAE_ROOT": 4}),
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
