"""FlexAttention interop: ``from attndsl import flex_attention, create_block_mask`` ports code unchanged.

A FlexAttention ``BlockMask`` is a materialised block-sparse summary of a ``mask_mod``; attndsl
analyses the ``mask_mod`` itself, so a BlockMask is read for its ``mask_mod`` and lengths only.
:func:`create_block_mask` returns a :class:`PatternMask` that records them without evaluating
anything (no O(L²) pass, no device memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

try:  # torch >= 2.8: AuxRequest/AuxOutput
    from torch.nn.attention.flex_attention import AuxOutput, AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxOutput = AuxRequest = None

#: FlexAttention kernel options that set attndsl's tiles (our keyword)
_TILE_KEYS = {"BLOCK_M": 0, "BLOCK_N": 1, "num_warps": 2, "num_stages": 3}


def _flex_option_names() -> frozenset:
    try:
        from torch.nn.attention.flex_attention import FlexKernelOptions
        names = set(getattr(FlexKernelOptions, "__annotations__", {}))
    except ImportError:  # pragma: no cover
        names = set()
    return frozenset(names | set(_TILE_KEYS) | {"PRESCALE_QK", "ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS",
                                                "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION", "BACKEND"})


def tile_options(kernel_options: dict) -> tuple:
    """``(block_m, block_n, num_warps, num_stages)`` from FlexAttention's ``kernel_options``: those four
    keys map to attndsl's tiles; Flex's other options tune Flex's own kernel and are ignored; a key
    Flex does not know raises (a typo should not pass silently)."""
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict, got {type(kernel_options).__name__}")
    known = _flex_option_names()
    unknown = sorted(k for k in kernel_options if k not in known)
    if unknown:
        raise ValueError(f"kernel_options: unknown option(s) {unknown}; attndsl reads BLOCK_M, BLOCK_N, num_warps, "
                         "num_stages and ignores FlexAttention's other options")
    out = [None, None, None, None]
    for k, i in _TILE_KEYS.items():
        if kernel_options.get(k) is not None:
            val = kernel_options[k]
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"kernel_options[{k!r}] must be a positive int, got {val!r}")
            out[i] = val
    return tuple(out)


@dataclass(frozen=True)
class PatternMask:
    """What :func:`create_block_mask` returns: a ``mask_mod`` and the lengths it was made for.

    Accepted wherever FlexAttention's ``BlockMask`` is (``block_mask=`` of :func:`attndsl.attention`
    and :func:`flex_attention`). Nothing is evaluated or stored on a device.

    Attributes:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
        B, H: batch and heads the mask was made for (None: broadcast over them).
        seq_lengths: ``(Q_LEN, KV_LEN)``.
        BLOCK_SIZE: ``(q, kv)`` block size requested (kept for FlexAttention compatibility; attndsl
            picks its own tiles).
        device: the device requested.
    """

    mask_mod: Callable
    B: int | None
    H: int | None
    seq_lengths: tuple[int, int]
    BLOCK_SIZE: tuple[int, int] = (128, 128)
    device: Any = None

    @property
    def shape(self) -> tuple:
        """``(B, H, Q_LEN, KV_LEN)`` as FlexAttention's BlockMask reports it (1 for a broadcast dim)."""
        return (self.B or 1, self.H or 1, *self.seq_lengths)

    def to(self, device) -> "PatternMask":
        """The same mask, recorded for ``device`` (nothing to move)."""
        return PatternMask(self.mask_mod, self.B, self.H, self.seq_lengths, self.BLOCK_SIZE, device)

    def __repr__(self):
        name = getattr(self.mask_mod, "__name__", repr(self.mask_mod))
        return f"PatternMask(mask_mod={name}, shape={self.shape})"


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


def _noop(mask_mod) -> bool:
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # pragma: no cover
        return False
    return mask_mod is noop_mask


def mask_of_block_mask(block_mask, query: torch.Tensor, key: torch.Tensor):
    """The ``mask_mod`` of a FlexAttention ``BlockMask`` or a :class:`PatternMask` (None for a
    BlockMask without a mask), after checking its lengths against the call's as FlexAttention does."""
    mask_mod = getattr(block_mask, "mask_mod", None)
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is None:
        raise TypeError(f"block_mask must be a torch.nn.attention.flex_attention.BlockMask or the result of "
                        f"attndsl.create_block_mask, got {type(block_mask).__name__}")
    if mask_mod is None or _noop(mask_mod):
        return None
    if getattr(mask_mod, "__name__", "") == "_sliced_mask_mod_error":
        raise RuntimeError("Cannot use mask_mod from a sliced BlockMask")
    Lq, Lkv = query.shape[-2], key.shape[-2]
    if (int(seq[0]), int(seq[1])) != (Lq, Lkv):
        raise ValueError(f"block_mask was created for lengths (Q_LEN, KV_LEN) = {tuple(seq)} but the call has "
                         f"q_len={Lq} and kv_len={Lkv}; create the block mask for the call's lengths")
    return mask_mod


def check_aux(return_aux, return_lse: bool, normalizer: str) -> None:
    """Validate ``return_aux`` as FlexAttention does."""
    if AuxRequest is None:  # pragma: no cover
        raise TypeError("return_aux needs torch.nn.attention.flex_attention.AuxRequest (torch >= 2.8)")
    if not isinstance(return_aux, AuxRequest):
        raise TypeError(f"return_aux must be a torch.nn.attention.flex_attention.AuxRequest, "
                        f"got {type(return_aux).__name__}")
    if return_lse:
        raise ValueError("Cannot specify both return_lse and return_aux. return_lse is deprecated, please use "
                         "return_aux=AuxRequest(lse=True) instead.")
    if return_aux.max_scores:
        raise NotImplementedError("return_aux=AuxRequest(max_scores=True): attndsl does not compute the rows' "
                                  "maximum scores; request lse only")
    if return_aux.lse and normalizer != "softmax":
        raise ValueError("return_aux=AuxRequest(lse=True) is not available with normalizer='sigmoid'")


def aux_output(got, return_aux):
    """``(out, AuxOutput(lse=...))`` from the call's result."""
    if return_aux.lse:
        out, lse = got
        return out, AuxOutput(lse=lse)
    return got, AuxOutput()


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
        block_mask (BlockMask | PatternMask | None): FlexAttention's BlockMask (its ``mask_mod`` is
            used, nothing materialised is read) or :func:`create_block_mask`'s result.
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
    from .api import attention
    return attention(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                     enable_gqa=bool(enable_gqa), return_lse=return_lse, return_aux=return_aux,
                     kernel_options=kernel_options)


__all__ = ["flex_attention", "create_block_mask", "PatternMask", "AuxRequest", "AuxOutput"]
