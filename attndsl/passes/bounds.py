"""Symbolic interval analysis: bounds of an IR expression over a tile, as IR expressions.

Given intervals for some variables (``q ∈ [q_lo, q_hi]``), :func:`interval` returns IR nodes
for a lower and an upper bound of a numeric expression, and for a boolean expression the pair
``(must, may)``: ``must`` is true only if the expression holds everywhere in the tile, ``may``
is false only if it holds nowhere. The bounds are themselves IR, so codegen emits them as a few
scalar instructions per tile: this is how the kernel classifies tiles with no block-mask tensor.
Bounds are sound but may be loose (a variable used twice loses its correlation); ``None`` means
unbounded on that side.
"""
from __future__ import annotations

from .. import ir
from ..ir import BOOL, FLOAT, INT, Node, const, node

TRUE, FALSE = const(True), const(False)
_MONOTONE = {"exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "floor", "to_float", "to_int"}


def _min(a, b):
    return None if a is None or b is None else node("minimum", a, b)


def _max(a, b):
    return None if a is None or b is None else node("maximum", a, b)


def _bin(op, a, b):
    return None if a is None or b is None else node(op, a, b)


class IntervalAnalysis:
    """Bounds for expressions given ``env: var name -> (lo, hi)``; other variables are exact."""

    def __init__(self, env: dict[str, tuple[Node, Node]], unbounded=(ir.SCORE,)):
        self.env = env
        self.unbounded = set(unbounded)
        self.varying = {k for k, (lo, hi) in env.items() if lo is not hi} | self.unbounded
        self.memo: dict[Node, tuple] = {}
        self.fv: dict = {}

    def exact(self, n: Node) -> bool:
        return not (ir.free_vars(n, self.fv) & self.varying)

    def __call__(self, n: Node):
        r = self.memo.get(n)
        if r is None:
            r = self._bool(n) if n.dtype == BOOL else self._num(n)
            self.memo[n] = r
        return r

    # numeric -----------------------------------------------------------------------------
    def _num(self, n: Node):
        if n.op == "var" and n.attr in self.env:
            return self.env[n.attr]
        if n.op == "var" and n.attr in self.unbounded:
            return (None, None)
        if self.exact(n):
            return (n, n)
        op, args = n.op, n.args
        if op == "load":
            return (None, None)
        a = self(args[0])
        if op == "neg":
            return (_un("neg", a[1]), _un("neg", a[0]))
        if op in _MONOTONE:
            return (_un(op, a[0]), _un(op, a[1]))
        if op == "bit_length":  # monotone in |x|
            lo, hi = self(node("abs", args[0]))
            return (_un(op, lo) if lo is not None else const(0), _un(op, hi))
        if op == "coord":
            return _coord_bounds(n, a)
        if op == "abs":
            lo, hi = a
            if lo is None or hi is None:
                return (const(0, n.dtype), None)
            zero = const(0, n.dtype)
            return (node("where", node("ge", lo, zero), lo,
                         node("where", node("le", hi, zero), node("neg", hi), zero)),
                    node("maximum", node("neg", lo), hi))
        if op == "where":
            c = self(args[0])
            x, y = self.branch(args[0], args[1], True), self.branch(args[0], args[2], False)
            lo, hi = _min(x[0], y[0]), _max(x[1], y[1])
            # each side on its own: one branch may be bounded below and not above (abs of a load)
            if lo is not None:
                lo = node("where", c[0], x[0], node("where", node("not", c[1]), y[0], lo))
            if hi is not None:
                hi = node("where", c[0], x[1], node("where", node("not", c[1]), y[1], hi))
            return (lo, hi)
        b = self(args[1])
        if op == "add":
            return (_bin("add", a[0], b[0]), _bin("add", a[1], b[1]))
        if op == "sub":
            return (_bin("sub", a[0], b[1]), _bin("sub", a[1], b[0]))
        if op == "minimum":
            return (_min(a[0], b[0]), a[1] if b[1] is None else b[1] if a[1] is None else node("minimum", a[1], b[1]))
        if op == "maximum":
            return (a[0] if b[0] is None else b[0] if a[0] is None else node("maximum", a[0], b[0]), _max(a[1], b[1]))
        if op == "mul":
            return self._mul(n, a, b)
        if op in ("shl", "shr"):  # monotone in each operand: the extremes sit at the corners
            if None in a or None in b:
                return (None, None)
            p = [node(op, i, j) for i in a for j in b]
            return (node("minimum", node("minimum", p[0], p[1]), node("minimum", p[2], p[3])),
                    node("maximum", node("maximum", p[0], p[1]), node("maximum", p[2], p[3])))
        d = args[1]
        if op in ("floordiv", "truediv") and d.op == "const" and ir.const_value(d) != 0:
            c = ir.const_value(d)
            lo, hi = (a[0], a[1]) if c > 0 else (a[1], a[0])
            return (_bin(op, lo, d), _bin(op, hi, d))
        if op == "mod" and d.op == "const" and ir.const_value(d) > 0 and n.dtype == INT:
            c = ir.const_value(d)
            full = (const(0), const(c - 1))
            if a[0] is None or a[1] is None:
                return full
            same = node("eq", node("floordiv", a[0], d), node("floordiv", a[1], d))
            return (node("where", same, node("mod", a[0], d), full[0]),
                    node("where", same, node("mod", a[1], d), full[1]))
        return (None, None)

    def branch(self, cond: Node, val: Node, taken: bool):
        """The interval of ``val`` where ``cond`` is ``taken`` (a branch of a ``where``): here
        simply val's; a subclass may use what cond says about val."""
        return self(val)

    def _mul(self, n, a, b):
        x, y = n.args
        for cnode, onode, ob in ((x, y, b), (y, x, a)):
            if cnode.op == "const":
                c = ir.const_value(cnode)
                if c >= 0:
                    return (_bin("mul", cnode, ob[0]), _bin("mul", cnode, ob[1]))
                return (_bin("mul", cnode, ob[1]), _bin("mul", cnode, ob[0]))
        if None in a or None in b:
            return (None, None)
        p = [node("mul", i, j) for i in a for j in b]
        return (node("minimum", node("minimum", p[0], p[1]), node("minimum", p[2], p[3])),
                node("maximum", node("maximum", p[0], p[1]), node("maximum", p[2], p[3])))

    # boolean -----------------------------------------------------------------------------
    def _bool(self, n: Node):
        if self.exact(n):
            return (n, n)
        op, args = n.op, n.args
        if op == "load":
            return (FALSE, TRUE)
        if op == "not":
            must, may = self(args[0])
            return (node("not", may), node("not", must))
        if op in ("and", "or"):
            a, b = self(args[0]), self(args[1])
            return (node(op, a[0], b[0]), node(op, a[1], b[1]))
        if op == "xor":
            return (FALSE, TRUE)
        if op == "where":
            c, x, y = (self(a) for a in args)
            must = node("or", node("or", node("and", c[0], x[0]), node("and", node("not", c[1]), y[0])),
                        node("and", x[0], y[0]))
            may = node("or", node("and", c[1], x[1]), node("and", node("not", c[0]), y[1]))
            return (must, may)
        if op in ("lt", "le", "gt", "ge"):
            a, b = self(args[0]), self(args[1])
            if op in ("gt", "ge"):
                a, b = b, a
                op = "lt" if op == "gt" else "le"
            must = FALSE if a[1] is None or b[0] is None else node(op, a[1], b[0])
            may = TRUE if a[0] is None or b[1] is None else node(op, a[0], b[1])
            return (must, may)
        if op in ("eq", "ne"):
            a, b = self(args[0]), self(args[1])
            if None in a or None in b:
                eq = (FALSE, TRUE)
            else:
                eq_must = node("and", node("and", node("eq", a[0], a[1]), node("eq", b[0], b[1])),
                               node("eq", a[0], b[0]))
                eq_may = node("and", node("le", a[0], b[1]), node("le", b[0], a[1]))
                eq = (eq_must, eq_may)
            return eq if op == "eq" else (node("not", eq[1]), node("not", eq[0]))
        if op in ("minimum", "maximum"):  # on booleans: and / or
            a, b = self(args[0]), self(args[1])
            o = "and" if op == "minimum" else "or"
            return (node(o, a[0], b[0]), node(o, a[1], b[1]))
        return (FALSE, TRUE)


def _un(op, x):
    return None if x is None else node(op, x)


def _coord_bounds(n: Node, a):
    """Layout coordinate of an index in ``[lo, hi]``: axes below the first lie in ``[0, shape-1]``;
    the first is ``t0 * tile_row + in_tile``, monotone in its tile row (also outside the grid)."""
    from ..ir.coords import Grid

    g = Grid.of(n.attr)
    axis = n.attr[3]
    if axis > 0:
        return (const(0), const(g.shape[axis] - 1))
    lo, hi = a
    div = g.size // g.counts[0]
    t0 = g.tile[0]

    def row(x):
        if x is None:
            return None
        local = node("sub", x, const(g.prefix)) if g.prefix else x
        r = node("floordiv", local, const(div)) if div != 1 else local
        return node("mul", r, const(t0)) if t0 != 1 else r

    rl, rh = row(lo), row(hi)
    return (rl, node("add", rh, const(t0 - 1)) if rh is not None and t0 != 1 else rh)

