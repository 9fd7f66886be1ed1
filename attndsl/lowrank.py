"""Low-rank bias factors: turn a dense bias into ``(u, w)`` for ``bias_factors=`` knowingly.

FlashBias's observation: many attention biases are close to low rank, and ``u·wᵀ`` rides along
the QK matrix multiply for R extra columns instead of an Lq×Lkv read. The truncated SVD is the
best rank-R approximation in Frobenius norm, and :func:`factorize_bias` says how far it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BiasFactors:
    u: torch.Tensor          # [B, H, Lq, R]
    w: torch.Tensor          # [B, H, Lkv, R]
    rank: int
    rel_error: float         # ‖bias − u·wᵀ‖_F / ‖bias‖_F
    max_abs_error: float     # max |bias − u·wᵀ|
    energy: float            # fraction of Σσ² kept

    def __iter__(self):  # so that ``bias_factors=factorize_bias(b, 16)`` works directly
        return iter((self.u, self.w))

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return (self.u, self.w)[i]


def factorize_bias(bias: torch.Tensor, rank: int, dtype: torch.dtype | None = None) -> BiasFactors:
    """Best rank-``rank`` factors of ``bias`` (``[Lq, Lkv]``, ``[H, Lq, Lkv]`` or ``[B, H, Lq, Lkv]``).

    Returns factors shaped ``[B|1, H|1, L, R]`` (ready for ``bias_factors``) and the error the
    truncation makes, measured on the given bias."""
    if not isinstance(bias, torch.Tensor) or bias.dim() not in (2, 3, 4):
        raise ValueError("bias must be a tensor of shape [Lq, Lkv], [H, Lq, Lkv] or [B, H, Lq, Lkv]")
    if not bias.dtype.is_floating_point:
        raise TypeError(f"bias must be floating, got {bias.dtype}")
    Lq, Lkv = bias.shape[-2:]
    if not 1 <= rank <= min(Lq, Lkv):
        raise ValueError(f"rank must be in 1..{min(Lq, Lkv)}, got {rank}")
    b = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).to(torch.float64)
    U, S, Vh = torch.linalg.svd(b, full_matrices=False)
    root = S[..., :rank].sqrt()
    u = U[..., :rank] * root[..., None, :]
    w = Vh[..., :rank, :].transpose(-1, -2) * root[..., None, :]
    approx = u @ w.transpose(-1, -2)
    err = b - approx
    total = (S ** 2).sum()
    kept = (S[..., :rank] ** 2).sum()
    out_dtype = dtype or bias.dtype
    return BiasFactors(u.to(out_dtype).contiguous(), w.to(out_dtype).contiguous(), rank,
                       float(err.norm() / b.norm().clamp_min(1e-300)), float(err.abs().max()),
                       float(kept / total.clamp_min(1e-300)))
