"""The decode call as a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` sees one op.

``attndsl::decode`` takes the pattern as the registry key of ``runtime/op.py`` (the one the
attention ops use: a function cannot be an op argument) and its captured tensors as a list of
tensor inputs, bound per call; its fake implementation gives the output shapes, so dynamo and AOT
trace a model's decode step over it, and a compiled step captures in a CUDA graph (the op never
syncs with the device). Decoding is inference only: the op has no autograd registration.

Eager calls of :func:`attndsl.serving.decode` do not go through the dispatcher (its per-op host
time): they call :func:`attndsl.serving.decoding.run` directly, as this op's implementation does.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..runtime.op import REGISTRY

#: kernel_options as the op's integer list (0: the default)
_OPTIONS = ("BLOCK_N", "BLOCK_M", "num_warps", "num_stages", "per_sm")


@torch.library.custom_op("attndsl::decode", mutates_args=())
def decode_op(query: Tensor, k_cache: Tensor, v_cache: Tensor, seq_lens: Tensor, q_offsets: Optional[Tensor],
              page_table: Optional[Tensor], buffers: list[Tensor], sinks: Optional[Tensor], u: Optional[Tensor],
              w: Optional[Tensor], indices: Optional[Tensor], pattern: str, scale: float,
              sigmoid_bias: Optional[float], max_seq_len: int, num_splits: int,
              options: list[int]) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq] float32)``; ``lse`` is empty (``[0]``) for the sigmoid
    normaliser. ``max_seq_len`` / ``num_splits`` 0: the default; ``options``: ``BLOCK_N, BLOCK_M,
    num_warps, num_stages, per_sm`` (0: the default)."""
    from .decoding import run
    compiled = REGISTRY[pattern]
    ko = {n: v for n, v in zip(_OPTIONS, options) if v}
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


def traced_decode(query, k_cache, v_cache, seq_lens, q_offsets, page_table, mask_mod, score_mod, scale, normalizer,
                  sigmoid_bias, sinks, bias_factors, indices, max_seq_len, num_splits, kernel_options):
    """:func:`attndsl.serving.decode` while dynamo traces: the pattern resolved once (a constant of
    the graph), its captured tensors followed from the functions (graph inputs bound per call), the
    shapes checked in plain Python, then the ``attndsl::decode`` op. Returns ``(out, lse | None)``."""
    from ..api import _resolve_for_trace
    from ..runtime.patterns import follow
    from .decoding import _check, _check_grads, _fail
    meta, paths = _resolve_for_trace(mask_mod, score_mod, normalizer, False, None)
    tensors = [follow((mask_mod, score_mod), p) for p in paths]
    _check(query, k_cache, v_cache, seq_lens, q_offsets, page_table, sinks, bias_factors, indices)
    _check_grads(query, k_cache, v_cache, sinks, bias_factors, tensors)
    ko = dict(kernel_options or {})
    unknown = set(ko) - set(_OPTIONS)
    if unknown:
        _fail(f"kernel_options: unknown keys {sorted(unknown)}; expected {', '.join(_OPTIONS)}")
    u, w = bias_factors if bias_factors is not None else (None, None)
    out, lse = torch.ops.attndsl.decode(query, k_cache, v_cache, seq_lens, q_offsets, page_table, tensors, sinks, u, w,
                                        indices, meta.key, query.shape[-1] ** -0.5 if scale is None else float(scale),
                                        None if sigmoid_bias is None else float(sigmoid_bias), int(max_seq_len or 0),
                                        int(num_splits or 0), [int(ko.get(n, 0)) for n in _OPTIONS])
    return out, (lse if normalizer == "softmax" else None)
