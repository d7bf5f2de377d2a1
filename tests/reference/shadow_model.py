"""A pure-Python reference model of KVM's shadow MMU: one VM, one vCPU, guest paging on.

Plain dicts and ints, written from upstream KVM (~v6.18) ``arch/x86/kvm/mmu/{mmu.c,paging_tmpl.h,
spte.c,page_track.c}``, ``arch/x86/kvm/x86.c`` and ``virt/kvm/kvm_main.c``, independently of
the kernels (``kernels/shadow_mmu.py``, ``paging_tmpl.py``, ...).  A shadow page (:class:`SP`) keeps its
SPTEs in ``spt`` (index -> int for a leaf SPTE, index -> child ``SP`` for a non-leaf one, absent = not
present); pages are found by ``hash[gfn]`` (newest first, as ``hlist_add_head``) with KVM's 32-bit role
word; rmaps are
``rmap[(level, gfn >> 9*(level-1))]`` lists of (SP, index).

Versions differ here; this follows v6.12+: make_spte sets A and D on every writable SPTE it
creates (A cleared only for prefetch), ``mmu_spte_update`` asks for a flush only when the
MMU-writable flag is cleared, FNAME(sync_spte) leaves an SPTE alone whose access is unchanged,
a write to a write-protected gfn returns RET_PF_WRITE_PROTECTED (counted as pf_emulate), and
FNAME(is_self_change_mapping) is gone.  Guest walks are ``reference.guest_walk.ref_walk``.

The simulated host follows batchmmu's contract: guest RAM is slot 0 at gpa 0 (plus an optional
slot 1 that the guest never maps); the host pfn of a gfn is the gfn; host pages are resident
after ``touch_host_memory``/``write_guest_memory`` or a KVM fault (a THP: its whole 2 MiB);
prefetch maps resident pages only (gup-fast); MMIO caching off (a gfn with no slot is
emulated); no PML; CR0.WP, EFER.NX forced on in hardware; the guest's native accesses walk the
shadow tables (hardware sets A/D in the leaf SPTE) and exit to KVM at most 4 times, reporting
the outcome and (hardware) error code of the last exit, or the guest's #PF error code; requests
are serviced at every guest entry (before an access and before each retry, and after an exit the
guest resumes from: MOV CR3, INVLPG, a TLB flush, an emulated instruction).
"""

from batchmmu import constants as C

from .guest_walk import _reserved, ref_walk

M64 = (1 << 64) - 1
P, W, U, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
HOST_WRITABLE, MMU_WRITABLE = 1 << 9, 1 << 10      # DEFAULT_SPTE_{HOST,MMU}_WRITABLE (spte.h)
NX = 1 << 63
ACC_X, ACC_W, ACC_U, ACC_ALL = 1, 2, 4, 7
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 0x10
RETRY, EMULATE, FIXED, SPURIOUS = "retry", "emulate", "fixed", "spurious"     # RET_PF_*
GUEST = "guest"       # RET_PF_RETRY after injecting the guest's #PF
REQ_FREE_OBSOLETE, REQ_SYNC, REQ_FLUSH_GUEST = "free_obsolete_roots", "mmu_sync", "tlb_flush_guest"
LOG_DIRTY = 1
STATS = ("pf_taken", "pf_fixed", "pf_emulate", "pf_spurious", "pf_fast", "pf_guest", "invlpg", "mmu_cache_miss",
         "mmu_shadow_zapped", "mmu_pte_write", "mmu_pde_zapped", "mmu_flooded", "mmu_unsync", "mmu_recycled",
         "pages_4k", "pages_2m", "pages_1g", "max_mmu_rmap_size", "remote_tlb_flush_requests", "mmu_pages",
         "rmap_entries", "max_mmu_page_hash_collisions")
GOLDEN_RATIO_64 = 0x61C8864680B583EB


def hash_bucket(gfn):
    """kvm_page_table_hashfn: hash_64(gfn, 12)."""
    return ((gfn * GOLDEN_RATIO_64) % (1 << 64)) >> 52


def _bit(x, n):
    return (x >> n) & 1


class SP:
    """struct kvm_mmu_page."""

    def __init__(self, gfn, role, gen):
        self.gfn, self.role, self.gen = gfn, role, gen
        self.level = role & 15
        self.has4 = _bit(role, 4)          # has_4_byte_gpte
        self.quadrant = (role >> 5) & 3
        self.direct = _bit(role, 7)
        self.access = (role >> 8) & 7
        self.invalid = False
        self.spt = {}                      # index -> leaf SPTE (int) or child SP
        self.trans = {}                    # shadowed_translation: index -> [gfn, access] (pages with gptes)
        self.parents = []                  # parent_ptes: (SP, index)
        self.unsync = False
        self.unsync_children = 0
        self.ubitmap = set()               # unsync_child_bitmap
        self.root_count = 0
        self.flood = 0                     # write_flooding_count

    def word(self):
        return self.role | (int(self.invalid) << 11)


def _child_link(e):
    return isinstance(e, SP)


class GuestWalker:
    """struct guest_walker, from a successful ref_walk."""
    level = max_level = gfn = pte_access = 0


