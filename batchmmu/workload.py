"""Workloads for ``batchmmu validate``: one list of guest and host steps that both the real KVM
(``realkvm.KernelSide``) and the simulator (``validate.SimSide``) execute on the same guest image
(``guestimage``).

A workload is TOML or JSON: an optional ``description``, a ``[config]`` table and ``[[steps]]``:

config: ``memory`` (slot 0 size, default "64MiB"), ``ad`` (guest PTEs with A/D preset, default false),
``guest_2m`` (2 MiB guest leaves from DATA = 0x400000 on), ``backing`` ("4k" or "thp"),
``manual_protect`` / ``initially_set`` (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), ``timeout`` (seconds per
guest run, default 10).

steps (``op`` = ...; any step may carry a ``note``):
* ``touch``: ``start`` gva, ``count`` (1), ``stride`` (4096), ``write`` (false), ``cpl`` 3 (native loop)
  or 0 (emulated loop).
* ``store``: target ``gva`` or ``pte_of = {tree, gva, level}`` (the gpte as built; tree defaults to the
  current one), plus ``offset`` bytes; ``value``, or ``point_to`` a gpa (the value gets the flags the
  builder uses there, or ``flags``); ``cpl`` 3 (native) or 0 (emulated); ``size`` 8 (1/2/4 at cpl 0).
* ``invlpg`` (``gva``, CPL0), ``mov_cr3`` (``tree``, a CPL0 instruction), ``set_cr3`` (``tree``, host
  KVM_SET_SREGS), ``new_tree`` (``name``, ``remap = [{from, to, size}]``: gvas from..from+size map to
  to..), ``dirty_log`` (``enable``, ``slot`` 0), ``get_dirty_log``, ``clear_dirty_log`` (``first`` 0,
  ``num`` the whole slot, ``pages`` "all" or "last": the bitmap of the last GET).

``compile_workload`` turns the steps into ops: ``GuestRun`` (a program, its registers, and the
simulator's events for it: the code fetch first) and ``HostCall`` (what the VMM does).
"""

import json
import random
import tomllib
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import guestimage as gi
from .constants import ACC_FETCH, ACC_USER, ACC_WRITE
from .errors import BatchMMUError
from .units import parse_size

CONFIG_DEFAULTS = {"memory": 64 << 20, "ad": False, "guest_2m": False, "backing": "4k", "manual_protect": False,
                   "initially_set": False, "timeout": 10.0}
STEP_KEYS = {
    "touch": {"start", "count", "stride", "write", "cpl"},
    "store": {"gva", "pte_of", "offset", "value", "point_to", "flags", "cpl", "size"},
    "invlpg": {"gva"},
    "mov_cr3": {"tree"},
    "set_cr3": {"tree"},
    "new_tree": {"name", "remap"},
    "dirty_log": {"enable", "slot"},
    "get_dirty_log": {"slot"},
    "clear_dirty_log": {"slot", "first", "num", "pages"},
}
MAX_TOUCH = 1 << 20


class Workload(NamedTuple):
    name: str
    description: str
    config: dict
    steps: list


class GuestRun(NamedTuple):
    """A guest program (kernel side) and the simulator events it stands for.  ``events``: tuples
    ``("access", gvas, kinds)``, ``("store", gva, value, kind)``, ``("emulated_access", gva, kind, value,
    size)``, ``("mov_cr3", cr3)``, ``("invlpg", gva)``, in order.  A CPL3 program fetches its code page
    natively before its first access and again for the final ``out`` (which refaults if the program's
    own accesses zapped the code mapping); CPL0 code is fetched by the emulator."""
    cpl: int
    code: bytes
    regs: dict
    events: tuple
    loads: bool = False


class HostCall(NamedTuple):
    """A VMM action: ``write_memory`` ([(gpa, words)]), ``set_cr3`` (cr3), ``set_slot_flags`` (slot,
    flags), ``get_dirty_log`` (slot), ``clear_dirty_log`` (slot, first, num, "all" | "last")."""
    name: str
    args: tuple


class Compiled(NamedTuple):
    workload: Workload
    config: dict
    image: gi.GuestImage
    initial_writes: list
    initial_regs: dict
    steps: list          # per step: list of GuestRun / HostCall


