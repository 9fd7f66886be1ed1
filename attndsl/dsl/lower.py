"""Lower a captured aten graph (:mod:`attndsl.dsl.capture`) into attndsl's IR.

Values while lowering:

* a scalar is an IR :class:`~attndsl.ir.Node` (the index variables, the score, expressions);
* a captured tensor, or part of one, is a :class:`View`: the user's tensor with some dimensions
  indexed by IR expressions and the others still free (``table[h]`` of a ``[H, N]`` table is a
  view with one free dimension of N). A view stays lazy until an elementwise op or a reduction
  needs its elements; then it becomes
* a small array (numpy, ``dtype=object``) of IR nodes, one per element: ``table[h][0]``,
  ``torch.dot(rope[b, h, q_idx], rope[b, h, kv_idx])`` or ``(ids == kv_tile[..., None]).any(-1)``
  unroll over the captured tensor's static trailing size, as FlexAttention's generated code does.

Each captured tensor becomes one :class:`~attndsl.ir.Buffer` (slot in order of first use), read
by ``load`` nodes: the same IR the kernels have always read. Tensors the pattern creates
itself (``torch.tensor(2.0)``, ``new_ones``) are constants.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from .. import ir
from .errors import PatternError

#: At most this many elements are unrolled for one array value (a dot product over a captured row).
MAX_UNROLL = 4096


class Buffers:
    """The tensors a pattern captures; each distinct tensor becomes one kernel buffer.

    ``sized``: the tensors (by identity) whose sizes the IR bakes in — a dimension unrolled
    (``torch.dot`` over a row, ``.any(-1)``), sliced or indexed from its end (``t[-1]``). A cache
    that reuses the IR for other tensors must check their shapes too."""

    def __init__(self):
        self.tensors: list[torch.Tensor] = []
        self.buffers: list[ir.Buffer] = []
        self._slot_of: dict[int, int] = {}
        self.sized: dict[int, torch.Tensor] = {}

    def buffer_for(self, t: torch.Tensor, site=None) -> ir.Buffer:
        slot = self._slot_of.get(id(t))
        if slot is None:
            kind = _kind(t.dtype)
            if kind is None:
                raise PatternError(f"captured tensor of dtype {t.dtype} is not supported",
                                   "use bool, integer or floating tensors", site=site)
            slot = len(self.tensors)
            self._slot_of[id(t)] = slot
            self.tensors.append(t)
            self.buffers.append(ir.Buffer(slot, kind, t.dim(), str(t.dtype).replace("torch.", "")))
        return self.buffers[slot]


def _kind(dtype: torch.dtype):
    if dtype == torch.bool:
        return ir.BOOL
    if dtype.is_floating_point:
        return ir.FLOAT
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return ir.INT
    return None


@dataclass(frozen=True)
class View:
    """A captured tensor with ``dims[d]`` either an index node (fixed) or ``(start, step, size)``."""

    tensor: torch.Tensor
    dims: tuple

    @property
    def shape(self) -> tuple:
        return tuple(d[2] for d in self.dims if isinstance(d, tuple))

    def free(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if isinstance(d, tuple)]


@dataclass(frozen=True)
class Refused:
    """A result the lowering cannot give (the indices of ``max(dim)``); an error only where used."""

    what: str
    hint: str = ""


def _view_of(t: torch.Tensor) -> View:
    return View(t, tuple((0, 1, s) for s in t.shape))


# -- values ------------------------------------------------------------------------------------
class Lowering:
    def __init__(self, buffers: Buffers):
        self.buf = buffers
        self.site = None

    def fail(self, what, hint=""):
        raise PatternError(what, hint, site=self.site)

    def scalar(self, v) -> ir.Node:
        """A Python number, 0-d value or one-element value as a node."""
        if isinstance(v, ir.Node):
            return v
        if isinstance(v, (bool, int, float)):
            return ir.const(v)
        if isinstance(v, Refused):
            self.fail(f"{v.what} are not supported", v.hint)
        if not isinstance(v, (np.ndarray, View)):
            self.fail(f"a value of type {type(v).__name__} where a tensor is needed")
        a = self.array(v)
        if a.size != 1:
            self.fail(f"a value of shape {tuple(a.shape)} where a scalar is needed")
        return a.reshape(())[()]

    def array(self, v) -> np.ndarray:
        if isinstance(v, np.ndarray):
            return v
        if isinstance(v, View):
            return self.materialize(v)
        a = np.empty((), dtype=object)
        a[()] = self.scalar(v)
        return a

    def materialize(self, v: View) -> np.ndarray:
        n = math.prod(v.shape)
        if n > MAX_UNROLL:
            self.fail(f"a captured tensor used whole, {n} elements of shape {tuple(v.shape)} (at most {MAX_UNROLL} "
                      f"are unrolled)", "index every dimension with an index expression, e.g. table[h, q_idx - kv_idx]")
        buf = self.buf.buffer_for(v.tensor, self.site)
        if v.shape:
            self.buf.sized[id(v.tensor)] = v.tensor
        out = np.empty(v.shape, dtype=object)
        free = v.free()
        for pos in np.ndindex(*v.shape):
            idx = list(v.dims)
            for d, p in zip(free, pos):
                start, step, _ = v.dims[d]
                idx[d] = ir.const(start + step * p)
            out[pos] = ir.load(buf, tuple(idx))
        return out

    @staticmethod
    def pack(a):
        return a[()] if isinstance(a, np.ndarray) and a.ndim == 0 else a

    def ew(self, f, *vals):
        """Apply ``f`` on nodes elementwise, broadcasting arrays as torch does."""
        if all(isinstance(v, (ir.Node, bool, int, float)) for v in vals):
            return f(*(self.scalar(v) for v in vals))
        arrs = np.broadcast_arrays(*(self.array(v) for v in vals))
        out = np.empty(arrs[0].shape, dtype=object)
        for pos in np.ndindex(*out.shape):
            out[pos] = f(*(a[pos] for a in arrs))
        return self.pack(out)

    def shape(self, v) -> tuple:
        if isinstance(v, View):
            return v.shape
        if isinstance(v, np.ndarray):
            return v.shape
        return ()

    # -- indexing --------------------------------------------------------------------------
    def index(self, v, indices):
        """``aten.index(v, indices)``: scalar index nodes (or None for a whole dimension)."""
        if isinstance(v, View):
            dims, free = list(v.dims), v.free()
            if len(indices) > len(free):
                self.fail(f"a captured tensor of rank {len(free)} indexed with {len(indices)} indices")
            for d, i in zip(free, indices):
                if i is None:
                    continue
                if not isinstance(i, ir.Node):
                    if self.shape(i) != ():
                        self.fail("a captured tensor indexed by a tensor of indices",
                                  "index every dimension with a scalar index expression")
                    i = self.scalar(i)
                if i.dtype == ir.FLOAT:
                    self.fail("a captured tensor indexed by a floating value",
                              "convert with .long()/.int() or use // for integer division")
                start, step, size = dims[d]
                i = ir.coerce(i, ir.INT)
                if i.op == "const" and ir.const_value(i) < 0:  # t[-1], as torch wraps it
                    i = ir.const(ir.const_value(i) + size)
                    self.buf.sized[id(v.tensor)] = v.tensor
                if step != 1:
                    i = ir.node("mul", i, ir.const(step))
                if start:
                    i = ir.node("add", i, ir.const(start))
                dims[d] = i
            return View(v.tensor, tuple(dims))
        a = self.array(v)
        if len(indices) > a.ndim:
            self.fail(f"a value of rank {a.ndim} indexed with {len(indices)} indices")
        d = 0
        for i in indices:
            if i is None:
                d += 1
                continue
            if not (isinstance(i, ir.Node) or self.shape(i) == ()):
                self.fail("indexing with a tensor of indices", "index with scalar index expressions")
            n = ir.coerce(self.scalar(i), ir.INT)
            if n.op == "const":
                a = np.take(a, int(ir.const_value(n)), axis=d)
                continue
            # a small array the pattern built (torch.tensor([...])[h]): select by comparisons
            size = a.shape[d]
            parts = [np.take(a, j, axis=d) for j in range(size)]
            out = parts[-1]
            for j in range(size - 2, -1, -1):
                hit = ir.node("eq", n, ir.const(j))
                out = self.array(self.ew(lambda x, y, c=hit: ir.node("where", c, x, y), parts[j], out))
            a = out
        return self.pack(a)

    def select(self, v, dim, k):
        shape = self.shape(v)
        dim = dim % len(shape)
        k = k % shape[dim] if isinstance(k, int) else k
        idx = [None] * dim + [ir.const(int(k))]
        return self.index(v, idx)

    def slice(self, v, dim=0, start=None, end=None, step=1):
        shape = self.shape(v)
        dim = dim % len(shape)
        rng = range(*slice(start, end, step).indices(shape[dim]))
        if isinstance(v, View):
            self.buf.sized[id(v.tensor)] = v.tensor
            d = v.free()[dim]
            s0, st, _ = v.dims[d]
            dims = list(v.dims)
            dims[d] = (s0 + st * rng.start, st * rng.step, len(rng))
            return View(v.tensor, tuple(dims))
        a = self.array(v)
        ix = [slice(None)] * a.ndim
        ix[dim] = slice(rng.start, rng.stop if rng.stop >= 0 else None, rng.step)
        return a[tuple(ix)]

    # -- reductions ------------------------------------------------------------------------
    def reduce(self, op, v, dims=None, keepdim=False):
        a = self.array(v)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = tuple(range(a.ndim))
        dims = tuple(sorted(d % max(a.ndim, 1) for d in ((dims,) if isinstance(dims, int) else dims)))
        if a.ndim == 0:
            return self.pack(a)
        moved = np.moveaxis(a, dims, tuple(range(a.ndim - len(dims), a.ndim)))
        lead = moved.shape[:a.ndim - len(dims)]
        flat = moved.reshape(lead + (-1,))
        out = np.empty(lead, dtype=object)
        for pos in np.ndindex(*lead):
            items = list(flat[pos])
            if not items:
                self.fail("a reduction over an empty dimension")
            out[pos] = functools.reduce(op, items)
        if keepdim:
            for d in dims:
                out = np.expand_dims(out, d)
        return self.pack(out)


def _n(op):
    return lambda *a: ir.node(op, *a)


def _logic(op, bitop):
    def f(x, y):
        if x.dtype == ir.BOOL and y.dtype == ir.BOOL:
            return ir.node(op, x, y)
        if ir.FLOAT in (x.dtype, y.dtype):
            raise TypeError(f"'{op}' on a floating value")
        return ir.node(bitop, x, y)
    return f


def _truncdiv(x, y):
    if ir.FLOAT in (x.dtype, y.dtype):
        t = ir.node("truediv", x, y)
        return ir.node("where", ir.node("lt", t, ir.const(0.0)), ir.node("neg", ir.node("floor", ir.node("neg", t))),
                       ir.node("floor", t))
    f = ir.node("floordiv", x, y)
    inexact = ir.node("ne", ir.node("mod", x, y), ir.const(0))
    signs = ir.node("xor", ir.node("lt", x, ir.const(0)), ir.node("lt", y, ir.const(0)))
    return ir.node("where", ir.node("and", inexact, signs), ir.node("add", f, ir.const(1)), f)


def _pow(x, e):
    if e.op != "const":
        if x.op == "const" and ir.const_value(x) == 2:
            return ir.node("shl", ir.const(1), e) if e.dtype != ir.FLOAT else ir.node("exp2", e)
        if x.op == "const" and ir.const_value(x) > 0:
            return ir.node("exp", ir.node("mul", e, ir.const(math.log(ir.const_value(x)))))
        raise TypeError("'**' with a traced exponent (only a constant base > 0 traces)")
    p = ir.const_value(e)
    if p == 0.5:
        return ir.node("sqrt", x)
    if p == -0.5:
        return ir.node("truediv", ir.const(1.0), ir.node("sqrt", x))
    if float(p).is_integer() and -8 <= p <= 8:
        k = int(p)
        if k == 0:
            return ir.const(1, x.dtype if x.dtype != ir.BOOL else ir.INT)
        r = functools.reduce(lambda a, b: ir.node("mul", a, b), [x] * abs(k))
        return r if k > 0 else ir.node("truediv", ir.const(1.0), r)
    raise TypeError(f"'**' with exponent {p} (only small integer powers and 0.5 trace)")


def _gelu(x, approximate="none"):
    half_x = ir.node("mul", ir.const(0.5), x)
    if approximate == "tanh":
        inner = ir.node("mul", ir.const(math.sqrt(2 / math.pi)),
                        ir.node("add", x, ir.node("mul", ir.const(0.044715), ir.node("mul", x, ir.node("mul", x, x)))))
        return ir.node("mul", half_x, ir.node("add", ir.const(1.0), ir.node("tanh", inner)))
    erf = ir.node("erf", ir.node("mul", x, ir.const(math.sqrt(0.5))))
    return ir.node("mul", half_x, ir.node("add", ir.const(1.0), erf))


def _clamp(x, lo=None, hi=None):
    if lo is not None:
        x = ir.node("maximum", x, lo)
    if hi is not None:
        x = ir.node("minimum", x, hi)
    return x


def _float_of(x):
    return ir.coerce(x, ir.FLOAT)


# Elementwise aten ops: name -> function of IR nodes (after python scalars become constants).
_EW = {
    "add": lambda x, y, alpha=1: ir.node("add", x, y if alpha == 1 else ir.node("mul", y, ir.const(alpha))),
    "sub": lambda x, y, alpha=1: ir.node("sub", x, y if alpha == 1 else ir.node("mul", y, ir.const(alpha))),
    "rsub": lambda x, y, alpha=1: ir.node("sub", y, x if alpha == 1 else ir.node("mul", x, ir.const(alpha))),
    "mul": _n("mul"), "true_divide": _n("truediv"), "floor_divide": _n("floordiv"),
    "remainder": _n("mod"), "fmod": lambda x, y: ir.node("sub", x, ir.node("mul", _truncdiv(x, y), y)),
    "eq": _n("eq"), "ne": _n("ne"), "lt": _n("lt"), "le": _n("le"), "gt": _n("gt"), "ge": _n("ge"),
    "minimum": _n("minimum"), "maximum": _n("maximum"), "fmin": _n("minimum"), "fmax": _n("maximum"),
    "logical_and": lambda x, y: ir.node("and", ir.coerce(x, ir.BOOL), ir.coerce(y, ir.BOOL)),
    "logical_or": lambda x, y: ir.node("or", ir.coerce(x, ir.BOOL), ir.coerce(y, ir.BOOL)),
    "logical_xor": lambda x, y: ir.node("xor", ir.coerce(x, ir.BOOL), ir.coerce(y, ir.BOOL)),
    "logical_not": lambda x: ir.node("not", ir.coerce(x, ir.BOOL)),
    "bitwise_and": _logic("and", "bitand"), "__and__": _logic("and", "bitand"),
    "bitwise_or": _logic("or", "bitor"), "__or__": _logic("or", "bitor"),
    "bitwise_xor": _logic("xor", "bitxor"), "__xor__": _logic("xor", "bitxor"),
    "bitwise_not": lambda x: (ir.node("not", x) if x.dtype == ir.BOOL
                              else ir.node("sub", ir.node("neg", x), ir.const(1))),  # ~x = -x - 1
    "bitwise_left_shift": _n("shl"), "__lshift__": _n("shl"),
    "bitwise_right_shift": _n("shr"), "__rshift__": _n("shr"),
    "where": lambda c, x, y: ir.node("where", ir.coerce(c, ir.BOOL), x, y),
    "abs": _n("abs"), "neg": _n("neg"), "positive": lambda x: x,
    "exp": _n("exp"), "exp2": _n("exp2"), "log": _n("log"), "log2": _n("log2"), "sqrt": _n("sqrt"),
    "tanh": _n("tanh"), "sigmoid": _n("sigmoid"), "floor": lambda x: x if x.dtype != ir.FLOAT else ir.node("floor", x),
    "erf": _n("erf"), "gelu": _gelu,
    "ceil": lambda x: x if x.dtype != ir.FLOAT else ir.node("neg", ir.node("floor", ir.node("neg", x))),
    "trunc": lambda x: x if x.dtype != ir.FLOAT else _truncdiv(x, ir.const(1.0)),
    "rsqrt": lambda x: ir.node("truediv", ir.const(1.0), ir.node("sqrt", x)),
    "reciprocal": lambda x: ir.node("truediv", ir.const(1.0), x),
    "square": lambda x: ir.node("mul", x, x),
    "relu": lambda x: ir.node("maximum", x, ir.const(0, x.dtype)),
    "silu": lambda x: ir.node("mul", x, ir.node("sigmoid", x)),
    "log1p": lambda x: ir.node("log", ir.node("add", ir.const(1.0), x)),
    "expm1": lambda x: ir.node("sub", ir.node("exp", x), ir.const(1.0)),
    "pow": _pow,
    "clamp": _clamp, "clip": _clamp,
    "clamp_min": lambda x, lo: ir.node("maximum", x, lo), "clamp_max": lambda x, hi: ir.node("minimum", x, hi),
    "sign": lambda x: ir.node("sub", ir.coerce(ir.node("gt", x, ir.const(0, x.dtype)), x.dtype),
                              ir.coerce(ir.node("lt", x, ir.const(0, x.dtype)), x.dtype)),
}
_DIV_MODES = {None: _n("truediv"), "floor": _n("floordiv"), "trunc": _truncdiv}
_REDUCE = {
    "sum": lambda x, y: ir.node("add", x, y), "prod": lambda x, y: ir.node("mul", x, y),
    "any": lambda x, y: ir.node("or", ir.coerce(x, ir.BOOL), ir.coerce(y, ir.BOOL)),
    "all": lambda x, y: ir.node("and", ir.coerce(x, ir.BOOL), ir.coerce(y, ir.BOOL)),
    "amax": _n("maximum"), "amin": _n("minimum"), "max": _n("maximum"), "min": _n("minimum"),
}
_IDENTITY = {"clone", "alias", "detach", "lift_fresh", "contiguous", "_to_copy", "to", "type_as",
             "_conj", "resolve_conj", "resolve_neg", "convert_element_type"}
_SHAPE = {"view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "permute", "t", "transpose",
          "flatten", "broadcast_to", "movedim", "view_as", "expand_as"}
_CREATE = {"scalar_tensor", "full", "full_like", "new_full", "new_ones", "new_zeros", "new_empty", "ones", "zeros",
           "ones_like", "zeros_like", "arange", "lift_fresh_copy", "tensor"}
#: aten ops the lowering handles itself: they are kept whole, not decomposed, while capturing.
HANDLED = (set(_EW) | set(_REDUCE) | _IDENTITY | _SHAPE | _CREATE
           | {"div", "index", "select", "slice", "dot", "vdot", "mv", "mean", "where", "sym_size"})
HANDLED_PACKETS = frozenset(getattr(torch.ops.aten, n) for n in HANDLED if hasattr(torch.ops.aten, n))


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        base = target._opname
        return f"torch.{base}" if ns in ("aten", "prims") else f"torch.ops.{ns}.{base}"
    return getattr(target, "__name__", str(target))


def lower_graph(gm: torch.fx.GraphModule, inputs: list, buffers: Buffers):
    """Lower ``gm`` with its placeholders bound to ``inputs`` (IR nodes); returns the output value
    and the site of the op that produced it."""
    lo = Lowering(buffers)
    env: dict = {}
    ph = iter(inputs)
    out_site = None

    def val(a):
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    for node in gm.graph.nodes:
        lo.site = node.meta.get("stack_trace") or None
        if node.op == "placeholder":
            env[node] = next(ph)
        elif node.op == "get_attr":
            t = getattr(gm, node.target)
            env[node] = _view_of(t) if isinstance(t, torch.Tensor) else t
        elif node.op == "call_function":
            try:
                r = _lower_call(lo, node, val(node.args), val(node.kwargs))
            except PatternError as e:
                if e.located or lo.site is None:
                    raise
                # raised where the IR is built (e.g. an integer division by zero): the op's own line
                raise PatternError(e.what, e.hint, site=lo.site) from None
            except TypeError as e:
                lo.fail(f"'{_op_name(node.target)}' {e}")
            env[node] = _fix_dtype(lo, node, r)
        elif node.op == "output":
            res = node.args[0]
            if isinstance(res, (list, tuple)):
                if len(res) != 1:
                    raise PatternError(f"the function returned {len(res)} values, expected one", site=lo.site)
                res = res[0]
            if isinstance(res, torch.fx.Node):
                out_site = res.meta.get("stack_trace") or None
            r = val(res)
            if isinstance(r, (View, np.ndarray)) and lo.shape(r) == ():
                r = lo.scalar(r)
            return r, out_site
        else:
            lo.fail(f"graph node of kind {node.op!r} is not supported")
    raise AssertionError("graph without output")


def _fix_dtype(lo: Lowering, node, r):
    """Coerce a result to the kind torch computed (bool add, int casts, float promotion)."""
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor) or isinstance(r, (View, Refused)):
        return r
    kind = _kind(v.dtype)
    if kind is None:
        lo.fail(f"'{_op_name(node.target)}' produced a {v.dtype} value", "use bool, integer or floating values")
    if tuple(v.shape) != lo.shape(r):
        lo.fail(f"internal: '{_op_name(node.target)}' lowered to shape {lo.shape(r)}, torch says {tuple(v.shape)}")
    return lo.ew(lambda x: ir.coerce(x, kind), r)


def _const_array(t: torch.Tensor, site):
    if t.numel() > MAX_UNROLL:
        raise PatternError(f"a tensor of {t.numel()} elements created inside the pattern", site=site)
    kind = _kind(t.dtype)
    vals = t.detach().cpu().tolist()
    out = np.empty(tuple(t.shape), dtype=object)
    for pos in np.ndindex(*t.shape):
        v = vals
        for p in pos:
            v = v[p]
        out[pos] = ir.const(v, kind)
    return out[()] if t.dim() == 0 else out


def _lower_call(lo: Lowering, node, args, kwargs):
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        if target is operator.getitem:
            return args[0][args[1]]
        lo.fail(f"'{_op_name(target)}' is not supported in a pattern")
    ns, name = target.namespace, target._opname
    if ns == "attndsl":
        if name == "coord":
            x, shape, tile, prefix, axis = args
            return lo.ew(lambda i: ir.coord(i, (tuple(shape), tuple(tile), int(prefix), int(axis))), x)
        if name == "bit_length":
            return lo.ew(lambda i: ir.node("bit_length", i), args[0])
    if ns not in ("aten", "prims"):
        lo.fail(f"'{_op_name(target)}' is not supported in a pattern",
                "a custom op traces when it has a Python (CompositeExplicitAutograd) kernel or a decomposition")
    meta = node.meta.get("val")
    if name in _EW:
        f = _EW[name]
        if name in ("clamp", "clip"):
            x = args[0]
            mn = kwargs.get("min", args[1] if len(args) > 1 else None)
            mx = kwargs.get("max", args[2] if len(args) > 2 else None)
            ops = [x] + [v for v in (mn, mx) if v is not None]
            return lo.ew(lambda *n: _clamp(n[0], n[1] if mn is not None else None,
                                           n[-1] if mx is not None else None), *ops)
        if name == "gelu":
            approx = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
            return lo.ew(lambda x: _gelu(x, approx), args[0])
        alpha = kwargs.get("alpha", 1)
        if name in ("add", "sub", "rsub") and (alpha != 1 or len(args) > 2):
            alpha = args[2] if len(args) > 2 else alpha
            return lo.ew(lambda x, y: f(x, y, alpha), args[0], args[1])
        return lo.ew(f, *args)
    if name == "div":
        mode = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
        return lo.ew(_DIV_MODES[mode], args[0], args[1])
    if name in _IDENTITY:
        return args[0]
    if name in _CREATE:
        if name == "lift_fresh_copy":
            t = args[0].tensor if isinstance(args[0], View) else args[0]
            return _const_array(t, lo.site) if isinstance(t, torch.Tensor) else t
        if not isinstance(meta, torch.Tensor):
            lo.fail(f"'{_op_name(target)}' without a tensor result")
        if name in ("arange",):
            return _const_array(torch.arange(*args, dtype=meta.dtype), lo.site)
        if name in ("scalar_tensor",):
            fill = args[0]
        elif name in ("full", "new_full"):
            fill = args[1]
        elif name in ("full_like",):
            fill = args[1]
        elif name in ("new_ones", "ones", "ones_like"):
            fill = 1
        elif name in ("new_zeros", "zeros", "zeros_like", "new_empty"):
            fill = 0
        else:
            lo.fail(f"'{_op_name(target)}' is not supported in a pattern")
        fill = lo.scalar(fill) if isinstance(fill, (ir.Node, np.ndarray, View)) else fill
        kind = _kind(meta.dtype)
        c = ir.coerce(fill, kind) if isinstance(fill, ir.Node) else ir.const(fill, kind)
        out = np.empty(tuple(meta.shape), dtype=object)
        out[...] = c
        return lo.pack(out) if meta.dim() else c
    if name == "index":
        return lo.index(args[0], list(args[1]))
    if name == "select":
        return lo.select(*args)
    if name == "slice":
        return lo.slice(*args, **kwargs)
    if name in _SHAPE:
        return _reshape(lo, name, args, meta)
    if name in _REDUCE or name == "mean":
        x = args[0]
        dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
        keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        if name in ("max", "min") and len(args) > 1 and not isinstance(args[1], (int, list, tuple)):
            return lo.ew(_n("maximum" if name == "max" else "minimum"), args[0], args[1])
        if name in ("max", "min") and dims is not None:  # (values, indices): indices are not supported
            return lo.reduce(_REDUCE[name], x, dims, keep), Refused(
                f"the indices of torch.{name} over a dimension", "use .amax()/.amin() for the values")
        if name == "mean":
            n = math.prod(lo.shape(x)) // max(1, math.prod(meta.shape))
            s = lo.reduce(_REDUCE["sum"], x, dims, keep)
            return lo.ew(lambda v: ir.node("truediv", v, ir.const(float(n))), s)
        return lo.reduce(_REDUCE[name], x, dims, keep)
    if name in ("dot", "vdot"):
        return lo.reduce(_REDUCE["sum"], lo.ew(_n("mul"), args[0], args[1]))
    if name == "mv":
        prod = lo.ew(_n("mul"), lo.array(args[0]), np.expand_dims(lo.array(args[1]), 0))
        return lo.reduce(_REDUCE["sum"], prod, -1)
    lo.fail(f"'{_op_name(target)}' is not supported in a pattern",
            "supported: arithmetic, comparisons, & | ~ ^ << >>, //, %, torch.where, clamp, abs, minimum/maximum, "
            "exp/exp2/log/log2/sqrt/rsqrt/tanh/sigmoid/erf/gelu/floor, indexing captured tensors, "
            "sum/any/all/amax/amin/dot over their small dimensions")


def _reshape(lo: Lowering, name, args, meta):
    x = args[0]
    if isinstance(x, View) and name == "expand" and tuple(x.shape) == tuple(meta.shape):
        return x
    a = lo.array(x)
    shape = tuple(meta.shape) if isinstance(meta, torch.Tensor) else None
    if name in ("view", "reshape", "_unsafe_view", "flatten", "view_as", "squeeze", "unsqueeze"):
        return lo.pack(a.reshape(shape))
    if name in ("expand", "broadcast_to", "expand_as"):
        return lo.pack(np.broadcast_to(a, shape))
    if name == "permute":
        return lo.pack(np.transpose(a, args[1]))
    if name in ("t", "transpose"):
        d0, d1 = (args[1], args[2]) if len(args) > 2 else (0, 1)
        return lo.pack(np.swapaxes(a, d0, d1) if a.ndim > 1 else a)
    if name == "movedim":
        return lo.pack(np.moveaxis(a, args[1], args[2]))
    lo.fail(f"'torch.{name}' is not supported in a pattern")
