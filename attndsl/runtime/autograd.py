"""The autograd Function tying the forward and backward kernels together."""
from __future__ import annotations

import torch

from .launch import Extras


class AttentionFunction(torch.autograd.Function):
    """Inputs: q, k, v, sinks, u, w, then the captured tensors; all may receive gradients.
    Outputs: (out, lse) for softmax; ``out`` alone for sigmoid, which has no row statistics."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, u, w, runner, scale, tables, sigmoid_bias, *buffers):
        extras = Extras(sinks, u, w, sigmoid_bias)
        # one key for the call's launches, forward and backward (block tables: no memo)
        key = runner.call_key(q, k, v, scale, extras, buffers) if tables is None else None
        out, lse, _ = runner.forward(q, k, v, scale, buffers, tables, extras, key=key)
        # ``out`` is float32 under ``runner.precise_delta``: that copy is what the backward reads
        ctx.save_for_backward(q, k, v, out, lse, sinks, u, w, *buffers)
        out = out.to(q.dtype)
        ctx.runner, ctx.scale, ctx.tables, ctx.sigmoid_bias, ctx.key = runner, scale, tables, sigmoid_bias, key
        # an unused lse gets None, not a zero tensor the backward would subtract (two launches a call)
        ctx.set_materialize_grads(False)
        return out if lse is None else (out, lse)

    @staticmethod
    def backward(ctx, dout, dlse=None):
        q, k, v, out, lse, sinks, u, w, *buffers = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out, dtype=q.dtype)
        extras = Extras(sinks, u, w, ctx.sigmoid_bias)
        dq, dk, dv, dsinks, du, dw, dbufs = ctx.runner.backward(
            q, k, v, out, lse, dout, dlse, ctx.scale, buffers, ctx.tables, extras, key=ctx.key)
        grads = [dbufs.get(i) if t.requires_grad else None for i, t in enumerate(buffers)] if buffers else ()
        return refuse_second_derivative((q, k, v, sinks, u, w, *buffers),
                                        (dq, dk, dv, dsinks, du, dw, None, None, None, None, *grads))


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
