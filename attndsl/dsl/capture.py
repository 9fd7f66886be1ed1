"""Capture a pattern function as an aten graph with torch's own tracing (``make_fx``).

A mask or score modifier is called once on 0-d fake tensors (``b, h, q_idx, kv_idx`` as int32,
``score`` as float32), as FlexAttention traces them, under ``make_fx``. Whatever torch runs on
those tensors is recorded as aten ops, so everything a FlexAttention pattern may use (torch's
``and_masks``/``or_masks``, ``F.gelu``, ``torch.dot`` over a captured row, chained indexing,
custom ops with a Python kernel...) reaches :mod:`attndsl.dsl.lower`, which turns the graph
into IR or names the op it cannot lower.

Around the call, a torch-function mode

* records the user's ``file:line`` of every op on the graph node (``node.stack_trace``), so an
  op that cannot be lowered is reported where the pattern wrote it, not where it was called;
* turns ``tensor[index_tensor, ...]`` into ``aten.index`` (as FlexAttention's
  ``TransformGetItemToIndex`` does) instead of a Python integer;
* refuses Python control flow, ``int()``/``float()``/``.item()`` and slice bounds on traced
  values with a :class:`PatternError` (FlexAttention's ``vmap`` refuses them too).

Captured tensors stay the user's objects (``get_attr`` constants of the graph), so they become
kernel buffers with their ``requires_grad``; tensors the pattern creates (``torch.tensor(2.0)``,
integer indices) appear as ``lift_fresh_copy`` of a constant and are folded.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

import torch
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from ..ir.coords import coord_value
from ..ir.intmath import bit_length_value
from .errors import PatternError, definition_site, traceback_site, user_site
from .reach import held_tensors

_STATE = threading.local()


def tracing() -> bool:
    """True while a pattern is being captured (layout coordinates and ``bit_length`` then record
    themselves as single ops instead of their ``//``/``%`` arithmetic)."""
    return getattr(_STATE, "depth", 0) > 0


# the pattern cache's walk keys it by identity: library state (the thread-local), not a pattern's
tracing.__attndsl_leaf__ = True


# -- attndsl's own ops: opaque in the graph so passes can recognise them ------------------------
@torch.library.custom_op("attndsl::coord", mutates_args=())
def coord_op(index: torch.Tensor, shape: list[int], tile: list[int], prefix: int, axis: int) -> torch.Tensor:
    """Layout coordinate ``axis`` of ``index`` (``ir.coords.coord_value``)."""
    return torch.as_tensor(coord_value((tuple(shape), tuple(tile), prefix, axis), index)).clone()


@coord_op.register_fake
def _coord_fake(index, shape, tile, prefix, axis):
    return torch.empty_like(index)


@torch.library.custom_op("attndsl::bit_length", mutates_args=())
def bit_length_op(x: torch.Tensor) -> torch.Tensor:
    """``int.bit_length`` of ``|x|``, elementwise (``ir.intmath.bit_length_value``)."""
    return bit_length_value(x).clone()


@bit_length_op.register_fake
def _bit_length_fake(x):
    return torch.empty_like(x)


# -- the torch-function mode --------------------------------------------------------------------
def _traced(x) -> bool:
    return isinstance(x, FakeTensor)


T = torch.Tensor
_REFUSED = {
    T.__bool__: ("Python control flow on a traced value (if/and/or/not/while)",
                 "use torch.where(cond, a, b) or & | ~ instead"),
    T.__int__: ("int() of a traced value", "use .long() or .int()"),
    T.__float__: ("float() of a traced value", "use .float()"),
    T.item: (".item() on a traced value", "keep it a tensor"),
    T.__index__: ("a traced value used as a Python integer (a slice bound such as t[q_idx:], range(), len() or "
                  "a list index)", "index with the tensor itself, e.g. t[q_idx]; slicing by a traced bound is "
                  "not supported"),
    T.tolist: (".tolist() on a traced value", "keep it a tensor"),
}


def _getitem(t, idx):
    """``t[idx]`` with tensor indices as ``aten.index`` (no Python integers), or None to fall back."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not any(isinstance(i, torch.Tensor) for i in idx):
        return None
    if any(i is None or isinstance(i, (bool, list)) for i in idx):
        return None
    if sum(i is Ellipsis for i in idx) == 1:
        e = idx.index(Ellipsis)
        idx = idx[:e] + (slice(None),) * (t.dim() - len(idx) + 1) + idx[e + 1:]
    if Ellipsis in idx or len(idx) > t.dim():
        return None
    for i in idx:
        if isinstance(i, slice) and any(_traced(x) for x in (i.start, i.stop, i.step)):
            raise PatternError("slicing with a traced bound (t[q_idx:])", "index with the tensor itself, e.g. t[q_idx]")
        if isinstance(i, torch.Tensor) and i.is_floating_point():
            raise PatternError(f"a captured tensor indexed by a floating value ({i.dtype})",
                               "convert with .long()/.int() or use // for integer division")
    if any(isinstance(i, slice) and i != slice(None) for i in idx):
        t = t[tuple(i if isinstance(i, slice) else slice(None) for i in idx)]
    ix = [None if isinstance(i, slice) else i if isinstance(i, torch.Tensor)
          else torch.tensor(int(i), dtype=torch.int64) for i in idx]
    while ix and ix[-1] is None:
        ix.pop()
    return torch.ops.aten.index(t, ix)


class _CaptureMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        site = user_site(sys._getframe(1), "")
        if site:
            fx_traceback.set_stack_trace([site])
        refused = _REFUSED.get(func)
        if refused is not None and args and _traced(args[0]):
            raise PatternError(*refused, site=site or None)
        if func is T.__getitem__:
            r = _getitem(*args)
            if r is not None:
                return r
        return func(*args, **kwargs)


# -- decompositions ------------------------------------------------------------------------------
_CORE: dict = {}


#: Activations outside torch's core decompositions that lower through where/clamp/exp.
_MORE = ("hardtanh", "leaky_relu", "elu", "celu", "selu", "hardsigmoid", "hardswish", "mish", "threshold",
         "softshrink", "hardshrink", "xlogy", "logit")


def _core(keep) -> dict:
    """torch's core aten decompositions and those of a few more activations, less the ops the
    lowering handles whole (``keep``)."""
    d = _CORE.get(keep)
    if d is None:
        from torch._decomp import core_aten_decompositions, get_decompositions

        more = get_decompositions([getattr(torch.ops.aten, n) for n in _MORE if hasattr(torch.ops.aten, n)])
        d = _CORE[keep] = {op: fn for op, fn in {**more, **core_aten_decompositions()}.items()
                           if getattr(op, "overloadpacket", None) not in keep}
    return d


def _python_kernel(op):
    """A decomposition for a custom op with a Python (CompositeExplicitAutograd) kernel: run that
    kernel, so the torch ops inside it are what the graph records (attn-gym's ``approx::tanh``)."""
    if not isinstance(op, torch._ops.OpOverload) or op.namespace in ("aten", "prims", "attndsl"):
        return None
    if not torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd"):
        return None
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda *a, **k: op.redispatch(keys, *a, **k)


@contextmanager
def _active():
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _held_devices(fn) -> set:
    """The non-CPU devices of the tensors ``fn`` holds (``reach.held_tensors``: the pattern cache's
    walk, lenient about objects it cannot key)."""
    return {t.device for t in held_tensors(fn) if t.device.type != "cpu"}


def capture(fn, n_args: int, keep) -> torch.fx.GraphModule:
    """``make_fx`` graph of ``fn`` called on ``n_args`` 0-d fake tensors (a float32 score first when
    ``n_args == 5``, then int32 ``b, h, q_idx, kv_idx``). ``keep``: aten overload packets the
    lowering handles itself (not decomposed). Errors raised by the function become
    :class:`PatternError` at the user's line."""
    with _disable_current_modes():  # an outer trace (make_fx, FakeTensorMode) sees none of this
        return _capture(fn, n_args, keep)


def _capture(fn, n_args, keep):
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    # the indices live where the pattern's tensors do: ``t[b, h, q_tile] == kv_tile.unsqueeze(-1)``
    # mixes them in ops torch refuses across devices (only 0-d CPU tensors may meet a CUDA one)
    held = _held_devices(fn)
    device = held.pop() if len(held) == 1 else "cpu"
    with fake:
        args = [torch.zeros((), dtype=torch.int32, device=device) for _ in range(4)]
        if n_args == 5:
            args.insert(0, torch.zeros((), dtype=torch.float32, device=device))
    table = _core(keep)

    def call(*a):  # make_fx counts the function's parameters: keep defaults (bias=bias) out of it
        return fn(*a)

    try:
        for _ in range(4):  # again with custom ops traced through their Python kernels, if any
            with _active(), fake, fx_traceback.preserve_node_meta(), _CaptureMode():
                gm = make_fx(call, tracing_mode="real", decomposition_table=table, pre_dispatch=False)(*args)
            extra = {n.target: k for n in gm.graph.nodes if n.op == "call_function"
                     and n.target not in table and (k := _python_kernel(n.target)) is not None}
            if not extra:
                return gm
            table = {**table, **extra}
        return gm
    except PatternError:
        raise
    except RecursionError:
        raise
    except Exception as e:  # the user's function failed on traced values: say where
        site = traceback_site(e.__traceback__) or definition_site(fn)
        what = getattr(fn, "__name__", type(fn).__name__)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if type(e).__name__ in ("DataDependentOutputException", "GuardOnDataDependentSymNode"):
            msg = "a traced value's content was needed in Python (control flow, int(), a slice bound...)"
        raise PatternError(f"{what!r} failed while tracing: {type(e).__name__}: {msg}", site=site) from e
