"""Neighborhood attention on 1-D, 2-D and 3-D grids, with NATTEN's semantics.

Neighborhood attention (Hassani et al., 2023, arXiv:2204.07143; dilated: arXiv:2209.15001; the
NATTEN library) lets each token attend to a window of ``kernel_size`` grid neighbours per axis.
Per axis of length ``n`` with kernel size ``k``, dilation ``d`` and causal flag:

* the axis is split into ``d`` interleaved groups (``x % d``); a query only sees keys of its own
  group, and inside a group (local index ``x // d``, group length ``ceil((n - x % d) / d)``) the
  rules below apply to local indices (``d = 1``: one group, the plain axis);
* **non-causal**: the window of ``k`` consecutive local indices starts at
  ``clamp(i - k // 2, 0, group_len - k)``: centred on the query, and *shifted* (not truncated)
  at the borders, so every query has exactly ``k`` neighbours on that axis;
* **causal**: keys ``i - k + 1 .. i`` (no shift: the first queries see fewer keys).

A token attends to a key when every axis allows it. Axes need ``n >= k * d`` (as NATTEN
requires). NATTEN's classic kernels take odd kernel sizes; even sizes here use the same start rule
(``k // 2`` keys before the query, the window clamped inside the group).

The grid comes from an :class:`attndsl.Layout`: row-major or tile-major token order and optional
extra (prefix/suffix) tokens, which by default attend to everything and are attended by all
(``extra="global"``) or only see each other (``extra="isolated"``). The mask is plain torch code
(``//``, ``%``, ``clamp``, comparisons), so it runs under attndsl (whose block analysis turns it
into a box of key tiles per query tile) and under FlexAttention alike.
"""
from __future__ import annotations

import torch

from attndsl.layout import Layout


def _per_axis(v, nd, what):
    t = (v,) * nd if isinstance(v, (int, bool)) else tuple(v)
    if len(t) != nd:
        raise ValueError(f"{what} needs {nd} values (one per axis), got {v!r}")
    return t


def window_1d(qx, kx, n: int, k: int, d: int = 1, causal: bool = False):
    """NATTEN's rule on one axis of length ``n``: does the query at ``qx`` see the key at ``kx``?"""
    if d == 1:
        if causal:
            return (kx <= qx) & (kx > qx - k)
        start = (qx - k // 2).clamp(0, n - k)
        return (kx >= start) & (kx < start + k)
    same = (kx % d) == (qx % d)
    li, lj = qx // d, kx // d
    if causal:
        return same & (lj <= li) & (lj > li - k)
    group_len = (n - 1 - qx % d) // d + 1
    start = torch.minimum((li - k // 2).clamp(min=0), group_len - k)
    return same & (lj >= start) & (lj < start + k)


def neighborhood(layout: Layout, kernel_size, dilation=1, causal=False, extra: str = "global"):
    """NATTEN neighborhood attention mask on ``layout``'s grid (see the module docstring).

    ``kernel_size``, ``dilation`` and ``causal`` are one value or one per axis (slowest first).
    """
    nd = layout.ndim
    ks = _per_axis(kernel_size, nd, "kernel_size")
    ds = _per_axis(dilation, nd, "dilation")
    cs = tuple(bool(c) for c in _per_axis(causal, nd, "causal"))
    for n, k, d in zip(layout.shape, ks, ds):
        if k < 1 or d < 1:
            raise ValueError(f"kernel sizes and dilations must be >= 1, got {ks}, {ds}")
        if k * d > n:
            raise ValueError(f"kernel_size * dilation = {k * d} exceeds the axis length {n} "
                             f"(grid {layout.shape}, kernel {ks}, dilation {ds})")
    if extra not in ("global", "isolated"):
        raise ValueError(f"extra must be 'global' or 'isolated', got {extra!r}")

    def window(q_idx, kv_idx):
        qc, kc = layout.coords(q_idx), layout.coords(kv_idx)
        m = window_1d(qc[0], kc[0], layout.shape[0], ks[0], ds[0], cs[0])
        for a in range(1, nd):
            m = m & window_1d(qc[a], kc[a], layout.shape[a], ks[a], ds[a], cs[a])
        return m

    def neighborhood_mask(b, h, q_idx, kv_idx):
        return window(q_idx, kv_idx)

    def neighborhood_mask_global_extra(b, h, q_idx, kv_idx):
        return layout.is_extra(q_idx) | layout.is_extra(kv_idx) | window(q_idx, kv_idx)

    def neighborhood_mask_isolated_extra(b, h, q_idx, kv_idx):
        return ((layout.is_extra(q_idx) & layout.is_extra(kv_idx))
                | (layout.in_grid(q_idx) & layout.in_grid(kv_idx) & window(q_idx, kv_idx)))

    if layout.prefix or layout.suffix:
        neighborhood_mask = neighborhood_mask_global_extra if extra == "global" else neighborhood_mask_isolated_extra
    neighborhood_mask.layout = layout
    return neighborhood_mask


def neighborhood_1d(length: int, kernel_size: int, dilation: int = 1, causal: bool = False, tile=None):
    """``(layout, mask)`` for 1-D neighborhood attention over ``length`` tokens."""
    lay = Layout((length,), tile)
    return lay, neighborhood(lay, kernel_size, dilation, causal)


def neighborhood_2d(height: int, width: int, kernel_size, dilation=1, causal=False, tile=(8, 8)):
    """``(layout, mask)`` for 2-D neighborhood attention on an image in tile-major order
    (``tile=None``: row-major)."""
    lay = Layout((height, width), tile)
    return lay, neighborhood(lay, kernel_size, dilation, causal)


def neighborhood_3d(frames: int, height: int, width: int, kernel_size, dilation=1, causal=False, tile=(4, 4, 4)):
    """``(layout, mask)`` for 3-D neighborhood attention on a video in tile-major order."""
    lay = Layout((frames, height, width), tile)
    return lay, neighborhood(lay, kernel_size, dilation, causal)