def _err(where, key, value, why):
    field = f"{where}.{key}" if key else where
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:76] + " ..."
    return BatchMMUError(f"{field}={shown}: {why}", field=field, value=value)


def _int(where, key, v, lo=0, hi=1 << 64):
    if isinstance(v, str):
        try:
            v = int(v, 0)
        except ValueError:
            try:
                v = parse_size(v, key)
            except BatchMMUError:
                raise _err(where, key, v, "not an integer") from None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(where, key, v, "not an integer")
    if not lo <= v < hi:
        raise _err(where, key, v, f"must be in [{lo:#x}, {hi:#x})")
    return v


def _bool(where, key, v):
    if not isinstance(v, bool):
        raise _err(where, key, v, "must be true or false")
    return v


# ---------------------------------------------------------------------------- loading
def list_workloads():
    """Bundled workloads: list of (name, description)."""
    out = []
    for f in sorted(resources.files("batchmmu.workloads").iterdir(), key=lambda p: p.name):
        if f.name.endswith(".toml"):
            out.append((f.name[:-5], tomllib.loads(f.read_text()).get("description", "")))
    return out


def load(source):
    """A Workload from a bundled name, a .toml/.json path, ``random:SEED[:STEPS]`` or a dict."""
    if isinstance(source, dict):
        return parse(source, "workload")
    s = str(source)
    if s.startswith("random:"):
        parts = s.split(":")
        try:
            seed = int(parts[1])
            n = int(parts[2]) if len(parts) > 2 else 100
        except (IndexError, ValueError):
            raise BatchMMUError(f"workload={s!r}: use random:SEED or random:SEED:STEPS", field="workload",
                                value=s) from None
        return random_workload(seed, n)
    p = Path(s)
    if p.suffix in (".toml", ".json") or p.exists():
        if not p.exists():
            raise BatchMMUError(f"workload={s!r}: no such file", field="workload", value=s)
        text, name = p.read_text(), p.stem
    else:
        f = resources.files("batchmmu.workloads") / f"{s}.toml"
        if not f.is_file():
            names = ", ".join(n for n, _ in list_workloads())
            raise BatchMMUError(f"workload={s!r}: no bundled workload of that name ({names})", field="workload",
                                value=s)
        text, name, p = f.read_text(), s, Path(f.name)
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise BatchMMUError(f"workload={s!r}: {e}", field="workload", value=s) from None
    return parse(data, name)


def parse(data, name="workload"):
    """Check a workload dict; returns a Workload with every default filled in.  Errors name the key
    (``config.memory``, ``steps[3].gva`` ...)."""
    if not isinstance(data, dict):
        raise _err("workload", "", data, "must be a table")
    unknown = set(data) - {"description", "config", "steps", "name"}
    if unknown:
        raise _err("workload", sorted(unknown)[0], data[sorted(unknown)[0]], "unknown key (use config, steps)")
    config = _parse_config(data.get("config", {}))
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise _err("workload", "steps", steps, "must be a non-empty list of steps")
    wl = Workload(str(data.get("name", name)), str(data.get("description", "")), config,
                  [_parse_step(i, s) for i, s in enumerate(steps)])
    compile_workload(wl)  # semantic checks (trees, addresses, logging state)
    return wl


