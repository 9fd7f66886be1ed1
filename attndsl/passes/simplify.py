"""simplify: constant folding, algebraic identities and sympy canonical forms of index arithmetic.

CSE needs no pass of its own: IR nodes are interned, so equal sub-expressions are one node.
Canonical forms make ``q + 1 - kv`` and ``(q - kv) + 1`` the same node, so patterns that differ
only in how they were written share one cache entry and one block analysis.
"""
from __future__ import annotations

import math
import weakref

import sympy

from .. import ir
from ..ir import BOOL, FLOAT, INT, Node, const, const_value, is_const, node

_AFFINE_OPS = {"add", "sub", "mul", "neg"}
_MEMO: "weakref.WeakKeyDictionary[Node, Node]" = weakref.WeakKeyDictionary()

_FOLD = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "truediv": lambda a, b: a / b if b != 0 else None,
    "floordiv": lambda a, b: (a // b if b != 0 else None),
    "mod": lambda a, b: (a % b if b != 0 else None),
    "minimum": min, "maximum": max,
    "lt": lambda a, b: a < b, "le": lambda a, b: a <= b, "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b, "eq": lambda a, b: a == b, "ne": lambda a, b: a != b,
    "and": lambda a, b: a and b, "or": lambda a, b: a or b, "xor": lambda a, b: a != b,
    "neg": lambda a: -a, "abs": abs, "not": lambda a: not a,
    "exp": math.exp, "exp2": lambda a: 2.0 ** a, "log": lambda a: math.log(a) if a > 0 else None,
    "log2": lambda a: math.log2(a) if a > 0 else None, "sqrt": lambda a: math.sqrt(a) if a >= 0 else None,
    "tanh": math.tanh, "sigmoid": lambda a: 1 / (1 + math.exp(-a)), "floor": math.floor,
    "to_float": float, "to_int": math.trunc,
    "bit_length": lambda a: abs(a).bit_length(),
    "shl": lambda a, b: a << b if 0 <= b < 63 else None, "shr": lambda a, b: a >> b if 0 <= b < 63 else None,
    "bitand": lambda a, b: a & b, "bitor": lambda a, b: a | b, "bitxor": lambda a, b: a ^ b, "erf": math.erf,
}
_NEGATE = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt", "eq": "ne", "ne": "eq"}


def _fold(op, args, dtype):
    if not all(a.op == "const" for a in args) or op not in _FOLD:
        return None
    try:
        v = _FOLD[op](*(const_value(a) for a in args))
    except (OverflowError, ValueError, ZeroDivisionError):
        return None
    if v is None:
        return None
    if dtype == FLOAT:
        v = float(v)
    elif dtype == INT:
        v = int(v)
    else:
        v = bool(v)
    return const(v, dtype)


def _local(n: Node, args) -> Node:
    """Rebuild ``n`` on simplified operands, applying local identities."""
    op = n.op
    f = _fold(op, args, n.dtype)
    if f is not None:
        return f
    if op == "coord" and args[0].op == "const":
        from ..ir.coords import coord_value
        return const(coord_value(n.attr, const_value(args[0])))
    a = args[0] if args else None
    b = args[1] if len(args) > 1 else None
    if op in ("floordiv", "mod") and n.dtype == INT and is_const(b, 0):
        return node(op, a, b)  # the divisor simplified to 0: ir.node raises the PatternError
    zero = 0 if n.dtype == INT else 0.0
    if op == "add":
        if is_const(a) and const_value(a) == 0 and n.dtype == INT:
            return b
        if is_const(b) and const_value(b) == 0:
            return a
    elif op == "sub" and is_const(b) and const_value(b) == 0:
        return a
    elif op == "mul":
        for x, y in ((a, b), (b, a)):
            if is_const(x) and const_value(x) == 1:
                return y
            if is_const(x) and const_value(x) == 0 and n.dtype == INT:
                return const(0)
    elif op in ("truediv", "floordiv") and is_const(b) and const_value(b) == 1:
        return a if op == "floordiv" else a if a.dtype == FLOAT else ir.coerce(a, FLOAT)
    elif op == "mod" and is_const(b) and const_value(b) in (1, -1) and n.dtype == INT:
        return const(0)
    elif op in ("minimum", "maximum") and a is b:
        return a
    elif op in ("minimum", "maximum") and n.dtype == INT and (a.op == op or b.op == op):
        # op(op(x, y), y) = op(x, y); op(op(x, c1), c2) = op(x, op(c1, c2)) (clamp chains of plans)
        for x, y in ((a, b), (b, a)):
            if x.op != op:
                continue
            if y is x.args[0] or y is x.args[1]:
                return x
            if y.op == "const":
                for i in (0, 1):
                    if x.args[i].op == "const":
                        c = _fold(op, (x.args[i], y), n.dtype)
                        return ir.nodes._make(op, (x.args[1 - i], c), n.dtype, n.attr)
    elif op == "and":
        for x, y in ((a, b), (b, a)):
            if is_const(x):
                return y if const_value(x) else const(False)
        if a is b:
            return a
    elif op == "or":
        for x, y in ((a, b), (b, a)):
            if is_const(x):
                return const(True) if const_value(x) else y
        if a is b:
            return a
    elif op == "not":
        if a.op == "not":
            return a.args[0]
        # only for integers: with a NaN operand, not(a < b) is true but a >= b is false
        if a.op in _NEGATE and a.args[0].dtype != FLOAT:
            return node(_NEGATE[a.op], *a.args)
    elif op == "neg" and a.op == "neg":
        return a.args[0]
    elif op == "where":
        c, x, y = args
        if is_const(c):
            return x if const_value(c) else y
        if x is y:
            return x
    elif op in ("to_float", "to_int") and a.dtype == n.dtype:
        return a
    if all(x is y for x, y in zip(args, n.args)):
        return n
    return ir.nodes._make(op, tuple(args), n.dtype, n.attr)


