"""Tile maps: which key tiles each query tile visits, and which of them skip the mask.

:func:`tile_map` replays a compiled pattern's visit plan in Python (vectorised torch, evaluating
the very IR expressions the kernels evaluate): for the forward kernel's tiling it returns an
``[n_q_tiles, n_kv_tiles]`` int8 map, 0 = not visited, 1 = visited with the mask evaluated
(partial), 2 = visited as a full tile. Its row sums equal the forward kernel's
``visit_counts`` (tests check that). :func:`save_tile_map` writes it as a PNG with a tiny
pure-Python PNG writer (zlib only, no imaging library), so the picture of a pattern is produced by
the project itself::

    attndsl tilemap patterns/neighborhood.py:neighborhood_2d(64,64,13) --out na2d.png
"""
from __future__ import annotations

import math
import struct
import zlib

import torch

from .ir.coords import Grid, coord_value
from .ir.evaluate import evaluate
from .spec import VisitBox

NOT_VISITED, PARTIAL, FULL = 0, 1, 2
COLORS = {NOT_VISITED: (255, 255, 255), PARTIAL: (230, 120, 30), FULL: (30, 70, 160)}


def _ev(node, env):
    return evaluate([node], env, [])[0]


def _range_map(rng, env, rows, n_t, block, t_max, tile_full=None, tile_nonempty=None, env2=None):
    """1-D visit range → ``[rows, n_t]`` map (the kernel's ``_plan_lines`` arithmetic)."""
    lo = torch.clamp(_ev(rng.outer[0], env), min=0)
    hi = torch.minimum(_ev(rng.outer[1], env), torch.tensor(t_max))
    ilo = torch.clamp(_ev(rng.inner[0], env), min=0)
    ihi = torch.minimum(_ev(rng.inner[1], env), torch.tensor(t_max))
    t = torch.arange(n_t).view(1, -1)
    lo, hi, ilo, ihi = (torch.broadcast_to(x.reshape(-1, 1), (rows, 1)) for x in (lo, hi, ilo, ihi))
    t_begin = lo // block
    t_end = torch.where(lo <= hi, hi // block + 1, t_begin)
    f_begin = torch.maximum((ilo + block - 1) // block, t_begin)
    f_end = torch.minimum((ihi + 1) // block, t_end)
    visit = (t >= t_begin) & (t < t_end)
    full = visit & (t >= f_begin) & (t < f_end)
    if rng.tile_check and tile_full is not None:
        ne = torch.broadcast_to(_ev(tile_nonempty, env2), visit.shape)
        full = full | (visit & torch.broadcast_to(_ev(tile_full, env2), visit.shape))
        visit = visit & ne
        full = full & ne
    return torch.where(full, FULL, torch.where(visit, PARTIAL, NOT_VISITED)).to(torch.int8)


def map_tiles(compiled, block_m=None, block_n=None) -> tuple[int, int]:
    """The (query, key) tile sizes a map is drawn with: the box plan's, else those asked for or
    compiled with, else 64x64."""
    if compiled.spec.tiles:
        return compiled.spec.tiles
    return (block_m or compiled._tiles[0] or 64, block_n or compiled._tiles[1] or 64)


def tile_map(compiled, Lq: int | None = None, Lkv: int | None = None, *, block_m=None, block_n=None,
             b: int = 0, h: int = 0) -> torch.Tensor:
    """The forward visit map of ``compiled`` (an ``attndsl.compile`` result) for lengths
    ``Lq x Lkv`` (default: the pattern's layout length), for batch ``b`` and head ``h``."""
    spec = compiled.spec
    if spec.data_dependent:
        raise NotImplementedError("tile maps of data-dependent masks need the device block table")
    layout = getattr(compiled.mask_mod, "layout", None)
    if Lq is None:
        if layout is None:
            raise ValueError("give the sequence length (the pattern declares no layout)")
        Lq = len(layout)
    Lkv = Lq if Lkv is None else Lkv
    bm, bn = map_tiles(compiled, block_m, block_n)
    nq, nk = math.ceil(Lq / bm), math.ceil(Lkv / bn)
    q_lo = (torch.arange(nq) * bm).view(-1, 1)
    q_hi = torch.clamp(q_lo + bm, max=Lq) - 1
    kv_lo = (torch.arange(nk) * bn).view(1, -1)
    kv_hi = kv_lo + bn - 1
    env = {"b": torch.tensor(b), "h": torch.tensor(h), "q_lo": q_lo, "q_hi": q_hi,
           "kv_max": torch.tensor(Lkv - 1), "q_max": torch.tensor(Lq - 1)}
    env2 = dict(env, kv_lo=kv_lo, kv_hi=kv_hi)
    rng = spec.fwd_range
    if spec.mask is None:
        return torch.full((nq, nk), FULL, dtype=torch.int8)
    if not isinstance(rng, VisitBox):
        return _range_map(rng, env, nq, nk, bn, Lkv - 1, spec.tile_full, spec.tile_nonempty, env2)
    grid = Grid(*rng.grid)
    nd = grid.ndim
    last = q_lo + bm - 1
    for a in range(nd):
        lo = coord_value(grid.attr(a), q_lo)
        if rng.other_shape[a] == 1:
            env[f"q_c{a}"] = lo
        else:
            env[f"q_c{a}_lo"], env[f"q_c{a}_hi"] = lo, coord_value(grid.attr(a), last)
    # every key tile inside the grid, by its tile coordinates
    start, end = grid.prefix // bn, (grid.prefix + grid.size) // bn
    in_grid = (torch.arange(nk) >= start) & (torch.arange(nk) < end)
    kfirst = torch.clamp(kv_lo, min=grid.prefix, max=grid.prefix + grid.size - 1)
    visit = torch.ones(nq, nk, dtype=torch.bool) & in_grid.view(1, -1)
    full = visit.clone()
    env2 = dict(env, kv_lo=kv_lo, kv_hi=kv_hi)
    for a in range(nd):
        e, top = rng.tile_shape[a], grid.shape[a] - 1
        g = coord_value(grid.attr(a), kfirst) // e
        lo = torch.clamp(_ev(rng.box_outer[a][0], env), min=0)
        hi = torch.clamp(_ev(rng.box_outer[a][1], env), max=top)
        ilo = torch.clamp(_ev(rng.box_inner[a][0], env), min=0)
        ihi = torch.clamp(_ev(rng.box_inner[a][1], env), max=top)
        lo, hi, ilo, ihi = (torch.broadcast_to(x, (nq, 1)) for x in (lo, hi, ilo, ihi))
        visit &= (lo <= hi) & (g >= lo // e) & (g <= hi // e)
        full &= (g >= (ilo + e - 1) // e) & (g < (ihi + 1) // e)
        c = g * e
        if e == 1:
            env2[f"kv_c{a}"] = c
        else:
            env2[f"kv_c{a}_lo"], env2[f"kv_c{a}_hi"] = c, c + e - 1
    full &= visit
    if rng.tile_check:
        ne = torch.broadcast_to(_ev(rng.tile_nonempty, env2), visit.shape)
        full = full | (visit & torch.broadcast_to(_ev(rng.tile_full, env2), visit.shape))
        if rng.exact_check:
            ne = ne & _touched(compiled, Lq, Lkv, bm, bn, b, h)
        visit &= ne
        full &= ne
    out = torch.where(full, FULL, torch.where(visit, PARTIAL, NOT_VISITED)).to(torch.int8)
    for x in rng.extras:
        m = _range_map(x.range, env, nq, nk, bn, Lkv - 1, x.tile_full, x.tile_nonempty, env2)
        out = torch.where(in_grid.view(1, -1), out, torch.maximum(out, m))
    return out


def _touched(compiled, Lq, Lkv, bm, bn, b, h):
    from .reference import scores_and_mask

    q = torch.zeros(b + 1, h + 1, Lq, 1)
    k = torch.zeros(b + 1, h + 1, Lkv, 1)
    _, mask = scores_and_mask(q, k, compiled.mask_mod)
    m = mask[b, h]
    nq, nk = math.ceil(Lq / bm), math.ceil(Lkv / bn)
    p = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
    p[:Lq, :Lkv] = m
    return p.view(nq, bm, nk, bn).any(3).any(1)


# --- PNG ---------------------------------------------------------------------------------------
def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(rgb) -> bytes:
    """An 8-bit RGB PNG of ``rgb`` (``[H, W, 3]`` uint8 tensor or nested lists)."""
    t = torch.as_tensor(rgb, dtype=torch.uint8)
    H, W, C = t.shape
    if C != 3:
        raise ValueError("expected [H, W, 3] RGB data")
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), t.reshape(H, W * 3)], 1)  # filter 0 per row
    raw = rows.contiguous().numpy().tobytes()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))


