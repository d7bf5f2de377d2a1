"""Host memory overcommit: LRU aging, reclaim to swap, refaults; the rule that picks victims across
VMs, and the epoch protocol that applies it across shards.

The rule (deterministic, a function of per-VM summaries only):

1. *Scan*: every resident evictable folio of every VM is aged through the MMU notifier
   (``clear_young``): a folio with an accessed SPTE gets age 0, any other one age + 1 (at most 255).
   Each VM reports ``hist[age]`` = pages of that age.
2. *Plan* (``plan_reclaim``): to free ``need`` pages, take every page older than a global threshold
   age T, where T is the youngest age such that the pages of age >= T cover ``need``; the rest at
   age T is split between VMs in proportion to their pages of age T (largest remainder, ties to the
   lower VM id).  A VM's share is ``(T, at_threshold)``.
3. *Evict*: each VM swaps out its folios older than T, and folios of age T in slot and page order
   until ``at_threshold`` pages; whole folios (a THP is split and all its 512 pages go).

Because the plan depends on the summed histograms only, the same pages go for 1 or N shards.
See docs/host_memory.md for what is modelled and what is not.
"""

import time

import numpy as np

from . import args as A
from .errors import BatchMMUError, bad
from .kernels import state as S
from .kernels.gmem import gm_discard_slots
from .kernels.memslot import host_page_pages
from .kernels.reclaim import NAGES, discard_pages, reclaim_evict, reclaim_scan
from .timemodel import chain

EPOCH_BUDGET = 1 << 62          # the kernels' budget in "epoch" mode: faults never fail
DEFAULT_WATERMARKS = (0.90, 0.95)


