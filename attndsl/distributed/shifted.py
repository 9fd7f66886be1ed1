"""A pattern seen at global positions: the one place that knows how a shard's offsets reach the kernel.

The kernels number queries and keys from 0. A shard's local index ``i`` is the global position
``start + i * stride``, so the pattern is wrapped to see ``q_idx * q_stride + q_off`` and
``kv_idx * kv_stride + kv_off``. The strides are compile-time constants (one kernel per stride
pair: 1 for contiguous and zig-zag chunks, ``P`` for striped ones); the offsets are a captured
2-element int32 tensor, i.e. a kernel argument read at run time, so one compiled kernel serves
every (query chunk, key chunk) pair.

Why run-time offsets rather than Python-int constants: constants would compile one kernel per
offset pair (``(2P)²`` for zig-zag: 64 Triton compiles of a few seconds each on 4 GPUs, and the
on-disk source cache grows with every sharding); the loaded offsets cost two scalar loads per
program. The block analysis stays closed form: the offsets do not depend on ``q``/``kv``, so the
solver treats them as tile-uniform symbols and the kernel computes its key-tile ranges from the
loaded values (``visit_counts`` of a causal pair above the diagonal is 0, see the tests); only
masks that were data dependent before (document ids) build block tables, as they would anyway.
Caveats: the offsets tensor is mutated between launches (stream-ordered ``fill_``, so no host
sync), and a pattern whose captured tensors are index-checked against values (``ids[q]``) reads
the offsets' extremes once per call (``ATTNDSL_CHECK_INDICES=0`` turns that check off).

When the kernels take native position offsets (planned with the decoding work), only
:class:`ShiftedPattern` changes: it would pass ``q_offset=``/``kv_offset=`` to the call instead of
wrapping the pattern.
"""
from __future__ import annotations

import torch

from ..api import compile as _compile
from .sharding import Chunk


class ShiftedPattern:
    """``mask_mod``/``score_mod`` over global positions, called on one (query chunk, key chunk) pair.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx)`` over global positions, or None.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` over global positions, or None.
        compile_kwargs: further keywords of :func:`attndsl.compile` (tiles, warps, determinism).
    """

    def __init__(self, mask_mod=None, score_mod=None, **compile_kwargs):
        self.mask_mod, self.score_mod = mask_mod, score_mod
        self.compile_kwargs = compile_kwargs
        self._compiled: dict = {}  # (q_stride, kv_stride, device) -> (CompiledAttention, offsets)

    def _get(self, q_stride: int, kv_stride: int, device: torch.device):
        key = (q_stride, kv_stride, str(device))
        got = self._compiled.get(key)
        if got is None:
            off = torch.zeros(2, dtype=torch.int32, device=device)
            m, s = self.mask_mod, self.score_mod

            def gq(q):
                return q * q_stride + off[0] if q_stride != 1 else q + off[0]

            def gk(kv):
                return kv * kv_stride + off[1] if kv_stride != 1 else kv + off[1]

            def shifted_mask(b, h, q_idx, kv_idx):
                return m(b, h, gq(q_idx), gk(kv_idx))

            def shifted_score(score, b, h, q_idx, kv_idx):
                return s(score, b, h, gq(q_idx), gk(kv_idx))

            compiled = _compile(mask_mod=shifted_mask if m is not None else None,
                                score_mod=shifted_score if s is not None else None, **self.compile_kwargs)
            got = self._compiled[key] = (compiled, off)
        return got

    def learnable(self, device: torch.device) -> list[torch.Tensor]:
        """The captured floating tensors that require grad (they receive gradients)."""
        compiled, _ = self._get(1, 1, device)
        return [t for t in compiled.tensors if t.requires_grad and t.dtype.is_floating_point]

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_chunk: Chunk,
                 kv_chunk: Chunk, *, scale: float | None = None, bias_factors=None):
        """Attention of ``query`` (global positions ``q_chunk``) over ``key``/``value`` (``kv_chunk``).

        Args:
            query: ``[B, Hq, q_chunk.length, D]``.
            key, value: ``[B, Hkv, kv_chunk.length, D]`` / ``[..., Dv]``.
            q_chunk, kv_chunk: the global positions of the rows and keys.
            scale: score scale (default ``D ** -0.5``).
            bias_factors: ``(u, w)`` for this pair (u of the queries, w of the keys) or None.

        Returns:
            ``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq] float32)``; differentiable.
        """
        compiled, off = self._get(q_chunk.stride, kv_chunk.stride, query.device)
        # stream-ordered writes: the launch below reads them, a later pair's writes come after it
        off[0].fill_(q_chunk.start)
        off[1].fill_(kv_chunk.start)
        return compiled(query, key, value, scale=scale, return_lse=True, bias_factors=bias_factors)
