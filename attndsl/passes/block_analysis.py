"""Block analysis: which key tiles a query tile must visit, and which of them are full.

The mask is put in negation normal form; every atom is solved for the *target* index (``kv``
for the forward, ``q`` for the backward's dK/dV pass) where it can be: affine comparisons,
``//`` by constants, ``abs``, ``minimum``/``maximum``, ``clamp`` and ``where`` on conditions that
do not involve the target invert exactly into bounds. From the resulting formula two ranges per
tile of the *other* index follow, as IR expressions the kernel evaluates itself:

* the **outer** range: every target index the mask may allow lies in it (tiles outside are
  never visited);
* the **inner** range: every target index in it is allowed for every row of the tile, so tiles
  inside it skip the mask.

Atoms that cannot be solved (``%`` on the target, comparisons of loaded values...) keep the outer
range open and the inner range empty; when they read captured tensors at the indices, the mask is
*data dependent* and a block-table kernel classifies tiles on the device instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from ..ir import BOOL, INT, Node, const, node
from .bounds import IntervalAnalysis
from .simplify import _Sympy, simplify

_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le", "eq": "eq", "ne": "ne"}


# --- constraint formulas ------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    kind: str  # "lo": target >= expr ; "hi": target <= expr
    expr: Node


@dataclass(frozen=True)
class Free:
    """An atom that does not involve the target index (tile-uniform along the target)."""
    atom: Node


@dataclass(frozen=True)
class Opaque:
    """An atom that involves the target in a way we cannot solve."""
    atom: Node


@dataclass(frozen=True)
class All:
    parts: tuple


@dataclass(frozen=True)
class Any:
    parts: tuple


def nnf(n: Node, neg: bool = False) -> Node:
    """Push negations down to atoms."""
    if n.op == "not":
        return nnf(n.args[0], not neg)
    if n.op in ("and", "or"):
        op = n.op if not neg else ("or" if n.op == "and" else "and")
        return node(op, nnf(n.args[0], neg), nnf(n.args[1], neg))
    return simplify(node("not", n)) if neg else n


def _ceil_div(a: Node, c: int) -> Node:
    return node("neg", node("floordiv", node("neg", a), const(c)))


def _floor_div(a: Node, c: int) -> Node:
    return node("floordiv", a, const(c))


class _Solver:
    def __init__(self, target: str):
        self.t = target
        self.fv: dict = {}

    def has_t(self, n: Node) -> bool:
        return self.t in ir.free_vars(n, self.fv)

    def formula(self, n: Node):
        if n.op == "and":
            return All((self.formula(n.args[0]), self.formula(n.args[1])))
        if n.op == "or":
            return Any((self.formula(n.args[0]), self.formula(n.args[1])))
        if not self.has_t(n):
            return Free(n)
        if n.op in ("lt", "le", "gt", "ge", "eq", "ne") and n.args[0].dtype == INT:
            return self.compare(n.op, n.args[0], n.args[1], n)
        return Opaque(n)

    def compare(self, op, lhs: Node, rhs: Node, atom: Node):
        # normalise to  e >= 0 / e <= 0 with e = lhs - rhs  (integers: strict becomes +-1)
        e = simplify(node("sub", lhs, rhs))
        if op == "lt":
            return self.cmp0(node("add", e, const(1)), "le", atom)
        if op == "gt":
            return self.cmp0(node("sub", e, const(1)), "ge", atom)
        if op in ("le", "ge"):
            return self.cmp0(e, op, atom)
        if op == "eq":
            return All((self.cmp0(e, "le", atom), self.cmp0(e, "ge", atom)))
        return Any((self.cmp0(node("add", e, const(1)), "le", atom), self.cmp0(node("sub", e, const(1)), "ge", atom)))

    def cmp0(self, e: Node, op: str, atom: Node):
        """Solve ``e op 0`` for the target."""
        r = self.isolate(simplify(e), "lo" if op == "ge" else "hi", const(0), atom)
        return r

    def isolate(self, f: Node, kind: str, g: Node, atom: Node):
        """Constraint equivalent to ``f >= g`` (kind lo) or ``f <= g`` (kind hi); g is free of t."""
        conv = _Sympy()
        ex = conv.to_sympy(f)
        syms_with_t = [s for s, n in conv.opaque.items() if self.has_t(n)]
        if len(syms_with_t) != 1:
            return Opaque(atom)
        s = syms_with_t[0]
        poly = sympy.Poly(ex, s) if ex.has(s) else None
        if poly is None or poly.degree() != 1:
            return Opaque(atom)
        c = poly.coeff_monomial(s)
        if not c.is_Integer or c == 0:
            return Opaque(atom)
        c = int(c)
        rest = conv.from_sympy(sympy.expand(ex - c * s))
        u = conv.opaque[s]
        # c*u + rest >= g  <=>  c*u >= g - rest
        rhs = simplify(node("sub", g, rest))
        if c > 0:
            new_kind, bound = kind, (_ceil_div(rhs, c) if kind == "lo" else _floor_div(rhs, c))
        else:
            new_kind = "hi" if kind == "lo" else "lo"
            neg = simplify(node("neg", rhs))
            bound = _floor_div(neg, -c) if kind == "lo" else _ceil_div(neg, -c)
        return self.invert(u, new_kind, simplify(bound), atom)

    def invert(self, u: Node, kind: str, g: Node, atom: Node):
        """Constraint equivalent to ``u >= g`` / ``u <= g`` where ``u`` contains the target."""
        if u.op == "var":
            return Bound(kind, g)
        a = u.args
        if u.op == "floordiv" and a[1].op == "const" and ir.const_value(a[1]) > 0:
            d = a[1]
            if kind == "lo":
                return self.isolate(a[0], "lo", simplify(node("mul", g, d)), atom)
            return self.isolate(a[0], "hi", simplify(node("add", node("mul", g, d), const(ir.const_value(d) - 1))), atom)
        if u.op == "abs":
            if kind == "hi":
                return All((self.isolate(a[0], "lo", simplify(node("neg", g)), atom), self.isolate(a[0], "hi", g, atom)))
            return Any((self.isolate(a[0], "lo", g, atom), self.isolate(a[0], "hi", simplify(node("neg", g)), atom)))
        if u.op in ("minimum", "maximum"):
            parts = tuple(self._side(x, kind, g, atom) for x in a)
            conj = (u.op == "minimum") == (kind == "lo")
            return All(parts) if conj else Any(parts)
        if u.op == "where" and not self.has_t(a[0]):
            c = a[0]
            return Any((All((Free(c), self._side(a[1], kind, g, atom))),
                        All((Free(simplify(node("not", c))), self._side(a[2], kind, g, atom)))))
        return Opaque(atom)

    def _side(self, x: Node, kind: str, g: Node, atom: Node):
        if self.has_t(x):
            return self.isolate(x, kind, g, atom)
        return Free(simplify(node("ge" if kind == "lo" else "le", x, g)))


# --- ranges ----------------------------------------------------------------------------------
@dataclass
class TileRange:
    """Closed-form visit range of the target index for one tile of the other index.

    All fields are IR expressions over ``b``, ``h``, ``{other}_lo``, ``{other}_hi`` and
    ``{target}_max`` (the last valid target index); ranges are inclusive.
    """

    target: str
    other: str
    outer: tuple[Node, Node]
    inner: tuple[Node, Node]
    tile_check: bool  # tiles inside the outer range may still be empty: test each one
    formula: object


def _empty():
    return (const(1), const(0))


class _Ranges:
    def __init__(self, target, other):
        self.t_max = ir.var(f"{target}_max")
        self.ia = IntervalAnalysis({other: (ir.var(f"{other}_lo"), ir.var(f"{other}_hi"))})
        self.check = False

    def outer(self, f):
        if isinstance(f, Bound):
            lo, hi = self.ia(f.expr)
            if f.kind == "lo":
                return (lo if lo is not None else const(0), self.t_max)
            return (const(0), hi if hi is not None else self.t_max)
        if isinstance(f, Free):
            # uniform along the target: the range is all or nothing, never gappy
            must, may = self.ia(f.atom)
            return (const(0), node("where", may, self.t_max, const(-1)))
        if isinstance(f, Opaque):
            self.check = True
            return (const(0), self.t_max)
        parts = [self.outer(p) for p in f.parts]
        if isinstance(f, All):
            lo, hi = parts[0]
            for l2, h2 in parts[1:]:
                lo, hi = node("maximum", lo, l2), node("minimum", hi, h2)
            return (lo, hi)
        # a union of ranges that all start at 0 (or all end at the last index) has no gaps;
        # otherwise tiles between the parts may be empty and are tested one by one
        # (a Free part is all-or-nothing, so it cannot open a gap)
        solid = [p for p, sub in zip(parts, f.parts) if not isinstance(sub, Free)]
        anchored_low = all(ir.is_const(simplify(l), 0) for l, _ in solid)
        anchored_high = all(simplify(h) is self.t_max for _, h in solid)
        if len(solid) > 1 and not (anchored_low or anchored_high):
            self.check = True
        big = node("add", self.t_max, const(1))
        los = [node("where", node("le", l, h), l, big) for l, h in parts]
        his = [node("where", node("le", l, h), h, const(-1)) for l, h in parts]
        lo, hi = los[0], his[0]
        for l2, h2 in zip(los[1:], his[1:]):
            lo, hi = node("minimum", lo, l2), node("maximum", hi, h2)
        return (lo, hi)

    def inner(self, f):
        if isinstance(f, Bound):
            lo, hi = self.ia(f.expr)
            if f.kind == "lo":
                return (hi, self.t_max) if hi is not None else _empty()
            return (const(0), lo) if lo is not None else _empty()
        if isinstance(f, Free):
            must, _ = self.ia(f.atom)
            return (const(0), node("where", must, self.t_max, const(-1)))
        if isinstance(f, Opaque):
            return _empty()
        parts = [self.inner(p) for p in f.parts]
        lo, hi = parts[0]
        for l2, h2 in parts[1:]:
            if isinstance(f, All):
                lo, hi = node("maximum", lo, l2), node("minimum", hi, h2)
            else:
                lo, hi = _union(lo, hi, l2, h2)
        return (lo, hi)


def _union(l1, h1, l2, h2):
    """An interval inside ``[l1,h1] ∪ [l2,h2]``: the hull when they touch, else the longer."""
    e1, e2 = node("gt", l1, h1), node("gt", l2, h2)
    touch = node("and", node("le", l1, node("add", h2, const(1))), node("le", l2, node("add", h1, const(1))))
    longer1 = node("ge", node("sub", h1, l1), node("sub", h2, l2))
    lo = node("where", e1, l2, node("where", e2, l1, node("where", touch, node("minimum", l1, l2),
                                                             node("where", longer1, l1, l2))))
    hi = node("where", e1, h2, node("where", e2, h1, node("where", touch, node("maximum", h1, h2),
                                                             node("where", longer1, h1, h2))))
    return lo, hi


def is_data_dependent(mask: Node) -> bool:
    """True when the mask reads captured tensors at positions that vary with q or kv."""
    fv: dict = {}
    return any(ir.free_vars(n, fv) & {"q", "kv"} for n in ir.loads([mask]))


def tile_range(mask: Node, target: str = "kv") -> TileRange:
    """Closed-form outer/inner ranges of ``target`` for a tile of the other index."""
    other = "q" if target == "kv" else "kv"
    f = _Solver(target).formula(nnf(simplify(mask)))
    rg = _Ranges(target, other)
    outer = tuple(simplify(x) for x in rg.outer(f))
    inner = tuple(simplify(x) for x in rg.inner(f))
    return TileRange(target, other, outer, inner, rg.check, f)


def tile_class(mask: Node) -> tuple[Node, Node]:
    """``(full, nonempty)`` of a whole q×kv tile, over ``q_lo..q_hi`` and ``kv_lo..kv_hi``."""
    ia = IntervalAnalysis({"q": (ir.var("q_lo"), ir.var("q_hi")), "kv": (ir.var("kv_lo"), ir.var("kv_hi"))})
    must, may = ia(simplify(mask))
    return simplify(must), simplify(may)
