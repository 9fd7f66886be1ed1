"""Layouts: tokens on a 1/2/3-D grid in row-major or tile-major order, plus extra tokens.

A :class:`Layout` says where each grid point sits in the sequence. Masks read coordinates from
it; because the coordinate functions are built from ``//`` and ``%`` only, the very same mask
function works when traced by attndsl and on real index tensors (FlexAttention, references)::

    lay = Layout((64, 64), tile=(8, 8))          # 8x8 tiles, tile-major order
    def mask(b, h, q, kv):
        qy, qx = lay.coords(q)
        ky, kx = lay.coords(kv)
        return ((qy - ky).abs() <= 3) & ((qx - kx).abs() <= 3)

    x_seq = lay.to_layout(x)                     # [B, H, 64*64, D], row-major -> tile-major
    out = lay.from_layout(attn(q_seq, k_seq, v_seq))

Traced, a coordinate is the IR op ``coord``: block analysis recognises it and computes, per query
tile, the *box* of key tiles the mask touches (``passes/box_analysis.py``), so every query tile
visits exactly the key tiles it needs with no block-mask tensor. Tile-major order is what makes
local 2-D/3-D windows dense per kernel tile: a kernel tile of ``BLOCK_N`` consecutive tokens is a
box of the grid when ``BLOCK_N`` is a multiple or divisor of the layout's tile volume in the
right way (:meth:`Layout.block_shape`); :meth:`Layout.kernel_tiles` picks such sizes.

Extra tokens (text before or after the video, registers...) are ``prefix`` tokens before the
grid and ``suffix`` tokens after it; :meth:`in_grid`, :meth:`is_extra`, :meth:`is_prefix` and
:meth:`is_suffix` let masks give them their own rules. Their "coordinates" continue the grid's
arithmetic (outside ``[0, shape)`` on the first axis) and mean nothing.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import ir
from .dsl.capture import coord_op, tracing
from .ir.coords import Grid, coord_value, index_value

_KERNEL_SIZES = (64, 128, 32, 16)


class Layout:
    """A ``shape`` grid (1-3 axes, slowest first, e.g. ``(T, H, W)``) in tile-major order.

    ``tile=None`` (or all ones) is row-major order; ``tile=(tt, th, tw)`` cuts the grid into
    tiles of that many tokens per axis (they must divide the grid), ordered row-major over the
    tile grid with tokens row-major inside each tile. ``prefix``/``suffix``: extra non-grid
    tokens before/after the grid.
    """

    def __init__(self, shape: int | Sequence[int], tile: int | Sequence[int] | None = None, *, prefix: int = 0,
                 suffix: int = 0) -> None:
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
        if not 1 <= len(shape) <= 3:
            raise ValueError(f"a layout has 1 to 3 axes, got shape {shape}")
        if tile is None:
            tile = (1,) * len(shape)
        tile = (tile,) if isinstance(tile, int) else tuple(int(t) for t in tile)
        if suffix < 0:
            raise ValueError("suffix must be >= 0")
        self.grid = Grid(shape, tile, int(prefix))
        self.shape, self.tile = shape, tile
        self.prefix, self.suffix = int(prefix), int(suffix)
        self._perm: dict = {}

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def grid_size(self) -> int:
        """Number of grid tokens."""
        return self.grid.size

    def __len__(self) -> int:
        """Sequence length: prefix + grid + suffix tokens."""
        return self.prefix + self.grid.size + self.suffix

    @property
    def grid_start(self) -> int:
        return self.prefix

    @property
    def grid_end(self) -> int:
        """One past the last grid position."""
        return self.prefix + self.grid.size

    @property
    def tile_volume(self) -> int:
        return self.grid.volume

    @property
    def row_major(self) -> bool:
        return all(t == 1 for t in self.tile) or self.tile == self.shape

    def __repr__(self):
        extra = "".join(f", {k}={getattr(self, k)}" for k in ("prefix", "suffix") if getattr(self, k))
        return f"Layout({self.shape}, tile={self.tile}{extra})"

    def __eq__(self, other):
        return isinstance(other, Layout) and (self.grid, self.suffix) == (other.grid, other.suffix)

    def __hash__(self):
        return hash((self.grid, self.suffix))

    def __attndsl_key__(self) -> tuple:
        """What a traced pattern reads of this layout (its IR holds the coordinates' constants): the
        pattern cache keys a mask holding a layout by it, so ``attndsl.attention`` traces a layout
        pattern once (a layout is not changed after it is made)."""
        return (self.shape, self.tile, self.prefix, self.suffix)

    # -- coordinates (usable in masks: traced values, tensors, ints) ----------------------------
    def coord(self, idx, axis: int):
        """Coordinate ``axis`` of sequence position ``idx``."""
        if not 0 <= axis < self.ndim:
            raise IndexError(f"axis {axis} out of range for a {self.ndim}-D layout")
        attr = self.grid.attr(axis)
        if tracing() and isinstance(idx, torch.Tensor):  # one opaque op while a pattern is traced
            return coord_op(idx, list(attr[0]), list(attr[1]), attr[2], attr[3])
        return coord_value(attr, idx)

    def coords(self, idx) -> tuple:
        """All coordinates of ``idx``, slowest axis first (e.g. ``t, y, x``)."""
        return tuple(self.coord(idx, a) for a in range(self.ndim))

    def tile_coords(self, idx) -> tuple:
        """Coordinates of the layout tile holding ``idx`` (``coords // tile``)."""
        return tuple(c // t if t != 1 else c for c, t in zip(self.coords(idx), self.tile))

    def index(self, *coords):
        """Sequence position of grid coordinates (ints or tensors; the inverse of :meth:`coords`)."""
        if len(coords) == 1 and isinstance(coords[0], (tuple, list)):
            coords = tuple(coords[0])
        if len(coords) != self.ndim:
            raise ValueError(f"expected {self.ndim} coordinates, got {len(coords)}")
        return index_value(self.grid, coords)

    def in_grid(self, idx):
        """True for grid tokens (not prefix/suffix)."""
        if self.prefix:
            return (idx >= self.prefix) & (idx < self.grid_end)
        return idx < self.grid_end

    def is_extra(self, idx):
        """True for the prefix and suffix tokens."""
        if self.prefix:
            return (idx < self.prefix) | (idx >= self.grid_end)
        return idx >= self.grid_end

    def is_prefix(self, idx):
        return idx < self.prefix

    def is_suffix(self, idx):
        return idx >= self.grid_end

    # -- kernel tiles ---------------------------------------------------------------------------
    def block_shape(self, block: int):
        """Grid extent per axis of every aligned run of ``block`` tokens, or None when such runs
        are not boxes (or do not line up with the prefix)."""
        if self.prefix % block:
            return None
        return self.grid.block_shape(block)

    def kernel_tiles(self, sizes=_KERNEL_SIZES):
        """``(block_m, block_n)``: the first of ``sizes`` whose tiles are boxes of the grid
        (so block analysis over coordinates applies), or None."""
        for s in sizes:
            if self.block_shape(s) is not None:
                return (s, s)
        return None

    # -- tensors in and out of the layout -------------------------------------------------------
    def permutation(self, device=None) -> torch.Tensor:
        """``perm[i]`` = natural position of layout position ``i``; the natural order is prefix
        tokens, the grid row-major (C order of ``shape``), suffix tokens."""
        key = torch.device(device) if device is not None else torch.device("cpu")
        p = self._perm.get(key)
        if p is None:
            pos = torch.arange(self.prefix, self.grid_end, dtype=torch.int64)
            cs = self.coords(pos)
            rm = torch.zeros_like(pos)
            for c, s in zip(cs, self.shape):
                rm = rm * s + c
            p = torch.cat([torch.arange(self.prefix), rm + self.prefix,
                           torch.arange(self.grid_end, len(self))]).to(key)
            self._perm[key] = p
        return p

    def inverse_permutation(self, device=None) -> torch.Tensor:
        p = self.permutation(device)
        inv = torch.empty_like(p)
        inv[p] = torch.arange(p.numel(), device=p.device)
        return inv

    def _check_len(self, x, dim):
        if x.shape[dim] != len(self):
            raise ValueError(f"dimension {dim} has {x.shape[dim]} tokens, the layout has {len(self)} "
                             f"({self.prefix} + {self.grid_size} + {self.suffix})")

    def to_layout(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Reorder tokens from natural (row-major grid) order into layout order along ``dim``
        (default ``-2``: ``[B, H, L, D]``)."""
        self._check_len(x, dim)
        return x.index_select(dim, self.permutation(x.device))

    def from_layout(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """Inverse of :meth:`to_layout`."""
        self._check_len(x, dim)
        return x.index_select(dim, self.inverse_permutation(x.device))

    def grid_positions(self, device=None) -> torch.Tensor:
        """Layout positions of the grid points as a ``shape`` tensor (``out[t, y, x]``)."""
        p = self.inverse_permutation(device)[self.prefix:self.grid_end]
        return p.reshape(self.shape)
