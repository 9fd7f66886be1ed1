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
from ..ir import Node, const
from ..ir.graph import free_vars, substitute, topo_order
from ..ir.printer import expr_str
from .bounds import IntervalAnalysis

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


def index_bounds(roots) -> tuple[IndexBound, ...]:
    roots = [r for r in roots if r is not None]
    out, seen = [], set()
    for n in topo_order(roots):
        if n.op != "load":
            continue
        slot = n.attr[0]
        for d, a in enumerate(n.args):
            if (slot, d, a) in seen:
                continue
            seen.add((slot, d, a))
            env = {v: (const(0), ir.var(LAST[v])) for v in ir.INDEX_VARS}
            values, mapping = [], {}
            for m in _outer_loads(a):
                if m.dtype == ir.BOOL:
                    continue  # a boolean read stays unbounded: the index is then checked densely
                name = f"value{len(values)}"
                values.append((m.attr[0], name))
                mapping[m] = ir.var(name, m.dtype)
                env[name] = (ir.var(f"{name}_min", m.dtype), ir.var(f"{name}_max", m.dtype))
            lo, hi = IntervalAnalysis(env)(substitute(a, mapping) if mapping else a)
            out.append(IndexBound(slot, d, a, lo, hi, tuple(values), expr_str(a)))
    return tuple(out)


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
    """The index variables the index depends on, in the order b, h, q, kv."""
    fv = free_vars(bound.index)
    return [v for v in ir.INDEX_VARS if v in fv]
