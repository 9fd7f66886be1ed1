"""Sliding tile attention (STA) for video.

Sliding tile attention (Zhang et al., 2025, "Fast Video Generation with Sliding Tile Attention",
arXiv:2502.04507; FastVideo) cuts a ``T x H x W`` video into tiles of ``tt x th x tw`` tokens,
stores the tokens tile-major (each tile contiguous), and lets every query attend to the keys of
a window of ``wt x wh x ww`` *tiles* around its own tile. As in the reference kernels the window
is centred on the query's tile and shifted at the borders, so it always spans exactly ``w`` tiles
per axis (window start ``clamp(tile - w // 2, 0, tiles - w)``). All queries of a tile share the
same key tiles, so every visited tile is full: there is no element-level mask work at all.

Optional text tokens (``text_tokens``; after the video by default, before it with
``text_first=True``) attend to every token and are attended by all, as in MM-DiT video models.
"""
from __future__ import annotations

from attndsl.layout import Layout


def sta_layout(video_shape, tile, text_tokens: int = 0, text_first: bool = False) -> Layout:
    """Tile-major layout of a ``(T, H, W)`` video with ``text_tokens`` extra tokens."""
    return Layout(tuple(video_shape), tuple(tile), prefix=text_tokens if text_first else 0,
                  suffix=0 if text_first else text_tokens)


def sliding_tile(layout: Layout, window):
    """STA mask over ``layout`` (its ``tile`` is the STA tile); ``window`` in tiles per axis."""
    nd = layout.ndim
    ws = (window,) * nd if isinstance(window, int) else tuple(window)
    if len(ws) != nd:
        raise ValueError(f"window needs {nd} values, got {window!r}")
    # a tuple, not a list: the pattern cache finds a pattern holding only immutable values by identity
    counts = tuple(s // t for s, t in zip(layout.shape, layout.tile))
    for w, n in zip(ws, counts):
        if not 1 <= w <= n:
            raise ValueError(f"window {ws} (in tiles) must lie in [1, tiles per axis {tuple(counts)}]")

    def tiles(q_idx, kv_idx):
        qt, kt = layout.tile_coords(q_idx), layout.tile_coords(kv_idx)
        m = None
        for a in range(nd):
            start = (qt[a] - ws[a] // 2).clamp(0, counts[a] - ws[a])
            w = (kt[a] >= start) & (kt[a] < start + ws[a])
            m = w if m is None else m & w
        return m

    def sliding_tile_mask(b, h, q_idx, kv_idx):
        return tiles(q_idx, kv_idx)

    def sliding_tile_mask_text(b, h, q_idx, kv_idx):
        return layout.is_extra(q_idx) | layout.is_extra(kv_idx) | tiles(q_idx, kv_idx)

    if layout.prefix or layout.suffix:
        sliding_tile_mask = sliding_tile_mask_text
    sliding_tile_mask.layout = layout
    return sliding_tile_mask


def sliding_tile_3d(video_shape=(16, 32, 32), tile=(4, 8, 8), window=(3, 3, 3), text_tokens: int = 0,
                    text_first: bool = False):
    """``(layout, mask)`` of STA on a ``(T, H, W)`` video (defaults: the benchmark case)."""
    lay = sta_layout(video_shape, tile, text_tokens, text_first)
    return lay, sliding_tile(lay, window)
