"""A small video diffusion transformer block: joint video + text attention with a 3-D locality pattern.

Video tokens (``T x H x W``) and text tokens share one attention, as in MM-DiT video models: the
text tokens sit after the video in the sequence, attend to everything and are attended by all;
among video tokens the pattern is either

* ``sta``: sliding tile attention (video in tile-major order, tiles of ``2x4x4`` tokens, a window
  of ``1x1x2`` tiles): every visited key tile is full, no element mask at all; or
* ``radial``: radial attention (frames of ``H*W`` tokens, window halving with frame distance,
  frame 0 as attention sink), whose ``bit_length`` arithmetic traces into integer IR.

The layout (``attndsl.Layout`` with ``suffix=text``) reorders the video tokens once; the block runs
in that order. Checked against PyTorch's SDPA with the same dense mask, forward and backward, on
the CPU (Triton interpreter)::

    python examples/video_block.py [sta|radial]
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attndsl  # noqa: E402
from attndsl.tilemap import summary, tile_map  # noqa: E402
from attndsl.patterns.radial import radial  # noqa: E402
from attndsl.patterns.sliding_tile import sliding_tile, sta_layout  # noqa: E402


class JointAttention(nn.Module):
    def __init__(self, dim, heads, mask_mod, block):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mask_mod = mask_mod
        self.attn = attndsl.compile(mask_mod=mask_mod, block_m=block[0], block_n=block[1])

    def qkv_heads(self, x):
        B, L, C = x.shape
        return self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv_heads(x)
        return self.proj(self.attn(q, k, v).transpose(1, 2).reshape(B, L, C))


class VideoBlock(nn.Module):
    def __init__(self, dim, heads, mask_mod, block):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = JointAttention(dim, heads, mask_mod, block)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):  # x: [B, L, C] in layout order (video tokens, then text)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def reference(block: VideoBlock, x):
    """The same block with SDPA and the pattern as a dense mask (same token order)."""
    L = x.shape[1]
    i = torch.arange(L)
    m = block.attn.mask_mod(0, 0, i[:, None], i[None, :])
    a = block.attn
    h = block.norm1(x)
    q, k, v = a.qkv_heads(h)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    x = x + a.proj(o.transpose(1, 2).reshape(x.shape))
    return x + block.mlp(block.norm2(x))


def build(kind: str, text: int = 16):
    if kind == "sta":
        layout = sta_layout((4, 8, 8), (2, 4, 4), text_tokens=text)
        return layout, sliding_tile(layout, (1, 1, 2)), (32, 32)
    if kind == "radial":
        mask = radial(4, 64, block=8, split_threshold=16, decay=1.0, text_tokens=text)
        return mask.layout, mask, (32, 32)
    raise SystemExit(f"unknown pattern {kind!r}: sta or radial")


def main(kind: str = "sta"):
    torch.manual_seed(0)
    layout, mask, blocks = build(kind)
    block = VideoBlock(dim=32, heads=2, mask_mod=mask, block=blocks)
    video = torch.randn(1, 4, 8, 8, 32)  # [B, T, H, W, C]
    text = torch.randn(1, 16, 32)
    if kind == "sta":
        seq = torch.cat([video.reshape(1, -1, 32), text], 1)  # natural order: video row-major, then text
        seq = layout.to_layout(seq, dim=1)  # video tokens into tile-major order
    else:
        seq = torch.cat([video.reshape(1, -1, 32), text], 1)  # frames of 64 tokens, then text
    seq.requires_grad_(True)
    y = block(seq)
    y.square().mean().backward()
    g = seq.grad.clone()
    seq.grad = None
    ref = reference(block, seq)
    ref.square().mean().backward()
    err = (y - ref).abs().max().item()
    gerr = (g - seq.grad).abs().max().item()
    attn = block.attn.attn
    print(f"{kind}: {layout}, max |out - SDPA| = {err:.2e}, max |d input| diff = {gerr:.2e}")
    print(f"visit plan: {type(attn.spec.fwd_range).__name__}, tiles {attn.spec.tiles}; {summary(tile_map(attn))}")
    assert err < 1e-4 and gerr < 1e-4


if __name__ == "__main__":
    main(*sys.argv[1:])
