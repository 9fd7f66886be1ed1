"""The autograd Function tying the forward and backward kernels together."""
from __future__ import annotations

import torch


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, runner, scale, tables, n_buffers, *buffers):
        out, lse, _ = runner.forward(q, k, v, scale, buffers, tables)
        ctx.save_for_backward(q, k, v, out, lse, *buffers)
        ctx.runner, ctx.scale, ctx.tables = runner, scale, tables
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *buffers = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ctx.runner.backward(q, k, v, out, lse, dout, dlse, ctx.scale, buffers, ctx.tables)
        return (dq, dk, dv, None, None, None, None) + (None,) * len(buffers)
