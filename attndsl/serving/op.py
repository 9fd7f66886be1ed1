"""The decode call as a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` sees one op.

``attndsl::decode`` takes the pattern as the registry key of ``runtime/op.py`` (the one the
attention ops use: a function cannot be an op argument) and its captured tensors as a list of
tensor inputs, bound per call; its fake implementation gives the output shapes, so dynamo and AOT
trace a model's decode step over it, and a compiled step captures in a CUDA graph (the op never
syncs with the device). Decoding is inference only: the op has no autograd registration.

Eager calls of :func:`attndsl.serving.decode` do not go through the dispatcher (its per-op host
time): they call :func:`attndsl.serving.decoding.run` directly, as this op's implementation does;
while dynamo traces, ``decode`` calls this op (``decoding._traced``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..runtime.op import REGISTRY
from .decoding import OPTION_KEYS, run


@torch.library.custom_op("attndsl::decode", mutates_args=())
def decode_op(query: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, q_offsets: Optional[Tensor],
              page_table: Optional[Tensor], buffers: list[Tensor], sinks: Optional[Tensor], u: Optional[Tensor],
              w: Optional[Tensor], indices: Optional[Tensor], pattern: str, scale: float,
              sigmoid_bias: Optional[float], max_seq_len: int, num_splits: int,
              options: list[int]) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq] float32)``; ``lse`` is empty (``[0]``) for the sigmoid
    normaliser. ``max_seq_len`` / ``num_splits`` 0: the default; ``options``: ``kernel_options`` in
    the order of ``decoding.OPTION_KEYS`` (-1: the default)."""
    compiled = REGISTRY[pattern]
    ko = {n: v for n, v in zip(OPTION_KEYS, options) if v >= 0}
    out, lse = run(compiled.spec, list(buffers), query, k_cache, v_cache, seq_lens, q_offsets, page_table,
                   scale=scale, normalizer=compiled.spec.normalizer, sigmoid_bias=sigmoid_bias, sinks=sinks,
                   bias_factors=None if u is None else (u, w), indices=indices, max_seq_len=max_seq_len or None,
                   num_splits=num_splits or None, kernel_options=ko or None)
    if lse is None:
        lse = query.new_empty((0,), dtype=torch.float32)
    return out, lse


@decode_op.register_fake
def _(query, k_cache, v_cache, seq_lens, q_offsets, page_table, buffers, sinks, u, w, indices, pattern, scale,
      sigmoid_bias, max_seq_len, num_splits, options):
    softmax = REGISTRY[pattern].spec.normalizer == "softmax"
    out = query.new_empty((*query.shape[:3], v_cache.shape[3]))
    return out, query.new_empty(query.shape[:3] if softmax else (0,), dtype=torch.float32)
