"""Which (query chunk, key chunk) pairs a mask leaves non-empty, and a balancer built on it.

The decision is the block analysis's tile classification (the interval analysis of
``passes.bounds`` that ``passes.block_analysis.tile_class`` runs: ``may`` is false only when no
(q, kv) pair of the box is allowed) evaluated on the host at shard granularity, with the chunks'
*global* bounds. Captured per-token tensors read at ``q``/``kv``
(document ids) are bounded by their minimum and maximum over each chunk, so a document mask skips
chunk pairs that share no document. Everything is evaluated as broadcast torch tensors over all
pairs at once, so the same code counts non-empty tiles of a 256K sequence (2048² tiles) for the
balancer.
"""
from __future__ import annotations

import torch

from .. import ir
from ..dsl import trace
from ..ir.evaluate import evaluate
from ..ir.nodes import const
from ..passes.bounds import IntervalAnalysis
from ..passes.simplify import simplify
from .sharding import Chunk, Sharding

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


class _LoadBounds(IntervalAnalysis):
    """Interval analysis where a captured tensor read at exactly ``q`` or ``kv`` (any other index
    free of q and kv, e.g. ``ids[b, q]``) is bounded by its extremes over the box: the variables
    ``_ld<n>_lo/_hi`` that :func:`pair_may` fills per range."""

    def __init__(self, env, tensors):
        super().__init__(env)
        self.tensors = tensors
        self.loads: list[tuple[str, int, int]] = []  # (index var, slot, dim) per bounded load

    def _num(self, n):
        if n.op == "load":
            found = [(d, a.attr) for d, a in enumerate(n.args) if a.op == "var" and a.attr in ("q", "kv")]
            others_free = all(not (ir.free_vars(a, self.fv) & {"q", "kv"})
                              for d, a in enumerate(n.args) if d not in [f[0] for f in found])
            t = self.tensors[n.attr[0]]
            if len(found) == 1 and others_free and t.dtype in _INT_DTYPES:
                k = len(self.loads)
                self.loads.append((found[0][1], n.attr[0], found[0][0]))
                return (ir.var(f"_ld{k}_lo"), ir.var(f"_ld{k}_hi"))
        return super()._num(n)


def _range_extremes(t: torch.Tensor, dim: int, ranges: list[torch.Tensor]):
    """Min and max of ``t`` over all dims but ``dim``, then over each position list in ``ranges``."""
    flat = t.detach().movedim(dim, 0).reshape(t.shape[dim], -1).to(torch.int64)
    per = torch.stack([flat.amin(1), flat.amax(1)], 1).cpu()  # [n, 2]
    lo = torch.stack([per[p.clamp(max=per.shape[0] - 1), 0].min() for p in ranges])
    hi = torch.stack([per[p.clamp(max=per.shape[0] - 1), 1].max() for p in ranges])
    return lo, hi


def pair_may(mask: ir.Node | None, tensors, q_ranges: list[torch.Tensor], kv_ranges: list[torch.Tensor],
             batch: int = 1, heads: int = 1) -> torch.Tensor:
    """``[len(q_ranges), len(kv_ranges)]`` bool: False where the mask allows no pair of the box.

    Args:
        mask: the traced mask IR over global indices (None: every pair may attend).
        tensors: the pattern's captured tensors, by slot.
        q_ranges, kv_ranges: global positions of each query / key range (int64 1-D tensors).
        batch, heads: the call's batch size and query heads (``b``, ``h`` range over them).

    Returns:
        A bool tensor; False is exact (no pair is allowed), True means "may be non-empty".
    """
    nq, nk = len(q_ranges), len(kv_ranges)
    if mask is None:
        return torch.ones(nq, nk, dtype=torch.bool)
    env_bounds = {"q": (ir.var("q_lo"), ir.var("q_hi")), "kv": (ir.var("kv_lo"), ir.var("kv_hi")),
                  "b": (const(0), const(batch - 1)), "h": (const(0), const(heads - 1))}
    ia = _LoadBounds(env_bounds, tensors)
    _, may = ia(simplify(mask))
    env = {"q_lo": torch.stack([p.min() for p in q_ranges])[:, None],
           "q_hi": torch.stack([p.max() for p in q_ranges])[:, None],
           "kv_lo": torch.stack([p.min() for p in kv_ranges])[None, :],
           "kv_hi": torch.stack([p.max() for p in kv_ranges])[None, :]}
    for k, (var, slot, dim) in enumerate(ia.loads):
        lo, hi = _range_extremes(tensors[slot], dim, q_ranges if var == "q" else kv_ranges)
        shape = (-1, 1) if var == "q" else (1, -1)
        env[f"_ld{k}_lo"], env[f"_ld{k}_hi"] = lo.reshape(shape), hi.reshape(shape)
    # loads the analysis could not bound evaluate nothing here (they turn into "may"), so tensors
    # stay on their device; only the per-range extremes above were read
    (r,) = evaluate([may], env, tensors, device="cpu")
    return torch.broadcast_to(r.to(torch.bool), (nq, nk)).clone()