class _Sympy:
    """Converts maximal integer add/sub/mul trees to sympy and back in canonical order."""

    def __init__(self):
        self.opaque: dict[sympy.Symbol, Node] = {}
        self.sym_of: dict[Node, sympy.Symbol] = {}

    def to_sympy(self, n: Node):
        if n.op == "const":
            return sympy.Integer(const_value(n))
        if n.op in _AFFINE_OPS and n.dtype == INT:
            a = [self.to_sympy(x) for x in n.args]
            if n.op == "add":
                return a[0] + a[1]
            if n.op == "sub":
                return a[0] - a[1]
            if n.op == "mul":
                return a[0] * a[1]
            return -a[0]
        s = self.sym_of.get(n)
        if s is None:
            # opaque sub-terms are named by their structure, so sympy orders them canonically
            name = n.attr if n.op == "var" else f"_o{ir.structural_hash(n)[:12]}"
            s = sympy.Symbol(name, integer=True)
            self.sym_of[n] = s
            self.opaque[s] = n
        return s

    def _monomial(self, factors) -> Node:
        r = None
        for f in factors:
            base, exp = f.as_base_exp()
            for _ in range(int(exp)):
                x = self.opaque[base]
                r = x if r is None else node("mul", r, x)
        return r

    def from_sympy(self, e) -> Node:
        e = sympy.expand(e)
        terms = e.as_ordered_terms()
        out = None
        # constants last, positive terms first so "q - kv + 1" reads naturally
        terms = sorted(terms, key=lambda t: (bool(t.is_number), bool(t.as_coeff_Mul()[0] < 0)))
        for t in terms:
            c, rest = t.as_coeff_Mul()
            c = int(c)
            if rest == 1:
                mono, mag = None, abs(c)
            else:
                mono = self._monomial(rest.as_ordered_factors())
                mag = abs(c)
            if mono is None:
                term = const(mag)
            elif mag == 1:
                term = mono
            else:
                term = node("mul", const(mag), mono)
            if out is None:
                out = term if c >= 0 else (const(c) if mono is None else node("neg", term))
            else:
                out = node("add" if c >= 0 else "sub", out, term)
        return out if out is not None else const(0)


def _is_affine_root(n: Node) -> bool:
    return n.dtype == INT and n.op in _AFFINE_OPS


def simplify(n: Node) -> Node:
    """Return an equivalent, canonical node."""
    r = _MEMO.get(n)
    if r is None:
        r = _simplify(n, {})
        _MEMO[n] = r
        _MEMO[r] = r
    return r


def _simplify(n: Node, memo: dict) -> Node:
    r = memo.get(n)
    if r is not None:
        return r
    if not n.args:
        r = n
    elif _is_affine_root(n):
        conv = _Sympy()
        # simplify the opaque leaves first, then canonicalise the affine tree over them
        e = conv.to_sympy(_rebuild_leaves(n, memo))
        r = conv.from_sympy(e)
    else:
        r = _local(n, [_simplify(a, memo) for a in n.args])
        if r is not n and r.args and r.op != n.op:
            r = _simplify(r, memo)
    memo[n] = r
    return r


def _rebuild_leaves(n: Node, memo) -> Node:
    if _is_affine_root(n):
        args = [_rebuild_leaves(a, memo) for a in n.args]
        return ir.nodes._make(n.op, tuple(args), n.dtype, n.attr)
    return _simplify(n, memo)