class RefShadowHost:
    """KVM's shadow MMU for one VM with one vCPU; the API of batchmmu.Host without vm/vcpu arguments."""

    def __init__(self, memory, backing="4k", mmio_caching=False, maxphyaddr=46, lazy_requests=False,
                 zap_unsync_children=False, legacy_tdp_levels=None):
        """``lazy_requests=True`` mimics batchmmu where it is known to differ from KVM: requests raised
        while handling an exit (a root zapped by an emulated write) stay pending until the next guest
        operation instead of being serviced as the vCPU re-enters the guest, and obsolete roots are
        freed only when the current root must be reloaded, or at MOV CR3.
        ``zap_unsync_children=True`` zaps the unsync children of a zapped upper-level page first, as
        upstream mmu.c __kvm_mmu_prepare_zap_page (mmu_zap_unsync_children) reads; the kernel measured
        here (6.18 kvm_pvm) leaves them linked nowhere but unsync, with their SPTEs (tests/test_realkvm.py),
        which is the default.
        ``legacy_tdp_levels=4`` (or 5) makes the VM one of the legacy TDP MMU (kvm.tdp_mmu=N, NPT, paging off
        for the model: accesses are gpas): kvm_tdp_page_fault -> direct_page_fault below one direct root of
        that level (mmu_alloc_direct_roots), 1G pages at most; the processor's #NPF error codes."""
        assert not mmio_caching and backing in ("4k", "thp")
        self.legacy = legacy_tdp_levels
        self.lazy = lazy_requests
        self.zap_unsync_children = zap_unsync_children
        self.npages = memory >> 12
        self.backing, self.maxphyaddr = backing, maxphyaddr
        self.slots = {0: (0, self.npages)}        # id -> (base_gfn, npages)
        self.flags = 0                            # slot 0 flags
        self.dirty = None                         # slot 0 dirty bitmap: set of gfns, None = not logging
        self.manual = self.initially_set = False
        self.mem = {}                             # guest memory: 8-aligned gpa -> u64
        self.written = set()                      # gfns the guest or KVM wrote (for the tests to compare)
        self.resident = set()
        self.cr0, self.cr3, self.cr4, self.efer, self.rflags = 0x60000010, 0, 0, 0, 2
        self.pdptrs = [0, 0, 0, 0]
        self.root = None                          # SP, or [SP|None]*4 for PAE/32-bit guests
        self.root_pgd = 0
        self.prev = [None, None, None]            # prev_roots: (pgd, SP)
        self.requests = set()
        self.hash = {}                            # gfn -> [SP], newest first
        self.buckets = {}                         # hash_bucket(gfn) -> [SP], newest first (mmu_page_hash)
        self.active = []                          # active_mmu_pages, oldest first
        self.valid_gen = 0
        self.indirect_shadow_pages = 0
        self.write_track = {}                     # gfn -> count
        self.disallow = {}                        # (level, gfn >> 9*(level-1)) -> disallow_lpage
        self.rmap = {}
        self.st = dict.fromkeys(STATS, 0)
        self.n_max = 0
        self._seed_lpage_info(0, self.npages)
        self._update_n_max()

    # ================================================================== host side
    def _slot_of(self, gfn):
        for sid, (base, n) in self.slots.items():
            if base <= gfn < base + n:
                return sid
        return None

    def _seed_lpage_info(self, base, n, sign=1):
        # kvm_alloc_memslot_metadata: the unaligned ends of a slot never map huge
        for level in (2, 3):
            s = 9 * (level - 1)
            if base & ((1 << s) - 1):
                self.disallow[(level, base >> s)] = self.disallow.get((level, base >> s), 0) + sign
            if (base + n) & ((1 << s) - 1):
                k = (level, (base + n - 1) >> s)
                self.disallow[k] = self.disallow.get(k, 0) + sign

    def _update_n_max(self):
        # kvm_arch_commit_memory_region -> kvm_mmu_change_mmu_pages on CREATE/DELETE
        goal = max(sum(n for _, n in self.slots.values()) // 50, 64)
        if self.st["mmu_pages"] > goal:
            self._zap_oldest(self.st["mmu_pages"] - goal)
            goal = self.st["mmu_pages"]
        self.n_max = goal

    def _host_level(self, gfn):
        # host_pfn_mapping_level: a THP where the aligned 2 MiB lies inside slot 0
        if self.backing == "thp" and self._slot_of(gfn) == 0 and (gfn | 511) < self.npages:
            return 2
        return 1

    def _fault_in(self, gfn):
        if self._host_level(gfn) == 2:
            self.resident.update(range(gfn & ~511, (gfn & ~511) + 512))
        else:
            self.resident.add(gfn)

    def touch_host_memory(self, gpa, size):
        for gfn in range(gpa >> 12, (gpa + size + 4095) >> 12):
            if self._slot_of(gfn) == 0:
                self._fault_in(gfn)

    def write_guest_memory(self, gpa, words):
        for k, w in enumerate(words):
            self.mem[gpa + 8 * k] = int(w) & M64
        self.touch_host_memory(gpa, 8 * len(words))

    def read_guest_memory(self, gpa, n):
        return [self.mem.get(gpa + 8 * k, 0) for k in range(n)]

    def _read(self, gpa, size):
        word = self.mem.get(gpa & ~7, 0)
        return word if size == 8 else (word >> (8 * (gpa & 7))) & ((1 << (8 * size)) - 1)

    def _write_bytes(self, gpa, value, size):
        self.written.add(gpa >> 12)
        for k in range(size):
            a = gpa + k
            old = self.mem.get(a & ~7, 0)
            sh = 8 * (a & 7)
            self.mem[a & ~7] = (old & ~(0xFF << sh) & M64) | (((value >> (8 * k)) & 0xFF) << sh)

    def _mark_page_dirty(self, gfn):
        if self.dirty is not None and self._slot_of(gfn) == 0:
            self.dirty.add(gfn)

    def stats(self):
        return dict(self.st)

    # ================================================================== vCPU mode and roles
    def _mode(self):
        if _bit(self.efer, 10):
            return "long", (5 if _bit(self.cr4, 12) else 4), 8
        if _bit(self.cr4, 5):
            return "pae", 3, 8
        return "32bit", 2, 4

    def _paging(self):
        return _bit(self.cr0, 31) and not self.legacy

    def _pae_paging(self):
        return _bit(self.cr0, 31) and self._mode()[0] == "pae"

    def _root_role(self):
        # kvm_calc_cpu_role + kvm_init_shadow_mmu: level >= 3, efer_nx forced, access ACC_ALL
        if self.legacy:                                     # kvm_calc_tdp_mmu_root_page_role
            return self.legacy | 1 << 7 | ACC_ALL << 8 | 1 << 12 | 1 << 13
        if not self._paging():
            return 3 | 1 << 7 | ACC_ALL << 8 | 1 << 12       # nonpaging: a direct PAE-sized root
        _, top, size = self._mode()
        wp = _bit(self.cr0, 16)
        return (max(top, 3) | (size == 4) << 4 | ACC_ALL << 8 | 1 << 12 | wp << 13
                | (_bit(self.cr4, 20) and not wp) << 14 | (_bit(self.cr4, 21) and not wp) << 15)

    def set_vcpu_regs(self, cr0=None, cr3=None, cr4=None, efer=None, rflags=None):
        """KVM_SET_SREGS (KVM_SET_REGS for rflags): kvm_mmu_reset_context when CR0/CR3/CR4/EFER change,
        and always for PAE paging (__set_sregs_common loads the PDPTRs and sets mmu_reset_needed)."""
        if rflags is not None:
            self.rflags = rflags
        new = {"cr0": cr0, "cr3": cr3, "cr4": cr4, "efer": efer}
        sregs = {k: v for k, v in new.items() if v is not None}
        if not sregs:
            return
        reset = any(getattr(self, k) != v for k, v in sregs.items())
        for k, v in sregs.items():
            setattr(self, k, v)
        if self._pae_paging():
            self._load_pdptrs(self.cr3)
            reset = True
        if reset:
            self._free_roots(current=True, prev=(0, 1, 2))   # kvm_mmu_unload
            self.requests.add(REQ_FLUSH_GUEST)

    def _load_pdptrs(self, cr3):
        pdptes = [self._read((cr3 & 0xFFFFFFE0) + 8 * i, 8) for i in range(4)]
        if pdptes != self.pdptrs:
            self._free_roots(current=True)
        self.pdptrs = pdptes

    # ================================================================== shadow pages: hash, alloc, links
    def _obsolete(self, sp):
        return sp.invalid or sp.gen != self.valid_gen

    def _valid_sps_with_gptes(self, gfn):
        """for_each_gfn_valid_sp_with_gptes."""
        return [sp for sp in self.hash.get(gfn, []) if not self._obsolete(sp) and not sp.direct]

    def _flush(self):
        self.st["remote_tlb_flush_requests"] += 1          # kvm_flush_remote_tlbs

    def _get_shadow_page(self, gfn, role):
        """kvm_mmu_find_shadow_page, else kvm_mmu_alloc_shadow_page."""
        invalid, found, collisions = [], None, 0
        for sp in list(self.buckets.get(hash_bucket(gfn), [])):
            if self._obsolete(sp):
                continue
            if sp.gfn != gfn:
                collisions += 1
                continue
            if sp.role != role:
                if (role & 15) > 1 and sp.unsync:
                    self._prepare_zap(sp, invalid)
                continue
            if sp.direct:
                found = sp
                break
            if sp.unsync:
                ret = self._sync_page(sp, invalid)
                if ret < 0:
                    break
                if ret > 0:
                    self._flush()
            sp.flood = 0
            found = sp
            break
        if found is None:
            self.st["mmu_cache_miss"] += 1
        self._commit_zap(invalid)
        self.st["max_mmu_page_hash_collisions"] = max(self.st["max_mmu_page_hash_collisions"], collisions)
        if found is not None:
            return found
        sp = SP(gfn, role, self.valid_gen)
        self.active.append(sp)
        self.st["mmu_pages"] += 1
        self.hash.setdefault(gfn, []).insert(0, sp)
        self.buckets.setdefault(hash_bucket(gfn), []).insert(0, sp)
        if not sp.direct:
            self._account_shadowed(sp)
        return sp

    def _account_shadowed(self, sp):
        self.indirect_shadow_pages += 1
        if sp.level > 1:                     # __kvm_write_track_add_gfn: upper levels stay read-only
            self.write_track[sp.gfn] = self.write_track.get(sp.gfn, 0) + 1
        self._disallow_lpage(sp.gfn, +1)
        if self._gfn_write_protect(sp.gfn, 1):
            self._flush()

    def _unaccount_shadowed(self, sp):
        self.indirect_shadow_pages -= 1
        if sp.level > 1:
            self.write_track[sp.gfn] -= 1
        self._disallow_lpage(sp.gfn, -1)

    def _disallow_lpage(self, gfn, n):
        for level in (2, 3):
            k = (level, gfn >> (9 * (level - 1)))
            self.disallow[k] = self.disallow.get(k, 0) + n

    def _child_role(self, parent, idx, direct, access):
        role = (parent.role & ~(15 | 0x80 | 0x700 | 1 << 18)) | (parent.level - 1) | direct << 7 | access << 8
        if parent.has4:                      # a 4-byte PTE consumes bit 21: quadrant = PDE index & 1
            role = (role & ~0x60) | (idx & 1) << 5
        return role

    def _link(self, parent, idx, child):
        """__link_shadow_page: drop a huge SPTE there (with a flush), link, propagate unsync."""
        if idx in parent.spt:
            self._drop_spte(parent, idx)
            self._flush()
        parent.spt[idx] = child
        child.parents.append((parent, idx))
        if child.unsync_children or child.unsync:
            self._mark_unsync(parent, idx)

    def _drop_parent_pte(self, child, parent, idx):
        child.parents.remove((parent, idx))
        del parent.spt[idx]

    def _mark_unsync(self, sp, idx):
        if idx in sp.ubitmap:
            return
        sp.ubitmap.add(idx)
        sp.unsync_children += 1
        if sp.unsync_children == 1:
            for p, i in list(sp.parents):
                self._mark_unsync(p, i)

    def _clear_unsync_child_bit(self, sp, idx):
        sp.unsync_children -= 1
        sp.ubitmap.discard(idx)

    # ================================================================== rmaps and SPTE updates
    def _rmap_key(self, level, gfn):
        return (level, gfn >> (9 * (level - 1)))

    def _translation(self, sp, i):
        if not sp.direct:
            return sp.trans[i]
        return [sp.gfn + (i << (9 * (sp.level - 1))), sp.access]

    def _rmap_add(self, sp, i, gfn, access):
        if not sp.direct:
            sp.trans[i] = [gfn, access]
        self.st[("pages_4k", "pages_2m", "pages_1g")[sp.level - 1]] += 1
        self.st["rmap_entries"] += 1
        lst = self.rmap.setdefault(self._rmap_key(sp.level, gfn), [])
        self.st["max_mmu_rmap_size"] = max(self.st["max_mmu_rmap_size"], len(lst))
        lst.append((sp, i))

    def _drop_spte(self, sp, i):
        """drop_spte / mmu_spte_clear_track_bits + rmap_remove for a leaf SPTE."""
        sp.spt.pop(i)
        gfn = self._translation(sp, i)[0]
        self.st[("pages_4k", "pages_2m", "pages_1g")[sp.level - 1]] -= 1
        self.st["rmap_entries"] -= 1
        key = self._rmap_key(sp.level, gfn)
        self.rmap[key].remove((sp, i))
        if not self.rmap[key]:
            del self.rmap[key]

    def _zap_pte(self, sp, i):
        """mmu_page_zap_pte."""
        e = sp.spt.get(i)
        if e is None:
            return
        if _child_link(e):
            self._drop_parent_pte(e, sp, i)
        else:
            self._drop_spte(sp, i)

    def _spte_update(self, sp, i, new):
        """mmu_spte_update: flush iff the MMU-writable flag is cleared."""
        old = sp.spt.get(i)
        sp.spt[i] = new
        return old is not None and bool(old & MMU_WRITABLE) and not new & MMU_WRITABLE

    def _spte_write_protect(self, sp, i, pt_protect):
        spte = sp.spt[i]
        if not spte & W and not (pt_protect and spte & MMU_WRITABLE):
            return False
        if pt_protect:
            spte &= ~MMU_WRITABLE
        return self._spte_update(sp, i, spte & ~W)

    def _gfn_write_protect(self, gfn, min_level, pt_protect=True):
        """kvm_mmu_slot_gfn_write_protect: rmaps of levels min_level..1G."""
        flush = False
        for level in range(min_level, 4):
            for sp, i in list(self.rmap.get(self._rmap_key(level, gfn), ())):
                flush |= self._spte_write_protect(sp, i, pt_protect)
        return flush

    def _try_to_unsync(self, gfn, synchronizing, prefetch):
        """mmu_try_to_unsync_pages: True = the SPTE must stay write-protected."""
        if self.write_track.get(gfn):
            return True
        for sp in self._valid_sps_with_gptes(gfn):
            if synchronizing:
                return True
            if sp.unsync:
                continue
            if prefetch:
                return True
            self.st["mmu_unsync"] += 1               # kvm_unsync_page
            sp.unsync = True
            for p, i in list(sp.parents):
                self._mark_unsync(p, i)
        return False

    def _make_spte(self, sp, access, gfn, old, prefetch, synchronizing, host_writable=True):
        """spte.c make_spte: (wrprot, spte)."""
        spte = P | (A if not prefetch or synchronizing else 0)
        if not access & ACC_X:
            spte |= NX
        if access & ACC_U:
            spte |= U
        if sp.level > 1:
            spte |= PS
        if host_writable:
            spte |= HOST_WRITABLE
        else:
            access &= ~ACC_W
        spte |= gfn << 12
        wrprot = False
        if access & ACC_W:
            old_writable_leaf = old is not None and not _child_link(old) and old & W
            if not old_writable_leaf and self._try_to_unsync(gfn, synchronizing, prefetch):
                wrprot = True
            else:
                spte |= W | MMU_WRITABLE | D
        if prefetch and not synchronizing:
            spte &= ~A                                   # mark_spte_for_access_track, A/D enabled
        if spte & W and self.dirty is not None:
            self._mark_page_dirty(gfn)
        return wrprot, spte

    def _mmu_set_spte(self, sp, i, access, gfn, write_fault=False, prefetch=False):
        ret, flush, was_rmapped = FIXED, False, False
        old = sp.spt.get(i)
        if old is not None:
            if sp.level > 1 and _child_link(old):
                self._drop_parent_pte(old, sp, i)
                flush = True
            elif old >> 12 & ((1 << 40) - 1) != gfn:
                self._drop_spte(sp, i)
                flush = True
            else:
                was_rmapped = True
        wrprot, spte = self._make_spte(sp, access, gfn, sp.spt.get(i), prefetch, False)
        if sp.spt.get(i) == spte:
            ret = SPURIOUS
        else:
            flush |= self._spte_update(sp, i, spte)
        if wrprot and write_fault:
            ret = EMULATE                                # RET_PF_WRITE_PROTECTED
        if flush:
            self._flush()
        if not was_rmapped:
            self._rmap_add(sp, i, gfn, access)
        elif not sp.direct:
            sp.trans[i][1] = access
        return ret

    # ================================================================== guest PTEs
    def _gpte_to_gfn(self, gpte):
        return (gpte & (0xFFFFF000 if self._mode()[2] == 4 else ((1 << 52) - 1) & ~0xFFF)) >> 12

    def _gpte_access(self, gpte):
        acc = (gpte & (W | U)) | ACC_X
        if self._mode()[2] == 8 and gpte >> 63:
            acc &= ~ACC_X
        return acc

    def _protect_clean(self, access, gpte):
        return access if gpte & D else access & ~ACC_W

    def _prefetch_invalid_gpte(self, gpte):
        mode = self._mode()[0]
        return (not gpte & P or not gpte & A
                or _reserved(mode, gpte, 1, False, self.maxphyaddr, _bit(self.cr4, 4), _bit(self.efer, 11), True))

    def _level1_gpa(self, sp):
        size = 4 if sp.has4 else 8
        return (sp.gfn << 12) + (sp.quadrant << 9) * size * sp.has4

    def _walk(self, gva, pfec):
        """FNAME(walk_addr): (GuestWalker, 0) or (None, error_code).  A/D bits are set in memory and
        the page-table pages they change are marked dirty."""
        err, gpa, level, new_mem = ref_walk(self.mem, self.cr0, self.cr4, self.efer, self.rflags, self.cr3,
                                            self.pdptrs, 0, self.maxphyaddr, gva, pfec, pse36_kvm=True)
        if gpa is None:
            return None, err
        gw = GuestWalker()
        if not self._paging():                         # nonpaging_gva_to_gpa
            gw.level, gw.gfn, gw.pte_access = 1, gpa >> 12, ACC_ALL
            return gw, 0
        old, self.mem = self.mem, new_mem
        mode, top, size = self._mode()
        bits = 10 if size == 4 else 9
        if mode == "pae":
            table, lvl = self.pdptrs[(gva >> 30) & 3] & ((1 << 52) - 1) & ~0xFFF, 2
        elif mode == "32bit":
            table, lvl = self.cr3 & 0xFFFFF000, 2
        else:
            table, lvl = self.cr3 & ((1 << 52) - 1) & ~0xFFF, top
        gw.max_level = lvl
        gw.table_gfn, gw.pt_access, gw.ptes = {}, {}, {}
        acc = ACC_ALL
        while True:
            idx = (gva >> (12 + bits * (lvl - 1))) & ((1 << bits) - 1)
            gpte = self._read(table + size * idx, size)
            if old.get((table + size * idx) & ~7, 0) != self.mem.get((table + size * idx) & ~7, 0):
                self._mark_page_dirty(table >> 12)         # update_accessed_dirty_bits
                self.written.add(table >> 12)
            gw.table_gfn[lvl], gw.pt_access[lvl], gw.ptes[lvl] = table >> 12, acc, gpte
            acc &= self._gpte_access(gpte)
            large = lvl > 1 and gpte & PS and (size == 8 or _bit(self.cr4, 4))
            if lvl == 1 or large:
                break
            table = gpte & (0xFFFFF000 if size == 4 else ((1 << 52) - 1) & ~0xFFF)
            lvl -= 1
        gw.level, gw.gfn = lvl, gpa >> 12
        gw.pte_access = acc if pfec & PF_W else self._protect_clean(acc, gw.ptes[lvl])
        return gw, 0

    # ================================================================== the shadow walk
    def _shadow_walk(self, gva, root=None):
        """for_each_shadow_entry: (SP, index) from the root down to the last present entry."""
        root = self.root if root is None else root
        if root is None:
            return
        if isinstance(root, list):
            sp = root[(gva >> 30) & 3]
        else:
            sp = root
        while sp is not None:
            i = (gva >> (12 + 9 * (sp.level - 1))) & 511
            yield sp, i
            e = sp.spt.get(i)
            sp = e if _child_link(e) else None

    def _clear_flood(self, gva):
        for sp, _ in self._shadow_walk(gva):           # shadow_page_table_clear_flood
            sp.flood = 0

    def _hw_walk(self, gva, kind):
        """The processor's walk of the shadow tables: (gpa, None) or (None, error code for KVM)."""
        write, user, fetch = kind & PF_W, kind & PF_U, kind & PF_I
        code = (kind & (PF_W | PF_U)) | (PF_I if fetch else 0)
        if self.legacy:
            code |= PF_U                                # #NPF: the nested walk is a user access
        for sp, i in self._shadow_walk(gva):
            e = sp.spt.get(i)
            if e is None:
                return None, code
            if _child_link(e):
                continue
            deny = (write and not e & W) or (fetch and e & NX) or (user and not e & U)
            if not user and e & U and self._paging():       # SMEP/SMAP only with guest paging
                deny |= bool(fetch and _bit(self.cr4, 20)) or bool(not fetch and _bit(self.cr4, 21)
                                                                 and not _bit(self.rflags, 18))
            if deny:
                return None, code | PF_P
            sp.spt[i] = e | A | (D if write else 0)
            page = 1 << (12 + 9 * (sp.level - 1))
            return ((e >> 12 & ((1 << 40) - 1)) << 12) + (gva & (page - 1)), None
        return None, code

    # ================================================================== the fault path
    def _page_fault(self, gva, code):
        """kvm_mmu_page_fault -> FNAME(page_fault): (RET_PF_*, guest error code, mmio)."""
        self.st["pf_taken"] += 1
        if self._paging():
            r, err, mmio = self._paging_page_fault(gva, code)
        else:
            r, err, mmio = self._nonpaging_page_fault(gva, code)
        for ret, name in ((FIXED, "pf_fixed"), (EMULATE, "pf_emulate"), (SPURIOUS, "pf_spurious")):
            if r == ret:
                self.st[name] += 1
        return r, err, mmio

    def _paging_page_fault(self, gva, code):
        gw, err = self._walk(gva, code & (PF_W | PF_U | PF_I))
        if gw is None:
            self._inject_page_fault(gva, err)
            return GUEST, err, False
        slot = self._slot_of(gw.gfn)
        write, user = code & PF_W, code & PF_U
        if code & PF_P and write and slot is not None and self.write_track.get(gw.gfn):
            self._clear_flood(gva)                      # page_fault_handle_page_track
            return EMULATE, 0, False
        if slot is None:
            return EMULATE, 0, True                     # kvm_handle_noslot_fault, MMIO caching off
        self._fault_in(gw.gfn)
        if write and not gw.pte_access & ACC_W and not _bit(self.cr0, 16) and not user:
            gw.pte_access = (gw.pte_access | ACC_W) & ~ACC_U       # CR0.WP=0 supervisor write
            if _bit(self.cr4, 20):
                gw.pte_access &= ~ACC_X
        root_sp = None if isinstance(self.root, list) else self.root
        if (root_sp is not None and self._obsolete(root_sp)) or \
                (root_sp is None and REQ_FREE_OBSOLETE in self.requests):
            return RETRY, 0, False                      # is_page_fault_stale
        self._make_mmu_pages_available()
        return self._fetch(gva, gw, write), 0, False

    def _nonpaging_page_fault(self, gva, code):
        """nonpaging_page_fault -> direct_page_fault: gva == gpa, ACC_ALL, 2M pages at most."""
        gfn, write = gva >> 12, code & PF_W
        slot = self._slot_of(gfn)
        if code & PF_P and write and slot is not None and self.write_track.get(gfn):
            return EMULATE, 0, False                    # page_fault_handle_page_track
        r = self._fast_page_fault(gva, gfn, code)
        if r is not None:
            self.st["pf_fast"] += 1
            return r, 0, False
        if slot is None:
            return EMULATE, 0, True                     # kvm_handle_noslot_fault, MMIO caching off
        self._fault_in(gfn)
        if REQ_FREE_OBSOLETE in self.requests:
            return RETRY, 0, False                      # is_page_fault_stale
        self._make_mmu_pages_available()
        return self._direct_map(gva, gfn, write), 0, False

    def _fast_page_fault(self, gva, gfn, code):
        """fast_page_fault on direct pages: None for RET_PF_INVALID (the slow path runs)."""
        if not (code & PF_P and code & PF_W):
            return None                                 # page_fault_can_be_fast (A/D bits on)
        last = None
        for sp, i in self._shadow_walk(gva):
            e = sp.spt.get(i)
            if e is None:
                return None
            if not _child_link(e):
                last = sp, i, e
        if last is None:
            return None
        sp, i, e = last
        if e & W:
            return SPURIOUS
        if not e & MMU_WRITABLE or (sp.level > 1 and self.dirty is not None and self._slot_of(gfn) == 0):
            return None
        sp.spt[i] = e | W                               # fast_pf_fix_direct_spte
        self._mark_page_dirty(gfn)
        return FIXED

    def _direct_map(self, gva, gfn, write):
        """direct_map: direct pages (ACC_ALL) down to the goal level, mmu_set_spte, direct_pte_prefetch."""
        goal = 1
        if self.dirty is None:
            lvl = 3 if self.legacy else 2               # max_level: KVM_MAX_HUGEPAGE_LEVEL, PG_LEVEL_2M for a PAE root
            while lvl > 1 and self.disallow.get((lvl, gfn >> (9 * (lvl - 1)))):
                lvl -= 1
            goal = min(lvl, self._host_level(gfn)) if lvl > 1 else 1
        sp, i = next(self._shadow_walk(gva))
        while sp.level != goal:
            if not _child_link(sp.spt.get(i)):
                base = gfn & ~((1 << (9 * (sp.level - 1))) - 1)
                self._link(sp, i, self._get_shadow_page(base, self._child_role(sp, i, 1, ACC_ALL)))
            sp, i = sp.spt[i], (gva >> (12 + 9 * (sp.level - 2))) & 511
        base = gfn & ~((1 << (9 * (goal - 1))) - 1)
        ret = self._mmu_set_spte(sp, i, ACC_ALL, base, write_fault=bool(write))
        if ret != SPURIOUS:
            self._pte_prefetch(sp, i)
        return ret

    def _fetch(self, gva, gw, write):
        sp, i = next(self._shadow_walk(gva), (None, None))
        while sp is not None:
            sp.flood = 0
            if sp.level == gw.level:
                break
            e = sp.spt.get(i)
            if not _child_link(e):
                child = self._get_shadow_page(gw.table_gfn[sp.level - 1],
                                              self._child_role(sp, i, 0, gw.pt_access[sp.level - 1]))
                if child.unsync_children:
                    self._sync_children(child)
                self._link(sp, i, child)
            sp, i = sp.spt[i], (gva >> (12 + 9 * (sp.level - 2))) & 511
        if sp is None:
            return RETRY
        # kvm_mmu_hugepage_adjust
        goal, gfn = 1, gw.gfn
        if gw.level > 1 and self.dirty is None:
            lvl = min(gw.level, 3)
            while lvl > 1 and self.disallow.get((lvl, gfn >> (9 * (lvl - 1)))):
                lvl -= 1
            goal = min(lvl, self._host_level(gfn)) if lvl > 1 else 1
        while sp.level != goal:
            base = gfn & ~((1 << (9 * (sp.level - 1))) - 1)
            e = sp.spt.get(i)
            if _child_link(e) and e.access != gw.pte_access:          # validate_direct_spte
                self._drop_parent_pte(e, sp, i)
                self._flush()
            if not _child_link(sp.spt.get(i)):
                self._link(sp, i, self._get_shadow_page(base, self._child_role(sp, i, 1, gw.pte_access)))
            sp, i = sp.spt[i], (gva >> (12 + 9 * (sp.level - 2))) & 511
        base = gfn & ~((1 << (9 * (goal - 1))) - 1)
        ret = self._mmu_set_spte(sp, i, gw.pte_access, base, write_fault=bool(write))
        if ret != SPURIOUS:
            self._pte_prefetch(sp, i)
        return ret

    def _pte_prefetch(self, sp, i):
        if sp.level > 1:
            return
        base = i & ~7
        if sp.direct:
            start = None
            for j in range(base, base + 8):
                if j in sp.spt or j == i:
                    if start is None:
                        continue
                    if self._direct_prefetch_many(sp, start, j) < 0:
                        return
                    start = None
                elif start is None:
                    start = j
            if start is not None:
                self._direct_prefetch_many(sp, start, base + 8)
            return
        size = 4 if sp.has4 else 8
        for j in range(base, base + 8):
            if j == i or j in sp.spt:
                continue
            if not self._prefetch_gpte(sp, j, self._read(self._level1_gpa(sp) + size * j, size)):
                break

    def _prefetch_gpte(self, sp, j, gpte):
        if self._prefetch_invalid_gpte(gpte):
            return False
        gfn = self._gpte_to_gfn(gpte)
        access = self._protect_clean(sp.access & self._gpte_access(gpte), gpte)
        slot = self._slot_of(gfn)          # gfn_to_memslot_dirty_bitmap(no_dirty_log = writable)
        if slot is None or (access & ACC_W and slot == 0 and self.dirty is not None) or gfn not in self.resident:
            return False
        self._mmu_set_spte(sp, j, access, gfn, prefetch=True)
        return True

    def _direct_prefetch_many(self, sp, start, end):
        gfn = sp.gfn + start
        slot = self._slot_of(gfn)
        if slot is None or (sp.access & ACC_W and slot == 0 and self.dirty is not None):
            return -1
        base, n = self.slots[slot]
        if base + n - gfn < end - start:
            return -1
        count = 0
        while count < end - start and gfn + count in self.resident:
            count += 1
        if count == 0:
            return -1
        for k in range(count):
            self._mmu_set_spte(sp, start + k, sp.access, gfn + k, prefetch=True)
        return 0

    def _make_mmu_pages_available(self):
        avail = max(self.n_max - self.st["mmu_pages"], 0)
        if avail < 5:
            self._zap_oldest(25 - avail)

    def _inject_page_fault(self, gva, err):
        """kvm_inject_emulated_page_fault: a protection fault first syncs the current root's SPTE."""
        if err & PF_P and not err & PF_RSVD:
            self._invalidate_addr(gva, self.root)
        self.st["pf_guest"] += 1

    # ================================================================== sync
    def _sync_spte(self, sp, i):
        """FNAME(sync_spte): 1 = flush needed, 0 = no flush."""
        size = 4 if sp.has4 else 8
        gpte = self._read(self._level1_gpa(sp) + size * i, size)
        if self._prefetch_invalid_gpte(gpte):
            self._drop_spte(sp, i)
            return 1
        gfn = self._gpte_to_gfn(gpte)
        access = self._protect_clean(sp.access & self._gpte_access(gpte), gpte)
        if gfn != sp.trans[i][0]:
            self._drop_spte(sp, i)
            return 1
        if sp.trans[i][1] == access:
            return 0
        sp.trans[i][1] = access
        old = sp.spt[i]
        _, spte = self._make_spte(sp, access, gfn, old, True, True, bool(old & HOST_WRITABLE))
        return int(self._spte_update(sp, i, spte))

    def _sync_page(self, sp, invalid):
        """kvm_sync_page: <0 (the page was zapped), 0, or >0 (flush)."""
        if sp.direct or (sp.role ^ self._root_role()) & ~(15 | 0x60 | 0x700 | 1 << 18):
            ret = -1
        else:
            ret = 0
            for i in sorted(sp.spt):
                ret |= self._sync_spte(sp, i)
        if ret < 0:
            self._prepare_zap(sp, invalid)
        return ret

    def _unsync_walk(self, parent, pvec):
        """mmu_unsync_walk: fill pvec ((SP, index) in DFS order, parent first); True while work remains."""
        pvec.clear()
        if not parent.unsync_children:
            return False
        pvec.append((parent, None))
        return self._unsync_walk_rec(parent, pvec) != 0

    def _pages_add(self, pvec, sp, idx):
        if sp.unsync and any(s is sp for s, _ in pvec):
            return False
        pvec.append((sp, idx))
        return len(pvec) == 16                   # KVM_PAGE_ARRAY_NR

    def _unsync_walk_rec(self, sp, pvec):
        nr = 0
        for i in sorted(sp.ubitmap):
            child = sp.spt.get(i)
            if not _child_link(child):
                self._clear_unsync_child_bit(sp, i)
                continue
            if child.unsync_children:
                if self._pages_add(pvec, child, i):
                    return -1
                ret = self._unsync_walk_rec(child, pvec)
                if ret == 0:
                    self._clear_unsync_child_bit(sp, i)
                elif ret > 0:
                    nr += ret
                else:
                    return ret
            elif child.unsync:
                nr += 1
                if self._pages_add(pvec, child, i):
                    return -1
            else:
                self._clear_unsync_child_bit(sp, i)
        return nr

    def _leaves(self, pvec, parents):
        """for_each_sp: the level-1 pages of pvec, keeping ``parents`` (level-2 index -> (SP, idx))."""
        top = pvec[0][0]
        parents.clear()
        parents[top.level - 2] = [top, None]
        parents[top.level - 1] = [None, None]
        for sp, idx in pvec[1:]:
            parents.setdefault(sp.level - 1, [None, None])[1] = idx
            if sp.level == 1:
                yield sp
            else:
                parents.setdefault(sp.level - 2, [None, None])[0] = sp

    def _clear_parents(self, parents):
        """mmu_pages_clear_parents: clear the path's bits upwards while the pages have no other unsync child."""
        level = 0
        while True:
            sp, idx = parents.get(level, (None, None))
            if sp is None:
                return
            self._clear_unsync_child_bit(sp, idx)
            level += 1
            if sp.unsync_children:
                return

    def _sync_children(self, parent):
        """mmu_sync_children: batches of 16, write-protecting each batch's gfns first."""
        pvec, parents, invalid, flush = [], {}, [], False
        while self._unsync_walk(parent, pvec):
            protected = False
            for sp in list(self._leaves(pvec, parents)):
                protected |= self._gfn_write_protect(sp.gfn, 1)
            if protected:
                self._remote_flush_or_zap(invalid, True)
                flush = False
            for sp in self._leaves(pvec, parents):
                sp.unsync = False                       # kvm_unlink_unsync_page
                self.st["mmu_unsync"] -= 1
                flush |= self._sync_page(sp, invalid) > 0
                self._clear_parents(parents)
        self._remote_flush_or_zap(invalid, flush)

    def _remote_flush_or_zap(self, invalid, flush):
        if invalid:
            self._commit_zap(invalid)
        elif flush:
            self._flush()

    def _invalidate_addr(self, gva, root):
        """__kvm_mmu_invalidate_addr on one root (nothing with paging off: no sync_spte)."""
        if not self._paging():
            return
        for sp, i in self._shadow_walk(gva, root):
            if sp.unsync and i in sp.spt:
                ret = self._sync_spte(sp, i)
                if ret:
                    self._flush()
            if not sp.unsync_children:
                break

    # ================================================================== zapping
    def _prepare_zap(self, sp, invalid):
        """__kvm_mmu_prepare_zap_page: returns (pages zapped, list unstable)."""
        self.st["mmu_shadow_zapped"] += 1
        n = 0
        if sp.level > 1 and self.zap_unsync_children:   # mmu_zap_unsync_children
            pvec, parents = [], {}
            while self._unsync_walk(sp, pvec):
                for child in self._leaves(pvec, parents):
                    self._prepare_zap(child, invalid)
                    self._clear_parents(parents)
                    n += 1
        for i in sorted(sp.spt):
            self._zap_pte(sp, i)
        while sp.parents:
            p, i = sp.parents[0]
            self._drop_parent_pte(sp, p, i)
        unstable = n > 0
        if not sp.invalid and not sp.direct:
            self._unaccount_shadowed(sp)
        if sp.unsync:
            sp.unsync = False
            self.st["mmu_unsync"] -= 1
        zapped_root = False
        if sp in self.active:
            self.active.remove(sp)
        if not sp.root_count:
            n += 1
            invalid.append(sp)
            self.st["mmu_pages"] -= 1
        else:
            zapped_root = not self._obsolete(sp)
        sp.invalid = True
        if zapped_root:
            self.requests.add(REQ_FREE_OBSOLETE)
        return n, unstable

    def _commit_zap(self, invalid):
        if not invalid:
            return
        self._flush()
        for sp in invalid:
            self.hash[sp.gfn].remove(sp)
            if not self.hash[sp.gfn]:
                del self.hash[sp.gfn]
            self.buckets[hash_bucket(sp.gfn)].remove(sp)
        invalid.clear()

    def _zap_oldest(self, nr):
        """kvm_mmu_zap_oldest_mmu_pages: from the tail of active_mmu_pages, roots skipped."""
        total, invalid = 0, []
        while True:
            sp = next((s for s in self.active if not s.root_count), None)
            if sp is None:
                break
            total += self._prepare_zap(sp, invalid)[0]
            if total >= nr:
                break
        self._commit_zap(invalid)
        self.st["mmu_recycled"] += total

    def _zap_all_fast(self):
        self.valid_gen ^= 1
        self.requests.add(REQ_FREE_OBSOLETE)
        invalid = []
        while True:
            sp = next((s for s in self.active if self._obsolete(s) and not s.invalid), None)
            if sp is None:
                break
            self._prepare_zap(sp, invalid)
        self._commit_zap(invalid)

    # ================================================================== roots
    def _free_roots(self, current=False, prev=()):
        """kvm_mmu_free_roots."""
        invalid = []

        def put(sp):
            sp.root_count -= 1
            if not sp.root_count and sp.invalid:
                self._prepare_zap(sp, invalid)
        for k in prev:
            if self.prev[k] is not None:
                put(self.prev[k][1])
                self.prev[k] = None
        if current and self.root is not None:
            for sp in (self.root if isinstance(self.root, list) else [self.root]):
                if sp is not None:
                    put(sp)
            self.root, self.root_pgd = None, 0
        self._commit_zap(invalid)

    def _mmu_load(self):
        """kvm_mmu_load -> mmu_alloc_shadow_roots, then kvm_mmu_sync_roots."""
        mode, top, _ = self._mode()
        self._make_mmu_pages_available()
        if self.legacy:                                 # mmu_alloc_direct_roots: one root of the TDP level
            self.root = self._get_shadow_page(0, self._root_role())
            self.root.root_count += 1
            self.root_pgd = 0
            return
        if not self._paging():                          # mmu_alloc_direct_roots: 4 level-2 roots
            self.root = [self._get_shadow_page(i << 18, (self._root_role() & ~15) | 2) for i in range(4)]
            for sp in self.root:
                sp.root_count += 1
            self.root_pgd = 0
            self._sync_roots()
            return
        if top >= 4:
            sp = self._get_shadow_page(self.cr3 >> 12 & ((1 << 40) - 1), self._root_role())
            sp.root_count += 1
            self.root = sp
        else:
            roots = [None] * 4
            for i in range(4):
                if mode == "pae":
                    if not self.pdptrs[i] & P:
                        continue
                    gfn, quadrant = (self.pdptrs[i] >> 12) & ((1 << 40) - 1), 0
                else:
                    gfn, quadrant = (self.cr3 & 0xFFFFF000) >> 12, i
                sp = self._get_shadow_page(gfn, (self._root_role() & ~(15 | 0x60)) | 2 | quadrant << 5)
                sp.root_count += 1
                roots[i] = sp
            self.root = roots
        self.root_pgd = self.cr3
        self._sync_roots()

    def _sync_roots(self):
        if self.root is None:
            return
        if isinstance(self.root, list):
            for sp in self.root:
                if sp is not None:
                    self._sync_children(sp)
        elif self.root.unsync or self.root.unsync_children:
            self._sync_children(self.root)

    def _vcpu_enter(self, mov_cr3=False):
        """vcpu_enter_guest: service requests, then kvm_mmu_reload."""
        req, self.requests = self.requests, set()
        if self.lazy and REQ_FREE_OBSOLETE in req and not mov_cr3 and not self._root_needs_reload():
            req.discard(REQ_FREE_OBSOLETE)
            self.requests.add(REQ_FREE_OBSOLETE)
        if REQ_FREE_OBSOLETE in req:
            self._free_obsolete_roots()
        if REQ_SYNC in req:
            self._sync_roots()
        if REQ_FLUSH_GUEST in req:
            self._flush_tlb_guest()
        if REQ_FREE_OBSOLETE in self.requests and not self.lazy:
            self.requests.discard(REQ_FREE_OBSOLETE)
            self._free_obsolete_roots()
        if self.root is None:
            self._mmu_load()

    def _root_needs_reload(self):
        if isinstance(self.root, list):
            return any(sp is not None and self._obsolete(sp) for sp in self.root)
        return self.root is None or self._obsolete(self.root)

    def _resume(self):
        if not self.lazy:
            self._vcpu_enter()

    def _free_obsolete_roots(self):
        cur = self.root is not None and (isinstance(self.root, list) or self._obsolete(self.root))
        prev = [k for k in range(3) if self.prev[k] is not None and self._obsolete(self.prev[k][1])]
        self._free_roots(current=cur, prev=prev)

    def _flush_tlb_guest(self):
        """kvm_vcpu_flush_tlb_guest: sync the current root, free unsync previous roots."""
        self._sync_roots()
        self._free_roots(prev=[k for k in range(3) if self.prev[k] is not None
                               and (self.prev[k][1].unsync or self.prev[k][1].unsync_children)])

    def _root_usable(self, entry, pgd):
        return entry is not None and entry[0] == pgd and entry[1].word() == self._root_role()

    def _new_pgd(self, pgd):
        """kvm_mmu_new_pgd -> fast_pgd_switch (special PAE roots are never cached)."""
        if isinstance(self.root, list):
            self._free_roots(current=True)
        hit = False
        if self.root is not None:
            cur = (self.root_pgd, self.root)
            if self._root_usable(cur, pgd):
                hit = True
            else:
                for k in range(3):
                    cur, self.prev[k] = self.prev[k], cur
                    if self._root_usable(cur, pgd):
                        hit = True
                        break
                self.root, self.root_pgd = (cur[1], cur[0]) if cur is not None else (None, 0)
                if not hit:
                    self._free_roots(current=True)
        else:
            for k in range(3):
                if self._root_usable(self.prev[k], pgd):
                    self.root_pgd, self.root = self.prev[k]
                    self.prev[k:] = self.prev[k + 1:] + [None]
                    hit = True
                    break
        if hit:
            self.root.flood = 0

    # ================================================================== guest operations
    def access(self, addr, kind=0, value=None, size=0):
        """A native access (a store if ``value`` is given: ``size`` bytes).  A write without a value that
        KVM has to emulate is taken as an 8-byte store of the bytes already there."""
        outcome, err = C.HIT, 0
        for _ in range(4):
            self._vcpu_enter()
            gpa, code = self._hw_walk(addr, kind)
            if gpa is not None:
                if value is not None:
                    self._write_bytes(gpa, value, size)
                return outcome, err
            r, err, mmio = self._page_fault(addr, code)
            if r == GUEST:
                self._resume()                          # the guest resumes in its #PF handler
                return C.GUEST_FAULT, err
            if r == EMULATE:
                outcome = C.MMIO
                if not mmio:
                    outcome = C.EMULATED
                    if kind & PF_W:
                        o, e = self._emulate(addr, kind & (PF_W | PF_U), value, size or 8)
                        if o == C.GUEST_FAULT:
                            outcome, code = o, e
                self._resume()                          # the guest resumes after the emulated instruction
                return outcome, code
            outcome, err = {FIXED: C.FIXED, SPURIOUS: C.SPURIOUS, RETRY: C.RETRY}[r], code
        return outcome, err

    def store(self, addr, value, kind=C.ACC_WRITE):
        """Host.store: an 8-byte store, two accesses if it crosses a page."""
        kind |= C.ACC_WRITE
        first = min(8, 4096 - (addr & 4095))
        out = self.access(addr, kind, value & ((1 << (8 * first)) - 1), first)
        ok = (C.HIT, C.FIXED, C.SPURIOUS, C.EMULATED)
        if first < 8 and out[0] in ok:
            out2 = self.access(addr + first, kind, value >> (8 * first), 8 - first)
            if out2[0] not in ok:
                out = out2
        return out

    def _emulate(self, addr, access, value, size):
        """emulator_read_write: each page part walked (A/D) and written, with kvm_mmu_track_write.
        ``value`` None (a write access without a value) writes back the bytes already there."""
        parts = []
        first = min(size, 4096 - (addr & 4095))
        parts.append((addr, None if value is None else value & ((1 << (8 * first)) - 1), first))
        if first < size:
            parts.append((addr + first, None if value is None else value >> (8 * first), size - first))
        outcome = C.EMULATED
        for a, v, n in parts:
            gw, err = self._walk(a, access)
            if gw is None:
                self._inject_page_fault(a, err)
                return C.GUEST_FAULT, err
            gpa = (gw.gfn << 12) | (a & 0xFFF)
            if self._slot_of(gw.gfn) is None:
                outcome = C.MMIO
                continue
            if access & PF_W:
                if v is None:
                    v = sum(self._read(gpa + k, 1) << (8 * k) for k in range(n))
                self._write_bytes(gpa, v, n)
                self._mark_page_dirty(gw.gfn)
                self._track_write(gpa, n)
        return outcome, 0

    def emulated_access(self, addr, kind=0, value=0, size=8):
        self._vcpu_enter()
        out = self._emulate(addr, kind & (PF_W | PF_U | PF_I), value, size)
        self._resume()
        return out

    def _track_write(self, gpa, nbytes):
        """kvm_mmu_track_write."""
        if not self.indirect_shadow_pages:
            return
        gfn = gpa >> 12
        if _bit(self.cr4, 5) and nbytes == 4:
            gpa, nbytes = gpa & ~7, 8
        gentry = self._read(gpa, nbytes) if nbytes in (4, 8) else 0
        self.st["mmu_pte_write"] += 1
        invalid, flush = [], False
        for sp in list(self.hash.get(gfn, [])):
            if self._obsolete(sp) or sp.direct:
                continue
            if self._misaligned(sp, gpa, nbytes) or self._flooded(sp):
                self._prepare_zap(sp, invalid)
                self.st["mmu_flooded"] += 1
                continue
            off, n = gpa & 0xFFF, 1
            if sp.has4:
                off <<= 1
                if sp.level == 2:
                    off = (off & ~7) << 1
                    n = 2
                if off >> 12 != sp.quadrant:
                    continue
                off &= 0xFFF
            for i in range(off // 8, off // 8 + n):
                present = i in sp.spt
                self._zap_pte(sp, i)
                if gentry and sp.level != 1:
                    self.st["mmu_pde_zapped"] += 1
                flush |= present
        self._remote_flush_or_zap(invalid, flush)

    def _misaligned(self, sp, gpa, nbytes):
        off, size = gpa & 0xFFF, (4 if sp.has4 else 8)
        if not off & (size - 1) and nbytes == 1:
            return False
        return bool((off ^ (off + nbytes - 1)) & ~(size - 1)) or nbytes < 4

    def _flooded(self, sp):
        if sp.level == 1:
            return False
        sp.flood += 1
        return sp.flood >= 3

    def invlpg(self, gva):
        """kvm_mmu_invlpg: every cached root."""
        self._vcpu_enter()
        self._invalidate_addr(gva, self.root)
        for k in range(3):
            if self.prev[k] is not None:
                self._invalidate_addr(gva, self.prev[k][1])
        self.st["invlpg"] += 1
        self._resume()

    def mov_cr3(self, cr3):
        """kvm_set_cr3 (no PCID): a new pgd, then KVM_REQ_MMU_SYNC (+ a current-TLB flush)."""
        self._vcpu_enter()
        if cr3 != self.cr3 or self._pae_paging():
            if self._pae_paging():
                self._load_pdptrs(cr3)
            if cr3 != self.cr3:
                self._new_pgd(cr3)
            self.cr3 = cr3
        self.requests.add(REQ_SYNC)
        self._vcpu_enter(mov_cr3=True)

    def flush_tlb(self):
        self._vcpu_enter()
        self._flush_tlb_guest()
        self._resume()

    # ================================================================== memslots and dirty logging
    def set_memslot(self, slot, gpa, size, flags=0):
        if slot == 0:
            self._set_slot0_flags(flags)
        elif size:
            self.slots[slot] = (gpa >> 12, size >> 12)
            self._seed_lpage_info(gpa >> 12, size >> 12)
            self._update_n_max()
        else:
            base, n = self.slots.pop(slot)
            self._seed_lpage_info(base, n, -1)
            self.resident -= set(range(base, base + n))   # the VMM unmaps it: its host pages are freed
            for g in [a for a in self.mem if base <= a >> 12 < base + n]:
                del self.mem[g]                            # ... and their contents
            self._zap_all_fast()                        # kvm_arch_flush_shadow_memslot (quirk on)
            self._update_n_max()

    def _set_slot0_flags(self, flags):
        old, self.flags = self.flags, flags
        if not (old ^ flags) & LOG_DIRTY:
            return
        if flags & LOG_DIRTY:
            self.dirty = set(range(self.npages)) if self.manual and self.initially_set else set()
            if not (self.manual and self.initially_set):
                for level in (1, 2, 3):                 # kvm_mmu_slot_remove_write_access(4K)
                    for (lvl, _), lst in list(self.rmap.items()):
                        if lvl == level:
                            for sp, i in list(lst):
                                self._spte_write_protect(sp, i, False)
                self._flush()
            return
        self.dirty = None
        zapped = False                                  # kvm_rmap_zap_collapsible_sptes, 4K..2M
        for (level, _), lst in list(self.rmap.items()):
            if level > 2:
                continue
            for sp, i in list(lst):
                if sp.direct and sp.level < self._max_mapping_level(sp.gfn):
                    self._drop_spte(sp, i)
                    zapped = True
        if zapped:
            self._flush()

    def _max_mapping_level(self, gfn):
        level = 3
        while level > 1 and self.disallow.get((level, gfn >> (9 * (level - 1)))):
            level -= 1
        return 1 if level == 1 else min(level, self._host_level(gfn))

    def enable_manual_dirty_log_protect(self, initially_set=True):
        self.manual, self.initially_set = True, bool(initially_set)

    def _words(self):
        out = [0] * ((self.npages + 63) // 64)
        for gfn in self.dirty:
            out[gfn >> 6] |= 1 << (gfn & 63)
        return out

    def _enable_log_dirty_masked(self, offset, mask):
        """kvm_arch_mmu_enable_log_dirty_pt_masked (no PML)."""
        if self.manual and self.initially_set:
            start = offset + (mask & -mask).bit_length() - 1
            end = offset + mask.bit_length() - 1
            self._gfn_write_protect(start, 2)
            if ((start << 12) + (1 << 21) - 1) >> 21 != ((end << 12) + (1 << 21) - 1) >> 21:
                self._gfn_write_protect(end, 2)
        for k in range(64):
            if mask >> k & 1:
                for sp, i in list(self.rmap.get((1, offset + k), ())):
                    self._spte_write_protect(sp, i, False)

    def get_dirty_log(self, slot=0):
        words = self._words()
        if self.manual:
            return words
        flush = False
        for w, mask in enumerate(words):
            if mask:
                flush = True
                self.dirty -= {w * 64 + k for k in range(64) if mask >> k & 1}
                self._enable_log_dirty_masked(w * 64, mask)
        if flush:
            self._flush()
        return words

    def clear_dirty_log(self, slot, first_page, num_pages, bitmap):
        cleared, flush = 0, False
        for w in range((num_pages + 63) // 64):
            offset = first_page + 64 * w
            mask = int(bitmap[w]) & M64
            mask &= sum(1 << k for k in range(64) if offset + k in self.dirty)
            if mask:
                flush = True
                cleared += bin(mask).count("1")
                self.dirty -= {offset + k for k in range(64) if mask >> k & 1}
                self._enable_log_dirty_masked(offset, mask)
        if flush:
            self._flush()
        return cleared
