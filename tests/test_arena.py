"""The Arena (batchmmu/arena.py): one owner of every struct and pool, growth without a copy to keep in sync,
and a page arena sized from the work."""

import numpy as np
import pytest
from batchmmu.kernels import state as S

from batchmmu import ACC_WRITE, FIXED, Host
from batchmmu.arena import Arena, table_rows, tdp_rows_bound


@pytest.mark.nojit
def test_pools_grow_in_place_of_their_field_and_offsets_stay_valid():
    a = Arena()
    offs = a.alloc_many("host", 3, 4)
    assert offs.tolist() == [0, 3, 6, 9]
    a.st.host[offs[1]:offs[1] + 3] = 7
    big = a.alloc("host", 10_000, fill=-1)             # grows the pool: the tuple's field is replaced
    assert big == 12 and a.st.host.shape[0] >= 10_012
    assert a.st.host[3:6].tolist() == [7, 7, 7]        # earlier regions kept their offsets and contents
    assert (a.st.host[12:10_012] == -1).all()
    assert a.st.swap.shape[0] == a.st.host.shape[0]    # companions of the host bitmaps follow it
    r = a.alloc_many("rmap", 5, 2, fill=(-1, 0))
    assert r.tolist() == [0, 5] and a.sh.rmap.shape == (10, S.NRMF)
    assert (a.sh.rmap[:, S.RM_HEAD] == -1).all() and (a.sh.rmap[:, S.RM_COUNT] == 0).all()
    assert a.alloc("ring", 64) == 0 and a.ct.ring.shape == (64, S.NRGF)


@pytest.mark.nojit
def test_host_structs_are_the_arenas_and_only_it_replaces_them():
    h = Host(memory="64MiB")
    h.create_vms(2, memory="4MiB", mmu="shadow")
    for name in ("pa", "vt", "st", "ct", "vr", "sh", "gm"):
        assert getattr(h, name) is getattr(h.arena, name)
        with pytest.raises(AttributeError):
            setattr(h, name, getattr(h, name))
    # a memslot added later grows the pools; the Host reads the new arrays at once
    h.set_memslot(0, 1, 1 << 30, 8 << 20)
    rec = h._slot_rec[(0, 1)]
    assert h.st.lpage.shape[0] >= int(h.st.lpage_off[rec, 0]) + 4
    assert h.st.rmap_off[rec, 0] >= 0 and h.sh.rmap.shape[0] >= int(h.st.rmap_off[rec, 0]) + 2048


@pytest.mark.nojit
def test_tdp_rows_bound_is_a_full_tree_at_most_and_levels_per_event():
    h = Host(memory="8GiB", backing="4k")
    vms = h.create_vms(2, memory="1GiB")
    assert table_rows(np.array([262144]), 1, np.array([4])).tolist() == [1 + 513 + 2 + 2]
    bound = tdp_rows_bound(h.vt, h.st, h.nrec, h.nvm, np.repeat(vms, [3, 10 ** 6]))
    assert bound == 3 * 4 + 518
    h.access(int(vms[1]), 0, np.arange(1 << 18) << 12, ACC_WRITE)
    held = int(h.stats(int(vms[1]))["mmu_pages"])
    assert tdp_rows_bound(h.vt, h.st, h.nrec, h.nvm, np.full(5, vms[1])) == 518 - held


def test_a_first_touch_sizes_the_page_arena_from_the_work_not_by_doubling():
    """Populating 1 GiB takes 515 table pages (root, PDPT, PD, 512 PTs); the arena holds about that many rows,
    not the next power of two (KVM holds 8.4 bytes of tables per 4K page; doubling gave the simulator 16.6)."""
    h = Host(memory="2GiB", backing="4k")
    vm = int(h.create_vms(1, memory="1GiB")[0])
    res = h.access(vm, 0, np.arange(1 << 18, dtype=np.int64) << 12, ACC_WRITE)
    assert (res.outcome == FIXED).all()
    used = int(h.stats(vm)["mmu_pages"])
    assert used == 515
    assert h.pa.spt.shape[0] <= used + 64 + S.MAX_ROWS_PER_EVENT
    per_page = h.pa.spt.shape[0] * (512 * 8 + 8 * S.NSP + 8) / (1 << 18)
    assert per_page < 9.0
