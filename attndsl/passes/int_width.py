"""Integer widths: which integer nodes a kernel must compute in 64 bits to match torch's int64.

torch (and so FlexAttention's eager path and ``attndsl.reference``) does index arithmetic in
int64; a kernel's positions are int32, and int32 arithmetic is what keeps masks cheap. This pass
bounds every integer node over every legal call, exactly (Python integers, no overflow of its
own), and marks *wide* the nodes whose value can leave the int32 range: codegen computes those
in int64 and everything else in int32. The decision is made once per IR, not per call: a
kernel compiled once serves every length, and a call costs nothing more than the check that its
extents are legal (:func:`check_extents`).

The domain is every call with batch, heads and lengths below :data:`MAX_EXTENT` (``2**30``): the
index variables ``b, h, q, kv`` and the tile variables codegen derives from them (``q_lo``,
``kv_hi``, ``q_max``, layout coordinates ``q_c0_lo``...) lie in ``[0, MAX_EXTENT - 1]``. The cap
is what keeps the common patterns 32-bit at every length: ``q - kv``, ``q + kv``, ``q // W``,
``q % W``, a tile bound ``q_hi + W`` for a window ``W < 2**30`` never leave int32, whereas
``(q - kv) * 100000007``, ``(q - kv) ** 2`` or ``q * kv`` can, and are computed in int64 even at
``L = 48``. Values read from captured integer tensors range over their dtype (an int64 tensor's
values, and what is computed from them, stay int64); constants of ``2**31`` or more are int64.

The rules are those of :class:`passes.bounds.IntervalAnalysis` (inclusion-monotone interval
arithmetic, ``where`` narrowed by its condition as in ``passes.index_range``), evaluated on numbers
instead of building IR: the bounds here are constants, and evaluating symbolic bounds would need
exact arithmetic anyway.
"""
from __future__ import annotations

import math
import re

from .. import ir
from ..ir import BOOL, FLOAT, INT, Node

#: Batch, heads and sequence lengths must stay below this (``runtime`` refuses larger calls).
MAX_EXTENT = 1 << 30
INT32 = (-(1 << 31), (1 << 31) - 1)
INT64 = (-(1 << 63), (1 << 63) - 1)
_INF = math.inf

#: Variables codegen binds to positions, tile bounds, lengths - 1 or layout coordinates.
_POSITION = re.compile(r"^(b|h|q|kv)(_c\d+)?(_lo|_hi|_max|_last)?$")
_INT_RANGE = {
    "int8": (-(1 << 7), (1 << 7) - 1), "uint8": (0, 255), "int16": (-(1 << 15), (1 << 15) - 1),
    "uint16": (0, (1 << 16) - 1), "int32": INT32, "uint32": (0, (1 << 32) - 1), "int64": INT64,
}


def var_range(name: str, dtype: str) -> tuple:
    """The interval of a variable over every legal call."""
    if dtype == FLOAT:
        return (-_INF, _INF)
    if dtype == BOOL:
        return (0, 1)
    if _POSITION.match(name):
        return (0, MAX_EXTENT - 1)
    if name == "dist":  # q - kv (passes/diagonal.py)
        return (1 - MAX_EXTENT, MAX_EXTENT - 1)
    return INT32  # any other integer codegen binds is an int32 value


def load_range(n: Node) -> tuple:
    """The values a load can read: its tensor's dtype range (bool 0/1, floats unbounded)."""
    kind, tdt = n.attr[1], n.attr[3]
    if kind == BOOL:
        return (0, 1)
    if kind == FLOAT:
        return (-_INF, _INF)
    return _INT_RANGE.get(str(tdt).replace("torch.", ""), INT64)


def _fits(r, limits=INT32) -> bool:
    return limits[0] <= r[0] and r[1] <= limits[1]


def _corners(f, a, b):
    vals = [f(x, y) for x in a for y in b]
    if any(v != v for v in vals):  # NaN: inf * 0 and the like
        return (-_INF, _INF)
    return (min(vals), max(vals))


def _mul(x, y):
    if (x == 0 and abs(y) == _INF) or (y == 0 and abs(x) == _INF):
        return 0
    return x * y


def _floor(x):
    return x if abs(x) == _INF else math.floor(x)



def _bitwise(op: str, x: tuple, y: tuple) -> tuple:
    """Bounds of ``x & y``, ``x | y``, ``x ^ y`` (two's complement, as torch's int64): with both
    operands non-negative, ``&`` lies in [0, min(highs)] and ``|``/``^`` in [0, 2**k - 1] for k bits
    of the larger high; otherwise any value of ``k + 1`` signed bits."""
    if _INF in (abs(x[0]), abs(x[1]), abs(y[0]), abs(y[1])):
        return (-_INF, _INF)
    k = max(int(v).bit_length() for v in (*x, *y))
    if x[0] >= 0 and y[0] >= 0:
        return (0, min(x[1], y[1])) if op == "bitand" else (0, (1 << k) - 1)
    return (-(1 << k), (1 << k) - 1)

