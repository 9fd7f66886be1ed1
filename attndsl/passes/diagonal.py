"""Diagonal indices: captured-tensor reads whose index depends on q and kv only through q - kv.

A relative-position table (T5 buckets, Shaw's clipped distances) is read at an entry that the
pair's distance fixes, so each diagonal of a tile reads one entry. The gradient of such a table
is then a sum per diagonal: codegen (``codegen/kernels.py: _diagonal_adds``) sums each diagonal
of a tile and adds it once, where a general index needs a masked reduction per entry.

The test is structural and sound: a node is shift-invariant (unchanged when q and kv move by
the same amount) when it reads neither, when it is an integer affine expression whose q and kv
terms cancel (sympy) over shift-invariant leaves, when it compares two integers whose
difference is, or when all its operands are. Such an index, with q := dist and kv := 0, is the
index as a function of the distance ``dist = q - kv``.
"""
from __future__ import annotations

import sympy

from .. import ir
from ..ir import INT, Node
from .simplify import _Sympy, simplify

_COMPARE = {"lt", "le", "gt", "ge", "eq", "ne"}
_AFFINE = {"add", "sub", "mul", "neg"}
DIST = "dist"  # the variable of a diagonal index


def _affine_invariant(n: Node, memo: dict) -> bool:
    conv = _Sympy()
    e = conv.to_sympy(n)
    if not all(shift_invariant(leaf, memo) for leaf in conv.opaque.values() if leaf.op != "var"):
        return False
    q, kv, t = (sympy.Symbol(s, integer=True) for s in ("q", "kv", "_shift"))
    return sympy.expand(e.subs({q: q + t, kv: kv + t}, simultaneous=True) - e) == 0


def shift_invariant(n: Node, memo: dict | None = None) -> bool:
    """Is ``n`` unchanged when q and kv both move by the same amount?"""
    memo = {} if memo is None else memo
    r = memo.get(n)
    if r is None:
        fv = ir.free_vars(n)
        if not fv & {"q", "kv"}:
            r = True
        elif n.op == "var":
            r = False
        elif n.op in _AFFINE and n.dtype == INT:
            r = _affine_invariant(n, memo)
        elif n.op in _COMPARE and all(a.dtype == INT for a in n.args):
            r = _affine_invariant(ir.node("sub", *n.args), memo)
        else:
            r = all(shift_invariant(a, memo) for a in n.args)
        memo[n] = r
    return r


def diagonal_index(load: Node) -> tuple[Node, ...] | None:
    """The load's index as IR over ``dist`` (and b, h, constants), when it reads along diagonals:
    it depends on both q and kv, and on them only through ``q - kv``. None otherwise."""
    if not {"q", "kv"} <= ir.free_vars(load):
        return None
    memo: dict = {}
    if not all(shift_invariant(a, memo) for a in load.args):
        return None
    return tuple(over_distance(a) for a in load.args)


def over_distance(n: Node) -> Node:
    """A shift-invariant expression as a function of ``dist = q - kv`` (q := dist, kv := 0)."""
    return simplify(ir.substitute(n, {ir.var("q"): ir.var(DIST), ir.var("kv"): ir.const(0)}))
