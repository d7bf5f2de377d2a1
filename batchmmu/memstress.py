"""The guest workloads of KVM's selftests, generated as arrays (no Python loop per access).

``memstress`` (``tools/testing/selftests/kvm/lib/memstress.c``)::

    rand_state = new_guest_random_state(guest_random_seed + vcpu_idx);
    for (;;) {
        for (i = 0; i < pages; i++) {
            page = random_access ? guest_random_u32(&rand_state) % pages : i;
            if (guest_random_u32(&rand_state) % 100 < write_percent)
                *(u64 *)(gva + page * 4096) = 0x0123456789ABCDEF;
            else
                READ_ONCE(*(u64 *)(gva + page * 4096));
        }
        GUEST_SYNC(1);
    }

``guest_random_u32`` is the Park-Miller "minimal standard" LCG: ``state = state * 48271 mod (2^31 - 1)``,
returning the new state.  A vCPU's state is seeded once and persists across passes, so pass k of a
vCPU starts where pass k-1 left it; every pass consumes ``pages`` draws (plus ``pages`` more with random
access).  Draw j of a stream seeded with s is ``s * 48271^j mod (2^31 - 1)``, so any stretch of any
stream is one vectorised multiply by a table of powers (products stay below 2^62).

``random_writer`` is ``dirty_log_test``'s guest: each write goes to page ``guest_random_u64() % pages``,
where a 64-bit draw is two 32-bit draws, the first one the high half.
"""

import numpy as np

LCG_A = 48271
LCG_M = (1 << 31) - 1
GUEST_RANDOM_SEED = 0x6B8B4567   # glibc's first unseeded random(): the selftests' default guest seed
DIRTY_LOG_PERF_SEED = 1          # dirty_log_perf_test's default (-r)
MEMSTRESS_WRITE_VALUE = 0x0123456789ABCDEF
PAGE_SIZE = 4096

_BLOCK = 1 << 16
_pow_cache = {}


def _powers(n):
    """``a^1 .. a^n mod m`` as int64 (cached; built by doubling, log2(n) vector steps)."""
    p = _pow_cache.get("p")
    if p is None or p.size < n:
        size = max(n, 2 * (0 if p is None else p.size), 16)
        p = np.array([LCG_A], np.int64)
        while p.size < size:
            p = np.concatenate([p, p * int(p[-1]) % LCG_M])
        _pow_cache["p"] = p
    return p[:n]


def seed_state(seed):
    """``new_guest_random_state(seed)``: the state is the seed as a u32."""
    return int(seed) & 0xFFFFFFFF


def lcg_scalar(state, n=1):
    """Reference (one draw at a time): the next ``n`` draws of ``state``; returns (draws, state)."""
    out = []
    s = int(state)
    for _ in range(n):
        s = s * LCG_A % LCG_M
        out.append(s)
    return out, s


def lcg_advance(states, count):
    """States after ``count`` draws (vectorised over streams)."""
    states = np.asarray(states, np.int64)
    return states % LCG_M * pow(LCG_A, int(count), LCG_M) % LCG_M if count else states.copy()


def lcg_draws(states, start, count):
    """Draws ``start+1 .. start+count`` of each stream: int64 array of shape (len(states), count).

    ``states`` are the streams' current states (u32 values); draw j is ``state * a^j mod m``.
    The first state is reduced mod m first, as the kernel's u64 product mod m reduces it.
    """
    states = np.atleast_1d(np.asarray(states, np.int64)) % LCG_M
    out = np.empty((states.size, count), np.int64)
    mul0 = pow(LCG_A, int(start), LCG_M)
    for b0 in range(0, count, _BLOCK):
        b1 = min(count, b0 + _BLOCK)
        pw = _powers(b1 - b0)
        lead = states * (mul0 * pow(LCG_A, b0, LCG_M) % LCG_M) % LCG_M   # state * a^(start+b0)
        np.multiply(lead[:, None], pw[None, :], out=out[:, b0:b1])
        np.remainder(out[:, b0:b1], LCG_M, out=out[:, b0:b1])
    return out


# ----------------------------------------------------------------------------- memstress
def region_gpa(max_gfn, guest_num_pages, backing_page_size=PAGE_SIZE):
    """memstress_create_vm: the test region's gpa, at the top of guest physical memory.

    ``gpa = (max_gfn + 1 - guest_num_pages - 1) * 4K``, aligned down to the backing page size.
    """
    gpa = (int(max_gfn) + 1 - int(guest_num_pages) - 1) * PAGE_SIZE
    if gpa < 0:
        raise ValueError(f"guest_num_pages={guest_num_pages}: does not fit below max_gfn={max_gfn}")
    return gpa & ~(int(backing_page_size) - 1)


def vcpu_pages(nr_vcpus, bytes_per_vcpu, overlap):
    """Pages each vCPU walks: its own partition, or (overlap, ``-o``) the whole region."""
    n = int(bytes_per_vcpu) // PAGE_SIZE
    return n * int(nr_vcpus) if overlap else n


def draws_per_pass(pages, random_access):
    return int(pages) * (2 if random_access else 1)


def memstress_pass(states, pages, write_percent=100, random_access=False, first=0, last=None):
    """Loop iterations ``first..last-1`` of one memstress pass for each vCPU stream in ``states``.

    ``states`` are the streams' states at the start of the pass.  Returns ``(page, write)``: int64 page
    indices and a bool write mask, both of shape (len(states), last-first).  The states after the pass
    are ``lcg_advance(states, draws_per_pass(pages, random_access))``.
    """
    pages = int(pages)
    last = pages if last is None else int(last)
    n = last - first
    states = np.atleast_1d(np.asarray(states, np.int64))
    if random_access:
        d = lcg_draws(states, 2 * first, 2 * n).reshape(states.size, n, 2)
        page = d[:, :, 0] % pages
        decide = d[:, :, 1]
    else:
        page = np.broadcast_to(np.arange(first, last, dtype=np.int64), (states.size, n))
        decide = lcg_draws(states, first, n)
    if write_percent >= 100:   # the draw is still consumed (it is counted in draws_per_pass)
        write = np.ones((states.size, n), bool)
    elif write_percent <= 0:
        write = np.zeros((states.size, n), bool)
    else:
        write = decide % 100 < int(write_percent)
    return page, write


def random_writer(states, pages, writes, first=0):
    """dirty_log_test's guest: pages of writes ``first..first+writes-1`` (one u64 draw = 2 u32 each).

    Returns int64 page indices of shape (len(states), writes); a stream advances 2 draws per write.
    """
    states = np.atleast_1d(np.asarray(states, np.int64))
    d = lcg_draws(states, 2 * int(first), 2 * int(writes)).reshape(states.size, int(writes), 2).astype(np.uint64)
    u64 = (d[:, :, 0] << np.uint64(32)) | d[:, :, 1]
    return (u64 % np.uint64(pages)).astype(np.int64)


def page_sets(pages, seed, iterations, write_percent=100, random_access=False, populate=True):
    """Per iteration, (writes, distinct pages written) of one vCPU, as dirty_log_perf_test runs it.

    Iteration 0 (populate: 100 % writes, sequential) is run first but not reported when ``populate``.
    """
    state = np.array([seed_state(seed)], np.int64)
    out = []
    if populate:
        state = lcg_advance(state, draws_per_pass(pages, False))
    for _ in range(iterations):
        page, write = memstress_pass(state, pages, write_percent, random_access)
        w = page[0][write[0]]
        out.append((int(w.size), int(np.unique(w).size)))
        state = lcg_advance(state, draws_per_pass(pages, random_access))
    return out
