"""Radial attention: O(n log n) sparse attention with energy decay for video diffusion.

Radial attention (Li et al., 2025, "Radial Attention: O(n log n) Sparse Attention with Energy
Decay for Long Video Generation", arXiv:2506.19852; mit-han-lab/radial-attention) keeps, for a
video of ``F`` frames of ``N`` tokens, a band around the diagonal of each frame pair whose width
halves each time the frame distance doubles. With query frame ``i``, key frame ``j``,
``d = |i - j|``, in-frame positions ``r`` (query) and ``c`` (key), ``g = bit_length(d)`` and
``P = 2 ** bit_length(N)``, the public reference mask (``radial_attn/attn_mask.py``) allows a pair
when

* ``j == 0`` (the first frame is an attention sink), or
* ``|c - r| <= w(d)`` and the frame distance survives the split rule, where
  ``w(d) = N`` for ``d <= 1`` (``model="hunyuan"``; ``model="wan"``: ``N`` for ``d == 0`` and
  ``N // 2`` for ``d == 1``) and ``max(block, P / 2**g * decay)`` beyond; the split rule keeps
  every distance while ``P / 2**g >= split_threshold`` and otherwise only distances with
  ``d % (split_threshold * 2**g / P) == 0``.

Text tokens after the video (``text_tokens``) attend to everything and are attended by all.
The reference uses ``block_size`` (default 128) for the window floor and a hard-coded 128 for the
split threshold; both are parameters here (``block``, ``split_threshold``), defaulting to 128.

:func:`radial` is the exact element-level mask; :func:`radial_block` is the reference's
block-level variant: its 128x128 (``block``) tiles of each frame pair are kept when "enough" of
the element mask inside is dense (``shrinkMaskStrict``: among the tile's columns with any allowed
entry, more than 60% must have more than a third of their rows allowed), which for a band comes
down to ``|C - R| <= K(d)`` on in-frame block indices with ``K`` tabulated here per window width.

The integer ``bit_length``/shift arithmetic is written with :func:`attndsl.bit_length`, ``<<`` and
``>>``: it traces into exact integer IR (FlexAttention needs a precomputed table for it, see
:func:`radial_tables`), and it also runs on plain tensors.
"""
from __future__ import annotations

from fractions import Fraction

import torch

from attndsl.dsl.intops import bit_length
from attndsl.layout import Layout

MODELS = ("hunyuan", "wan")


def radial_layout(num_frames: int, tokens_per_frame: int, text_tokens: int = 0) -> Layout:
    """Frames x tokens in row-major order (frame-major, as the video tokens are), text after."""
    return Layout((num_frames, tokens_per_frame), suffix=text_tokens)


def _check(F, N, block, model, split_threshold, decay):
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if F < 1 or N < 1 or block < 1 or split_threshold < 1:
        raise ValueError("frames, tokens per frame, block and split_threshold must be >= 1")
    if decay <= 0:
        raise ValueError(f"decay must be > 0, got {decay}")


def _widths(N: int, block: int, decay) -> tuple[int, int]:
    """``(P, W0)``: ``P = 2**bit_length(N)`` and ``W0 = floor(P * decay)`` (so that
    ``floor(P / 2**g * decay) == W0 >> g`` exactly)."""
    P = 1 << N.bit_length()
    fr = Fraction(decay)
    return P, (P * fr.numerator) // fr.denominator


