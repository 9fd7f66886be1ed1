"""Ranges of captured-tensor indices over a whole call, so that a pattern indexing past a
tensor's end is an error before launch.

Kernels never read out of bounds: they mask plain ``q``/``kv`` indices and clamp every other
index into the tensor. That keeps memory safe but would turn a wrong index (a table one entry
too short, document ids shorter than the sequence) into silently wrong values. The float64
reference raises on such an index; the runtime must refuse it too.

:func:`index_bounds` builds, once per pattern, each index's interval over the call's domain
``b < B, h < Hq, q < Lq, kv < Lkv`` as IR over the variables :data:`LAST` (the largest value of
each index variable). The runtime evaluates those few scalar expressions per call shape;
when they do not prove an index in range (intervals are sound but may be loose) it evaluates
the index itself densely before deciding.
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import ir
from ..ir import Node, const, node
from ..ir.graph import free_vars, loads, substitute
from ..ir.nodes import expr_str
from .bounds import IntervalAnalysis
from .diagonal import DIST, over_distance, shift_invariant

LAST = {v: f"{v}_last" for v in ir.INDEX_VARS}  # b_last = B - 1, h_last = Hq - 1, ...


@dataclass(frozen=True)
class IndexBound:
    """Dimension ``dim`` of the captured tensor ``slot`` is read at ``index``.

    ``lo``/``hi`` bound the index over the call (IR over :data:`LAST`; None when unbounded).
    An index computed from captured values (``table[ids[q]]``) depends on the call's data:
    ``values`` names, per value it reads, the slot read and the variable standing for it in
    ``lo``/``hi``, bounded by ``{name}_min``/``{name}_max`` (that tensor's smallest and largest
    entries)."""

    slot: int
    dim: int
    index: Node
    lo: Node | None
    hi: Node | None
    values: tuple = ()  # (slot, variable name) per captured value the index reads
    text: str = ""
    #: the index over ``dist = q - kv`` when it reads along diagonals (a relative-position table):
    #: evaluating it densely then takes Lq + Lkv - 1 distances, not Lq * Lkv pairs
    on_dist: Node | None = None


def index_bounds(roots) -> tuple[IndexBound, ...]:
    roots = [r for r in roots if r is not None]
    out, seen = [], set()
    for n in loads(roots):
        slot = n.attr[0]
        for d, a in enumerate(n.args):
            if (slot, d, a) in seen:
                continue
            seen.add((slot, d, a))
            lo, hi, values = _call_interval(a)
            out.append(IndexBound(slot, d, a, lo, hi, values, expr_str(a), _on_dist(a)))
    return tuple(out)


@dataclass(frozen=True)
class DivisorBound:
    """An integer divisor (of ``//`` or ``%``) that is not a constant, with its interval over the
    call as for :class:`IndexBound` (same fields): a call where it can be zero is refused, as torch
    raises ZeroDivisionError."""

    index: Node
    lo: Node | None
    hi: Node | None
    values: tuple = ()
    text: str = ""
    on_dist: Node | None = None


def divisor_bounds(roots) -> tuple[DivisorBound, ...]:
    """Every non-constant integer divisor the IR computes, with its interval over the call."""
    from ..ir.graph import topo_order
    roots = [r for r in roots if r is not None]
    divisors = {n.args[1]: None for n in topo_order(roots)
                if n.op in ("floordiv", "mod") and n.dtype == ir.INT and n.args[1].op != "const"}
    out = []
    for a in divisors:
        lo, hi, values = _call_interval(a)
        out.append(DivisorBound(a, lo, hi, values, expr_str(a), _on_dist(a)))
    return tuple(out)


def _call_interval(a: Node):
    """``(lo, hi, values)``: the interval of ``a`` over ``b < B, h < Hq, q < Lq, kv < Lkv`` as IR over
    :data:`LAST`, and the captured values it reads (see :class:`IndexBound`)."""
    env = {v: (const(0), ir.var(LAST[v])) for v in ir.INDEX_VARS}
    values, mapping = [], {}
    for m in _outer_loads(a):
        if m.dtype == ir.BOOL:
            continue  # a boolean read stays unbounded: the expression is then checked densely
        name = f"value{len(values)}"
        values.append((m.attr[0], name))
        mapping[m] = ir.var(name, m.dtype)
        env[name] = (ir.var(f"{name}_min", m.dtype), ir.var(f"{name}_max", m.dtype))
    lo, hi = _BranchIntervals(env)(substitute(a, mapping) if mapping else a)
    return lo, hi, tuple(values)


class _BranchIntervals(IntervalAnalysis):
    """Intervals that also use what a ``where`` tests: in ``where(e < K, e, y)`` the first branch
    lies below K (T5 buckets: ``where(dist < max_exact, dist, log-spaced bucket)``). Kept to this
    pass, so the tile classifications built on :class:`IntervalAnalysis` do not change."""

    def branch(self, cond: Node, val: Node, taken: bool):
        return _narrow(self, cond, val, taken)


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
_NEGATE = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}


def _narrow(ia, cond: Node, val: Node, taken: bool):
    """The interval of ``val`` where ``cond`` is ``taken``: clipped when cond compares val itself
    with something (``where(d < K, d, ...)``), or when val is the difference of what cond compares
    (``where(q > kv, q - kv, 0)``)."""
    lo, hi = ia(val)
    if cond.op not in _FLIP:
        return (lo, hi)
    op = cond.op if taken else _NEGATE[cond.op]
    a, b = cond.args
    zero = const(0, val.dtype)
    if a is val:
        other = b
    elif b is val:
        other, op = a, _FLIP[op]
    elif val.op == "sub" and val.args == (a, b):  # a OP b is a - b OP 0
        other = zero
    elif val.op == "sub" and val.args == (b, a):
        other, op = zero, _FLIP[op]
    else:
        return (lo, hi)
    olo, ohi = ia(other)
    step = const(1, val.dtype) if val.dtype == ir.INT and op in ("lt", "gt") else None
    if op in ("lt", "le") and ohi is not None:
        cap = node("sub", ohi, step) if step is not None else ohi
        hi = cap if hi is None else node("minimum", hi, cap)
    if op in ("gt", "ge") and olo is not None:
        cap = node("add", olo, step) if step is not None else olo
        lo = cap if lo is None else node("maximum", lo, cap)
    return (lo, hi)


def _on_dist(index: Node) -> Node | None:
    """The index over ``dist`` when it depends on q and kv only through ``q - kv``."""
    if not {"q", "kv"} <= free_vars(index) or not shift_invariant(index):
        return None
    return over_distance(index)


def _outer_loads(n: Node) -> list[Node]:
    """The loads an expression reads that are not themselves inside another load's index."""
    found, stack, seen = [], [n], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "load":
            found.append(m)
        else:
            stack.extend(m.args)
    return found


def index_vars(bound: IndexBound) -> list[str]:
    """The variables a dense evaluation runs over, in the order b, h, q, kv (or b, h, dist for an
    index read along diagonals: see ``on_dist``)."""
    fv = free_vars(bound.on_dist if bound.on_dist is not None else bound.index)
    return [v for v in (*ir.INDEX_VARS, DIST) if v in fv]