class IntWidths:
    """Intervals of IR nodes over every legal call, and which integer nodes need 64 bits.

    ``ranges(n)`` is ``(lo, hi)`` (Python ints for integer nodes, floats with ±inf for floating
    ones, ``(0, 1)`` for booleans); ``wide(n)`` says whether an integer node must be computed in
    int64. Results are memoised per node (nodes are interned, so one instance serves any IR).
    """

    def __init__(self):
        self.memo: dict[Node, tuple] = {}

    def wide(self, n: Node) -> bool:
        """Whether integer node ``n`` must be computed in 64 bits: its value, or the intermediate
        its code computes (``q * b`` inside a floor division by a non-constant ``b``), can leave
        int32 on some legal call."""
        if n.dtype != INT:
            return False
        if not _fits(self.ranges(n)):
            return True
        if n.op in ("floordiv", "mod") and not (n.args[1].op == "const" and ir.const_value(n.args[1]) > 0):
            x, y = (self.ranges(a) for a in n.args)
            return not _fits((-abs(x[0]) - max(abs(y[0]), abs(y[1])), abs(x[1]) + max(abs(y[0]), abs(y[1]))))
        return False

    def ranges(self, n: Node) -> tuple:
        r = self.memo.get(n)
        if r is None:
            for m in ir.topo_order([n]):  # operands first: no deep recursion on long chains
                if m not in self.memo:
                    self.memo[m] = self._range(m)
            r = self.memo[n]
        return r

    def _range(self, n: Node) -> tuple:
        op, dt = n.op, n.dtype
        if dt == BOOL:
            return (0, 1)
        if op == "const":
            v = ir.const_value(n)
            return (v, v)
        if op == "var":
            return var_range(n.attr, dt)
        if op == "load":
            return load_range(n)
        if op == "coord":  # what codegen emits for it
            return self.ranges(ir.coords.coord_expr(n.attr, n.args[0]))
        r = self._arith(n, [self.memo[a] for a in n.args])
        if dt == INT:
            lo, hi = r
            lo = INT64[0] if lo == -_INF or lo != lo else int(lo)
            hi = INT64[1] if hi == _INF or hi != hi else int(hi)
            return (lo, hi)
        return r

    def _arith(self, n: Node, a: list) -> tuple:
        op = n.op
        x = a[0]
        if op == "neg":
            return (-x[1], -x[0])
        if op == "abs":
            if x[0] >= 0:
                return x
            if x[1] <= 0:
                return (-x[1], -x[0])
            return (0, max(-x[0], x[1]))
        if op in ("to_float", "floor"):
            return (_floor(x[0]), _floor(x[1])) if op == "floor" else x
        if op == "to_int":  # truncation toward zero
            return (math.trunc(x[0]) if abs(x[0]) != _INF else x[0], math.trunc(x[1]) if abs(x[1]) != _INF else x[1])
        if op in ("exp", "exp2", "sqrt", "log", "log2", "tanh", "sigmoid"):
            return _monotone(op, x)
        if op == "erf":
            return (-1.0, 1.0)
        if op == "bit_length":
            m = max(abs(x[0]), abs(x[1]))
            return (0, int(m).bit_length() if m != _INF else 64)
        if op == "where":
            y, z = self._narrowed(n.args[0], n.args[1], True), self._narrowed(n.args[0], n.args[2], False)
            return (min(y[0], z[0]), max(y[1], z[1]))
        y = a[1]
        if op == "add":
            r = (x[0] + y[0], x[1] + y[1])
            return r if r[0] == r[0] and r[1] == r[1] else (-_INF, _INF)
        if op == "sub":
            return _corners(lambda p, s: p - s, x, y)
        if op == "mul":
            return _corners(_mul, x, y)
        if op == "minimum":
            return (min(x[0], y[0]), min(x[1], y[1]))
        if op == "maximum":
            return (max(x[0], y[0]), max(x[1], y[1]))
        if op == "truediv":
            if y[0] <= 0 <= y[1]:
                return (-_INF, _INF)
            return _corners(lambda p, s: p / s, x, y)
        if op == "floordiv":
            return self._floordiv(n, x, y)
        if op == "mod":
            return _mod(x, y, n.dtype)
        if op in ("shl", "shr"):
            if y[0] < 0 or y[1] > 62:
                return (-_INF, _INF) if op == "shl" else (min(x[0], 0), max(x[1], 0))
            f = (lambda p, s: p * (1 << s)) if op == "shl" else (lambda p, s: p // (1 << s) if abs(p) != _INF else p)
            return _corners(f, x, (int(y[0]), int(y[1])))
        if op in ("bitand", "bitor", "bitxor"):
            return _bitwise(op, x, y)
        raise NotImplementedError(f"no interval rule for IR op '{op}'")

    def _floordiv(self, n, x, y):
        if n.dtype == FLOAT:
            if y[0] <= 0 <= y[1]:
                return (-_INF, _INF)
            return _corners(lambda p, s: _floor(p / s), x, y)
        if y[0] > 0 or y[1] < 0:  # monotone in each operand on one side of zero: the corners
            return _corners(lambda p, s: p // s if abs(p) != _INF else p * (1 if s > 0 else -1), x, y)
        m = max(abs(x[0]), abs(x[1]))  # |x // y| <= |x| for any nonzero integer y
        return (-m, m)

    def _narrowed(self, cond: Node, val: Node, taken: bool):
        """The interval of ``val`` where ``cond`` is ``taken``, clipped when cond compares val with
        something (``where(d < K, d, bucket)``: T5 buckets), as ``passes.index_range`` does."""
        lo, hi = self.ranges(val)
        if cond.op not in _FLIP:
            return (lo, hi)
        op = cond.op if taken else _NEGATE[cond.op]
        a, b = cond.args
        if a is val:
            other = b
        elif b is val:
            other, op = a, _FLIP[op]
        else:
            return (lo, hi)
        olo, ohi = self.ranges(other)
        step = 1 if val.dtype == INT and op in ("lt", "gt") else 0
        if op in ("lt", "le"):
            hi = min(hi, ohi - step)
        else:
            lo = max(lo, olo + step)
        return (lo, hi) if lo <= hi else self.ranges(val)


_FLIP = {"lt": "gt", "le": "ge", "gt": "lt", "ge": "le"}
_NEGATE = {"lt": "ge", "le": "gt", "gt": "le", "ge": "lt"}


def _mod(x, y, dtype):
    """``x mod y`` with the divisor's sign (torch.remainder): within ``(-|y|, |y|)``."""
    if abs(y[0]) == _INF or abs(y[1]) == _INF:
        m = _INF
    else:
        m = max(abs(y[0]), abs(y[1]))
    if dtype == INT and m != _INF:
        m -= 1
    if y[0] > 0:
        return (0, min(m, x[1]) if x[0] >= 0 else m)
    if y[1] < 0:
        return (-m, 0)
    return (-m, m)


def _monotone(op, x):
    f = {"exp": math.exp, "exp2": lambda v: 2.0 ** v, "sqrt": math.sqrt, "log": math.log, "log2": math.log2,
         "tanh": math.tanh, "sigmoid": lambda v: 1 / (1 + math.exp(-v))}[op]

    def at(v, low):
        try:
            return f(v)
        except (ValueError, OverflowError):
            if op in ("log", "log2", "sqrt") and v <= 0:
                return -_INF if low else (0.0 if op == "sqrt" else -_INF)
            if op == "sigmoid":
                return 0.0 if v < 0 else 1.0
            return _INF if v > 0 else 0.0

    lo, hi = at(x[0], True), at(x[1], False)
    if op in ("log", "log2", "sqrt") and x[0] < 0:
        lo = -_INF  # NaN below the domain: unbounded
    return (lo, hi)


_SHARED = IntWidths()


def wide(n: Node) -> bool:
    """Whether integer node ``n`` must be computed in 64 bits (memoised across calls)."""
    return _SHARED.wide(n)


def value_range(n: Node) -> tuple:
    """``n``'s interval over every legal call (see :class:`IntWidths`)."""
    return _SHARED.ranges(n)


def wide_nodes(roots) -> frozenset:
    """The integer nodes reachable from ``roots`` that need 64 bits (what the KernelSpec records)."""
    roots = [r for r in roots if r is not None]
    out = set()
    for n in ir.topo_order(roots):
        if n.op == "coord":
            out |= wide_nodes([ir.coords.coord_expr(n.attr, n.args[0])])
        elif wide(n):
            out.add(n)
    return frozenset(out)


def check_extents(shape) -> None:
    """Refuses a call whose batch, heads or lengths reach :data:`MAX_EXTENT` (the integer widths
    of every kernel are decided for extents below it)."""
    for name, n in zip(("batch", "heads", "query length", "key length"), shape):
        if n >= MAX_EXTENT:
            raise ValueError(f"{name} {n} is too large: batch, heads and sequence lengths must be below "
                             f"2**30 = {MAX_EXTENT} (kernel index arithmetic is sized for that)")


def spec_roots(spec) -> list:
    """Every IR root of a KernelSpec that codegen emits: the mask and score modifier, their
    derivative and gradient loads, the tile classifications and the visit plans."""
    roots = [spec.mask, spec.score, spec.dscore, spec.tile_full, spec.tile_nonempty]
    roots += [g.grad for g in spec.grad_loads] + [g.load for g in spec.grad_loads]
    for rng in (spec.fwd_range, spec.bwd_range, spec.dq_range):
        if rng is None:
            continue
        flat = getattr(rng, "flat", rng)
        if flat is not None:
            roots += [*flat.outer, *flat.inner]
        for axis in getattr(rng, "box_outer", ()) + getattr(rng, "box_inner", ()):
            roots += list(axis)
        roots += [getattr(rng, "tile_full", None), getattr(rng, "tile_nonempty", None)]
        for extra in getattr(rng, "extras", ()):
            roots += [*extra.range.outer, *extra.range.inner, extra.tile_full, extra.tile_nonempty]
    return [r for r in roots if isinstance(r, Node)]
