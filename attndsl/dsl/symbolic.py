"""Symbolic values: what a pattern function receives while it is traced.

``Sym`` overloads Python operators and implements ``__torch_function__`` for the subset of
torch a FlexAttention-style pattern uses, so existing ``mask_mod``/``score_mod`` functions trace
unchanged. Anything else raises :class:`PatternError` naming the construct and the user's line.
"""
from __future__ import annotations

import numbers

import torch

from .. import ir
from .errors import PatternError


class TraceContext:
    """Collects the tensors a pattern captures; each distinct tensor becomes one kernel buffer."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.buffers: list[ir.Buffer] = []
        self._slot_of: dict[int, int] = {}

    def buffer_for(self, t: torch.Tensor) -> ir.Buffer:
        slot = self._slot_of.get(id(t))
        if slot is None:
            if t.dtype == torch.bool:
                kind = ir.BOOL
            elif t.dtype.is_floating_point:
                kind = ir.FLOAT
            elif t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
                kind = ir.INT
            else:
                raise PatternError(f"captured tensor of dtype {t.dtype} is not supported",
                                   "use bool, integer or floating tensors")
            slot = len(self.tensors)
            self._slot_of[id(t)] = slot
            self.tensors.append(t)
            self.buffers.append(ir.Buffer(slot, kind, t.dim(), str(t.dtype).replace("torch.", "")))
        return self.buffers[slot]


_CTX: list[TraceContext] = []


def current_context() -> TraceContext:
    if not _CTX:
        raise RuntimeError("symbolic values are only valid while a pattern is traced")
    return _CTX[-1]


def lift(x, what="operand") -> ir.Node:
    """Turn a Python scalar, 0-d tensor or Sym into an IR node."""
    if isinstance(x, Sym):
        return x.node
    if isinstance(x, bool):
        return ir.const(x)
    if isinstance(x, numbers.Integral):
        return ir.const(int(x))
    if isinstance(x, numbers.Real):
        return ir.const(float(x))
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            # A captured 0-d tensor is a runtime scalar: changing its value needs no recompile.
            return ir.load(current_context().buffer_for(x), ())
        raise PatternError(f"a captured tensor of shape {tuple(x.shape)} used as an {what}",
                           "index it with index expressions, e.g. table[h, q_idx - kv_idx]")
    raise PatternError(f"value of type {type(x).__name__} used as an {what}")


def _index_node(i) -> ir.Node:
    if isinstance(i, slice) or i is None or i is Ellipsis:
        raise PatternError("slicing a captured tensor is not supported",
                           "index every dimension with an index expression")
    n = lift(i, "index")
    if n.dtype == ir.FLOAT:
        raise PatternError("a captured tensor indexed by a floating value",
                           "convert with .long()/.int() or use // for integer division")
    return ir.coerce(n, ir.INT)


def index_tensor(t: torch.Tensor, idx) -> "Sym":
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) != t.dim():
        raise PatternError(f"a captured tensor of rank {t.dim()} indexed with {len(idx)} indices",
                           "index every dimension")
    buf = current_context().buffer_for(t)
    return Sym(ir.load(buf, tuple(_index_node(i) for i in idx)))


def _bin(op, a, b):
    return Sym(ir.node(op, lift(a), lift(b)))


def _logic(op, a, b):
    x, y = lift(a), lift(b)
    if x.dtype != ir.BOOL or y.dtype != ir.BOOL:
        raise PatternError(f"'{ {'and': '&', 'or': '|', 'xor': '^'}[op] }' on non-boolean values",
                           "bitwise integer operations are not supported; combine masks only")
    return Sym(ir.node(op, x, y))


def _unary(op, a):
    return Sym(ir.node(op, lift(a)))


def _where(cond, a, b):
    c = lift(cond, "condition")
    if c.dtype != ir.BOOL:
        raise PatternError("torch.where condition is not boolean")
    return Sym(ir.node("where", c, lift(a), lift(b)))


def _clamp(x, min=None, max=None):
    n = lift(x)
    if min is not None:
        n = ir.node("maximum", n, lift(min))
    if max is not None:
        n = ir.node("minimum", n, lift(max))
    return Sym(n)


def _floor(x):
    n = lift(x)
    return Sym(n) if n.dtype != ir.FLOAT else Sym(ir.node("floor", n))


def _pow(a, b):
    if not isinstance(b, numbers.Integral) or b < 0 or b > 8:
        raise PatternError("'**' with a non-constant or large exponent", "only small integer powers trace")
    n = lift(a)
    r = ir.const(1, n.dtype if n.dtype != ir.BOOL else ir.INT)
    for _ in range(int(b)):
        r = ir.node("mul", r, n)
    return Sym(r)


def _to(x, *args, **kwargs):
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    if dtype is None:
        return x
    n = lift(x)
    if dtype == torch.bool:
        return Sym(ir.coerce(n, ir.BOOL))
    if dtype.is_floating_point:
        return Sym(ir.coerce(n, ir.FLOAT))
    return Sym(ir.node("to_int", n) if n.dtype == ir.FLOAT else ir.coerce(n, ir.INT))


def _torch_where(cond, a=None, b=None):
    if a is None:
        raise PatternError("torch.where with one argument (nonzero) is not supported")
    return _where(cond, a, b)


def _min_max(op):
    def f(a, b=None, *rest, **kw):
        if b is None or isinstance(b, int) and not isinstance(a, Sym) and not isinstance(b, Sym):
            raise PatternError(f"torch.{'min' if op == 'minimum' else 'max'} as a reduction is not supported",
                               "use the two-argument form")
        return _bin(op, a, b)
    return f


T = torch.Tensor
_HANDLERS = {
    T.__getitem__: index_tensor,
    torch.where: _torch_where, T.where: lambda self, cond, other: _where(cond, self, other),
    torch.minimum: lambda a, b: _bin("minimum", a, b), torch.maximum: lambda a, b: _bin("maximum", a, b),
    T.minimum: lambda a, b: _bin("minimum", a, b), T.maximum: lambda a, b: _bin("maximum", a, b),
    torch.min: _min_max("minimum"), torch.max: _min_max("maximum"),
    torch.clamp: _clamp, torch.clip: _clamp, T.clamp: _clamp, T.clip: _clamp,
    torch.clamp_min: lambda x, m: _clamp(x, min=m), torch.clamp_max: lambda x, m: _clamp(x, max=m),
    torch.abs: lambda x: _unary("abs", x), T.abs: lambda x: _unary("abs", x), T.__abs__: lambda x: _unary("abs", x),
    torch.neg: lambda x: _unary("neg", x), T.__neg__: lambda x: _unary("neg", x),
    torch.floor: _floor, T.floor: _floor,
    torch.logical_not: lambda x: Sym(ir.node("not", ir.coerce(lift(x), ir.BOOL))),
    torch.logical_and: lambda a, b: Sym(ir.node("and", ir.coerce(lift(a), ir.BOOL), ir.coerce(lift(b), ir.BOOL))),
    torch.logical_or: lambda a, b: Sym(ir.node("or", ir.coerce(lift(a), ir.BOOL), ir.coerce(lift(b), ir.BOOL))),
    torch.add: lambda a, b, alpha=1: _bin("add", a, b if alpha == 1 else _bin("mul", b, alpha)),
    torch.sub: lambda a, b, alpha=1: _bin("sub", a, b if alpha == 1 else _bin("mul", b, alpha)),
    torch.mul: lambda a, b: _bin("mul", a, b), torch.div: None, torch.floor_divide: lambda a, b: _bin("floordiv", a, b),
    torch.remainder: lambda a, b: _bin("mod", a, b), torch.fmod: None,
    torch.eq: lambda a, b: _bin("eq", a, b), torch.ne: lambda a, b: _bin("ne", a, b),
    torch.lt: lambda a, b: _bin("lt", a, b), torch.le: lambda a, b: _bin("le", a, b),
    torch.gt: lambda a, b: _bin("gt", a, b), torch.ge: lambda a, b: _bin("ge", a, b),
    T.to: _to, T.float: lambda x: _to(x, torch.float32), T.int: lambda x: _to(x, torch.int32),
    T.long: lambda x: _to(x, torch.int64), T.bool: lambda x: _to(x, torch.bool),
    T.__pow__: _pow, torch.pow: _pow, torch.square: lambda x: _pow(x, 2),
}
for _name in ("exp", "exp2", "log", "log2", "sqrt", "tanh", "sigmoid"):
    _HANDLERS[getattr(torch, _name)] = (lambda op: lambda x: _unary(op, x))(_name)
    _HANDLERS[getattr(T, _name)] = (lambda op: lambda x: _unary(op, x))(_name)
_HANDLERS[torch.rsqrt] = lambda x: Sym(ir.node("truediv", ir.const(1.0), ir.node("sqrt", lift(x))))
_HANDLERS[torch.special.expit] = _HANDLERS[torch.sigmoid]


def _div(a, b, rounding_mode=None):
    if rounding_mode is None:
        return _bin("truediv", a, b)
    if rounding_mode == "floor":
        return _bin("floordiv", a, b)
    raise PatternError(f"torch.div with rounding_mode={rounding_mode!r} is not supported",
                       "use // (floor division)")


_HANDLERS[torch.div] = _div
_HANDLERS[torch.true_divide] = lambda a, b: _bin("truediv", a, b)
_HANDLERS.pop(torch.fmod)
# method spellings (tensor.mul(sym), tensor.__mul__ dispatching as Tensor.mul, ...)
for _name in ("add", "sub", "mul", "div", "true_divide", "floor_divide", "remainder", "eq", "ne", "lt", "le", "gt",
              "ge", "logical_and", "logical_or", "logical_not", "neg", "clamp_min", "clamp_max", "rsqrt", "square",
              "pow"):
    if hasattr(T, _name) and getattr(torch, _name, None) in _HANDLERS:
        _HANDLERS[getattr(T, _name)] = _HANDLERS[getattr(torch, _name)]
_OPS = {"add": "add", "sub": "sub", "mul": "mul", "truediv": "truediv", "floordiv": "floordiv", "mod": "mod",
        "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "eq": "eq", "ne": "ne"}
for _py, _op in _OPS.items():
    _HANDLERS[getattr(T, f"__{_py}__")] = (lambda op: lambda a, b: _bin(op, a, b))(_op)
    if hasattr(T, f"__r{_py}__"):
        _HANDLERS[getattr(T, f"__r{_py}__")] = (lambda op: lambda a, b: _bin(op, b, a))(_op)
for _py, _op in (("and", "and"), ("or", "or"), ("xor", "xor")):
    _HANDLERS[getattr(T, f"__{_py}__")] = (lambda op: lambda a, b: _logic(op, a, b))(_op)
    _HANDLERS[getattr(T, f"__r{_py}__")] = (lambda op: lambda a, b: _logic(op, b, a))(_op)
_HANDLERS[T.__invert__] = lambda x: Sym(ir.node("not", lift(x)))


def _shift(op, a, b):
    x, y = lift(a), lift(b)
    if x.dtype == ir.FLOAT or y.dtype == ir.FLOAT:
        raise PatternError(f"'{'<<' if op == 'shl' else '>>'}' on a floating value", "shifts need integers")
    return Sym(ir.node(op, x, y))


for _py, _op in (("lshift", "shl"), ("rshift", "shr")):
    _HANDLERS[getattr(T, f"__{_py}__")] = (lambda op: lambda a, b: _shift(op, a, b))(_op)
    _HANDLERS[getattr(T, f"__r{_py}__")] = (lambda op: lambda a, b: _shift(op, b, a))(_op)
_HANDLERS[torch.bitwise_left_shift] = lambda a, b: _shift("shl", a, b)
_HANDLERS[torch.bitwise_right_shift] = lambda a, b: _shift("shr", a, b)


def _func_name(func) -> str:
    mod = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    if "Tensor" in name or "TensorBase" in name:
        return "Tensor." + name.split(".")[-1]
    if name.startswith("_VariableFunctionsClass."):
        return "torch." + name.split(".")[-1]
    return f"{mod.replace('torch._C._VariableFunctions', 'torch')}.{name}".lstrip(".")


class _UnsupportedAttribute(PatternError, AttributeError):
    pass


class Sym:
    """A symbolic scalar standing for an index, a score, or an expression of them."""

    __slots__ = ("node",)

    def __init__(self, node: ir.Node):
        self.node = node

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        h = _HANDLERS.get(func)
        if h is None:
            raise PatternError(f"'{_func_name(func)}' is not supported in a pattern",
                               "supported: arithmetic, comparisons, & | ~, //, %, torch.where, clamp, abs, "
                               "minimum/maximum, exp/exp2/log/log2/sqrt/tanh/sigmoid/floor, indexing captured tensors")
        try:
            return h(*args, **kwargs)
        except TypeError as e:
            raise PatternError(f"'{_func_name(func)}' called with unsupported arguments: {e}") from None

    # arithmetic
    def __add__(self, o): return _bin("add", self, o)
    def __radd__(self, o): return _bin("add", o, self)
    def __sub__(self, o): return _bin("sub", self, o)
    def __rsub__(self, o): return _bin("sub", o, self)
    def __mul__(self, o): return _bin("mul", self, o)
    def __rmul__(self, o): return _bin("mul", o, self)
    def __truediv__(self, o): return _bin("truediv", self, o)
    def __rtruediv__(self, o): return _bin("truediv", o, self)
    def __floordiv__(self, o): return _bin("floordiv", self, o)
    def __rfloordiv__(self, o): return _bin("floordiv", o, self)
    def __mod__(self, o): return _bin("mod", self, o)
    def __rmod__(self, o): return _bin("mod", o, self)
    def __pow__(self, o): return _pow(self, o)
    def __neg__(self): return _unary("neg", self)
    def __pos__(self): return self
    def __abs__(self): return _unary("abs", self)
    # comparisons
    def __lt__(self, o): return _bin("lt", self, o)
    def __le__(self, o): return _bin("le", self, o)
    def __gt__(self, o): return _bin("gt", self, o)
    def __ge__(self, o): return _bin("ge", self, o)
    def __eq__(self, o): return _bin("eq", self, o)  # type: ignore[override]
    def __ne__(self, o): return _bin("ne", self, o)  # type: ignore[override]
    __hash__ = object.__hash__
    # logic
    def __and__(self, o): return _logic("and", self, o)
    def __rand__(self, o): return _logic("and", o, self)
    def __or__(self, o): return _logic("or", self, o)
    def __ror__(self, o): return _logic("or", o, self)
    def __xor__(self, o): return _logic("xor", self, o)
    def __rxor__(self, o): return _logic("xor", o, self)
    # integer shifts (a << s == a * 2**s, a >> s == floor(a / 2**s))
    def __lshift__(self, o): return _shift("shl", self, o)
    def __rlshift__(self, o): return _shift("shl", o, self)
    def __rshift__(self, o): return _shift("shr", self, o)
    def __rrshift__(self, o): return _shift("shr", o, self)

    def __invert__(self):
        if self.node.dtype != ir.BOOL:
            raise PatternError("'~' on a non-boolean value", "bitwise integer operations are not supported")
        return Sym(ir.node("not", self.node))

    # methods people call on index tensors
    def clamp(self, min=None, max=None): return _clamp(self, min, max)
    clip = clamp
    def clamp_min(self, m): return _clamp(self, min=m)
    def clamp_max(self, m): return _clamp(self, max=m)
    def abs(self): return _unary("abs", self)
    def exp(self): return _unary("exp", self)
    def exp2(self): return _unary("exp2", self)
    def log(self): return _unary("log", self)
    def log2(self): return _unary("log2", self)
    def sqrt(self): return _unary("sqrt", self)
    def tanh(self): return _unary("tanh", self)
    def sigmoid(self): return _unary("sigmoid", self)
    def floor(self): return _floor(self)
    def minimum(self, o): return _bin("minimum", self, o)
    def maximum(self, o): return _bin("maximum", self, o)
    def where(self, cond, other): return _where(cond, self, other)
    def float(self): return _to(self, torch.float32)
    def int(self): return _to(self, torch.int32)
    def long(self): return _to(self, torch.int64)
    def bool(self): return _to(self, torch.bool)
    def to(self, *args, **kwargs): return _to(self, *args, **kwargs)
    def logical_not(self): return Sym(ir.node("not", ir.coerce(self.node, ir.BOOL)))
    def logical_and(self, o): return _HANDLERS[torch.logical_and](self, o)
    def logical_or(self, o): return _HANDLERS[torch.logical_or](self, o)

    def __bool__(self):
        raise PatternError("Python control flow on a traced value (if/and/or/not/while)",
                           "use torch.where(cond, a, b) or & | ~ instead")

    def __index__(self):
        raise PatternError("a traced value used as a Python integer (a slice bound such as t[q_idx:], "
                           "range(), len() or a list index)", "slicing captured tensors is not supported; "
                           "index every dimension with an index expression")

    def __int__(self):
        raise PatternError("int() of a traced value", "use .long() or .int()")

    def __float__(self):
        raise PatternError("float() of a traced value", "use .float()")

    def item(self):
        raise PatternError(".item() on a traced value")

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise _UnsupportedAttribute(f"'.{name}' is not supported on a traced value")

    def __repr__(self):
        return f"Sym({ir.expr_str(self.node)})"
