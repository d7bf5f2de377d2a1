"""A shard: some VMs of a scenario on their own Host, driven phase by phase.

Every backend (serial, process, ray) runs the same ``Shard`` code; the only thing
exchanged between shards is a phase's results at the phase boundary (the epoch), so
statistics are identical for any number of workers.  Random choices are drawn per
(seed, VM, vCPU, pass), never from a stream shared between VMs.
"""

import time

import numpy as np

from .constants import ACC_WRITE, MEM_LOG_DIRTY_PAGES
from .errors import BatchMMUError
from .host import Host
from .units import parse_size

TEST_SLOT = 1
CHUNK_EVENTS = 1 << 22


class Workload(dict):
    """The resolved scenario (plain data, picklable): host, groups, workload, phases."""


def plan(spec):
    """Per global VM id: (group index, vcpus, weight).  Weight = events per pass + memory."""
    out = []
    for gi, g in enumerate(spec["groups"]):
        vcpus = int(g.get("vcpus", 1))
        w = vcpus * spec["bpv"]
        out += [(gi, vcpus, w)] * int(g.get("count", 1))
    return out


def split(spec, workers):
    """Deal VMs to workers by weight (greedy, heaviest first, ties by id): sorted id lists."""
    vms = plan(spec)
    if workers < 1:
        raise BatchMMUError(f"workers={workers!r}: must be at least 1", field="workers", value=workers)
    order = sorted(range(len(vms)), key=lambda v: (-vms[v][2], v))
    load = [0] * workers
    parts = [[] for _ in range(workers)]
    for v in order:
        k = min(range(workers), key=lambda i: (load[i], i))
        parts[k].append(v)
        load[k] += vms[v][2]
    return [sorted(p) for p in parts if p]


_LEAF_LEVEL = {"4k": 1, "thp": 2, "hugetlb-2m": 2, "hugetlb-1g": 3}


def vm_table_rows(spec, gi):
    """Upper bound of page-table pages one VM of group ``gi`` builds (its test region fully mapped)."""
    from .arena import table_rows
    g = spec["groups"][gi]
    backing = spec["workload"].get("slot_backing", g.get("backing", spec["host"].get("backing", "thp")))
    pages = int(g.get("vcpus", 1)) * spec["bpv"] // 4096
    return table_rows(pages, _LEAF_LEVEL.get(backing, 1), int(g.get("tdp_levels", 4)))


