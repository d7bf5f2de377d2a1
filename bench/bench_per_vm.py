"""Per-VM host operations at scale: each call must cost O(that VM's slots), not O(all slots).

Usage: python bench/bench_per_vm.py [VMS ...]   (default 500 2000 8000)
Prints seconds for one pass of page_idle marking (memslots + clear_young on every VM, as the
``mark_idle`` phase does) and of memslots() alone, per VM count.
"""

import sys
import time

import batchmmu as bm


def one(nvm):
    h = bm.Host(memory="64GiB", backing="4k")
    vms = h.create_vms(nvm, memory="2MiB")
    for vm in vms[:: max(1, nvm // 64)]:
        h.set_memslot(int(vm), 1, 1 << 30, 1 << 21)  # a second slot in some VMs
    h.access(vms, 0, 0x1000, bm.ACC_WRITE)
    t = time.perf_counter()
    for vm in range(nvm):
        h.memslots(vm)
    t_slots = time.perf_counter() - t
    t = time.perf_counter()
    for vm in range(nvm):
        for m in h.memslots(vm):
            h.age_hva_range(vm, m["hva"], m["hva"] + m["size"], flush=False)
    t_idle = time.perf_counter() - t
    return t_slots, t_idle


def main(argv):
    sizes = [int(a) for a in argv] or [500, 2000, 8000]
    one(4)  # compile
    print(f"{'VMs':>6} {'memslots() s':>13} {'mark_idle s':>12}")
    for n in sizes:
        a, b = one(n)
        print(f"{n:>6} {a:>13.3f} {b:>12.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
