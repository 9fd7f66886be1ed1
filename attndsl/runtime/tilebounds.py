"""Block tables of data-dependent masks in O(L + tiles²), from per-tile bounds (issue 30 part 4).

The table kernel evaluates the mask on every (q, kv) pair: O(L²). Many data-dependent masks read
captured tensors through the index variables one axis at a time (``doc_ids[q_idx] ==
doc_ids[kv_idx]``, ``q_idx < lengths[b]``, ``segment[kv_idx] >= 0``). Then:

1. every sub-expression that depends on ``q`` but not ``kv`` (or the reverse) is evaluated
   exactly, once per position: O(L), and reduced to its minimum and maximum over each tile
   (for booleans: "true on the whole tile" and "true somewhere");
2. the rest of the mask is evaluated on those per-tile intervals over the (q tile, kv tile) grid,
   O(tiles²): ``eq`` of two intervals is surely true when both are one and the same value and maybe
   true when they overlap; ``and``/``or``/``not`` combine (sure, maybe) pairs; ``add``/``sub``/
   ``minimum``/``maximum``/comparisons use interval arithmetic.

A tile is *full* when the mask is surely true on it (and it is not cut by the sequence's end),
*partial* when maybe true: exactly the kernel's contract (full tiles skip the mask, partial tiles
evaluate it per element), so the result is exact, only possibly less tight than the dense table
(a partial tile that is in fact empty costs a visit, never a wrong value). Anything else (a load
indexed by both ``q`` and ``kv``, float arithmetic across the axes, ``mod`` of an interval)
raises :class:`Unsupported` and the table kernel builds the table as before.
"""
from __future__ import annotations

import torch

from .. import ir
from ..ir.graph import topo_order
from .launch import Table, cdiv


def _lists(mask):
    from ..selectors.blocks import _lists as lists  # ascending column lists and counts, one format
    return lists(mask)


class Unsupported(Exception):
    """The mask is not bounded per tile by this builder: use the table kernel."""


class _Exact:
    """A value known per position: a tensor broadcastable to [B, H, Lq, Lkv] that does not vary
    along both q and kv (``axes``: the subset of {"q", "kv"} it varies along)."""

    __slots__ = ("t", "axes")

    def __init__(self, t, axes):
        self.t, self.axes = t, axes


class _Iv:
    """Per (b, h, q tile, kv tile) bounds: ints ``lo <= x <= hi`` (int64); booleans (bool tensors)
    ``lo``: true on the whole tile, ``hi``: true somewhere."""

    __slots__ = ("lo", "hi", "boolean")

    def __init__(self, lo, hi, boolean=False):
        self.lo, self.hi, self.boolean = lo, hi, boolean


_ARITH_EXACT = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "minimum": torch.minimum, "maximum": torch.maximum,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
    "and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor,
}


def _floordiv(a, b):
    return torch.div(a, b, rounding_mode="floor")


def _mod(a, b):
    return torch.remainder(a, b)