def estimate_memory(spec, vm_ids):
    """Bytes a shard of these VMs needs: page tables, metadata, bitmaps, one chunk of events."""
    from .arena import bytes_per_row
    vms = plan(spec)
    rows = sum(vm_table_rows(spec, vms[v][0]) for v in vm_ids)
    pages = sum(vms[v][1] * spec["bpv"] // 4096 for v in vm_ids)
    per_vm = 2048  # VM table, stats, memslot records, slot lists
    events = min(CHUNK_EVENTS, max(1, pages)) * 80  # vm, vcpu, addr, kind, sort copies, results
    return rows * bytes_per_row() + pages // 8 + pages // 128 + len(vm_ids) * per_vm + events


class Shard:
    """The VMs ``vm_ids`` (global ids, sorted) of a scenario on one Host."""

    def __init__(self, spec, seed, vm_ids):
        self.spec, self.seed = spec, seed
        self.gids = np.asarray(vm_ids, np.int64)
        vms = plan(spec)
        host_kw = dict(spec["host"])
        host_kw["memory"] = spec["host_memory"]
        self.host = Host(**host_kw)
        self.vcpus = np.array([vms[v][1] for v in vm_ids], np.int64)
        self.test_base = np.zeros(len(vm_ids), np.int64)
        region, bpv, wl = spec["region"], spec["bpv"], spec["workload"]
        # consecutive ids of one group become one create_vms call
        i = 0
        while i < len(vm_ids):
            gi = vms[vm_ids[i]][0]
            j = i
            while j < len(vm_ids) and vms[vm_ids[j]][0] == gi:
                j += 1
            g = dict(spec["groups"][gi])
            g.pop("count", None)
            vcpus = int(g.get("vcpus", 1))
            if region == "slot0":
                g["memory"] = max(parse_size(g.get("memory", 0), "vm_group.memory"), vcpus * bpv)
            local = self.host.create_vms(j - i, **g)
            if region == "top":
                # memstress: the test memslot at the top of guest physical memory, aligned to its backing
                size = vcpus * bpv
                backing = wl.get("slot_backing", g.get("backing", spec["host"].get("backing", "thp")))
                align = (1 << 30) if backing == "hugetlb-1g" else (1 << 21)
                gpa = ((1 << int(g.get("maxphyaddr", 46))) - size) & ~(align - 1)
                for vm in local:
                    self.host.set_memslot(int(vm), TEST_SLOT, gpa, size, backing=backing)
                self.test_base[i:j] = gpa
            i = j
        self.slot = TEST_SLOT if region == "top" else 0
        # size the page arena once for the whole run instead of doubling it on the way
        self.host.reserve_tables(sum(vm_table_rows(spec, vms[v][0]) for v in vm_ids))

    # ------------------------------------------------------------------ events
    def _vm_events(self, lvm, pass_no, p0, p1):
        """Events of local VM ``lvm`` for pages p0..p1 of each vCPU's partition, vCPUs round-robin."""
        spec = self.spec
        pages = spec["bpv"] // spec["stride"]
        v = int(self.vcpus[lvm])
        gvm = int(self.gids[lvm])
        offs = np.empty((v, p1 - p0), np.int64)
        kinds = np.empty((v, p1 - p0), np.int64)
        wp = spec["write_percent"]
        for c in range(v):
            rng = np.random.default_rng([self.seed, gvm, c, pass_no])
            order = rng.permutation(pages) if spec["pattern"] == "random" else None
            offs[c] = np.arange(p0, p1) if order is None else order[p0:p1]
            if 0 < wp < 100:
                kinds[c] = np.where(rng.integers(0, 100, pages)[p0:p1] < wp, ACC_WRITE, 0)
            else:
                kinds[c] = ACC_WRITE if wp >= 100 else 0
        base = self.test_base[lvm] + np.arange(v, dtype=np.int64)[:, None] * spec["bpv"]
        addr = (base + offs * spec["stride"]).T.ravel()
        vcpu = np.broadcast_to(np.arange(v, dtype=np.int64), (p1 - p0, v)).ravel()
        return np.full(addr.size, lvm, np.int64), vcpu, addr, kinds.T.ravel()

    def events(self, pass_no):
        """Chunks of (vm, vcpu, addr, kind): whole VMs at a time (VMs are independent)."""
        pages = self.spec["bpv"] // self.spec["stride"]
        buf, n = [], 0
        for lvm in range(self.gids.size):
            per_page = int(self.vcpus[lvm])
            step = max(1, CHUNK_EVENTS // per_page)
            for p0 in range(0, pages, step):
                ev = self._vm_events(lvm, pass_no, p0, min(pages, p0 + step))
                buf.append(ev)
                n += ev[0].size
                if n >= CHUNK_EVENTS:
                    yield tuple(np.concatenate(x) for x in zip(*buf, strict=True))
                    buf, n = [], 0
        if buf:
            yield tuple(np.concatenate(x) for x in zip(*buf, strict=True))

    # ------------------------------------------------------------------ phases
    def run_phase(self, k, progress=None):
        ph = self.spec["phases"][k]
        op = ph.get("op", "access")
        t0 = time.perf_counter()
        events, extra = 0, {}
        if op == "access":
            for p in range(int(ph.get("passes", 1))):
                for vm, vc, addr, kind in self.events(p):
                    self.host.access(vm, vc, addr, kind)
                    events += addr.size
                    if progress is not None:
                        progress(addr.size)
        elif op == "dirty_log":
            enable = bool(ph.get("enable", True))
            for vm in range(self.gids.size):
                info = next(m for m in self.host.memslots(vm) if m["slot"] == self.slot)
                flags = info["flags"] | MEM_LOG_DIRTY_PAGES if enable else info["flags"] & ~MEM_LOG_DIRTY_PAGES
                self.host.set_memslot(vm, self.slot, info["gpa"], info["size"], flags)
        elif op == "get_dirty_log":
            dirty = 0
            for vm in range(self.gids.size):
                bm = self.host.get_dirty_log(vm, self.slot)
                dirty += int(np.unpackbits(bm.view(np.uint8)).sum())
            extra["dirty_pages"] = dirty
        stats = self.host.vt.stats[:self.host.nvm].copy()
        return {"seconds": time.perf_counter() - t0, "events": events, "extra": extra, "stats": stats,
                "host_used": self.host.host_memory()[0]}

    def footprint(self):
        return self.host.footprint()


def total_events(spec, k):
    ph = spec["phases"][k]
    if ph.get("op", "access") != "access":
        return 0
    return int(ph.get("passes", 1)) * sum(v[1] for v in plan(spec)) * (spec["bpv"] // spec["stride"])