def window_width(d, N: int, block: int, decay, model: str):
    """``floor(w(d))`` for frame distances ``d`` (tensor, traced value or int)."""
    P, W0 = _widths(N, block, decay)
    g = bit_length(d)
    w = (W0 >> g).clamp(min=block) if not isinstance(d, int) else max(W0 >> g, block)
    if isinstance(d, int):
        if model == "hunyuan" and d <= 1:
            return N
        if model == "wan" and d <= 1:
            return N if d == 0 else N // 2
        return w
    if model == "hunyuan":
        return torch.where(d <= 1, N, w)
    return torch.where(d == 0, N, torch.where(d == 1, N // 2, w))


def split_keep(d, N: int, split_threshold: int = 128):
    """The reference's ``get_diagonal_split_mask`` for frame distance ``d``: is it kept?"""
    P = 1 << N.bit_length()
    g = bit_length(d)
    t = split_threshold << g
    if isinstance(d, int):
        return t <= P or d % max(t // P, 1) == 0
    return (t <= P) | (d % (t // P).clamp(min=1) == 0)


def radial(num_frames: int, tokens_per_frame: int, *, block: int = 128, decay: float = 1.0,
           model: str = "hunyuan", text_tokens: int = 0, split_threshold: int = 128, layout: Layout | None = None):
    """Exact element-level radial attention mask (see the module docstring)."""
    F, N = num_frames, tokens_per_frame
    _check(F, N, block, model, split_threshold, decay)
    lay = layout or radial_layout(F, N, text_tokens)
    if lay.shape != (F, N):
        raise ValueError(f"layout {lay} is not {F} frames x {N} tokens")

    def video(q_idx, kv_idx):
        i, r = lay.coords(q_idx)
        j, c = lay.coords(kv_idx)
        d = (i - j).abs()
        band = (c - r).abs() <= window_width(d, N, block, decay, model)
        return (j == 0) | (split_keep(d, N, split_threshold) & band)

    def radial_mask(b, h, q_idx, kv_idx):
        return video(q_idx, kv_idx)

    def radial_mask_text(b, h, q_idx, kv_idx):
        return lay.is_extra(q_idx) | lay.is_extra(kv_idx) | video(q_idx, kv_idx)

    if lay.prefix or lay.suffix:
        radial_mask = radial_mask_text
    radial_mask.layout = lay
    return radial_mask


def _kept_offsets(w: int, block: int, nb: int) -> int:
    """Largest ``|C - R|`` of the in-frame ``block`` tiles that ``shrinkMaskStrict`` keeps for the
    band ``|c - r| <= w``; -1 when none (the kept offsets are always ``|C - R| <= K``)."""
    kept = []
    cc = torch.arange(block)
    rr = torch.arange(block)[:, None]
    for delta in range(nb):
        allowed = ((delta * block + cc[None, :] - rr).abs() <= w)
        counts = allowed.sum(0)
        nonzero = int((counts > 0).sum())
        high = int((3 * counts > block).sum())  # density > 1/3
        kept.append(nonzero > 0 and 5 * high > 3 * nonzero)  # high / nonzero > 0.6
    K = -1
    for delta, k in enumerate(kept):
        if k:
            if delta != K + 1:
                raise NotImplementedError("kept block offsets are not contiguous")
            K = delta
    return K


def block_offsets(N: int, block: int, decay, model: str, max_distance: int) -> dict:
    """``K`` per frame-distance class for :func:`radial_block`: keys ``"d0"``, ``"d1"`` and the
    bit lengths ``g >= 2`` of larger distances."""
    nb = N // block
    out = {"d0": _kept_offsets(window_width(0, N, block, decay, model), block, nb),
           "d1": _kept_offsets(window_width(1, N, block, decay, model), block, nb)}
    for g in range(2, max(max_distance, 1).bit_length() + 1):
        out[g] = _kept_offsets(window_width(1 << (g - 1), N, block, decay, model), block, nb)
    return out


def radial_block(num_frames: int, tokens_per_frame: int, *, block: int = 128, decay: float = 1.0,
                 model: str = "hunyuan", text_tokens: int = 0, split_threshold: int = 128,
                 layout: Layout | None = None):
    """The reference's block-level radial mask (``block x block`` tiles; ``N % block == 0``)."""
    F, N = num_frames, tokens_per_frame
    _check(F, N, block, model, split_threshold, decay)
    if N % block:
        raise ValueError(f"the block-level variant needs tokens_per_frame ({N}) to be a multiple of block ({block})")
    lay = layout or radial_layout(F, N, text_tokens)
    if lay.shape != (F, N):
        raise ValueError(f"layout {lay} is not {F} frames x {N} tokens")
    K = block_offsets(N, block, decay, model, F - 1)
    top = max(F - 1, 1).bit_length()
    # the offsets the mask reads, as constants and a tuple (not the dict: the pattern cache finds
    # a pattern holding only immutable values by identity, without walking it each call)
    k_top = K.get(top, -1) if top >= 2 else -1
    k_groups = tuple((gg, K[gg]) for gg in range(top - 1, 1, -1))
    k_d0, k_d1 = K["d0"], K["d1"]

    def limit(d):
        """``K(d)``: the kept in-frame block offsets are ``|C - R| <= K(d)``."""
        g = bit_length(d)
        k = k_top
        for gg, kg in k_groups:
            k = torch.where(g == gg, kg, k)
        return torch.where(d == 0, k_d0, torch.where(d == 1, k_d1, k))

    def video(q_idx, kv_idx):
        i, r = lay.coords(q_idx)
        j, c = lay.coords(kv_idx)
        d = (i - j).abs()
        near = (c // block - r // block).abs() <= limit(d)
        return (j == 0) | (split_keep(d, N, split_threshold) & near)

    def radial_block_mask(b, h, q_idx, kv_idx):
        return video(q_idx, kv_idx)

    def radial_block_mask_text(b, h, q_idx, kv_idx):
        return lay.is_extra(q_idx) | lay.is_extra(kv_idx) | video(q_idx, kv_idx)

    if lay.prefix or lay.suffix:
        radial_block_mask = radial_block_mask_text
    radial_block_mask.layout = lay
    return radial_block_mask


def radial_tables(num_frames: int, tokens_per_frame: int, *, block: int = 128, decay: float = 1.0,
                  model: str = "hunyuan", split_threshold: int = 128, device=None):
    """Per frame distance ``d``: ``(window [F] int32, keep [F] bool)``, for FlexAttention users who
    prefer a table lookup (``radial_via_tables``) to the traced bit-length arithmetic."""
    F, N = num_frames, tokens_per_frame
    _check(F, N, block, model, split_threshold, decay)
    w = torch.tensor([window_width(d, N, block, decay, model) for d in range(F)], dtype=torch.int32, device=device)
    keep = torch.tensor([bool(split_keep(d, N, split_threshold)) for d in range(F)], device=device)
    return w, keep


def radial_via_tables(num_frames: int, tokens_per_frame: int, *, text_tokens: int = 0, device=None, **kw):
    """The element-level radial mask through per-distance tables (same mask as :func:`radial`)."""
    F, N = num_frames, tokens_per_frame
    lay = radial_layout(F, N, text_tokens)
    win, keep = radial_tables(F, N, device=device, **kw)

    def video(q_idx, kv_idx):
        i, r = q_idx // N, q_idx % N
        j, c = kv_idx // N, kv_idx % N
        d = (i - j).abs().clamp(max=F - 1)
        w, k = win, keep
        if isinstance(d, torch.Tensor) and w.device != d.device:  # eager calls: tables follow the indices
            w, k = w.to(d.device), k.to(d.device)
        return (j == 0) | (k[d] & ((c - r).abs() <= w[d]))

    def radial_table_mask(b, h, q_idx, kv_idx):
        return (q_idx >= F * N) | (kv_idx >= F * N) | video(q_idx, kv_idx)

    radial_table_mask.layout = lay
    return radial_table_mask