# ----------------------------------------------------------------------------- the rule
def plan_reclaim(hist, need):
    """``hist``: int (nvm, NAGES) evictable pages by age; ``need``: pages to free.  Returns
    ``(threshold, at_threshold)``: every page older than ``threshold`` goes, and VM v gives
    ``at_threshold[v]`` pages of age ``threshold``.  With ``need`` <= 0 the threshold is NAGES
    (nothing goes); with fewer evictable pages than ``need``, everything goes."""
    hist = np.asarray(hist, np.int64)
    nvm = hist.shape[0]
    at = np.zeros(nvm, np.int64)
    if need <= 0 or nvm == 0:
        return NAGES, at
    by_age = hist.sum(axis=0)
    older = 0
    for t in range(NAGES - 1, -1, -1):
        here = int(by_age[t])
        if here and older + here >= need:
            rest = need - older
            h = [int(x) for x in hist[:, t]]
            share = [rest * x // here for x in h]
            rem = [rest * x % here for x in h]
            left = rest - sum(share)
            for v in sorted(range(nvm), key=lambda v: (-rem[v], v))[:left]:
                share[v] += 1
            return t, np.array(share, np.int64)
        older += here
    return 0, hist[:, 0].copy()


# ----------------------------------------------------------------------------- one host
def configure(host, overcommit, watermarks):
    """Parse Host(overcommit=, watermarks=)."""
    if isinstance(overcommit, np.bool_):
        overcommit = bool(overcommit)
    if overcommit is True:
        host.overcommit = "direct"
    elif overcommit is False or overcommit is None:
        host.overcommit = None
    elif isinstance(overcommit, str) and overcommit in ("direct", "epoch"):
        host.overcommit = overcommit
    else:
        raise bad("overcommit", overcommit, "use False, True (reclaim when a fault finds memory full) or 'epoch'")
    if not isinstance(watermarks, (tuple, list)) or len(watermarks) != 2:
        raise bad("watermarks", watermarks, "must be (low, high) fractions of memory")
    low, high = (A.number(x, "watermarks", 0.0, 1.0) for x in watermarks)
    if not 0 < low <= high <= 1:
        raise bad("watermarks", watermarks, "need 0 < low <= high <= 1")
    host.watermarks = (low, high)
    if host.overcommit == "epoch":
        host.host_ctl[S.HOST_BUDGET_BYTES] = EPOCH_BUDGET


def _require(host):
    if host.overcommit is None:
        raise bad("overcommit", False, "reclaim needs a Host(overcommit=True) (or 'epoch')")


def vm_records(host):
    """The VMs' slots for the kernels: the records of VM v are recs[ptr[v]:ptr[v + 1]] (by slot
    id, one per set of aliases), and the slots sharing recs[k]'s host pages are
    arecs[aptr[k]:aptr[k + 1]]."""
    groups = {}
    for (vm, _slot), rec in sorted(host._slot_rec.items()):
        groups.setdefault((vm, int(host.st.host_off[rec])), []).append(rec)
    owners, recs, aptr, arecs = [], [], [0], []
    for (vm, _off), members in groups.items():  # VM by VM, in the slot order of each set's first
        owners.append(vm)
        recs.append(members[0])
        arecs += members
        aptr.append(len(arecs))
    owners = np.array(owners, np.int64)
    ptr = np.searchsorted(owners, np.arange(host.nvm + 1)).astype(np.int64)
    return ptr, np.array(recs, np.int64), np.array(aptr, np.int64), np.array(arecs, np.int64)


def vm_layout(ptr, recs, aptr, arecs, vm):
    """VM ``vm``'s slots for the reclaim kernels in one array (kernels/reclaim.py ``_lay``): [n, its n records,
    the n + 1 offsets of their alias lists, the alias lists], or None when it has no slot."""
    a, b = int(ptr[vm]), int(ptr[vm + 1])
    if b <= a:
        return None
    offs = aptr[a:b + 1]
    return np.concatenate([[b - a], recs[a:b], offs - offs[0], arecs[offs[0]:offs[-1]]]).astype(np.int64)


def scan(host):
    """Age every resident evictable folio; returns int64 (nvm, NAGES) pages by age."""
    _require(host)
    layout = vm_records(host)
    hist = np.zeros((host.nvm, NAGES), np.int64)
    work = np.zeros(NAGES + 512, np.int64)   # a VM's histogram, then one folio's young map
    for vm in range(host.nvm):
        lay = vm_layout(*layout, vm)
        if lay is not None:
            work[:NAGES] = 0
            reclaim_scan(host._mmu_bundle(), vm, lay, work)
            hist[vm] = work[:NAGES]
    return hist


def evict(host, threshold, at_threshold):
    """Apply a plan (see plan_reclaim); returns int64 pages evicted per VM."""
    _require(host)
    at = np.asarray(at_threshold, np.int64)
    if at.shape != (host.nvm,):
        raise bad("at_threshold", f"shape {at.shape}", f"needs one entry per VM ({host.nvm})")
    layout = vm_records(host)
    out = np.zeros(host.nvm, np.int64)
    if threshold >= NAGES:
        return out
    for vm in range(host.nvm):
        lay = vm_layout(*layout, vm)
        if lay is not None:
            out[vm] = reclaim_evict(host._mmu_bundle(), vm, lay, int(threshold), int(at[vm]))
    return out


def reclaim(host, force=False, min_pages=0):
    """kswapd on one host: above the low watermark every folio is aged; above the high one (or with
    ``force``) pages are reclaimed down to the low watermark (at least ``min_pages``)."""
    _require(host)
    used = int(host.host_ctl[S.HOST_USED_BYTES])
    low, high = (int(w * host.memory) for w in host.watermarks)
    out = {"scanned": 0, "reclaimed": 0}
    if used <= low and not force and not min_pages:
        return out
    hist = scan(host)
    out["scanned"] = int(hist.sum())
    if used > high or force or min_pages:
        need = max(-(-(used - low) // 4096), int(min_pages))
        t, at = plan_reclaim(hist, need)
        out["reclaimed"] = int(evict(host, t, at).sum())
    return out


def direct_reclaim(host, vm, gpa):
    """A fault found the host full (try_to_free_pages): reclaim down to the low watermark and at
    least what the faulting host page needs.  True if anything was freed (the fault runs again)."""
    if host.overcommit != "direct":
        return False
    need = 1
    rec = _gfn_rec(host, vm, gpa >> 12)
    if rec >= 0:
        need = int(host_page_pages(host.st, rec, gpa >> 12))
    free = (host.memory - int(host.host_ctl[S.HOST_USED_BYTES])) >> 12
    return reclaim(host, force=True, min_pages=max(0, need - free))["reclaimed"] > 0


def _gfn_rec(host, vm, gfn):
    st = host.st
    for (v, slot), rec in host._slot_rec.items():
        if v == vm and not slot >> 16 and st.base_gfn[rec] <= gfn < st.base_gfn[rec] + st.npages[rec]:
            return rec
    return -1


def discard(host, vm, start, end):
    """MADV_DONTNEED of [start, end): the notifier invalidates, then the host pages are freed."""
    host.invalidate_hva_range(vm, start, end)
    freed = 0
    for rec, g0, g1 in host._hva_ranges(vm, start, end):
        base = int(host.st.base_gfn[rec])
        freed += int(discard_pages(host.vt, host.st, host.host_ctl, vm, rec, g0 - base, g1 - base))
        gm_discard_slots(host.gm, host.st, vm, np.array([rec]), np.array([g0 - base]), np.array([g1 - base]))
    return freed


def note_aliases(host, first, k):
    """Slots of one VM over the same hva range with the same backing (one memfd in several memslots,
    as max_guest_memory_test makes) share their host pages: a new record takes its alias's bitmaps."""
    aliases, users = host._aliases, host._alias_users
    st = host.st
    for rec in range(first, first + k):
        key = (int(st.vm[rec]), int(st.hva[rec]), int(st.npages[rec]), int(st.backing[rec]))
        off = aliases.get(key)
        if off is not None and users.get(off, 0) > 0:
            st.host_off[rec] = off
        else:
            aliases[key] = off = int(st.host_off[rec])
        users[off] = users.get(off, 0) + 1


def drop_alias(host, rec):
    """A slot goes: True if another slot still maps its host pages (nothing is released then)."""
    users = host._alias_users
    off = int(host.st.host_off[rec])
    users[off] = users.get(off, 1) - 1
    return users[off] > 0


def release_slot(host, vm, rec):
    """A deleted slot's swapped pages and THP splits go with it (the VMM unmapped its memory)."""
    st = host.st
    words = (int(st.npages[rec]) + 63) // 64
    off = int(st.host_off[rec])
    swapped = int(np.unpackbits(st.swap[off:off + words].view(np.uint8)).sum())
    st.swap[off:off + words] = 0
    st.split[off:off + words] = 0
    if st.age.size:
        st.age[64 * off:64 * (off + words)] = 0
    host.host_ctl[S.HOST_SWAPPED_BYTES] -= swapped * 4096
    host.vt.stats[vm, S.ST_HOST_PAGES_SWAPPED] -= swapped


def page_state(host, vm, slot):
    """Bool arrays over the slot's pages: ``resident``, ``swapped``, ``split`` (THP split)."""
    rec = host._slot_rec.get((vm, slot))
    if rec is None:
        raise bad("slot", slot, f"VM {vm} has no such memslot")
    st = host.st
    n = int(st.npages[rec])
    off = int(st.host_off[rec])
    words = (n + 63) // 64

    def bits(a):
        return np.unpackbits(a[off:off + words].view(np.uint8), bitorder="little")[:n].astype(bool)

    return {"resident": bits(st.host), "swapped": bits(st.swap), "split": bits(st.split)}


# ----------------------------------------------------------------------------- shards and epochs
def shard_step(shard, step, progress=None):
    """What a shard does for a host-wide step: ("epoch", k, j, n) runs epoch j of phase k;
    ("reclaim_scan",) ages and returns the histogram; ("reclaim_evict", T, at) applies a plan
    (``at`` indexed by global VM id)."""
    t0 = time.perf_counter()
    kind = step[0]
    if kind == "epoch":
        _, k, j, n = step
        shard._epoch = (j, n)
        try:
            return shard._run_phase(k, progress)
        finally:
            shard._epoch = None
    host = shard.host
    extra = {}
    res = {"events": 0}
    if kind == "reclaim_scan":
        res["hist"] = scan(host)
        extra["scanned_pages"] = int(res["hist"].sum())
    elif kind == "reclaim_evict":
        _, t, at = step
        extra["reclaimed_pages"] = int(evict(host, t, np.asarray(at, np.int64)[shard.gids]).sum())
    else:
        raise BatchMMUError(f"unknown host step {kind!r}", field="step", value=kind)
    res.update(seconds=time.perf_counter() - t0, extra=extra, stats=host.vt.stats[:host.nvm].copy(),
               **host_figures(host))
    return res


def host_figures(host):
    return {"host_used": int(host.host_ctl[S.HOST_USED_BYTES]),
            "host_swapped": int(host.host_ctl[S.HOST_SWAPPED_BYTES])}


def _merge(acc, res):
    if acc is None:
        return [dict(r, extra=dict(r["extra"])) for r in res]
    for a, r in zip(acc, res, strict=True):
        a["seconds"] += r["seconds"]
        a["events"] += r["events"]
        for key, v in r["extra"].items():
            if isinstance(v, (int, float)):
                a["extra"][key] = a["extra"].get(key, 0) + v
        if "sim" in r:
            a["sim"] = chain(a["sim"], r["sim"]) if "sim" in a else r["sim"]
        a["stats"] = r["stats"]
        a["host_used"] = r["host_used"]
        a["host_swapped"] = r.get("host_swapped", 0)
    return acc


_TIMELINE_STATS = ("host_major_faults", "host_pages_reclaimed", "host_pages_swapped", "host_thp_splits",
                   "mmu_notifier_zapped", "pf_fixed", "pages_4k", "pages_2m", "mmu_pages")


def snapshot(results, **more):
    """Host-wide figures after a step: resident and swapped bytes, page-table bytes, refaults."""
    stats = np.concatenate([r["stats"] for r in results]).sum(axis=0)
    idx = {n: i for i, n in enumerate(S.STAT_NAMES)}
    out = {"host_resident": sum(r["host_used"] for r in results),
           "host_swapped": sum(r.get("host_swapped", 0) for r in results),
           "page_table_bytes": int(stats[idx["mmu_pages"]]) * 4096}
    out.update({k: int(stats[idx[k]]) for k in _TIMELINE_STATS})
    out.update(more)
    return out


def phase_epochs(ph):
    n = ph.get("epochs", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise BatchMMUError(f"phase.epochs={n!r}: must be a positive integer", field="phase.epochs", value=n)
    return n


EPOCH_OPS = ("access", "populate", "dirty_pass")


def run_phase(be, spec, parts, k):
    """Run phase ``k`` on every shard: in epochs when it has ``epochs = n`` (each pass in n slices,
    the same slices of every VM), and with the host overcommitted a reclaim step at every epoch
    boundary.  Returns (results merged over the epochs, extra phase-record keys or {})."""
    ph = spec["phases"][k]
    n = phase_epochs(ph)
    over = bool(spec["host"].get("overcommit"))
    if n == 1 and not over:
        return be.run_phase(k), {}
    if n > 1 and ph["op"] not in EPOCH_OPS:
        raise BatchMMUError(f"phase.epochs={n}: only {', '.join(EPOCH_OPS)} phases run in epochs",
                            field="phase.epochs", value=n)
    passes = int(ph.get("passes", 1))
    steps = [k] if n == 1 else [("epoch", k, j, n) for j in range(passes * n)]
    merged, timeline = None, []
    for j, step in enumerate(steps):
        res = be.run_phase(step)
        merged = _merge(merged, res)
        info = {}
        if over:
            res, info = balance(be, spec, parts, res)
            merged = _merge(merged, [dict(r, events=0) for r in res]) if info else merged
        timeline.append(snapshot(merged, epoch=j, **info))
    return merged, {"host": timeline[-1], **({"epochs": timeline} if len(timeline) > 1 else {})}


def balance(be, spec, parts, results):
    """An epoch boundary: above the low watermark every shard ages its folios; above the high one
    the coordinator plans the reclaim from the summed histograms and the shards apply it."""
    mem = spec["host_memory"]
    low, high = (w * mem for w in spec["host"].get("watermarks", DEFAULT_WATERMARKS))
    used = sum(r["host_used"] for r in results)
    if used <= low:
        return results, {}
    scans = be.run_phase(("reclaim_scan",))
    nvm = sum(len(p) for p in parts)
    hist = np.zeros((nvm, NAGES), np.int64)
    for part, r in zip(parts, scans, strict=True):
        hist[part] = r["hist"]
    info = {"scanned_pages": int(hist.sum()), "reclaimed_pages": 0}
    if used <= high:
        return [dict(r, extra={}, seconds=r["seconds"]) for r in scans], info
    need = -(-(used - int(low)) // 4096)
    t, at = plan_reclaim(hist, need)
    res = be.run_phase(("reclaim_evict", t, at))
    for a, r in zip(res, scans, strict=True):
        a["seconds"] += r["seconds"]
    info["reclaimed_pages"] = sum(r["extra"]["reclaimed_pages"] for r in res)
    return [dict(r, extra={}) for r in res], info
