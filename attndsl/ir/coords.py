"""Token layouts as integer arithmetic: coordinates of an index and the index of coordinates.

A layout puts ``N = prod(shape)`` grid tokens at sequence positions ``prefix .. prefix + N - 1``
in *tile-major* order: the grid is cut into tiles of ``tile`` tokens per axis, tiles are ordered
row-major over the tile grid and the tokens of a tile row-major inside it. ``tile = (1, ..., 1)``
is plain row-major order. As mixed-radix digits, most significant first::

    (n_0, ..., n_{k-1}, t_0, ..., t_{k-1})     n_a = shape_a / t_a tiles along axis a

and coordinate ``a`` is ``tile_digit_a * t_a + in_tile_digit_a``. Everything here is built from
``//``, ``%``, ``*`` and ``+`` only, so the same functions work on Python ints, on torch tensors
(FlexAttention, tests) and, through :func:`coord_expr` / :func:`index_expr`, as IR.

The ``coord`` IR op (``ir.coord(index, attr)``, ``attr = (shape, tile, prefix, axis)``) stands for
``coord_value(attr, index)``; it is kept opaque so that passes can recognise layout coordinates
(block analysis over coordinates), and expanded into div/mod code by codegen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Grid:
    """The arithmetic of one layout: ``shape`` and ``tile`` per axis, ``prefix`` tokens before it."""

    shape: tuple
    tile: tuple
    prefix: int = 0

    def __post_init__(self):
        if len(self.shape) != len(self.tile) or not self.shape:
            raise ValueError(f"layout shape {self.shape} and tile {self.tile} must have the same (>0) rank")
        for s, t in zip(self.shape, self.tile):
            if t < 1 or s < 1 or s % t:
                raise ValueError(f"layout tile {self.tile} must divide the grid {self.shape}")
        if self.prefix < 0:
            raise ValueError("prefix must be >= 0")

    @classmethod
    def of(cls, attr) -> "Grid":
        return cls(tuple(attr[0]), tuple(attr[1]), int(attr[2]))

    def attr(self, axis: int) -> tuple:
        return (self.shape, self.tile, self.prefix, axis)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def volume(self) -> int:
        """Tokens per layout tile."""
        return math.prod(self.tile)

    @property
    def counts(self) -> tuple:
        """Tiles per axis."""
        return tuple(s // t for s, t in zip(self.shape, self.tile))

    def digits(self) -> list:
        """``(radix, axis, weight)`` from the most significant digit down; radix-1 digits dropped."""
        out = [(n, a, t) for a, (n, t) in enumerate(zip(self.counts, self.tile))]
        out += [(t, a, 1) for a, t in enumerate(self.tile)]
        return [d for d in out if d[0] > 1]

    def block_shape(self, block: int):
        """Extent per axis of every aligned run of ``block`` grid tokens, or None when such runs
        are not boxes (then a kernel tile of that size does not cover a box of coordinates)."""
        ext = [1] * self.ndim
        rest = block
        merged = []  # adjacent digits of one axis form one digit (a one-tile-wide tile grid row)
        for radix, axis, _ in self.digits():
            if merged and merged[-1][1] == axis:
                merged[-1] = (merged[-1][0] * radix, axis)
            else:
                merged.append((radix, axis))
        for radix, axis in reversed(merged):
            if rest == 1:
                break
            if rest % radix == 0:
                ext[axis] *= radix
                rest //= radix
            elif radix % rest == 0:
                ext[axis] *= rest
                rest = 1
            else:
                return None
        if rest != 1:
            return None
        return tuple(ext)


def _mul(a, c):
    return a if c == 1 else a * c


def coord_value(attr, index):
    """Coordinate ``attr[3]`` of ``index`` (int or tensor; floor semantics outside the grid)."""
    g = Grid.of(attr)
    a = attr[3]
    local = index - g.prefix if g.prefix else index
    V, counts = g.volume, g.counts
    div = V * math.prod(counts[a + 1:])
    tile_d = local // div if div != 1 else local
    if a > 0:
        tile_d = tile_d % counts[a] if counts[a] != 1 else None
    if g.tile[a] == 1:
        return tile_d if tile_d is not None else local * 0
    below_in = math.prod(g.tile[a + 1:])
    in_d = local % V
    if below_in != 1:
        in_d = in_d // below_in
    if a > 0:
        in_d = in_d % g.tile[a]
    return in_d if tile_d is None else _mul(tile_d, g.tile[a]) + in_d


def index_value(grid: Grid, coords):
    """Sequence position of grid coordinates (ints or tensors)."""
    t = None
    for a, c in enumerate(coords):
        td = c // grid.tile[a] if grid.tile[a] != 1 else c
        t = td if t is None else _mul(t, grid.counts[a]) + td
    out = _mul(t, grid.volume)
    i = None
    for a, c in enumerate(coords):
        if grid.tile[a] != 1:
            d = c % grid.tile[a]
            i = d if i is None else _mul(i, grid.tile[a]) + d
    if i is not None:
        out = out + i
    return out + grid.prefix if grid.prefix else out


# --- as IR -------------------------------------------------------------------------------------
def coord_expr(attr, index):
    """``coord_value`` as IR over an IR index (what codegen emits for a ``coord`` node)."""
    from .nodes import const, node

    g = Grid.of(attr)
    a = attr[3]
    local = node("sub", index, const(g.prefix)) if g.prefix else index
    V, counts = g.volume, g.counts
    div = V * math.prod(counts[a + 1:])
    tile_d = node("floordiv", local, const(div)) if div != 1 else local
    if a > 0:
        tile_d = node("mod", tile_d, const(counts[a])) if counts[a] != 1 else None
    if g.tile[a] == 1:
        return tile_d if tile_d is not None else const(0)
    below_in = math.prod(g.tile[a + 1:])
    in_d = node("mod", local, const(V))
    if below_in != 1:
        in_d = node("floordiv", in_d, const(below_in))
    if a > 0:
        in_d = node("mod", in_d, const(g.tile[a]))
    return in_d if tile_d is None else node("add", node("mul", tile_d, const(g.tile[a])), in_d)


def index_expr(grid: Grid, coords):
    """``index_value`` as IR over IR coordinates."""
    from .nodes import const, node

    def mul(x, c):
        return x if c == 1 else node("mul", x, const(c))

    t = None
    for a, c in enumerate(coords):
        td = node("floordiv", c, const(grid.tile[a])) if grid.tile[a] != 1 else c
        t = td if t is None else node("add", mul(t, grid.counts[a]), td)
    i = None
    for a, c in enumerate(coords):
        if grid.tile[a] == 1:
            continue
        d = node("mod", c, const(grid.tile[a]))
        i = d if i is None else node("add", mul(i, grid.tile[a]), d)
    out = mul(t, grid.volume)
    if i is not None:
        out = node("add", out, i)
    if grid.prefix:
        out = node("add", out, const(grid.prefix))
    return out