def _parse_config(c):
    if not isinstance(c, dict):
        raise _err("config", "", c, "must be a table")
    for k in c:
        if k not in CONFIG_DEFAULTS:
            raise _err("config", k, c[k], f"unknown key (known: {', '.join(CONFIG_DEFAULTS)})")
    out = dict(CONFIG_DEFAULTS, **c)
    out["memory"] = parse_size(out["memory"], "config.memory")
    for k in ("ad", "guest_2m", "manual_protect", "initially_set"):
        _bool("config", k, out[k])
    if out["backing"] not in ("4k", "thp"):
        raise _err("config", "backing", out["backing"], "must be '4k' or 'thp'")
    if out["initially_set"] and not out["manual_protect"]:
        raise _err("config", "initially_set", True, "needs manual_protect = true")
    t = out["timeout"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 600:
        raise _err("config", "timeout", t, "must be seconds in (0, 600]")
    try:
        gi.GuestImage(out["memory"], out["ad"], out["guest_2m"]).initial_writes()
    except BatchMMUError as e:
        raise _err("config", "memory", c.get("memory", out["memory"]), str(e)) from None
    return out


def _parse_step(i, s):
    where = f"steps[{i}]"
    if not isinstance(s, dict):
        raise _err(where, "", s, "must be a table")
    op = s.get("op")
    if op not in STEP_KEYS:
        raise _err(where, "op", op, f"must be one of {', '.join(STEP_KEYS)}")
    for k in s:
        if k not in STEP_KEYS[op] | {"op", "note"}:
            raise _err(where, k, s[k], f"not a key of {op} (use {', '.join(sorted(STEP_KEYS[op]))})")
    out = {"op": op, "note": str(s.get("note", ""))}
    if op == "touch":
        out["start"] = _int(where, "start", s.get("start", gi.DATA_GPA), 0, 1 << 47)
        out["count"] = _int(where, "count", s.get("count", 1), 1, MAX_TOUCH + 1)
        out["stride"] = _int(where, "stride", s.get("stride", gi.PAGE), 1, 1 << 32)
        out["write"] = _bool(where, "write", s.get("write", False))
        out["cpl"] = _cpl(where, s.get("cpl", 3))
    elif op == "store":
        if ("gva" in s) == ("pte_of" in s):
            raise _err(where, "gva", s.get("gva"), "give exactly one of gva and pte_of")
        if ("value" in s) == ("point_to" in s):
            raise _err(where, "value", s.get("value"), "give exactly one of value and point_to")
        if "gva" in s:
            out["gva"] = _int(where, "gva", s["gva"], 0, 1 << 47)
        else:
            p = s["pte_of"]
            if not isinstance(p, dict) or set(p) - {"tree", "gva", "level"} or "gva" not in p:
                raise _err(where, "pte_of", p, "must be a table {tree, gva, level}")
            out["pte_of"] = {"tree": p.get("tree"), "gva": _int(where, "pte_of.gva", p["gva"], 0, 1 << 47),
                             "level": _int(where, "pte_of.level", p.get("level", 1), 1, 5)}
            if out["pte_of"]["tree"] is not None and not isinstance(out["pte_of"]["tree"], str):
                raise _err(where, "pte_of.tree", p["tree"], "must be a tree name")
        out["offset"] = _int(where, "offset", s.get("offset", 0), 0, gi.PAGE)
        if "value" in s:
            out["value"] = _int(where, "value", s["value"])
        else:
            out["point_to"] = _int(where, "point_to", s["point_to"], 0, 1 << 52)
            if out["point_to"] % gi.PAGE:
                raise _err(where, "point_to", s["point_to"], "must be 4 KiB aligned")
        if "flags" in s:
            out["flags"] = _int(where, "flags", s["flags"], 0, gi.PAGE)
        out["cpl"] = _cpl(where, s.get("cpl", 3))
        out["size"] = _int(where, "size", s.get("size", 8), 1, 9)
        if out["size"] not in (1, 2, 4, 8):
            raise _err(where, "size", out["size"], "must be 1, 2, 4 or 8")
        if out["cpl"] == 3 and out["size"] != 8:
            raise _err(where, "size", out["size"], "native (cpl 3) stores are 8 bytes")
    elif op == "invlpg":
        out["gva"] = _int(where, "gva", s.get("gva"), 0, 1 << 47) if "gva" in s else _missing(where, "gva")
    elif op in ("mov_cr3", "set_cr3"):
        out["tree"] = s.get("tree")
        if out["tree"] is not None and not isinstance(out["tree"], str):
            raise _err(where, "tree", out["tree"], "must be a tree name")
        if op == "set_cr3" and out["tree"] is None:
            _missing(where, "tree")
    elif op == "new_tree":
        if not isinstance(s.get("name"), str) or not s["name"]:
            raise _err(where, "name", s.get("name"), "must be a non-empty string")
        out["name"] = s["name"]
        remap = s.get("remap", [])
        if not isinstance(remap, list):
            raise _err(where, "remap", remap, "must be a list of {from, to, size}")
        out["remap"] = []
        for k, r in enumerate(remap):
            if not isinstance(r, dict) or set(r) != {"from", "to", "size"}:
                raise _err(where, f"remap[{k}]", r, "must be a table {from, to, size}")
            out["remap"].append({key: _int(where, f"remap[{k}].{key}", r[key]) for key in ("from", "to", "size")})
    elif op == "dirty_log":
        out["enable"] = _bool(where, "enable", s["enable"]) if "enable" in s else _missing(where, "enable")
    if op in ("dirty_log", "get_dirty_log", "clear_dirty_log"):
        out["slot"] = _int(where, "slot", s.get("slot", 0))
        if out["slot"] != 0:
            raise _err(where, "slot", out["slot"], "the guest has one memslot, 0")
    if op == "clear_dirty_log":
        out["first"] = _int(where, "first", s.get("first", 0))
        out["num"] = _int(where, "num", s["num"]) if "num" in s else None
        out["pages"] = s.get("pages", "all")
        if out["pages"] not in ("all", "last"):
            raise _err(where, "pages", out["pages"], "must be 'all' or 'last'")
    return out


def _cpl(where, v):
    if v not in (0, 3) or isinstance(v, bool):
        raise _err(where, "cpl", v, "must be 3 (native) or 0 (emulated)")
    return v


def _missing(where, key):
    raise _err(where, key, None, "missing")


# ---------------------------------------------------------------------------- compiling
def _user(cpl):
    return ACC_USER if cpl == 3 else 0


def _fetch(cpl):
    """The code fetch every guest program starts with (native at CPL3, by the emulator at CPL0)."""
    if cpl == 3:
        return ("access", np.array([gi.CODE_GPA], np.int64), np.array([ACC_FETCH | ACC_USER], np.int64))
    return ("emulated_access", gi.CODE_GPA, ACC_FETCH, 0, 8)


def touch_addresses(start, count, stride):
    return start + stride * np.arange(count, dtype=np.int64)


def _touch(step):
    start, count, stride, write, cpl = (step[k] for k in ("start", "count", "stride", "write", "cpl"))
    addrs = touch_addresses(start, count, stride)
    regs = {"rax": start, "rcx": start + count * stride, "rdx": stride}
    kind = _user(cpl) | (ACC_WRITE if write else 0)
    prog = gi.touch_program(write)
    if cpl == 0:
        ev = [_fetch(0)] + [("emulated_access", int(a), kind, int(a) if write else 0, 8) for a in addrs]
        return GuestRun(0, prog, regs, tuple(ev), loads=not write)
    code = np.array([gi.CODE_GPA], np.int64)
    fetch_kind = np.array([ACC_FETCH | ACC_USER], np.int64)
    if write:
        # mov [rax], rax: every store writes its own address (a store across a page is split by host.store)
        addrs = addrs.astype(np.int64)
        return GuestRun(3, prog, regs, (("access", code, fetch_kind),
                                        ("store", addrs, addrs, np.full(addrs.size, kind, np.int64)),
                                        ("access", code, fetch_kind)), loads=False)
    # native loads: one access per page (an 8-byte access that crosses a page touches both); repeats of
    # the page just touched are hits and are left out
    split = (addrs & 4095) > 4088
    if split.any():
        addrs = np.sort(np.concatenate([addrs, (addrs[split] | 4095) + 1]), kind="stable")
    pages = addrs >> 12
    keep = np.ones(addrs.size, bool)
    keep[1:] = pages[1:] != pages[:-1]
    gvas = np.concatenate([[gi.CODE_GPA], addrs[keep], [gi.CODE_GPA]]).astype(np.int64)
    kinds = np.full(gvas.size, kind, np.int64)
    kinds[0] = kinds[-1] = ACC_FETCH | ACC_USER
    return GuestRun(3, prog, regs, (("access", gvas, kinds),), loads=not write)


class _Planner:
    """Compile-time state: the image, the current tree, whether slot 0 logs dirty pages."""

    def __init__(self, wl):
        c = wl.config
        self.wl = wl
        self.image = gi.GuestImage(c["memory"], c["ad"], c["guest_2m"])
        self.initial = self.image.initial_writes()
        self.tree = "main"
        self.logging = False

    def tree_name(self, where, key, name):
        name = self.tree if name is None else name
        if name not in self.image.trees:
            raise _err(where, key, name, f"no such tree (have {', '.join(self.image.trees)})")
        return name

    def check_range(self, where, key, gva, size):
        mem = self.wl.config["memory"]
        if gva + size > mem:
            raise _err(where, key, gva, f"beyond the mapped range [0, {mem:#x}) (a guest #PF ends the run)")

    def step(self, i, s):
        where, op = f"steps[{i}]", s["op"]
        img = self.image
        if op == "touch":
            last = s["start"] + (s["count"] - 1) * s["stride"]
            self.check_range(where, "start", last, 8)
            return [_touch(s)]
        if op == "store":
            if "gva" in s:
                target, level = s["gva"], 1
                self.check_range(where, "gva", target + s["offset"], s["size"])
                leaf = True
            else:
                p = s["pte_of"]
                tree = self.tree_name(where, "pte_of.tree", p["tree"])
                try:
                    target = img.pte_gpa(tree, p["gva"], p["level"])
                except BatchMMUError as e:
                    raise _err(where, "pte_of", p, str(e)) from None
                level = p["level"]
                leaf = level == 1 or (level == 2 and img.leaf_size(p["gva"]) == gi.HUGE)
            addr = target + s["offset"]
            if "value" in s:
                value = s["value"]
            else:
                value = s["point_to"] | s.get("flags", img.entry_flags(level, leaf))
            value &= (1 << (8 * s["size"])) - 1
            regs = {"rax": addr, "rbx": value}
            prog = gi.store_program(s["size"])
            if s["cpl"] == 3:
                ev = (_fetch(3), ("store", addr, value, ACC_WRITE | ACC_USER), _fetch(3))
            else:
                ev = (_fetch(0), ("emulated_access", addr, ACC_WRITE, value, s["size"]))
            return [GuestRun(s["cpl"], prog, regs, ev)]
        if op == "invlpg":
            return [GuestRun(0, gi.invlpg_program(), {"rax": s["gva"]}, (_fetch(0), ("invlpg", s["gva"])))]
        if op == "mov_cr3":
            self.tree = self.tree_name(where, "tree", s["tree"])
            cr3 = img.trees[self.tree].root
            return [GuestRun(0, gi.mov_cr3_program(), {"rax": cr3}, (_fetch(0), ("mov_cr3", cr3)))]
        if op == "set_cr3":
            self.tree = self.tree_name(where, "tree", s["tree"])
            return [HostCall("set_cr3", (img.trees[self.tree].root,))]
        if op == "new_tree":
            try:
                writes = img.new_tree(s["name"], [dict(r) for r in s["remap"]])
            except BatchMMUError as e:
                raise _err(where, "name" if e.field == "name" else "remap", s["name"], str(e)) from None
            return [HostCall("write_memory", (writes,))]
        if op == "dirty_log":
            self.logging = s["enable"]
            return [HostCall("set_slot_flags", (s["slot"], 1 if s["enable"] else 0))]
        if not self.logging:
            raise _err(where, "op", op, "dirty logging is off for the slot (a dirty_log step enables it)")
        if op == "get_dirty_log":
            return [HostCall("get_dirty_log", (s["slot"],))]
        npages = img.memory // gi.PAGE
        if not self.wl.config["manual_protect"]:
            raise _err(where, "op", op, "needs config.manual_protect = true")
        first = s["first"]
        num = npages - first if s["num"] is None else s["num"]
        if first % 64 or first > npages:
            raise _err(where, "first", first, f"must be a multiple of 64 within the slot's {npages} pages")
        if num > npages - first or (num % 64 and first + num != npages):
            raise _err(where, "num", num, "must be a multiple of 64 (or reach the slot's end) within the slot")
        return [HostCall("clear_dirty_log", (s["slot"], first, num, s["pages"]))]


def settle():
    """The CPL3 ``out`` every step that is not a CPL3 loop ends with: the vCPU re-enters the guest, so
    the requests the step raised (KVM_REQ_MMU_SYNC after a CR3 load, the root load after KVM_SET_SREGS,
    TLB flushes) are serviced within the step, as when a guest runs on after the instruction."""
    return GuestRun(3, gi.out_program(), {}, (_fetch(3),))


def compile_workload(wl):
    """Steps -> ops, with the image they run on.  Every step ends with a guest entry at CPL3 (``settle``
    where the step itself is not a CPL3 run).  Raises BatchMMUError naming the step and key."""
    pl = _Planner(wl)
    steps = []
    for i, s in enumerate(wl.steps):
        ops = pl.step(i, s)
        if not (isinstance(ops[-1], GuestRun) and ops[-1].cpl == 3):
            ops.append(settle())
        steps.append(ops)
    return Compiled(wl, wl.config, pl.image, pl.initial, pl.image.regs("main"), steps)


def describe(step):
    """One line for a step."""
    op = step["op"]
    if op == "touch":
        d = (f"{'write' if step['write'] else 'read'} {step['count']} x {step['stride']:#x} from "
             f"{step['start']:#x} cpl{step['cpl']}")
    elif op == "store":
        where = (f"gva {step['gva']:#x}" if "gva" in step else
                 "pte_of({tree}, {gva:#x}, L{level})".format(**{**step["pte_of"],
                                                                "tree": step["pte_of"]["tree"] or "cur"}))
        what = f"{step['value']:#x}" if "value" in step else f"-> {step['point_to']:#x}"
        off = f"+{step['offset']}" if step["offset"] else ""
        d = f"store{step['size'] * 8} {where}{off} = {what} cpl{step['cpl']}"
    elif op == "invlpg":
        d = f"invlpg {step['gva']:#x}"
    elif op in ("mov_cr3", "set_cr3"):
        d = f"{op} {step['tree'] or '(current)'}"
    elif op == "new_tree":
        d = "new_tree {} {}".format(step["name"], " ".join(f"{r['from']:#x}->{r['to']:#x}+{r['size']:#x}"
                                                           for r in step["remap"]))
    elif op == "dirty_log":
        d = f"dirty_log {'on' if step['enable'] else 'off'}"
    elif op == "clear_dirty_log":
        d = f"clear_dirty_log {step['pages']} from {step['first']}"
    else:
        d = op
    return f"{d}  ({step['note']})" if step.get("note") else d


# ---------------------------------------------------------------------------- random workloads
def random_steps(seed, n, config=None):
    """``n`` seeded random steps that keep the guest running: touches of DATA, PTE/PDE stores (native and
    emulated, to mapped DATA targets or unused PDEs, some misaligned), invlpg, CR3 loads and resets, new
    trees while the pool has room, dirty-log toggles, GET and (manual protect) CLEAR."""
    cfg = dict(CONFIG_DEFAULTS, **(config or {}))
    cfg["memory"] = parse_size(cfg["memory"], "config.memory")
    rng = random.Random(seed)
    img = gi.GuestImage(cfg["memory"], cfg["ad"], cfg["guest_2m"])
    img.initial_writes()
    mem = cfg["memory"]
    data_pages = (mem - gi.DATA_GPA) // gi.PAGE
    big = (mem - gi.DATA_GPA) // gi.HUGE
    tree, logging, steps = "main", False, []

    def data_page():
        return gi.DATA_GPA + gi.PAGE * rng.randrange(data_pages)

    def data_huge():
        return gi.DATA_GPA + gi.HUGE * rng.randrange(big)

    kinds = ["touch"] * 8 + ["store_pte"] * 4 + ["store_pde"] * 2 + ["store_unused"] * 2 + ["invlpg"] * 2 \
        + ["mov_cr3"] * 2 + ["set_cr3", "new_tree", "dirty_log", "get"] + ["clear"] * 2
    while len(steps) < n:
        k = rng.choice(kinds)
        if k == "touch":
            cpl = 0 if rng.random() < 0.1 else 3
            count = rng.randint(1, 4 if cpl == 0 else 48)
            stride = rng.choice([gi.PAGE, gi.PAGE, 2 * gi.PAGE, 512, 8 * gi.PAGE])
            start = data_page() + rng.choice([0, 0, 8, 0xFF8, 0xFFC])
            last = start + (count - 1) * stride + 8
            if last > mem:
                continue
            steps.append({"op": "touch", "start": start, "count": count, "stride": stride,
                          "write": rng.random() < 0.4, "cpl": cpl})
        elif k == "store_pte":
            t = rng.choice(list(img.trees))
            flags = gi.PTE_P | gi.PTE_RW | gi.PTE_US | rng.choice([0, gi.PTE_A, gi.PTE_A | gi.PTE_D])
            if cfg["guest_2m"]:
                steps.append({"op": "store", "pte_of": {"tree": t, "gva": data_huge(), "level": 2},
                              "point_to": data_huge(), "flags": flags | gi.PTE_PS, "cpl": rng.choice([3, 3, 0])})
            else:
                steps.append({"op": "store", "pte_of": {"tree": t, "gva": data_page(), "level": 1},
                              "point_to": data_page(), "flags": flags, "cpl": rng.choice([3, 3, 0])})
        elif k == "store_pde":
            if cfg["guest_2m"]:
                continue
            pts = [g for g in img.table_gpas(tree, 1)][2:]  # PTs that map DATA only
            steps.append({"op": "store", "pte_of": {"tree": tree, "gva": data_huge(), "level": 2},
                          "point_to": rng.choice(pts), "cpl": rng.choice([3, 3, 0])})
        elif k == "store_unused":
            top = min(1 << 30, gi.HUGE * 512)
            if mem + gi.HUGE * 8 > top:
                continue
            gva = mem + gi.HUGE * rng.randrange(8)
            steps.append({"op": "store", "pte_of": {"tree": tree, "gva": gva, "level": 2},
                          "offset": rng.choice([0, 0, 4]), "value": data_page() | 0x7, "cpl": rng.choice([3, 0])})
        elif k == "invlpg":
            steps.append({"op": "invlpg", "gva": data_page()})
        elif k == "mov_cr3":
            tree = rng.choice(list(img.trees))
            steps.append({"op": "mov_cr3", "tree": tree})
        elif k == "set_cr3":
            tree = rng.choice(list(img.trees))
            steps.append({"op": "set_cr3", "tree": tree})
        elif k == "new_tree":
            unit = gi.HUGE if cfg["guest_2m"] else gi.PAGE
            span = unit * rng.randint(1, min(16, (mem - gi.DATA_GPA) // unit))
            src = gi.DATA_GPA + unit * rng.randrange((mem - gi.DATA_GPA - span) // unit + 1)
            dst = gi.DATA_GPA + unit * rng.randrange((mem - gi.DATA_GPA - span) // unit + 1)
            name = f"t{len(img.trees)}"
            remap = [{"from": src, "to": dst, "size": span}]
            try:
                img.new_tree(name, remap)
            except BatchMMUError:
                continue
            steps.append({"op": "new_tree", "name": name, "remap": remap})
        elif k == "dirty_log":
            logging = not logging
            steps.append({"op": "dirty_log", "enable": logging})
        elif k == "get" and logging:
            steps.append({"op": "get_dirty_log"})
        elif k == "clear" and logging and cfg["manual_protect"]:
            steps.append({"op": "clear_dirty_log", "pages": rng.choice(["all", "last"])})
    return steps


def random_workload(seed, n=100, config=None):
    """A Workload of ``random_steps(seed, n)`` on ``config`` (by default one drawn from the seed:
    A/D preset or not, 4K or 2M guest leaves, 4K or THP host pages, manual protect or not)."""
    if config is None:
        rng = random.Random(seed ^ 0x5EED)
        mp = rng.random() < 0.5
        config = {"memory": "32MiB", "ad": rng.random() < 0.5, "guest_2m": rng.random() < 0.25,
                  "backing": rng.choice(["4k", "4k", "thp"]), "manual_protect": mp,
                  "initially_set": mp and rng.random() < 0.5}
    return parse({"description": f"random steps, seed {seed}", "config": config,
                  "steps": random_steps(seed, n, config)}, f"random:{seed}:{n}")