class TileBounds:
    """Builds the :class:`~attndsl.runtime.launch.Table` of one spec for one call from per-tile bounds."""

    def __init__(self, spec, buffers, shape, device):
        if spec.mask is None:
            raise Unsupported("no mask")
        self.spec, self.buffers, self.shape, self.device = spec, list(buffers), shape, device

    # -- exact evaluation along one axis ---------------------------------------------------------
    def _exact(self, n, vals, Lq, Lkv):
        B, Hq = self.shape[:2]
        dev = self.device
        if n.op == "const":
            v = n.attr[1]
            if n.dtype == ir.FLOAT:
                raise Unsupported("float constant")
            return _Exact(torch.tensor(v, dtype=torch.bool if n.dtype == ir.BOOL else torch.int64, device=dev), set())
        if n.op == "var":
            name = n.attr
            if name == "b":
                return _Exact(torch.arange(B, device=dev).view(B, 1, 1, 1), set())
            if name == "h":
                return _Exact(torch.arange(Hq, device=dev).view(1, Hq, 1, 1), set())
            if name == "q":
                return _Exact(torch.arange(Lq, device=dev).view(1, 1, Lq, 1), {"q"})
            if name == "kv":
                return _Exact(torch.arange(Lkv, device=dev).view(1, 1, 1, Lkv), {"kv"})
            raise Unsupported(f"variable {name}")
        args = [vals[a] for a in n.args]
        if not all(isinstance(a, _Exact) for a in args):
            return None
        axes = set().union(*(a.axes for a in args)) if args else set()
        if len(axes) > 1:
            return None  # varies along both axes: bounded per tile instead
        if n.op == "load":
            t = self.buffers[n.attr[0]]
            if t.dtype.is_floating_point:
                raise Unsupported("float load")
            # indices were checked against the tensor (runtime/indexcheck.py); clamp as the kernels do
            idx = [a.t.to(torch.int64).clamp(0, max(s - 1, 0)) for a, s in zip(args, t.shape)]
            idx = torch.broadcast_tensors(*idx) if len(idx) > 1 else idx
            got = t[tuple(idx)]
            return _Exact(got.to(torch.bool) if t.dtype == torch.bool else got.to(torch.int64), axes)
        a = [x.t for x in args]
        op = n.op
        if op in _ARITH_EXACT:
            return _Exact(_ARITH_EXACT[op](*a), axes)
        if op == "floordiv":
            return _Exact(_floordiv(*a), axes)
        if op == "mod":
            return _Exact(_mod(*a), axes)
        if op == "neg":
            return _Exact(-a[0], axes)
        if op == "abs":
            return _Exact(a[0].abs(), axes)
        if op == "not":
            return _Exact(~a[0], axes)
        if op == "to_int":
            return _Exact(a[0].to(torch.int64), axes)
        raise Unsupported(f"op {op}")

    # -- per-tile intervals --------------------------------------------------------------------
    def _tiles(self, e: _Exact, BM, BN, R, C):
        """Per-tile bounds of an exact value."""
        t = e.t
        boolean = t.dtype == torch.bool
        t = t.to(torch.int64)
        while t.dim() < 4:
            t = t.unsqueeze(0)
        lo = hi = t
        for axis, block, n in (("q", BM, R), ("kv", BN, C)):
            if axis not in e.axes:
                continue
            d = 2 if axis == "q" else 3
            L = lo.shape[d]
            pad = n * block - L
            if pad:  # beyond the sequence: repeat the last position (adds no value; edge tiles are never full)
                lo = torch.cat([lo, lo.narrow(d, L - 1, 1).expand(*lo.shape[:d], pad, *lo.shape[d + 1:])], d)
                hi = torch.cat([hi, hi.narrow(d, L - 1, 1).expand(*hi.shape[:d], pad, *hi.shape[d + 1:])], d)
            shp = list(lo.shape)
            shp[d:d + 1] = [n, block]
            lo = lo.reshape(shp).amin(d + 1)
            hi = hi.reshape(shp).amax(d + 1)
        if boolean:
            return _Iv(lo.bool(), hi.bool(), True)
        return _Iv(lo, hi)

    def _interval(self, n, vals, BM, BN, R, C):
        args = []
        for a in n.args:
            v = vals[a]
            args.append(self._tiles(v, BM, BN, R, C) if isinstance(v, _Exact) else v)
        op = n.op
        if n.dtype == ir.FLOAT or any(not isinstance(a, _Iv) for a in args):
            raise Unsupported(f"{op} across both axes")
        if op in ("and", "or", "not", "xor") and not all(a.boolean for a in args):
            raise Unsupported(f"{op} of integers across both axes")
        if op == "and":
            return _Iv(args[0].lo & args[1].lo, args[0].hi & args[1].hi, True)
        if op == "or":
            return _Iv(args[0].lo | args[1].lo, args[0].hi | args[1].hi, True)
        if op == "not":
            return _Iv(~args[0].hi, ~args[0].lo, True)
        if op in ("lt", "le", "gt", "ge", "eq", "ne"):
            a, b = args
            if op in ("gt", "ge"):
                a, b, op = b, a, {"gt": "lt", "ge": "le"}[op]
            if op == "lt":
                return _Iv(a.hi < b.lo, a.lo < b.hi, True)
            if op == "le":
                return _Iv(a.hi <= b.lo, a.lo <= b.hi, True)
            same = (a.lo == a.hi) & (b.lo == b.hi) & (a.lo == b.lo)
            overlap = (a.lo <= b.hi) & (b.lo <= a.hi)
            if op == "eq":
                return _Iv(same, overlap, True)
            return _Iv(~overlap, ~same, True)  # ne
        if any(a.boolean for a in args):
            raise Unsupported(f"{op} of booleans across both axes")
        if op == "add":
            return _Iv(args[0].lo + args[1].lo, args[0].hi + args[1].hi)
        if op == "sub":
            return _Iv(args[0].lo - args[1].hi, args[0].hi - args[1].lo)
        if op == "neg":
            return _Iv(-args[0].hi, -args[0].lo)
        if op == "minimum":
            return _Iv(torch.minimum(args[0].lo, args[1].lo), torch.minimum(args[0].hi, args[1].hi))
        if op == "maximum":
            return _Iv(torch.maximum(args[0].lo, args[1].lo), torch.maximum(args[0].hi, args[1].hi))
        if op == "abs":
            lo, hi = args[0].lo, args[0].hi
            return _Iv(torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo))),
                       torch.maximum(lo.abs(), hi.abs()))
        raise Unsupported(f"{op} across both axes")

    def classify(self, BM: int, BN: int):
        """``(full, nonempty)`` boolean ``[TB|1, TH|1, R, C]`` over (q tile, kv tile) for tiles BM x BN."""
        B, Hq, Lq, Lkv = self.shape
        R, C = cdiv(Lq, BM), cdiv(Lkv, BN)
        vals: dict = {}
        for n in topo_order([self.spec.mask]):
            v = self._exact(n, vals, Lq, Lkv)
            vals[n] = v if v is not None else self._interval(n, vals, BM, BN, R, C)
        root = vals[self.spec.mask]
        if isinstance(root, _Exact):
            root = self._tiles(root, BM, BN, R, C)
        if not root.boolean:
            raise Unsupported("mask is not boolean")
        full, nonempty = root.lo, root.hi
        q_lo = torch.arange(R, device=self.device) * BM
        kv_lo = torch.arange(C, device=self.device) * BN
        edge = ((q_lo + BM > Lq)[:, None] | (kv_lo + BN > Lkv)[None, :]).view(1, 1, R, C)
        return full & nonempty & ~edge, nonempty

    def table(self, transposed: bool, br: int, bc: int) -> Table:
        """The table of a launch with row tiles ``br`` and column tiles ``bc`` (rows are kv tiles
        when ``transposed``, for dK/dV), in the table kernel's format."""
        B, Hq = self.shape[:2]
        spec = self.spec
        BM, BN = (bc, br) if transposed else (br, bc)
        full, nonempty = self.classify(BM, BN)
        part = nonempty & ~full
        if transposed:
            full, part = full.transpose(-1, -2), part.transpose(-1, -2)
        TB = B if spec.mask_uses_b else 1
        TH = Hq if spec.mask_uses_h else 1
        R, C = full.shape[-2:]
        if full.shape[0] > TB or full.shape[1] > TH:
            raise Unsupported("bounds vary along b or h where the table does not")
        full = full.expand(TB, TH, R, C)
        part = part.expand(TB, TH, R, C)
        full_l, n_full = _lists(full)
        part_l, n_part = _lists(part)
        count = torch.stack([n_full, n_part], -1).contiguous()
        return Table(full_l, part_l, count, spec.mask_uses_b, spec.mask_uses_h)


class BoundedTables(dict):
    """``BlockTables.tables`` that builds each requested table from per-tile bounds when it can;
    a table it cannot build is reported missing, so the runner's table kernel builds it."""

    def __init__(self, bounds: TileBounds):
        super().__init__()
        self.bounds = bounds

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        if self.bounds is None:
            return False
        try:
            with torch.no_grad():
                self[key] = self.bounds.table(*key)
        except Unsupported:
            self.bounds = None  # the same for every tile size: stop trying
            return False
        return True