def trace_mask(mask_mod):
    """``(mask IR, captured tensors)`` of a mask written over global indices."""
    if mask_mod is None:
        return None, []
    t = trace(mask_mod, None)
    return t.mask, list(t.tensors)


def chunk_pairs(mask_mod, sharding: Sharding, batch: int = 1, heads: int = 1) -> torch.Tensor:
    """Which (query chunk, key chunk) pairs of a sharding the mask may leave non-empty.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx)`` over global positions (None: no mask).
        sharding: the :class:`Sharding`; chunks are numbered rank-major (rank 0's chunks first).
        batch, heads: the call's batch size and query heads.

    Returns:
        bool ``[n_chunks, n_chunks]``: row = query chunk, column = key chunk; False pairs are
        skipped by every rank (no launch, no merge).
    """
    mask, tensors = trace_mask(mask_mod)
    chunks = [c for r in sharding.ranks for c in r]
    ranges = [c.positions() for c in chunks]
    return pair_may(mask, tensors, ranges, ranges, batch, heads)


def tile_counts(mask_mod, length: int, tile: int = 128, batch: int = 1, heads: int = 1) -> torch.Tensor:
    """Non-empty (query tile, key tile) pairs per query tile, as the block analysis sees them.

    Args:
        mask_mod: the mask over global positions.
        length: global sequence length ``L``.
        tile: tile size (the kernels' block size is a good choice).
        batch, heads: ``b`` and ``h`` range over these.

    Returns:
        int64 ``[ceil(L / tile)]``: how many key tiles each query tile may visit.
    """
    mask, tensors = trace_mask(mask_mod)
    n = -(-length // tile)
    ranges = [torch.arange(i * tile, min((i + 1) * tile, length)) for i in range(n)]
    if mask is None:
        return torch.full((n,), n, dtype=torch.int64)
    return pair_may(mask, tensors, ranges, ranges, batch, heads).sum(1)


def balance(mask_mod, length: int, world_size: int, *, chunks_per_rank: int = 2, tile: int = 128,
            batch: int = 1, heads: int = 1) -> Sharding:
    """A sharding whose ranks visit about the same number of tiles, for any mask.

    The sequence is cut into ``world_size * chunks_per_rank`` equal chunks; the cost of a chunk is
    the number of non-empty (query tile, key tile) pairs its query tiles visit (block analysis,
    :func:`tile_counts`); chunks are dealt largest first to the least loaded rank that still has
    room (every rank gets ``chunks_per_rank`` chunks, so shards stay the same size). For a causal
    mask with two chunks per rank this is the zig-zag sharding.

    Args:
        mask_mod: the mask over global positions.
        length: global length ``L``, divisible by ``world_size * chunks_per_rank``.
        world_size: number of ranks ``P``.
        chunks_per_rank: chunks per rank (more: finer balance, more launches).
        tile: the tile size costs are counted in; chunk boundaries need not align with it.
        batch, heads: ``b`` and ``h`` range over these.

    Returns:
        The :class:`Sharding` (each rank's chunks in increasing global order).
    """
    parts = world_size * chunks_per_rank
    if chunks_per_rank < 1 or length % parts:
        raise ValueError(f"balance needs a length divisible by world_size * chunks_per_rank = {parts}, got {length}")
    n = length // parts
    tile = max(1, min(tile, n))
    per_tile = tile_counts(mask_mod, length, tile, batch, heads)
    # a chunk's cost: its query tiles' visits (a tile cut by a chunk edge counts by its share)
    pos_cost = per_tile.repeat_interleave(tile)[:length].double() / tile
    cost = pos_cost.reshape(parts, n).sum(1)
    load = [0.0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for c in sorted(range(parts), key=lambda i: (-float(cost[i]), i)):
        r = min((r for r in range(world_size) if len(owned[r]) < chunks_per_rank), key=lambda r: (load[r], r))
        owned[r].append(c)
        load[r] += float(cost[c])
    return Sharding(length, [tuple(Chunk(c * n, n) for c in sorted(cs)) for cs in owned])


def imbalance(mask_mod, sharding: Sharding, tile: int = 128, batch: int = 1, heads: int = 1) -> float:
    """How unevenly a sharding spreads the mask's work over the ranks.

    Args:
        mask_mod: the mask over global positions.
        sharding: the :class:`Sharding` to rate.
        tile: tile size the work is counted in (clamped to the smallest chunk).
        batch, heads: ``b`` and ``h`` range over these.

    Returns:
        The slowest rank's visited tiles (block analysis, :func:`tile_counts`) over the mean:
        1.0 is perfectly balanced, ``P`` is one rank doing everything.
    """
    tile = max(1, min(tile, min(c.length for r in sharding.ranks for c in r)))
    per_tile = tile_counts(mask_mod, sharding.length, tile, batch, heads)
    pos_cost = per_tile.repeat_interleave(tile)[:sharding.length].double() / tile
    loads = torch.stack([pos_cost[sharding.positions(r)].sum() for r in range(sharding.world_size)])
    return float(loads.max() / loads.mean())
