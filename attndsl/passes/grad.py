"""Symbolic derivatives of IR expressions (forward-mode over the DAG).

The backward kernels need ``∂score_mod/∂score`` elementwise; later, gradients into captured
tensors need ``∂score_mod/∂load``. Differentiating the IR directly keeps ``where``, ``minimum``,
loads and index arithmetic intact (sympy's Piecewise/Min/Max derivatives would bring Heaviside
and DiracDelta terms back that we would have to translate away); the result goes through
:func:`simplify`, which uses sympy for the index arithmetic it contains.
"""
from __future__ import annotations

from .. import ir
from ..ir import BOOL, FLOAT, Node, const, node
from .simplify import simplify

ZERO, ONE = const(0.0), const(1.0)
_LN2 = 0.6931471805599453
_TWO_OVER_SQRT_PI = 1.1283791670955126


def derivative(expr: Node, wrt: Node) -> Node:
    """``d expr / d wrt`` for a float expression; ``wrt`` is a variable or any sub-node."""
    memo: dict[Node, Node] = {}
    fv: dict = {}
    dep: dict[Node, bool] = {}

    def depends(n):
        if n is wrt:
            return True
        if wrt.op == "var":
            return wrt.attr in ir.free_vars(n, fv)
        r = dep.get(n)
        if r is None:
            r = dep[n] = any(depends(a) for a in n.args)
        return r

    def d(n: Node) -> Node:
        r = memo.get(n)
        if r is not None:
            return r
        if n is wrt:
            r = ONE
        elif n.dtype != FLOAT or not depends(n):
            r = ZERO
        else:
            r = _rule(n, d)
        memo[n] = r
        return r

    return simplify(d(expr))


def _mul(x: Node, y: Node) -> Node:
    """Product that drops structurally-zero terms (simplify must keep float ``x * 0``: inf/nan)."""
    if x is ZERO or y is ZERO:
        return ZERO
    return y if x is ONE else x if y is ONE else node("mul", x, y)


def _add(x: Node, y: Node) -> Node:
    return y if x is ZERO else x if y is ZERO else node("add", x, y)


def _sub(x: Node, y: Node) -> Node:
    return x if y is ZERO else node("neg", y) if x is ZERO else node("sub", x, y)


def _rule(n: Node, d) -> Node:
    op, a = n.op, n.args
    mul, add, sub = _mul, _add, _sub
    if op == "add":
        return add(d(a[0]), d(a[1]))
    if op == "sub":
        return sub(d(a[0]), d(a[1]))
    if op == "neg":
        return node("neg", d(a[0]))
    if op == "mul":
        return add(mul(d(a[0]), a[1]), mul(a[0], d(a[1])))
    if op == "truediv":
        # (u/v)' = u'/v - u v' / v^2
        da, db = d(a[0]), d(a[1])
        t1 = ZERO if da is ZERO else node("truediv", da, a[1])
        t2 = ZERO if db is ZERO else node("truediv", mul(a[0], db), mul(a[1], a[1]))
        return sub(t1, t2)
    if op == "exp":
        return mul(n, d(a[0]))
    if op == "exp2":
        return mul(mul(n, const(_LN2)), d(a[0]))
    if op == "log":
        return node("truediv", d(a[0]), a[0])
    if op == "log2":
        return node("truediv", d(a[0]), mul(a[0], const(_LN2)))
    if op == "sqrt":
        return node("truediv", d(a[0]), mul(const(2.0), n))
    if op == "tanh":
        return mul(sub(ONE, mul(n, n)), d(a[0]))
    if op == "erf":  # 2/sqrt(pi) exp(-x^2)
        return mul(mul(const(_TWO_OVER_SQRT_PI), node("exp", node("neg", mul(a[0], a[0])))), d(a[0]))
    if op == "sigmoid":
        return mul(mul(n, sub(ONE, n)), d(a[0]))
    if op == "abs":
        return mul(node("where", node("ge", a[0], ZERO), ONE, const(-1.0)), d(a[0]))
    if op in ("floor", "to_float"):
        return ZERO if op == "floor" else d(a[0])
    if op == "where":
        return node("where", a[0], d(a[1]), d(a[2]))
    if op == "minimum":
        return node("where", node("le", a[0], a[1]), d(a[0]), d(a[1]))
    if op == "maximum":
        return node("where", node("ge", a[0], a[1]), d(a[0]), d(a[1]))
    if op in ("floordiv", "mod"):
        # piecewise constant (floordiv) or identity slope (mod) in the float operand
        return ZERO if op == "floordiv" else d(a[0])
    raise NotImplementedError(f"no derivative rule for '{op}'")
