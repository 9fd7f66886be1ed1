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
The table kernel (``codegen/tilebounds.py``) takes surely-full tiles as full, skips surely-empty ones,
and evaluates the mask on the remaining tiles only, so its table is the dense table exactly.

A mask this does not cover gets ``None`` (with :func:`why_not` saying why) and the dense table
kernel: a load indexed by both ``q`` and ``kv``, float arithmetic across the axes, an op with no
interval rule here, or bounds that never rule a tile out.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import ir
from ..ir import BOOL, FLOAT, Node
from ..ir.graph import free_vars, substitute, topo_order
from ..ir.printer import expr_str
from ..spec import KernelSpec, Param
from .bounds import TRUE, IntervalAnalysis

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
    must, may = _TileIntervals(env, bools)(substitute(mask, sub))
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
    return TilePlan(tuple(frontier.values()), must, may)


@functools.lru_cache(maxsize=256)
def _cached(mask: Node) -> TilePlan | str:
    return _plan(mask)


def tile_plan(spec) -> TilePlan | None:
    """The per-tile-bounds plan of ``spec``'s block tables, or None: the dense table kernel builds
    them (a layout box plan, no data-dependent mask, or see :func:`why_not`). Pure and cached per
    mask: codegen (which kernels to emit) and the runtime (which to launch) agree by calling it."""
    got = why_not_or_plan(spec)
    return got if isinstance(got, TilePlan) else None


def why_not(spec) -> str | None:
    """Why ``spec``'s tables are built by the dense kernel, or None when :func:`tile_plan` covers them."""
    got = why_not_or_plan(spec)
    return None if isinstance(got, TilePlan) else got


def why_not_or_plan(spec) -> TilePlan | str:
    if spec.mask is None or not spec.data_dependent:
        return "no data-dependent mask"
    if spec.tiles is not None:
        return "a layout box plan (its tiles are fixed)"
    return _cached(spec.mask)


# -- the kernels' signatures (codegen/tilebounds.py renders them, runtime/tilebounds.py fills them) --
def axes(transposed: bool) -> tuple[str, str]:
    """(row axis, column axis) of a table."""
    return ("kv", "q") if transposed else ("q", "kv")


def _buffers(spec: KernelSpec) -> list:
    """The captured tensors' parameters, as the dense table kernel takes them."""
    return [p for p in spec.lowering.signature("table") if p.name.startswith("buf")]


def bounds_signature(spec: KernelSpec) -> tuple:
    """Parameters of ``<name>_tbounds`` / ``_tbounds_t``."""
    ints = [Param(n, "int") for n in ("TH", "LQ", "LKV", "NT")]
    return tuple([Param("TBND", "tensor"), *ints, *_buffers(spec),
                  Param("BLOCK_C", "constexpr"), Param("BLOCK_T", "constexpr")])


def class_signature(spec: KernelSpec) -> tuple:
    """Parameters of ``<name>_tclass`` / ``_tclass_t``: the dense table kernel's, plus the bounds scratch."""
    table = [Param(n, "tensor") for n in ("TBL_FULL", "TBL_PART", "TBL_CNT")]
    table += [Param(n, "int") for n in ("tbl_stride_b", "tbl_stride_h", "tbl_stride_r")]
    ints = [Param(n, "int") for n in ("TH", "LQ", "LKV", "NT")]
    return tuple([*table, Param("TBND", "tensor"), *ints, *_buffers(spec),
                  *(Param(n, "constexpr") for n in ("BLOCK_R", "BLOCK_C", "BLOCK_T"))])
