"""The autograd Function tying the forward and backward kernels together."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .launch import Prepared, Runner
from .marshal import Extras


def any_grad(sinks, u, w, tensors) -> bool:
    """Whether sink logits, low-rank factors or captured tensors of a call need a gradient (then it
    goes through the autograd Function even where q, k and v do not)."""
    return (sinks is not None and sinks.requires_grad) or (u is not None and (u.requires_grad or w.requires_grad)) \
        or any(t.requires_grad for t in tensors)


class Call(NamedTuple):
    """What a call's launches need besides the tensors: one argument of the Function, not five."""

    runner: Runner
    scale: float
    tables: object  # BlockTables or None
    extras: Extras  # holds the same sinks / u / w the Function takes as inputs (for their gradients)
    #: the call key's prepared launches (``launch.Prepared``) of forward and backward (those of a
    #: call with block tables take its tables); None: no memo
    prepared: Prepared | None


class AttentionFunction(torch.autograd.Function):
    """Inputs: q, k, v, sinks, u, w, a :class:`Call`, then the captured tensors; all tensors may
    receive gradients. Outputs: (out, lse) for softmax; ``out`` alone for sigmoid, which has no
    row statistics."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, u, w, call, *buffers):
        if call.prepared is not None:
            out, lse = call.runner.forward_prepared(call.prepared, q, k, v, call.scale, buffers, call.extras,
                                                    call.tables)
        else:
            out, lse, _ = call.runner.forward(q, k, v, call.scale, buffers, call.tables, call.extras)
        # ``out`` is float32 under ``runner.precise_delta``: that copy is what the backward reads;
        # sinks and factors are saved only when there are some (each saved slot costs unpacking)
        ctx.saved_extras = sinks is not None or u is not None
        if ctx.saved_extras:
            ctx.save_for_backward(q, k, v, out, lse, sinks, u, w, *buffers)
        else:
            ctx.save_for_backward(q, k, v, out, lse, *buffers)
        if out.dtype != q.dtype:
            out = out.to(q.dtype)
        ctx.call = call
        # an unused lse gets None, not a zero tensor the backward would subtract (two launches a call)
        ctx.set_materialize_grads(False)
        return out if lse is None else (out, lse)

    @staticmethod
    def backward(ctx, dout, dlse=None):
        if ctx.saved_extras:
            q, k, v, out, lse, sinks, u, w, *buffers = ctx.saved_tensors
        else:
            (q, k, v, out, lse, *buffers), sinks, u, w = ctx.saved_tensors, None, None, None
        if dout is None:
            dout = torch.zeros_like(out, dtype=q.dtype)
        call = ctx.call
        if call.prepared is not None:
            dq, dk, dv, dsinks, du, dw, dbufs = call.runner.backward_prepared(
                call.prepared, q, k, v, out, lse, dout, dlse, call.scale, buffers, call.extras, call.tables)
        else:
            dq, dk, dv, dsinks, du, dw, dbufs = call.runner.backward(
                q, k, v, out, lse, dout, dlse, call.scale, buffers, call.tables, call.extras)
        grads = [dbufs.get(i) if t.requires_grad else None for i, t in enumerate(buffers)] if buffers else ()
        if not torch.is_grad_enabled():  # the usual backward (no create_graph): nothing to tie
            return (dq, dk, dv, dsinks, du, dw, None, *grads)
        return refuse_second_derivative((q, k, v, sinks, u, w, *buffers), (dq, dk, dv, dsinks, du, dw, None, *grads))


def raw_apply(function):
    """``function.apply`` (an autograd Function's) as a function of its positional arguments that
    calls the C entry directly where no functorch transform is active: the Python wrapper's work
    (binding default arguments for ``setup_context`` Functions, unwrapping dead functorch wrappers,
    microseconds a call) is then for arguments these calls do not have."""
    raw = torch._C._FunctionBase.__dict__["apply"].__get__(None, function)
    wrapped = function.apply
    active = torch._C._are_functorch_transforms_active

    def apply(*args):
        if active():
            return wrapped(*args)
        return raw(*args)
    apply.__doc__ = f"``{function.__name__}.apply`` (see ``raw_apply``)."
    return apply


#: ``AttentionFunction.apply(q, k, v, sinks, u, w, call, *buffers)`` (``raw_apply``)
apply = raw_apply(AttentionFunction)


def refuse_second_derivative(inputs, grads):
    """The gradients, tied to a differentiable input when `create_graph=True`, so that
    differentiating them raises a clear error.

    The backward kernels have no derivative of their own; left alone, `create_graph=True` would
    hand back gradients with no history, and a gradient penalty would silently lose attention's
    share of the second derivative."""
    if not torch.is_grad_enabled():  # the usual backward: nothing to tie
        return tuple(grads)
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    if anchor is None:
        return tuple(grads)
    where = [i for i, g in enumerate(grads) if g is not None]
    tied = _NoSecondDerivative.apply(anchor, *(grads[i] for i in where))
    out = list(grads)
    for i, g in zip(where, tied if isinstance(tied, tuple) else (tied,)):
        out[i] = g
    return tuple(out)


class _NoSecondDerivative(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "attndsl.attention has no second derivative: its gradients come from backward kernels "
            "that are not differentiable (double backward, create_graph=True gradient penalties and "
            "Hessian products through attention are not supported)")
