"""Memory-access trace replay: the ``trace`` workload pattern.

A trace is a sequence of records (vcpu, addr, kind), read in chunks (a trace larger than memory streams):

* ``npy``: a structured array with fields ``addr`` [``vcpu``, ``kind``], an (n, 3) integer array
  (vcpu, addr, kind), an (n, 2) one (addr, kind) or a 1-D array of addresses; memory-mapped, read in chunks.
* ``npz``: arrays ``addr`` [``vcpu``, ``kind``] (read whole; use .npy for traces larger than memory).
* ``csv``: columns vcpu, addr, kind (a header names them in any order, else by position: addr |
  addr,kind | vcpu,addr,kind); addr decimal or 0x-hex; kind an integer (ACC_* bits) or r/w/x.
* ``lackey``: ``valgrind --tool=lackey --trace-mem=yes`` output (I = fetch, L = read, S and M = write).
* ``drcachesim``: DynamoRIO drcachesim / drmemtrace ``view`` text (ifetch, read, write; thread ids become
  vCPUs 0, 1, ... in order of first appearance).
Text formats may be gzip-compressed (``.gz``).  ``kind`` uses the access bits of ``bm.ACC_*``.

Placement (injective, so every distinct trace page is one distinct guest page): ``keep`` puts page p at
p - base (base: the first page aligned down to 2 MiB), ``compact`` puts the distinct pages one after
the other in order of first use; ``auto`` keeps the layout when it fits the test region, else compacts.
Trace vCPU t runs on vCPU t % vcpus of every VM.
"""

import gzip
import os
from pathlib import Path

import numpy as np

from .constants import ACC_FETCH, ACC_VALID_MASK, ACC_WRITE
from .errors import BatchMMUError

KEYS = {"trace", "trace_format", "trace_repeat", "trace_scale", "trace_offset", "trace_vm_offset", "trace_layout",
        "trace_chunk", "trace_memory"}
FORMATS = ("npz", "npy", "csv", "lackey", "drcachesim")
LAYOUTS = ("auto", "keep", "compact")
CHUNK = 1 << 20                    # records per chunk
TEXT_BLOCK = 8 << 20               # bytes of text per chunk
KEEP_AUTO_MAX = 1 << 30            # memory "auto": keep the trace's layout when its span is at most this
_HUGE = 512                        # 2 MiB in 4 KiB pages
_KIND_WORDS = {b"r": 0, b"read": 0, b"l": 0, b"load": 0, b"0": 0, b"w": ACC_WRITE, b"write": ACC_WRITE,
               b"s": ACC_WRITE, b"store": ACC_WRITE, b"m": ACC_WRITE, b"modify": ACC_WRITE,
               b"x": ACC_FETCH, b"f": ACC_FETCH, b"i": ACC_FETCH, b"fetch": ACC_FETCH, b"ifetch": ACC_FETCH,
               b"exec": ACC_FETCH}
