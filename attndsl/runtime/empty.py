"""Calls where no query meets a key (B, Hq, Lq or Lkv is 0), answered without a kernel launch.

Variable-length batching produces them (an empty batch, a sequence with no context yet), and SDPA
answers them; a grid with no programs is not a launch Triton takes. Every row then sees no key, so
the result is the one a fully masked row has: zeros, ``lse = -inf`` (or the row's sink logit).
"""
from __future__ import annotations

import torch

from .checks import call_shape


def is_empty(query, key) -> bool:
    """Does this call have no (query, key) pair at all?"""
    return 0 in call_shape(query, key)


class EmptyAttention(torch.autograd.Function):
    """Inputs: q, k, v, sinks (or None), softmax (bool), then every other differentiable input
    (low-rank factors, captured tensors). Outputs: (out, lse); lse is None for sigmoid.

    No score exists, so every gradient is zero except the sinks': with no key, ``lse = sink`` and
    ``out = 0``, so ``d lse / d sink = 1``."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, softmax, *others):
        B, Hq, Lq = q.shape[:3]
        out = q.new_zeros((B, Hq, Lq, v.shape[3]))
        stats = torch.float64 if q.dtype == torch.float64 else torch.float32  # lse's dtype, as the kernels'
        if not softmax:
            lse = None
        elif sinks is not None:
            lse = sinks.detach().to(stats)[None, :, None].expand(B, Hq, Lq).contiguous()
        else:
            lse = torch.full((B, Hq, Lq), float("-inf"), dtype=stats, device=q.device)
        # shapes only: every gradient is a zero tensor of its input's shape
        ctx.like = [(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else None for t in (q, k, v, *others)]
        ctx.sinks_dtype = sinks.dtype if sinks is not None else None
        if lse is None:
            return out
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse=None):
        needs = ctx.needs_input_grad[:3] + ctx.needs_input_grad[5:]
        zeros = [torch.zeros(like[0], dtype=like[1], device=like[2]) if like is not None and need else None
                 for like, need in zip(ctx.like, needs)]
        dsinks = None
        if ctx.sinks_dtype is not None and dlse is not None and ctx.needs_input_grad[3]:
            dsinks = dlse.sum(dim=(0, 2)).to(ctx.sinks_dtype)
        q, k, v, *others = zeros
        return (q, k, v, dsinks, None, *others)


def empty_call(query, key, value, *, softmax: bool, return_lse: bool, sinks=None, others=()):
    """The public call's result for an empty call (see :func:`is_empty`); ``others``: the
    remaining differentiable inputs, which get zero gradients."""
    got = EmptyAttention.apply(query, key, value, sinks, softmax, *others)
    if not softmax:
        return got
    return got if return_lse else got[0]
