"""Tile maps: which key tiles each query tile visits, and which of them skip the mask.

:func:`tile_map` replays a compiled pattern's visit plan in Python (vectorised torch, evaluating
the very IR expressions the kernels evaluate): for the forward kernel's tiling it returns an
``[n_q_tiles, n_kv_tiles]`` int8 map, 0 = not visited, 1 = visited with the mask evaluated
(partial), 2 = visited as a full tile. Its row sums equal the forward kernel's
``visit_counts`` (tests check that). :func:`draw_tile_map` draws it with matplotlib (tile indices
on the axes, a legend, a title) and :func:`save_tile_map` writes the picture::

    attndsl tilemap "patterns/neighborhood.py:neighborhood_2d(64, 64, 13)" --out na2d.png
"""
from __future__ import annotations

import math

import torch

from .ir.coords import Grid, coord_value
from .ir.evaluate import evaluate
from .spec import VisitBox

NOT_VISITED, PARTIAL, FULL = 0, 1, 2


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


# --- drawing ---------------------------------------------------------------------------------
#: Colours of the three tile classes (matplotlib colour specs) and their legend labels.
COLORS = {NOT_VISITED: "#ffffff", PARTIAL: "#e6781e", FULL: "#1e46a0"}
LABELS = {FULL: "full (mask skipped)", PARTIAL: "partial (mask evaluated)", NOT_VISITED: "skipped (never visited)"}


def default_title(compiled, tmap: torch.Tensor, Lq: int, Lkv: int, tiles: tuple[int, int]) -> str:
    """``'<mask name>: L=4096, tiles 64x64 (64 x 64 tiles)'`` and a line of :func:`summary`."""
    name = getattr(compiled.mask_mod, "__name__", None) or type(compiled.mask_mod).__name__
    lengths = f"L={Lq}" if Lq == Lkv else f"Lq={Lq}, Lkv={Lkv}"
    v, f = int((tmap > 0).sum()), int((tmap == FULL).sum())
    return (f"{name}: {lengths}, tiles {tiles[0]}x{tiles[1]} ({tmap.shape[0]} x {tmap.shape[1]} tiles)\n"
            f"{v / tmap.numel():.1%} of tiles visited: {f} full, {v - f} partial")


def draw_tile_map(tmap: torch.Tensor, *, title: str | None = None, grid_every: int | None = None,
                  ax=None):
    """Draw a tile map with matplotlib: one cell per (query tile, key tile), query tiles down the
    rows and key tiles along the columns, axes labelled with tile indices, a legend of the three
    classes and ``title``. ``grid_every`` draws light lines every that many tiles (default: every
    tile when the map has at most 48 tiles a side, none otherwise). Draws into ``ax`` when given,
    else into a new :class:`matplotlib.figure.Figure` (no pyplot state); returns the figure."""
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    nq, nk = tmap.shape
    if ax is None:
        side = 6.0
        fig = Figure(figsize=(side * min(2.0, max(0.6, nk / max(nq, 1))) + 2.2, side))
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cmap = ListedColormap([COLORS[NOT_VISITED], COLORS[PARTIAL], COLORS[FULL]])
    ax.imshow(tmap.to(torch.int64).numpy(), cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3),
              interpolation="nearest", aspect="auto" if max(nq, nk) > 4 * min(nq, nk) else "equal")
    ax.set_xlabel("key tile (kv_idx // block_n)")
    ax.set_ylabel("query tile (q_idx // block_m)")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True, nbins=12))
    if grid_every is None:
        grid_every = 1 if max(nq, nk) <= 48 else 0
    if grid_every:
        ax.set_xticks([x - 0.5 for x in range(0, nk + 1, grid_every)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(0, nq + 1, grid_every)], minor=True)
        ax.grid(which="minor", color="#c8c8c8", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
    handles = [Patch(facecolor=COLORS[k], edgecolor="#808080", label=LABELS[k]) for k in (FULL, PARTIAL, NOT_VISITED)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_tile_map(compiled, path, Lq=None, Lkv=None, *, title: str | None = None, grid_every=None, dpi: int = 110,
                  **kw) -> torch.Tensor:
    """Compute the tile map of ``compiled`` (``kw``: :func:`tile_map`'s ``block_m``, ``block_n``,
    ``b``, ``h``), draw it with :func:`draw_tile_map` and write it to ``path`` (the format follows
    the suffix: ``.png``, ``.svg``, ``.pdf``); returns the map. ``title`` defaults to
    :func:`default_title`."""
    tmap = tile_map(compiled, Lq, Lkv, **kw)
    if Lq is None:
        Lq = len(compiled.mask_mod.layout)
    tiles = map_tiles(compiled, kw.get("block_m"), kw.get("block_n"))
    title = default_title(compiled, tmap, Lq, Lq if Lkv is None else Lkv, tiles) if title is None else title
    draw_tile_map(tmap, title=title, grid_every=grid_every).savefig(path, dpi=dpi)
    return tmap


def summary(tmap: torch.Tensor) -> str:
    v = int((tmap > 0).sum())
    f = int((tmap == FULL).sum())
    total = tmap.numel()
    return (f"{tmap.shape[0]} query tiles x {tmap.shape[1]} key tiles: {v} visited ({v / total:.1%}), "
            f"{f} full, {v - f} partial; {v / tmap.shape[0]:.1f} key tiles per query tile")