def render(tmap: torch.Tensor, scale: int | None = None, grid_every: int | None = None) -> torch.Tensor:
    """RGB image of a tile map: white = skipped, orange = partial (mask evaluated), blue = full.
    ``grid_every`` draws light lines every that many tiles."""
    nq, nk = tmap.shape
    if scale is None:
        scale = max(1, min(16, 512 // max(nq, nk)))
    img = torch.empty(nq, nk, 3, dtype=torch.uint8)
    for k, col in COLORS.items():
        img[tmap == k] = torch.tensor(col, dtype=torch.uint8)
    img = img.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    if grid_every and scale >= 2:
        light = torch.tensor((200, 200, 200), dtype=torch.uint8)
        for i in range(0, nq, grid_every):
            img[i * scale, :][(img[i * scale, :] == 255).all(-1)] = light
        for j in range(0, nk, grid_every):
            img[:, j * scale][(img[:, j * scale] == 255).all(-1)] = light
    return img


def save_tile_map(compiled, path, Lq=None, Lkv=None, *, scale=None, grid_every=None, **kw) -> torch.Tensor:
    """Compute the tile map of ``compiled`` and write it to ``path`` as a PNG; returns the map."""
    tmap = tile_map(compiled, Lq, Lkv, **kw)
    with open(path, "wb") as f:
        f.write(png_bytes(render(tmap, scale, grid_every)))
    return tmap


def summary(tmap: torch.Tensor) -> str:
    v = int((tmap > 0).sum())
    f = int((tmap == FULL).sum())
    total = tmap.numel()
    return (f"{tmap.shape[0]} query tiles x {tmap.shape[1]} key tiles: {v} visited ({v / total:.1%}), "
            f"{f} full, {v - f} partial; {v / tmap.shape[0]:.1f} key tiles per query tile")
