"""Draw the tile maps of the shipped patterns (docs/tilemaps/*.png) with matplotlib.

Each picture has one cell per (query tile, key tile) of the forward kernel, tile indices on the
axes: blue = visited as a full tile (no mask evaluated), orange = visited with the mask
evaluated, white = never visited. The maps replay the kernels' closed-form visit plans (``attndsl.tilemap``); their row
sums are what ``visit_counts`` reports on a device. Run from the repository root::

    python examples/tile_maps.py [OUT_DIR]

Masks that read captured tensors (``document``) have no static map: their tiles are classified on
the device per call. Score modifiers (ALiBi, softcap, relative biases) visit every tile.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attndsl  # noqa: E402
from attndsl.tilemap import save_tile_map, summary  # noqa: E402
from attndsl.patterns.causal import causal, causal_bottom_right  # noqa: E402
from attndsl.patterns.chunked import chunked  # noqa: E402
from attndsl.patterns.neighborhood import neighborhood  # noqa: E402
from attndsl.patterns.prefix_lm import prefix_lm  # noqa: E402
from attndsl.patterns.sliding_window import sliding_window  # noqa: E402
from attndsl.patterns.radial import radial, radial_block  # noqa: E402
from attndsl.patterns.sliding_tile import sliding_tile_3d  # noqa: E402

CASES = [
    # name, mask, block_m, block_n, what[, length]
    ("causal_4096", causal, 128, 64, "causal, L=4096", 4096),
    ("causal_bottom_right_1024x4096", causal_bottom_right(1024, 4096), 128, 64,
     "causal aligned to the bottom right, 1024 queries over 4096 keys (decode-style)", (1024, 4096)),
    ("sliding_window_4096_w512", sliding_window(512), 128, 64, "causal sliding window of 512, L=4096", 4096),
    ("chunked_4096_c1024", chunked(1024), 128, 64, "causal attention inside chunks of 1024, L=4096", 4096),
    ("prefix_lm_4096_p1024", prefix_lm(1024), 128, 64, "prefix LM, bidirectional prefix of 1024, L=4096", 4096),
    ("na2d_128x128_k13_rowmajor", neighborhood(attndsl.Layout((128, 128)), 13), 128, 128,
     "2-D neighborhood attention, 128x128 image, kernel 13, row-major order (one image row per tile)"),
    ("na2d_128x128_k13_tiled8x8", neighborhood(attndsl.Layout((128, 128), tile=(8, 8)), 13), 128, 64,
     "the same in tile-major order, 8x8 layout tiles (query tiles 8x16, key tiles 8x8)"),
    ("na3d_16x32x32_k5x7x7", neighborhood(attndsl.Layout((16, 32, 32), tile=(2, 4, 8)), (5, 7, 7), dilation=(1, 2, 1)),
     64, 64, "3-D neighborhood attention, 16x32x32 video, kernel 5x7x7, dilation 2 on the height axis"),
    ("sta3d_16x32x32_tile4x8x8_win3", sliding_tile_3d()[1], 128, 128,
     "sliding tile attention, 16x32x32 video, tiles 4x8x8, window 3x3x3 tiles"),
    ("sta3d_text256", sliding_tile_3d(text_tokens=256)[1], 128, 128,
     "the same with 256 text tokens after the video (global)"),
    ("radial_16x1024", radial(16, 1024), 128, 128,
     "radial attention, 16 frames x 1024 tokens, element-level mask (hunyuan, decay 1)"),
    ("radial_block_16x1024", radial_block(16, 1024, decay=0.5), 128, 128,
     "radial attention, block-level variant (128x128 tiles kept by density), decay 0.5"),
]


def main(out_dir="docs/tilemaps"):
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    for name, mask, bm, bn, what, *length in CASES:
        attn = attndsl.compile(mask_mod=mask, block_m=bm, block_n=bn)
        path = os.path.join(out_dir, f"{name}.png")
        lq, lkv = (length[0] if isinstance(length[0], tuple) else (length[0], None)) if length else (None, None)
        tmap = save_tile_map(attn, path, lq, lkv, block_m=bm, block_n=bn)
        lines.append(f"- `{name}.png`: {what}; tiles {bm}x{bn}: {summary(tmap)}")
        print(lines[-1])
    return lines


if __name__ == "__main__":
    main(*sys.argv[1:])
