"""Which block tables can be built from per-tile bounds, and how (issue 30 part 4).

A data-dependent mask (``doc[q_idx] == doc[kv_idx]``) needs a block table: per (row tile,
column tile), full / partial / empty. Evaluating the mask on every pair is O(L²). Most such masks
read captured tensors one axis at a time. Then the mask splits into

* the **frontier**: the largest sub-expressions that read ``q`` or ``kv`` but not both
  (``doc[q_idx]``, ``doc[kv_idx]``, ``kv_idx < lengths[b]``), evaluated exactly per position and
  reduced to their minimum and maximum per tile (for booleans: "true on the whole tile", "true
  somewhere"): O(L);
* the rest, evaluated once per (row tile, column tile) on those intervals by the interval rules of
  :class:`attndsl.passes.bounds.IntervalAnalysis` (``eq`` of two intervals surely true when both
  are one and the same value, maybe true when they overlap; ``and``/``or``/``not`` on (sure, maybe)
  pairs; ``add``/``sub``/``min``/``max``/comparisons by interval arithmetic): O(tiles²).

:func:`tile_plan` makes that split once per mask. ``must`` / ``may`` are IR over ``b``, ``h``, the
tile bounds ``q_lo, q_hi, kv_lo, kv_hi`` and each frontier value's bounds ``_f{i}_lo, _f{i}_hi``:
``must`` true only where the mask holds on the whole tile, ``may`` false only where it holds nowhere.
``exact`` (:class:`_Exactness`) is true only where that verdict is the truth on the tile, so a tile
that is neither surely full nor surely empty is partial as it stands. The table kernel
(``codegen/tilebounds.py``) takes surely-full tiles as full, skips surely-empty ones, takes exact
maybe-tiles as partial, and evaluates the mask on the remaining tiles only (for 64 documents in
32K, 110 of 131072 tiles): its table is the dense table exactly.

A mask this does not cover gets ``None`` (with :func:`why_not` saying why) and the dense table
kernel: a load indexed by both ``q`` and ``kv``, float arithmetic across the axes, an op with no
interval rule here, or bounds that never rule a tile out.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import ir
from ..ir import BOOL, FLOAT, Node, node
from ..ir.graph import free_vars, substitute, topo_order
from ..ir.nodes import expr_str
from .bounds import FALSE, TRUE, IntervalAnalysis

AXES = ("q", "kv")
#: ops of ``must`` / ``may`` (outside sub-expressions of ``b``/``h`` only) the table kernel emits
INTERVAL_OPS = frozenset({"var", "const", "add", "sub", "mul", "neg", "minimum", "maximum", "abs", "where",
                          "floordiv", "mod", "lt", "le", "gt", "ge", "eq", "ne", "and", "or", "xor", "not"})
#: variables of ``must`` / ``may`` besides ``b``, ``h`` and the frontier bounds
TILE_VARS = ("q_lo", "q_hi", "kv_lo", "kv_hi")


@dataclass(frozen=True)
class Frontier:
    """A sub-expression of the mask that reads one axis (``axis``: "q" or "kv") and not the other;
    its per-tile bounds are the variables ``{name}_lo`` / ``{name}_hi`` (booleans: "true on the
    whole tile" / "true somewhere")."""

    node: Node
    axis: str
    name: str


@dataclass(frozen=True)
class TilePlan:
    """How to classify tiles from per-tile bounds (see the module docstring)."""

    frontier: tuple[Frontier, ...]
    must: Node
    may: Node
    #: true only where the verdict (must, may) is the mask's truth on the tile (``_Exactness``)
    exact: Node = None

    def along(self, axis: str) -> tuple[Frontier, ...]:
        """The frontier values that vary along ``axis``."""
        return tuple(f for f in self.frontier if f.axis == axis)


class _TileIntervals(IntervalAnalysis):
    """Interval rules, with boolean frontier variables bounded by their (all, any) variables."""

    def __init__(self, env, bools):
        super().__init__(env, unbounded=(ir.SCORE, *bools))
        self.bools = set(bools)

    def _bool(self, n: Node):
        if n.op == "var" and n.attr in self.bools:
            return (ir.var(f"{n.attr}_lo", BOOL), ir.var(f"{n.attr}_hi", BOOL))
        return super()._bool(n)


def _exact(n: Node, fv: dict) -> bool:
    """Depends on neither axis (only ``b``, ``h`` and constants): emitted as is, once per program."""
    return not (free_vars(n, fv) - {"b", "h"})


def _plan(mask: Node) -> TilePlan | str:
    fv: dict = {}
    axes = {n: free_vars(n, fv) & set(AXES) for n in topo_order([mask])}
    for n, ax in axes.items():
        if len(ax) == 2 and n.op == "load":
            return f"the mask reads a captured tensor at both q_idx and kv_idx ({expr_str(n)})"
        if len(ax) == 2 and n.dtype == FLOAT:
            return f"float arithmetic across q_idx and kv_idx ({expr_str(n)})"
    frontier: dict[Node, Frontier] = {}

    def add(n):
        if n not in frontier and not (n.op == "var" and n.attr in AXES):
            (axis,) = axes[n]
            frontier[n] = Frontier(n, axis, f"_f{len(frontier)}")

    if len(axes[mask]) == 1:
        add(mask)
    for n, ax in axes.items():
        if len(ax) == 2:
            for a in n.args:
                if len(axes[a]) == 1:
                    add(a)
    sub = {f.node: ir.var(f.name, f.node.dtype) for f in frontier.values()}
    env = {"q": (ir.var("q_lo"), ir.var("q_hi")), "kv": (ir.var("kv_lo"), ir.var("kv_hi"))}
    env.update({f.name: (ir.var(f"{f.name}_lo"), ir.var(f"{f.name}_hi"))
                for f in frontier.values() if f.node.dtype != BOOL})
    bools = [f.name for f in frontier.values() if f.node.dtype == BOOL]
    analysis = _TileIntervals(env, bools)
    root = substitute(mask, sub)
    must, may = analysis(root)
    if may is TRUE:
        return "the interval rules never rule a tile out for this mask"
    efv: dict = {}
    for n in topo_order([must, may]):
        if _exact(n, efv) and n.op != "var":
            continue
        if n.dtype == FLOAT:
            return f"float values in the tile bounds ({expr_str(n)})"
        if n.op not in INTERVAL_OPS:
            return f"no interval rule emitted for '{n.op}'"
        if n.op in ("floordiv", "mod") and not (n.args[1].op == "const" and ir.const_value(n.args[1]) > 0):
            return f"'{n.op}' by a non-constant or non-positive divisor"
    axes_of = {ir.var(f.name, f.node.dtype): {f.axis} for f in frontier.values()}
    exact = _Exactness(analysis, axes_of)(root)
    exact = _and(exact[0], exact[1])
    return TilePlan(tuple(frontier.values()), must, may, exact)


# -- exactness: where the interval verdict is the truth, the tile needs no evaluation ---------------
def _and(a: Node, b: Node) -> Node:
    return b if a is TRUE else a if b is TRUE else FALSE if FALSE in (a, b) else node("and", a, b)


def _or(a: Node, b: Node) -> Node:
    return a if b is FALSE else b if a is FALSE else TRUE if TRUE in (a, b) else node("or", a, b)


def _not(a: Node) -> Node:
    return FALSE if a is TRUE else TRUE if a is FALSE else node("not", a)


class _Exactness:
    """Per boolean node of the substituted mask, IR ``(ee, fe)``: ``ee`` true only where its ``may``
    is exact (maybe true ⇒ true at some pair of the tile), ``fe`` only where its ``must`` is (not
    surely true ⇒ false at some pair). Where both hold at the root, a tile that is neither surely
    full nor surely empty is partial: no evaluation needed (a document mask's diagonal tiles, and
    tiles of a long document against a tile holding its end).

    The facts used: a tile's bounds are attained (minimum and maximum over its positions); values of
    the row axis and of the column axis vary independently over a tile, so a comparison of a
    row-only and a column-only value (or of ``q - kv`` and a constant) is true somewhere iff its
    bounds say so; equality needs both sides' values to fill their integer ranges (``contiguous``:
    ``q``, ``kv``, sums of them, or a frontier value whose steps between neighbouring positions are
    at most 1, checked per tile: ``_f{i}_ct``)."""

    def __init__(self, analysis: _TileIntervals, axes_of: dict):
        self.iv, self.axes_of = analysis, axes_of
        self.memo: dict = {}
        self.fv: dict = {}

    def axes(self, n: Node) -> set:
        out = set()
        for v in topo_order([n]):
            if v.op == "var":
                out |= self.axes_of.get(v, {v.attr} & set(AXES))
        return out

    def tight(self, n: Node) -> bool:
        """The interval analysis' bounds of ``n`` are attained in every tile."""
        if n.op in ("var", "const") or _exact(n, self.fv):
            return True
        if n.op == "neg":
            return self.tight(n.args[0])
        if n.op in ("add", "sub"):
            a, b = n.args
            return self.tight(a) and self.tight(b) and not (self.axes(a) & self.axes(b))
        return False

    def contiguous(self, n: Node) -> Node:
        """IR: ``n``'s values over a tile are every integer between its bounds (given ``tight``)."""
        if n.op == "const" or _exact(n, self.fv) or (n.op == "var" and n.attr in AXES):
            return TRUE
        if n.op == "var" and n.dtype != BOOL:
            return ir.var(f"{n.attr}_ct", BOOL)
        if n.op == "neg":
            return self.contiguous(n.args[0])
        if n.op in ("add", "sub"):
            return _and(self.contiguous(n.args[0]), self.contiguous(n.args[1]))
        return FALSE

    def __call__(self, n: Node):
        got = self.memo.get(n)
        if got is None:
            got = self.memo[n] = self._rule(n)
        return got

    def _rule(self, n: Node):
        must, may = self.iv(n)
        generic = (_not(may), must)  # exact where surely nowhere / surely everywhere
        if n.op == "var" or _exact(n, self.fv):  # a frontier boolean's (all, any), or b/h only
            return (TRUE, TRUE)
        if n.op == "not":
            ee, fe = self(n.args[0])
            return (fe, ee)
        if n.op in ("and", "or"):
            (am, ay), (bm, by) = self.iv(n.args[0]), self.iv(n.args[1])
            (ae, af), (be, bf) = self(n.args[0]), self(n.args[1])
            if n.op == "and":
                ee = _or(_or(_and(am, be), _and(bm, ae)), _or(_not(ay), _not(by)))
                fe = _and(_or(am, af), _or(bm, bf))
            else:
                ee = _or(_or(_and(ay, ae), _and(by, be)), _and(_not(ay), _not(by)))
                fe = _or(_or(_and(_not(ay), bf), _and(_not(by), af)), _or(am, bm))
            return (_or(ee, generic[0]), _or(fe, generic[1]))
        if n.op in ("lt", "le", "gt", "ge", "eq", "ne"):
            a, b = n.args
            if a.dtype == BOOL or not (self.tight(a) and self.tight(b)) or (self.axes(a) & self.axes(b)):
                return generic
            if n.op in ("eq", "ne"):
                ct = _and(self.contiguous(a), self.contiguous(b))
                return (ct, TRUE) if n.op == "eq" else (TRUE, ct)
            return (TRUE, TRUE)
        return generic


@functools.lru_cache(maxsize=256)
def _cached(mask: Node) -> TilePlan | str:
    return _plan(mask)


def tile_plan(spec) -> TilePlan | None:
    """The per-tile-bounds plan of ``spec``'s block tables, or None: the dense table kernel builds
    them (a layout box plan, no data-dependent mask, or see :func:`why_not`). Pure and cached per
    mask: codegen (which kernels to emit) and the runtime (which to launch) agree by calling it."""
    got = _plan_of(spec)
    return got if isinstance(got, TilePlan) else None


def why_not(spec) -> str | None:
    """Why ``spec``'s tables are built by the dense kernel, or None when :func:`tile_plan` covers them."""
    got = _plan_of(spec)
    return None if isinstance(got, TilePlan) else got


def _plan_of(spec) -> TilePlan | str:
    """The plan of ``spec``, or why it has none."""
    if spec.mask is None or not spec.data_dependent:
        return "no data-dependent mask"
    if spec.tiles is not None:
        return "a layout box plan (its tiles are fixed)"
    return _cached(spec.mask)


def axes(transposed: bool) -> tuple[str, str]:
    """(row axis, column axis) of a table."""
    return ("kv", "q") if transposed else ("q", "kv")
