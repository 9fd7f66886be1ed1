"""Tile-uniform loads: captured-tensor reads whose index is the same for every pair of most tiles.

A relative-position table read through a clamped or bucketed distance (T5 buckets, Shaw's
clipped distances) saturates: far from the diagonal every pair of a tile reads the same entry,
yet the kernel would compute the index (log, floor, clamps) and gather for each element. The
interval analysis gives each index's bounds over a tile as scalar IR over ``q_lo, q_hi, kv_lo,
kv_hi``, and the same IR bounds it over any range of tiles. Codegen (``codegen/runs.py``) finds
the constant runs, the longest ranges of full tiles at either end of a program's range where
``lo == hi``, loads their one entry as a scalar (and, for a learnable table, adds each run's
gradient once), computing per element only on the few tiles near the diagonal; under block
tables and layout plans it tests ``lo == hi`` per tile instead.

Only float loads indexed by both ``q`` and ``kv`` qualify (a load of one index is a vector per
tile, already cheap), and only when some index is not affine in them (an affine index like
``q - kv`` takes many values on every tile, so the test would never pass).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ir
from ..ir import FLOAT, INT, Node
from .bounds import IntervalAnalysis

_AFFINE_OPS = {"var", "const", "add", "sub", "neg"}


@dataclass(frozen=True)
class UniformLoad:
    """A load and, per index, its bounds over a tile (IR over the tile's q/kv ranges, b, h)."""

    load: Node
    lo: tuple
    hi: tuple
    varying: tuple  # per index: does it depend on q or kv (the indices whose lo == hi is tested)


def _affine(n: Node) -> bool:
    if n.op == "mul":
        return any(a.op == "const" for a in n.args) and all(_affine(a) for a in n.args)
    return n.op in _AFFINE_OPS and all(_affine(a) for a in n.args)


def tile_interval_env() -> dict:
    """q and kv range over the tile: the names every dense kernel binds."""
    return {"q": (ir.var("q_lo"), ir.var("q_hi")), "kv": (ir.var("kv_lo"), ir.var("kv_hi"))}


def uniform_loads(score: Node | None) -> tuple:
    if score is None:
        return ()
    ia = IntervalAnalysis(tile_interval_env())
    out = []
    for ld in ir.loads([score]):
        if ld.attr[1] != FLOAT or not {"q", "kv"} <= ir.free_vars(ld):
            continue
        varying = tuple(bool(ir.free_vars(a) & {"q", "kv"}) for a in ld.args)
        if any(a.dtype != INT or ir.loads([a]) for a in ld.args):
            continue
        if all(_affine(a) for a, v in zip(ld.args, varying) if v):
            continue
        bounds = [ia(a) for a in ld.args]
        if any(lo is None or hi is None for lo, hi in bounds):
            continue
        # not simplified: the bounds repeat the index's own float operations in the same order, so
        # the per-tile value is bitwise the one each element computes
        out.append(UniformLoad(ld, tuple(lo for lo, _ in bounds), tuple(hi for _, hi in bounds), varying))
    return tuple(out)
