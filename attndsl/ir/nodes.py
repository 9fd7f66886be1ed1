"""IR nodes: a typed, hash-consed expression DAG.

Every node is interned: building the same structure twice returns the same object, so
common sub-expressions are shared for free and node identity is structural equality.
Types are deliberately few: ``int`` (index arithmetic), ``float`` (scores, fp32 in kernels)
and ``bool`` (masks).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

INT, FLOAT, BOOL = "int", "float", "bool"

#: Index variables a pattern sees, plus the score of a score modifier.
INDEX_VARS = ("b", "h", "q", "kv")
SCORE = "score"

ARITH = {"add", "sub", "mul", "truediv", "floordiv", "mod", "minimum", "maximum"}
COMPARE = {"lt", "le", "gt", "ge", "eq", "ne"}
LOGIC = {"and", "or", "xor"}
UNARY_FLOAT = {"exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid", "floor", "erf"}
UNARY = UNARY_FLOAT | {"neg", "abs", "not", "to_float", "to_int"}
#: Integer-only ops: ``bit_length(x)`` (of ``|x|``, as Python's ``int.bit_length``), shifts
#: ``shl(a, s) = a * 2**s`` and ``shr(a, s) = floor(a / 2**s)``; ``coord`` (built by :func:`coord`)
#: is a layout coordinate of an index, its layout and axis in ``attr`` (see ``ir/coords.py``);
#: ``bitand``/``bitor``/``bitxor`` are two's-complement bitwise ops on integers (``&``, ``|``, ``^``
#: of bool operands stay the logic ops ``and``/``or``/``xor``).
INT_OPS = {"bit_length", "shl", "shr", "coord", "bitand", "bitor", "bitxor"}

_INTERN: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()


@dataclass(frozen=True, eq=False)
class Buffer:
    """A captured tensor as the kernel sees it: a slot, an element kind and a rank.

    Shapes and strides are runtime arguments, so they are not part of the key."""

    slot: int
    kind: str  # INT, FLOAT or BOOL
    ndim: int
    torch_dtype: str  # e.g. "float32", kept for the kernel (load dtype) and the printer

    def key(self):
        return (self.slot, self.kind, self.ndim, self.torch_dtype)


class Node:
    """One IR value. Build nodes with :func:`node`, :func:`const`, :func:`var`, :func:`load`."""

    __slots__ = ("op", "args", "dtype", "attr", "__weakref__", "_hash")

    def __init__(self, op, args, dtype, attr):
        self.op = op
        self.args = args
        self.dtype = dtype
        self.attr = attr
        self._hash = None

    def __repr__(self):
        return f"<{self.dtype} {expr_str(self)}>"

    # Nodes are interned, so identity is structural equality.
    __hash__ = object.__hash__


def _make(op, args, dtype, attr=None):
    key = (op, dtype, attr, tuple(id(a) for a in args))
    n = _INTERN.get(key)
    if n is None:
        n = Node(op, tuple(args), dtype, attr)
        _INTERN[key] = n
    return n


def const(value, dtype=None):
    if dtype is None:
        dtype = BOOL if isinstance(value, bool) else INT if isinstance(value, int) else FLOAT
    if dtype == BOOL:
        value = bool(value)
    elif dtype == INT:
        value = int(value)
    else:
        value = float(value)
    # -0.0 and 0.0 print alike; keep one so hashes agree.
    if dtype == FLOAT and value == 0.0:
        value = 0.0
    return _make("const", (), dtype, ("c", value, repr(value)))


def const_value(n: Node):
    return n.attr[1]


def is_const(n: Node, value=None) -> bool:
    if n.op != "const":
        return False
    return value is None or (n.attr[1] == value and not (isinstance(value, bool) ^ (n.dtype == BOOL)))


def var(name: str, dtype: str = INT) -> Node:
    return _make("var", (), dtype, name)


def load(buf: Buffer, index: tuple[Node, ...]) -> Node:
    if len(index) != buf.ndim:
        raise ValueError(f"buffer of rank {buf.ndim} indexed with {len(index)} indices")
    return _make("load", tuple(index), buf.kind, buf.key())


def coord(index: Node, attr: tuple) -> Node:
    """Layout coordinate of an integer index; ``attr = (shape, tile, prefix, axis)`` (ir/coords.py)."""
    if index.dtype == FLOAT:
        raise TypeError("a layout coordinate needs an integer index")
    return _make("coord", (coerce(index, INT),), INT, tuple(attr))


def buffer_of(n: Node) -> Buffer:
    slot, kind, ndim, tdt = n.attr
    return Buffer(slot, kind, ndim, tdt)


def result_type(op: str, args) -> str:
    kinds = [a.dtype for a in args]
    if op in INT_OPS:
        return INT
    if op in COMPARE or op in LOGIC or op == "not":
        return BOOL
    if op in UNARY_FLOAT or op in ("truediv", "to_float"):
        return FLOAT
    if op == "to_int":
        return INT
    if op == "where":
        kinds = kinds[1:]
    if FLOAT in kinds:
        return FLOAT
    if op in ("neg", "abs", "add", "sub", "mul", "floordiv", "mod", "minimum", "maximum", "where"):
        if all(k == BOOL for k in kinds) and op in ("minimum", "maximum", "where"):
            return BOOL
        return INT
    raise ValueError(f"unknown op {op}")


def node(op: str, *args: Node) -> Node:
    """Build (or find) the node ``op(*args)`` with its result type inferred."""
    for a in args:
        if not isinstance(a, Node):
            raise TypeError(f"IR argument must be a Node, got {type(a).__name__}")
    if op == "where":
        c, a, b = args
        if c.dtype != BOOL:
            raise TypeError("where() condition must be boolean")
        dtype = result_type(op, args)
        args = (c, coerce(a, dtype), coerce(b, dtype))
    elif op in LOGIC or op == "not":
        if any(a.dtype != BOOL for a in args):
            raise TypeError(f"'{op}' needs boolean operands")
        dtype = BOOL
    elif op in ("to_float", "to_int"):
        dtype = result_type(op, args)
    elif op in INT_OPS:
        if op == "coord":
            raise TypeError("build coordinate nodes with ir.coord(index, attr)")
        if any(a.dtype == FLOAT for a in args):
            raise TypeError(f"'{op}' needs integer operands")
        dtype = INT
        args = tuple(coerce(a, INT) for a in args)
    else:
        dtype = result_type(op, args)
        if op in COMPARE or op in ARITH:
            common = FLOAT if FLOAT in (a.dtype for a in args) else INT
            args = tuple(coerce(a, common) for a in args)
        elif op in UNARY_FLOAT:
            args = tuple(coerce(a, FLOAT) for a in args)
        elif op in ("neg", "abs") and args[0].dtype == BOOL:
            args = (coerce(args[0], INT),)
    if op in ("floordiv", "mod") and dtype == INT and is_const(args[1], 0):
        # torch raises ZeroDivisionError for integer division by zero; so does the pattern, here
        from ..dsl.errors import PatternError  # (lazily: the IR does not depend on the tracer)
        sym = "//" if op == "floordiv" else "%"
        raise PatternError(f"integer division by zero: `{expr_str(args[0])} {sym} 0`",
                           "torch raises ZeroDivisionError for it; divide by a nonzero value")
    return _make(op, args, dtype)


def coerce(n: Node, dtype: str) -> Node:
    """Convert ``n`` to ``dtype`` (bool → int → float), as torch's type promotion would."""
    if n.dtype == dtype:
        return n
    if n.op == "const":
        v = const_value(n)
        if dtype == FLOAT:
            return const(float(v))
        if dtype == INT:
            return const(int(v))
        return const(bool(v))
    if dtype == FLOAT:
        return _make("to_float", (n,), FLOAT)
    if dtype == INT:
        if n.dtype == FLOAT:
            return _make("to_int", (n,), INT)
        return _make("to_int", (n,), INT)
    return node("ne", n, const(0, n.dtype))


NEG_INF = float("-inf")
INF = math.inf


#: infix spelling of the binary ops (``expr_str`` and the printer's listing)
INFIX = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
         "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=",
         "and": "&", "or": "|", "xor": "^"}


def leaf_str(n: Node) -> str:
    """A constant's or a variable's spelling."""
    if n.op == "const":
        return n.attr[2]
    if n.op == "var":
        return n.attr
    raise AssertionError(n.op)


def expr_str(n: Node) -> str:
    """One-line infix form (shared sub-expressions are repeated)."""
    if n.op in ("const", "var"):
        return leaf_str(n)
    a = [expr_str(x) for x in n.args]
    if n.op in INFIX:
        return f"({a[0]} {INFIX[n.op]} {a[1]})"
    if n.op == "neg":
        return f"-{a[0]}"
    if n.op == "not":
        return f"~{a[0]}"
    if n.op == "load":
        return f"buf{n.attr[0]}[{', '.join(a)}]"
    return f"{n.op}({', '.join(a)})"
