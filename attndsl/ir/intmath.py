"""Integer helpers shared by the evaluator, the tracer's eager path and patterns.

``bit_length(x)`` is Python's ``int.bit_length`` of ``|x|`` (``0 -> 0``, ``1 -> 1``, ``2..3 -> 2``,
``4..7 -> 3``...). torch has no such function, so on tensors it is a branch-free binary search
over right shifts: exact for every int32/int64 value, usable under ``vmap`` and ``torch.compile``
(FlexAttention's ``create_block_mask`` and its fused kernels).
"""
from __future__ import annotations

import torch


def bit_length_value(x):
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise TypeError(f"bit_length needs an integer tensor, got {x.dtype}")
        ax = x.abs()
        steps = (32, 16, 8, 4, 2, 1) if ax.dtype == torch.int64 else (16, 8, 4, 2, 1)
        n = torch.zeros_like(ax)
        for s in steps:
            hi = ax >> s
            m = hi > 0
            n = n + m.to(ax.dtype) * s
            ax = torch.where(m, hi, ax)
        return n + (ax > 0).to(ax.dtype)
    return abs(int(x)).bit_length()