_HEXDIG = np.full(256, -1, np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEXDIG[_c] = _i
    _HEXDIG[bytes([_c]).upper()[0]] = _i


def _err(path, msg, field="trace"):
    return BatchMMUError(f"trace={str(path)!r}: {msg}", field=field, value=str(path))


# ----------------------------------------------------------------------------- text parsing (vectorised)
def _digits(s, base, path, what):
    """An 'S' array of digit strings (no prefix) -> uint64 values."""
    s = np.asarray(s)
    if s.size == 0:
        return np.zeros(0, np.uint64)
    width = max(1, s.dtype.itemsize)
    b = np.ascontiguousarray(s.astype(f"S{width}")).view(np.uint8).reshape(s.size, width)
    d = _HEXDIG[b]
    present = b != 0
    bad = present & ((d < 0) | (d >= base))
    empty = ~present[:, 0]
    if bad.any() or empty.any():
        i = int(np.nonzero(bad.any(axis=1) | empty)[0][0])
        raise _err(path, f"{what} {s[i].decode(errors='replace')!r} is not a number")
    width = int(present.sum(axis=1).max())
    if width > (16 if base == 16 else 20):
        raise _err(path, f"{what}: numbers of more than 64 bits")
    val = np.zeros(s.size, np.uint64)
    ub = np.uint64(base)
    for col in range(width):   # a loop over digit positions, not records
        val = np.where(present[:, col], val * ub + d[:, col].astype(np.uint64), val)
    return val


def _numbers(s, path, what):
    """Decimal or 0x-hex strings -> uint64."""
    s = np.char.strip(np.asarray(s, dtype="S"))
    low = np.char.lower(s)
    hexa = np.char.startswith(low, b"0x")
    out = np.zeros(s.size, np.uint64)
    if hexa.any():
        out[hexa] = _digits(np.char.replace(low[hexa], b"0x", b""), 16, path, what)
    if (~hexa).any():
        out[~hexa] = _digits(s[~hexa], 10, path, what)
    return out


def _kinds(s, path):
    """Kind strings (integers or r/w/x words) -> int64 ACC_* bits."""
    s = np.char.lower(np.char.strip(np.asarray(s, dtype="S")))
    u, inv = np.unique(s, return_inverse=True)
    vals = np.zeros(u.size, np.int64)
    for j, w in enumerate(u):      # a loop over distinct kind words
        w = bytes(w)
        if w in _KIND_WORDS:
            vals[j] = _KIND_WORDS[w]
        else:
            try:
                vals[j] = int(w, 0)
            except ValueError:
                raise _err(path, f"kind {w.decode(errors='replace')!r}: use an integer of ACC_* bits or "
                           "r/w/x (read, write, fetch)") from None
    return vals[inv.ravel()]


def _blocks(path, compressed):
    """Blocks of whole lines (bytes, about TEXT_BLOCK each) of a text file."""
    opener = gzip.open if compressed else open
    with opener(path, "rb") as f:
        rest = b""
        while True:
            block = f.read(TEXT_BLOCK)
            if not block:
                break
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0:
                rest = block
                continue
            rest = block[cut + 1:]
            yield block[:cut + 1]
        if rest.strip():
            yield rest + b"\n"


def _lines(path, compressed):
    """Blocks of whole lines of a text file, as 'S' arrays."""
    for block in _blocks(path, compressed):
        yield np.array(block[:-1].split(b"\n"))


def _lackey(path, compressed):
    """Lackey lines ``I  04017a10,3`` / `` S 1ffefffd08,8``: kind at column 0 or 1, the address from
    column 3 to the comma; parsed on the block's bytes (no per-line objects)."""
    for block in _blocks(path, compressed):
        buf = np.frombuffer(block, np.uint8)
        ends = np.flatnonzero(buf == 10)
        starts = np.concatenate([[0], ends[:-1] + 1])
        ok = ends - starts >= 5
        starts, ends = starts[ok], ends[ok]
        c0, c1, c2 = buf[starts], buf[starts + 1], buf[starts + 2]
        fetch = (c0 == ord("I")) & (c1 == 32) & (c2 == 32)
        data = (c0 == 32) & np.isin(c1, np.frombuffer(b"LSM", np.uint8)) & (c2 == 32)
        keep = fetch | data
        starts, ends, fetch, c1 = starts[keep], ends[keep], fetch[keep], c1[keep]
        commas = np.flatnonzero(buf == ord(","))
        at = np.searchsorted(commas, starts)
        comma = commas[np.minimum(at, max(commas.size - 1, 0))] if commas.size else ends
        n = comma - (starts + 3)
        if (comma >= ends).any() or (n < 1).any() or (n > 16).any():
            i = int(np.nonzero((comma >= ends) | (n < 1) | (n > 16))[0][0])
            raise _err(path, f"not a lackey line: {bytes(buf[starts[i]:ends[i]]).decode(errors='replace')!r}")
        addr = np.zeros(starts.size, np.uint64)
        for col in range(int(n.max()) if n.size else 0):   # a loop over digit positions, not records
            live = col < n
            d = _HEXDIG[buf[np.where(live, starts + 3 + col, 0)]]
            if (live & (d < 0)).any():
                i = int(np.nonzero(live & (d < 0))[0][0])
                raise _err(path, f"address in {bytes(buf[starts[i]:ends[i]]).decode(errors='replace')!r} "
                           "is not a number")
            addr = np.where(live, addr * np.uint64(16) + d.astype(np.uint64), addr)
        kind = np.where(fetch, ACC_FETCH, np.where(c1 == ord("L"), 0, ACC_WRITE)).astype(np.int64)
        if addr.size:
            yield np.zeros(addr.size, np.int64), addr, kind


_DR_KINDS = {b"ifetch": ACC_FETCH, b"read": 0, b"write": ACC_WRITE}


def _drcachesim(path, compressed):
    for lines in _lines(path, compressed):
        keep = np.char.find(lines, b"byte(s) @ 0x") >= 0
        s = lines[keep]
        if not s.size:
            continue
        rest = np.char.lstrip(np.char.partition(s, b":")[:, 2])
        tid_s = np.char.partition(rest, b" ")[:, 0]
        typ = np.char.partition(np.char.lstrip(np.char.partition(rest, b" ")[:, 2]), b" ")[:, 0]
        mem = np.isin(typ, list(_DR_KINDS))
        s, tid_s, typ = s[mem], tid_s[mem], typ[mem]
        if not s.size:
            continue
        addr = _digits(np.char.partition(np.char.partition(s, b"@ 0x")[:, 2], b" ")[:, 0], 16, path, "address")
        kind = np.zeros(s.size, np.int64)
        for word, k in _DR_KINDS.items():
            kind[typ == word] = k
        tid = _digits(np.char.lstrip(tid_s, b"T"), 10, path, "thread id").astype(np.int64)
        yield tid, addr, kind


def _csv(path, compressed):
    cols = None
    for lines in _lines(path, compressed):
        lines = lines[np.char.strip(lines) != b""]
        if not lines.size:
            continue
        if cols is None:
            first = [c.strip().lower() for c in bytes(lines[0]).split(b",")]
            alias = {b"address": b"addr", b"tid": b"vcpu", b"cpu": b"vcpu", b"thread": b"vcpu", b"type": b"kind",
                     b"op": b"kind", b"rw": b"kind", b"access": b"kind"}
            named = [alias.get(c, c) for c in first]
            if b"addr" in named:
                cols, lines = named, lines[1:]
            elif len(first) in (1, 2, 3):
                cols = [[b"addr"], [b"addr", b"kind"], [b"vcpu", b"addr", b"kind"]][len(first) - 1]
            else:
                raise _err(path, "a CSV trace needs columns addr [kind] [vcpu] (a header names them)")
        fields, rest = {}, lines
        for c in cols:
            part = np.char.partition(rest, b",")
            fields[c], rest = part[:, 0], part[:, 2]
        n = lines.size
        addr = _numbers(fields[b"addr"], path, "address")
        kind = _kinds(fields[b"kind"], path) if b"kind" in fields else np.zeros(n, np.int64)
        vcpu = _numbers(fields[b"vcpu"], path, "vcpu").astype(np.int64) if b"vcpu" in fields \
            else np.zeros(n, np.int64)
        yield vcpu, addr, kind


def _npy(path, chunk):
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    names = a.dtype.names
    for i in range(0, a.shape[0], chunk):
        c = a[i:i + chunk]
        if names:
            if "addr" not in names:
                raise _err(path, f"a structured .npy trace needs a field 'addr' (has {', '.join(names)})")
            addr = np.asarray(c["addr"])
            vcpu = np.asarray(c["vcpu"]) if "vcpu" in names else np.zeros(len(c), np.int64)
            kind = np.asarray(c["kind"]) if "kind" in names else np.zeros(len(c), np.int64)
        elif c.ndim == 1:
            addr, vcpu, kind = np.asarray(c), np.zeros(len(c), np.int64), np.zeros(len(c), np.int64)
        elif c.ndim == 2 and c.shape[1] in (2, 3):
            c = np.asarray(c)
            addr = c[:, -2] if c.shape[1] == 3 else c[:, 0]
            kind = c[:, -1]
            vcpu = c[:, 0] if c.shape[1] == 3 else np.zeros(len(c), np.int64)
        else:
            raise _err(path, f"a .npy trace of shape {a.shape}: use (n,), (n, 2) or (n, 3) or fields vcpu/addr/kind")
        yield vcpu, addr, kind


def _npz(path, chunk):
    with np.load(path, allow_pickle=False) as z:
        if "addr" not in z.files:
            raise _err(path, f"a .npz trace needs an array 'addr' (has {', '.join(z.files)})")
        addr = z["addr"]
        vcpu = z["vcpu"] if "vcpu" in z.files else np.zeros(addr.shape, np.int64)
        kind = z["kind"] if "kind" in z.files else np.zeros(addr.shape, np.int64)
    if not (addr.shape == vcpu.shape == kind.shape) or addr.ndim != 1:
        raise _err(path, "addr, vcpu and kind must be 1-D arrays of one length")
    for i in range(0, addr.size, chunk):
        yield vcpu[i:i + chunk], addr[i:i + chunk], kind[i:i + chunk]


def guess_format(path):
    """The format of a trace file from its name, else from its first lines."""
    p = Path(path)
    name = p.name[:-3] if p.name.endswith(".gz") else p.name
    for fmt in ("npz", "npy", "csv"):
        if name.endswith("." + fmt):
            return fmt
    if name.endswith((".lackey", ".lackey.txt")):
        return "lackey"
    if name.endswith((".drcachesim", ".drmemtrace.txt", ".view")):
        return "drcachesim"
    opener = gzip.open if p.name.endswith(".gz") else open
    try:
        with opener(p, "rb") as f:
            head = f.read(1 << 16).split(b"\n")[:200]
    except OSError as e:
        raise _err(path, f"cannot read ({e.strerror or e})") from None
    if any(b"byte(s) @ 0x" in h for h in head):
        return "drcachesim"
    if any(h[:3] in (b"I  ", b" L ", b" S ", b" M ") for h in head):
        return "lackey"
    if any(b"," in h for h in head):
        return "csv"
    raise _err(path, f"cannot tell the format; give format= one of {', '.join(FORMATS)}", field="format")


def records(path, fmt, chunk=CHUNK):
    """Chunks (vcpu int64, addr uint64, kind int64) of a trace, in order."""
    gz = str(path).endswith(".gz")
    gen = {"npy": lambda: _npy(path, chunk), "npz": lambda: _npz(path, chunk),
           "csv": lambda: _csv(path, gz), "lackey": lambda: _lackey(path, gz),
           "drcachesim": lambda: _drcachesim(path, gz)}[fmt]()
    n = 0
    for vcpu, addr, kind in gen:
        vcpu = np.asarray(vcpu).astype(np.int64)
        kind = np.asarray(kind).astype(np.int64)
        addr = np.asarray(addr)
        if addr.dtype.kind not in "iu":
            raise _err(path, f"addresses must be integers (dtype {addr.dtype})")
        badk = np.nonzero(kind & ~ACC_VALID_MASK)[0]
        if badk.size:
            raise _err(path, f"record {n + int(badk[0])}: kind {int(kind[badk[0]])}: kinds are ACC_* bits "
                       "(0 read, 2 write, 4 user, 16 fetch)")
        if (vcpu < 0).any():
            raise _err(path, f"record {n + int(np.argmax(vcpu < 0))}: negative vcpu")
        addr = addr.astype(np.uint64)
        for i in range(0, addr.size, chunk):
            yield vcpu[i:i + chunk], addr[i:i + chunk], kind[i:i + chunk]
        n += addr.size


# ----------------------------------------------------------------------------- scan and placement
_CACHE = {}


def _key(path, fmt):
    st = os.stat(path)
    return (str(path), fmt, st.st_mtime_ns, st.st_size)


def scan(path, fmt):
    """One pass over a trace: records, threads, and its distinct 4 KiB pages (sorted, and each one's rank in
    order of first use).  Cached per process."""
    key = _key(path, fmt)
    if key in _CACHE:
        return _CACHE[key]
    seen = np.zeros(0, np.int64)          # sorted distinct pages
    first = np.zeros(0, np.int64)         # their first-use record index
    tids = np.zeros(0, np.int64)          # drcachesim thread ids, sorted, and their first appearance
    tfirst = np.zeros(0, np.int64)
    n = 0
    vmax = -1
    for vcpu, addr, _ in records(path, fmt):
        page = (addr >> np.uint64(12)).astype(np.int64)
        u, idx = np.unique(page, return_index=True)
        new = ~np.isin(u, seen, assume_unique=True)
        seen = np.concatenate([seen, u[new]])
        first = np.concatenate([first, idx[new] + n])
        o = np.argsort(seen, kind="stable")
        seen, first = seen[o], first[o]
        if fmt == "drcachesim":
            tu, ti = np.unique(vcpu, return_index=True)
            tn = ~np.isin(tu, tids)
            tids, tfirst = np.concatenate([tids, tu[tn]]), np.concatenate([tfirst, ti[tn] + n])
            o = np.argsort(tids)
            tids, tfirst = tids[o], tfirst[o]
        elif vcpu.size:
            vmax = max(vmax, int(vcpu.max()))
        n += addr.size
    if n == 0:
        raise _err(path, f"no memory accesses found (format {fmt})")
    rank = np.empty(seen.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(seen.size)
    trank = np.empty(tids.size, np.int64)
    trank[np.argsort(tfirst, kind="stable")] = np.arange(tids.size)
    info = {"records": n, "pages": int(seen.size), "first_page": int(seen[0]), "last_page": int(seen[-1]),
            "threads": int(tids.size) if fmt == "drcachesim" else vmax + 1, "sorted": seen, "rank": rank,
            "tids": tids, "trank": trank}
    _CACHE[key] = info
    return info


def _path(value):
    """``bundled:NAME`` (a trace shipped in batchmmu/traces) or a file path."""
    if not isinstance(value, str) or not value:
        raise BatchMMUError(f"trace={value!r}: give a trace file (--set trace=PATH)", field="trace", value=value)
    if value.startswith("bundled:"):
        from importlib import resources
        p = Path(str(resources.files("batchmmu.traces") / value[len("bundled:"):]))
    else:
        p = Path(value).expanduser()
    if p.is_dir():
        raise _err(value, "is a directory")
    if not p.is_file():
        raise _err(value, "no such file")
    return p.resolve()


def _int(v, field, lo=0):
    import numbers
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < lo:
        raise BatchMMUError(f"workload.{field}={v!r}: must be an integer >= {lo}", field=f"workload.{field}", value=v)
    return int(v)


def resolve(wl, groups, host):
    """Check the workload's trace settings and scan the trace: returns the plain ``trace`` spec, with the
    test region's size (``trace_memory``, else ``region_bytes``; "auto" or none: just enough for the trace)."""
    from .units import parse_size
    mem = wl.get("trace_memory", "auto")
    region_bytes = 0 if mem == "auto" else parse_size(mem, "memory")
    region_bytes = region_bytes or parse_size(wl.get("region_bytes", 0), "workload.region_bytes")
    backs = {wl.get("slot_backing", g.get("backing", host.get("backing", "thp"))) for g in groups}
    backing_page = (1 << 30) if "hugetlb-1g" in backs else 2 << 20
    path = _path(wl.get("trace"))
    fmt = wl.get("trace_format", "auto")
    if fmt in ("auto", "", None):
        fmt = guess_format(path)
    if fmt not in FORMATS:
        raise BatchMMUError(f"format={fmt!r}: use auto or one of {', '.join(FORMATS)}", field="format", value=fmt)
    layout = wl.get("trace_layout", "auto")
    if layout not in LAYOUTS:
        raise BatchMMUError(f"layout={layout!r}: use {', '.join(LAYOUTS)}", field="layout", value=layout)
    repeat = _int(wl.get("trace_repeat", 1), "trace_repeat", 1)
    scale = _int(wl.get("trace_scale", 1), "trace_scale", 1)
    offset = parse_size(wl.get("trace_offset", 0), "workload.trace_offset")
    vm_off = parse_size(wl.get("trace_vm_offset", 0), "workload.trace_vm_offset")
    chunk = _int(wl.get("trace_chunk", CHUNK), "trace_chunk", 1)
    for name, v in (("trace_offset", offset), ("trace_vm_offset", vm_off)):
        if v % 4096:
            raise BatchMMUError(f"workload.{name}={v}: must be a multiple of 4096", field=f"workload.{name}", value=v)
    info = scan(path, fmt)
    nvm = sum(int(g.get("count", 1)) for g in groups)
    base = info["first_page"] & ~(_HUGE - 1)
    span = info["last_page"] - base + 1
    extra = offset + vm_off * (nvm - 1)
    if layout == "auto":
        fits = span * scale * 4096 + extra <= region_bytes if region_bytes else span * 4096 <= KEEP_AUTO_MAX
        layout = "keep" if fits else "compact"
    used = (span if layout == "keep" else info["pages"]) * scale * 4096 + extra
    align = max(backing_page, 2 << 20)
    need = -(-used // align) * align
    if region_bytes and used > region_bytes:
        raise BatchMMUError(f"memory={region_bytes}: the trace needs {used} bytes of guest memory per VM "
                            f"({info['pages']} distinct pages, layout {layout}); give more memory", field="memory",
                            value=region_bytes)
    return {"path": str(path), "format": fmt, "layout": layout, "repeat": repeat, "scale": scale, "offset": offset,
            "vm_offset": vm_off, "chunk": chunk, "records": info["records"], "pages": info["pages"],
            "threads": info["threads"], "base_page": int(base), "region_bytes": region_bytes or need}


def place(t, info, addr):
    """Guest offsets (bytes into the test region, before the VM's own offset) of trace addresses."""
    page = (addr >> np.uint64(12)).astype(np.int64)
    if t["layout"] == "keep":
        placed = page - t["base_page"]
    else:
        placed = info["rank"][np.searchsorted(info["sorted"], page)]
    return placed * (4096 * t["scale"]) + (addr & np.uint64(0xFFF)).astype(np.int64) + t["offset"]


def events(shard, ph):
    """The ``access`` op's pieces for the trace pattern: every VM replays the trace ``repeat`` times per pass."""
    t = shard.spec["trace"]
    if shard._epoch is not None:
        raise BatchMMUError("phase.epochs: a trace replay runs whole passes", field="phase.epochs", value=None)
    path = Path(t["path"])
    info = scan(path, t["format"])
    for _pass in range(int(ph.get("passes", 1))):
        for _rep in range(t["repeat"]):
            for vcpu, addr, kind in records(path, t["format"], t["chunk"]):
                if t["format"] == "drcachesim":
                    vcpu = info["trank"][np.searchsorted(info["tids"], vcpu)]
                local = place(t, info, addr)
                for lvm in range(shard.gids.size):
                    if not shard._runs(lvm):
                        continue
                    base = int(shard.test_base[lvm]) + t["vm_offset"] * int(shard.gids[lvm])
                    yield (np.full(local.size, lvm, np.int64), vcpu % int(shard.vcpus[lvm]), base + local, kind)


def total_events(spec, ph):
    t = spec["trace"]
    nvm = sum(int(g.get("count", 1)) for g in spec["groups"])
    return int(ph.get("passes", 1)) * t["repeat"] * t["records"] * nvm
