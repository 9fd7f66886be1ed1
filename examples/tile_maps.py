"""Draw the tile maps of the locality patterns (docs/tilemaps/*.png) with attndsl's own PNG writer.

Each picture has one pixel block per (query tile, key tile) of the forward kernel: blue = visited
as a full tile (no mask evaluated), orange = visited with the mask evaluated, white = never
visited. The maps replay the kernels' closed-form visit plans (``attndsl.tilemap``); their row
sums are what ``visit_counts`` reports on a device. Run from the repository root::

    python examples/tile_maps.py [OUT_DIR]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attndsl  # noqa: E402
from attndsl.tilemap import save_tile_map, summary  # noqa: E402
from attndsl.patterns.neighborhood import neighborhood  # noqa: E402
from attndsl.patterns.radial import radial, radial_block  # noqa: E402
from attndsl.patterns.sliding_tile import sliding_tile_3d  # noqa: E402

CASES = [
    # name, mask, block_m, block_n, what
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
    for name, mask, bm, bn, what in CASES:
        attn = attndsl.compile(mask_mod=mask, block_m=bm, block_n=bn)
        path = os.path.join(out_dir, f"{name}.png")
        tmap = save_tile_map(attn, path, grid_every=None)
        lines.append(f"- `{name}.png`: {what}; tiles {bm}x{bn}: {summary(tmap)}")
        print(lines[-1])
    return lines


if __name__ == "__main__":
    main(*sys.argv[1:])
