"""A small vision transformer block with 2-D neighborhood attention (NATTEN semantics).

The image's tokens are put into tile-major order once, at the start (``Layout.to_layout``); the
layer norms and the MLP are per token, so the whole stack runs in that order and the result is
put back at the end (``from_layout``). In tile-major order the keys a tile of queries needs are a
small box of key tiles, which attndsl's block analysis derives from the mask itself: no
block-mask tensor, and key tiles entirely inside every query's window skip the mask.

Runs on the CPU (Triton interpreter) in a few seconds and checks itself against PyTorch's SDPA
with the same neighborhood as a dense boolean mask, forward and backward::

    python examples/vision_block.py
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
from attndsl.patterns.neighborhood import neighborhood  # noqa: E402


class NeighborhoodAttention2d(nn.Module):
    """Multi-head neighborhood attention over tokens already in ``layout`` order."""

    def __init__(self, dim, heads, layout: attndsl.Layout, kernel_size, dilation=1, block=None):
        super().__init__()
        self.heads, self.layout = heads, layout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mask_mod = neighborhood(layout, kernel_size, dilation)
        bm, bn = block or (None, None)
        self.attn = attndsl.compile(mask_mod=self.mask_mod, block_m=bm, block_n=bn)

    def forward(self, x):  # x: [B, L, C] in layout order
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        o = self.attn(q, k, v)  # [B, heads, L, C/heads]
        return self.proj(o.transpose(1, 2).reshape(B, L, C))


class VisionBlock(nn.Module):
    def __init__(self, dim, heads, layout, kernel_size, dilation=1, mlp_ratio=2, block=None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = NeighborhoodAttention2d(dim, heads, layout, kernel_size, dilation, block)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def sdpa_reference(block: VisionBlock, x_nat, layout):
    """The same block with SDPA and the neighborhood as a dense mask, in natural (row-major) order."""
    pos = layout.inverse_permutation()  # natural position -> layout position
    m = block.attn.mask_mod(0, 0, pos[:, None], pos[None, :])  # mask between natural positions
    a = block.attn
    B, L, C = x_nat.shape
    h = block.norm1(x_nat)
    q, k, v = a.qkv(h).view(B, L, 3, a.heads, C // a.heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    x = x_nat + a.proj(o.transpose(1, 2).reshape(B, L, C))
    return x + block.mlp(block.norm2(x))


def main():
    torch.manual_seed(0)
    H = W = 16
    layout = attndsl.Layout((H, W), tile=(4, 4))  # 4x4 tiles of 16 tokens
    block = VisionBlock(dim=32, heads=2, layout=layout, kernel_size=5, dilation=(1, 2), block=(32, 32))
    img = torch.randn(1, H, W, 32, requires_grad=True)
    x_nat = img.reshape(1, H * W, 32)

    y = layout.from_layout(block(layout.to_layout(x_nat, dim=1)), dim=1)  # permute in, run, permute out
    y.square().mean().backward()
    g_ours = img.grad.clone()

    img.grad = None
    ref = sdpa_reference(block, x_nat, layout)
    ref.square().mean().backward()
    err = (y - ref).abs().max().item()
    gerr = (g_ours - img.grad).abs().max().item()
    print(f"vision block, {H}x{W} image, kernel 5, dilation (1, 2): max |out - SDPA| = {err:.2e}, "
          f"max |d img| diff = {gerr:.2e}")
    attn = block.attn.attn
    print(f"visit plan: {type(attn.spec.fwd_range).__name__}, tiles {attn.spec.tiles}; "
          f"{summary(tile_map(attn))}")
    assert err < 1e-4 and gerr < 1e-4


if __name__ == "__main__":
    main()
