"""FlexAttention interop: ``from attndsl import flex_attention, create_block_mask`` ports code unchanged.

The drop-in entry points; what their arguments mean is :mod:`attndsl.flexcompat`.

:func:`create_block_mask` returns a :class:`PatternMask` that records the ``mask_mod`` and lengths
without evaluating anything (no O(L²) pass, no device memory).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .api import attention
from .flexcompat import AuxOutput, AuxRequest, PatternMask  # noqa: F401 (re-exported: FlexAttention's names)


def create_block_mask(mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int,
                      device: Any = None, BLOCK_SIZE: int | tuple[int, int] = 128, _compile: bool = False,
                      **_ignored) -> PatternMask:
    """FlexAttention's ``create_block_mask`` signature, without materialising anything.

    Args:
        mask_mod (Callable): ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
        B (int | None): batch size (None: the mask does not depend on ``b``).
        H (int | None): heads (None: the mask does not depend on ``h``).
        Q_LEN (int): query length the mask is for.
        KV_LEN (int): key length the mask is for.
        device: accepted for compatibility; nothing is allocated.
        BLOCK_SIZE (int | tuple[int, int]): accepted for compatibility (attndsl chooses tiles itself).
        _compile (bool): accepted and ignored (nothing to compile here).

    Returns:
        PatternMask: records ``mask_mod`` and the lengths; pass it as ``block_mask=`` to
        :func:`attndsl.attention` or :func:`flex_attention`. O(1) time and memory.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    for name, n in (("Q_LEN", Q_LEN), ("KV_LEN", KV_LEN)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    bs = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    return PatternMask(mask_mod, B, H, (Q_LEN, KV_LEN), bs, device)


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   score_mod: Callable | None = None, block_mask=None, scale: float | None = None,
                   enable_gqa: bool = False, return_lse: bool = False, kernel_options: dict | None = None, *,
                   return_aux=None):
    r"""A drop-in for ``torch.nn.attention.flex_attention.flex_attention`` running attndsl's kernels.

    Same signature and results: ``from attndsl import flex_attention`` ports code unchanged.

    Args:
        query (Tensor): ``[B, Hq, L, E]``.
        key (Tensor): ``[B, Hkv, S, E]``.
        value (Tensor): ``[B, Hkv, S, Ev]``.
        score_mod (Callable | None): ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
        block_mask (BlockMask | PatternMask | None): :func:`create_block_mask`'s result, or
            FlexAttention's BlockMask with FlexAttention's meaning (its listed kv blocks, partial
            and full, with ``mask_mod`` skipped on full blocks): run from the ``mask_mod`` alone when
            the block tensors are what it implies (checked once per BlockMask), else as block
            selections (see :func:`attndsl.attention`).
        scale (float | None): default ``1/sqrt(E)``.
        enable_gqa (bool): as FlexAttention: ``Hq != Hkv`` raises unless True.
        return_lse (bool): deprecated in FlexAttention; also return the logsumexp ``[B, Hq, L]``.
        kernel_options (dict | None): ``BLOCK_M``/``BLOCK_N``/``num_warps``/``num_stages`` set
            attndsl's tiles; FlexAttention's other options are ignored; unknown keys raise.
        return_aux (AuxRequest | None): ``AuxRequest(lse=True)``: return ``(out, AuxOutput)``.

    Returns:
        ``out [B, Hq, L, Ev]``; with ``return_lse`` ``(out, lse)``; with ``return_aux``
        ``(out, AuxOutput(lse=...))``. The lse is the natural-log logsumexp, as FlexAttention's.
    """
    if query.dim() == 4 and key.dim() == 4 and enable_gqa and query.shape[1] % key.shape[1] != 0:
        raise ValueError(f"Expect number of query heads to be a multiple of kv heads for GQA but got "
                         f"Hq={query.shape[1]} and Hkv={key.shape[1]}.")
    return attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                     enable_gqa=bool(enable_gqa), return_lse=return_lse, return_aux=return_aux,
                     kernel_options=kernel_options)


__all__ = ["flex_attention", "create_block_mask", "PatternMask", "AuxRequest", "AuxOutput"]
