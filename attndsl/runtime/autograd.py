"""The autograd Function tying the forward and backward kernels together."""
from __future__ import annotations

import torch

from .launch import Extras


class AttentionFunction(torch.autograd.Function):
    """Inputs: q, k, v, sinks, u, w, then the captured tensors; all may receive gradients."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, u, w, runner, scale, tables, sigmoid_bias, *buffers):
        extras = Extras(sinks, u, w, sigmoid_bias)
        out, lse, _ = runner.forward(q, k, v, scale, buffers, tables, extras)
        ctx.save_for_backward(q, k, v, out, lse, sinks, u, w, *buffers)
        ctx.runner, ctx.scale, ctx.tables, ctx.sigmoid_bias = runner, scale, tables, sigmoid_bias
        # an unused lse gets None, not a zero tensor the backward would subtract (two launches a call)
        ctx.set_materialize_grads(False)
        if runner.spec.normalizer != "softmax":
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks, u, w, *buffers = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        extras = Extras(sinks, u, w, ctx.sigmoid_bias)
        dq, dk, dv, dsinks, du, dw, dbufs = ctx.runner.backward(
            q, k, v, out, lse, dout, dlse, ctx.scale, buffers, ctx.tables, extras)
        grads = [dbufs.get(i) if t.requires_grad else None for i, t in enumerate(buffers)]
        return (dq, dk, dv, dsinks, du, dw, None, None, None, None, *grads)
