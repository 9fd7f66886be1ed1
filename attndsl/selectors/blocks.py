"""Block-level selectors (MoBA, NSA's selection branch) on the existing block-table path.

A :class:`BlockSelection` lists, per query block of ``q_block`` queries, the key blocks of
``kv_block`` keys it may visit: ``indices[b, g, i, j]`` (``-1`` = unused), shared by the query
heads of group ``g``. The attention kernels already know how to follow a block table (per row
tile: a list of full tiles that skip the mask, a list of partial tiles that evaluate it, and the
two counts), so a selection becomes such tables, in the kernel's tile units:

* each kernel tile lies inside one selection block (the tiles are chosen no larger than the
  blocks, both powers of two), so a tile is visited iff its block is selected;
* the pattern's mask still applies: its closed-form whole-tile classification (the spec's
  ``tile_full`` / ``tile_nonempty``, evaluated with torch on the tile grid) drops tiles the mask
  empties and marks the ones it fills completely as full; everything else is partial;
* the transposed tables (key tiles as rows, query tiles as columns) drive dK/dV.

No new attention kernel is involved: the pattern's forward/backward kernels are rendered in
block-table mode under a spec name of their own.
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .. import ir
from ..ir.evaluate import evaluate
from ..passes.fuse import run_lowering
from ..runtime.checks import call_shape
from ..runtime.blocktables import BlockTables, Table


def _pow2(x: int) -> bool:
    return x >= 16 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSelection:
    """Key blocks per query block: ``indices [B|1, G, n_q_blocks, K]`` (int, ``-1`` unused).

    ``q_block`` and ``kv_block`` are powers of two, at least 16. Query block ``i`` covers queries
    ``[i*q_block, (i+1)*q_block)``; key block ``j`` covers keys ``[j*kv_block, (j+1)*kv_block)``.
    Query heads ``h`` use group ``h // (Hq // G)``. Listing a block twice is the same as once.
    Queries beyond ``n_q_blocks * q_block`` visit nothing.
    """

    indices: torch.Tensor
    q_block: int
    kv_block: int
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.indices, torch.Tensor) or self.indices.dim() != 4:
            raise ValueError("BlockSelection.indices must be a [B, G, n_q_blocks, K] tensor")
        if self.indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"BlockSelection.indices must be int32/int64, got {self.indices.dtype}")
        for name in ("q_block", "kv_block"):
            if not _pow2(int(getattr(self, name))):
                raise ValueError(f"{name} must be a power of two >= 16, got {getattr(self, name)}")

    @property
    def groups(self) -> int:
        return self.indices.shape[1]

    def selected(self, n_kv_blocks: int) -> torch.Tensor:
        """Boolean ``[B|1, G, n_q_blocks, n_kv_blocks]``: which key blocks each query block visits."""
        idx = self.indices.to(torch.int64)
        ok = (idx >= 0) & (idx < n_kv_blocks)
        sel = torch.zeros(idx.shape[:3] + (n_kv_blocks + 1,), dtype=torch.bool, device=idx.device)
        sel.scatter_(-1, torch.where(ok, idx, torch.full_like(idx, n_kv_blocks)), True)
        return sel[..., :n_kv_blocks]

    def check(self, query, key):
        B, Hq = query.shape[:2]
        Bi, G = self.indices.shape[:2]
        if Bi not in (1, B):
            raise ValueError(f"block selection batch {Bi} does not match the query batch {B}")
        if G == 0 or Hq % G:
            raise ValueError(f"block selection has G={G} groups; the query's {Hq} heads must be a multiple of it")
        if self.indices.device != query.device:
            raise ValueError(f"block selection is on {self.indices.device}, the inputs on {query.device}")


def _tile_class(spec, buffers, B, Hq, Lq, Lkv, BM, BN, device):
    """(full, nonempty) per (q tile, kv tile) from the spec's closed-form classification."""
    R, C = -(-Lq // BM), -(-Lkv // BN)
    q_lo = torch.arange(R, device=device) * BM
    kv_lo = torch.arange(C, device=device) * BN
    edge = ((q_lo + BM > Lq)[:, None] | (kv_lo + BN > Lkv)[None, :]).view(1, 1, R, C)
    if spec.mask is None or ir.is_const(spec.mask, True):
        return ~edge, torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    env = {"q_lo": q_lo.view(1, 1, R, 1), "q_hi": (torch.clamp(q_lo + BM, max=Lq) - 1).view(1, 1, R, 1),
           "kv_lo": kv_lo.view(1, 1, 1, C), "kv_hi": (torch.clamp(kv_lo + BN, max=Lkv) - 1).view(1, 1, 1, C),
           "q_max": torch.tensor(Lq - 1, device=device), "kv_max": torch.tensor(Lkv - 1, device=device),
           "b": torch.arange(B, device=device).view(B, 1, 1, 1),
           "h": torch.arange(Hq, device=device).view(1, Hq, 1, 1)}
    try:
        full, nonempty = evaluate([spec.tile_full, spec.tile_nonempty], env, list(buffers), device=device)
        full, nonempty = full.to(torch.bool), nonempty.to(torch.bool)
    except Exception:  # anything the closed form cannot say: visit every selected tile, masked
        return torch.zeros((1, 1, 1, 1), dtype=torch.bool, device=device), \
            torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
    full = full.view((1,) * (4 - full.dim()) + tuple(full.shape)) & nonempty & ~edge
    return full, nonempty.view((1,) * (4 - nonempty.dim()) + tuple(nonempty.shape))


def _lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending column indices where ``mask`` holds (first ``count`` entries valid), and counts."""
    C = mask.shape[-1]
    ar = torch.arange(C, dtype=torch.int32, device=mask.device)
    v = torch.sort(torch.where(mask, ar, ar + C), dim=-1).values
    return torch.where(v >= C, v - C, v).contiguous(), mask.sum(-1, dtype=torch.int32)


def build_table(blocks: BlockSelection, spec, buffers, shape, transposed: bool, br: int, bc: int) -> Table:
    """The block table of one kernel launch (rows ``br``, columns ``bc`` wide) for a selection."""
    B, Hq, Lq, Lkv = shape
    BM, BN = (bc, br) if transposed else (br, bc)
    if blocks.q_block % BM or blocks.kv_block % BN:
        raise ValueError(f"kernel tiles {BM}x{BN} do not divide the selection blocks "
                         f"{blocks.q_block}x{blocks.kv_block}")
    dev = blocks.indices.device
    nkb = -(-Lkv // blocks.kv_block)
    sel = blocks.selected(nkb)                                           # [Bi, G, nqb, nkb]
    nqb = sel.shape[2]
    R, C = -(-Lq // BM), -(-Lkv // BN)
    qt = torch.arange(R, device=dev) * BM // blocks.q_block
    kt = torch.arange(C, device=dev) * BN // blocks.kv_block
    tsel = sel[:, :, qt.clamp(max=max(nqb - 1, 0))][:, :, :, kt] & (qt < nqb).view(1, 1, R, 1)
    G = tsel.shape[1]
    if G != 1:
        tsel = tsel.repeat_interleave(Hq // G, dim=1)
    full, nonempty = _tile_class(spec, buffers, B, Hq, Lq, Lkv, BM, BN, dev)
    visit = tsel & nonempty
    is_full = visit & full
    is_part = visit & ~full
    if transposed:
        is_full, is_part = is_full.transpose(-1, -2), is_part.transpose(-1, -2)
    full_l, n_full = _lists(is_full)
    part_l, n_part = _lists(is_part)
    TB, TH = full_l.shape[:2]
    full_l = full_l.expand(TB, TH, *full_l.shape[2:]).contiguous()
    part_l = part_l.expand(full_l.shape).contiguous()
    count = torch.stack([n_full.expand(full_l.shape[:3]), n_part.expand(full_l.shape[:3])], -1).contiguous()
    return Table(full_l, part_l, count, TB > 1, TH > 1)


class SelectionTables(BlockTables):
    """Block tables that come from a :class:`BlockSelection` instead of the table kernel: every
    ``(transposed, rows, cols)`` the runner asks for is built from the selection on first use (and
    kept by the selection, per spec and call shape, for later calls with it)."""

    def __init__(self, blocks: BlockSelection, spec, buffers, shape):
        super().__init__(shape)
        self.blocks, self.spec, self.buffers = blocks, spec, tuple(buffers)
        self.device = blocks.indices.device

    def get_table(self, key: tuple) -> Table:
        """The table of ``key`` = ``(transposed, rows, cols)``, built now if it is new (never None)."""
        t = self.tables.get(key)
        if t is None:
            ck = (self.spec.key, self.shape, key)
            t = self.blocks._cache.get(ck)
            if t is None:
                t = self.blocks._cache[ck] = build_table(self.blocks, self.spec, self.buffers, self.shape, *key)
            self.tables[key] = t
        return t


def block_variant(compiled, blocks: BlockSelection):
    """``compiled`` in block-table mode, with tiles no larger than the selection blocks."""
    variants = compiled.__dict__.setdefault("_block_variants", {})
    key = (blocks.q_block, blocks.kv_block)
    v = variants.get(key)
    if v is None:
        v = copy.copy(compiled)
        v.__dict__.pop("_block_variants", None)
        v.__dict__.pop("_gather_runners", None)
        v._runners = {}
        s = compiled.spec
        # table mode; with no mask, partial tiles (at the ends) only check the lengths
        # (lowered again: runs, dQ's range and the table kernels' signatures follow the table mode)
        v.spec = run_lowering(dataclasses.replace(s, data_dependent=True, mask_uses_b=True, mask_uses_h=True,
                                                  mask=s.mask if s.mask is not None else ir.const(True),
                                                  name=f"{s.name}_blk", key=f"{s.key}b1"))
        bm, bn, *rest = compiled._tiles
        # the largest default tiles are 128 (queries) and 64 (keys)
        if (bm or 128) > blocks.q_block:
            bm = blocks.q_block
        if (bn or 64) > blocks.kv_block:
            bn = blocks.kv_block
        v._tiles = (bm, bn, *rest)
        variants[key] = v
    return v


def block_call(compiled, query, key, value, blocks: BlockSelection, *, block_tables=None, **kw):
    """``compiled(query, key, value, blocks=...)``: the block-selector path of the public API."""
    if not isinstance(blocks, BlockSelection):
        raise TypeError(f"blocks must be an attndsl.selectors.BlockSelection, got {type(blocks).__name__}")
    if block_tables is not None:
        raise ValueError("pass either blocks= or block_tables=, not both")
    blocks.check(query, key)
    v = block_variant(compiled, blocks)
    shape = call_shape(query, key)
    compiled.index_check(compiled.tensors, shape, query.device)  # before the tables are built
    tables = SelectionTables(blocks, v.spec, v.tensors, shape)
    return v(query, key, value, block_tables=tables, **kw)


# -------------------------------------------------------------------------------------------
# selections from block scores
# -------------------------------------------------------------------------------------------
def _mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean over consecutive blocks of the length dim of ``[B, H, L, D]`` (last block partial)."""
    B, H, L, D = x.shape
    n = -(-L // block)
    pad = n * block - L
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(B, H, n, block, D).sum(3)
    cnt = torch.full((n,), float(block), device=x.device)
    cnt[-1] = block - pad
    return xs / cnt.view(1, 1, n, 1)


def _topk_blocks(gate: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, gate.shape[-1])
    val, idx = gate.topk(k, dim=-1)
    return torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx).to(torch.int32)


def moba_select(query: torch.Tensor, key: torch.Tensor, *, block_size: int = 64, topk: int = 3) -> BlockSelection:
    """MoBA gating at block granularity (Lu et al., 2025, arXiv:2502.13189), causal.

    Each query block ``i`` scores every earlier key block ``j < i`` by the mean-pooled query block
    against the mean-pooled key block (the average over the block's queries of MoBA's per-query
    gate ``q·mean(K_j)``), keeps the ``topk - 1`` best and always its own block ``i`` (causally
    masked by the pattern's mask). Selections are per query head (``G = Hq``).
    """
    B, Hq, Lq, _ = query.shape
    Hkv = key.shape[1]
    qbar = _mean_pool(query, block_size)                                   # [B, Hq, nqb, D]
    kbar = _mean_pool(key, block_size).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, nkb, D]
    gate = qbar @ kbar.transpose(-1, -2)
    nqb, nkb = gate.shape[-2:]
    i = torch.arange(nqb, device=query.device)[:, None]
    j = torch.arange(nkb, device=query.device)[None, :]
    gate = gate.masked_fill(j > i, float("-inf")).masked_fill(j == i, float("inf"))
    return BlockSelection(_topk_blocks(gate, topk), block_size, block_size)


def nsa_select(query: torch.Tensor, key: torch.Tensor, *, block_size: int = 64, n_select: int = 16, q_tile: int = 64, n_init: int = 1,
               n_local: int = 2, scale: float | None = None, k_cmp=None, chunk_tiles: int = 64) -> BlockSelection:
    """NSA's selection branch (Yuan et al., 2025, arXiv:2502.11089) at query-tile granularity.

    Compressed keys ``k_cmp [B, Hkv, n_blocks, D]`` (default: the mean of each ``block_size`` key
    block, standing in for NSA's learned compression MLP) give every query ``t`` the importance
    ``p_cmp[t, i] = softmax_i(q_t · k_cmp_i · scale)`` over the blocks that end at or before ``t``.
    The importance of a block for a query tile is ``p_cmp`` summed over the tile's queries and the
    query heads of the key/value group (NSA shares the selection across a GQA group, so
    ``G = Hkv``). The ``n_init`` first blocks and the ``n_local`` blocks ending the tile's causal
    range are always kept; the ``n_select`` best blocks in all. Query tiles are processed
    ``chunk_tiles`` at a time, so memory stays ``O(chunk · n_blocks)``.
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    grp = Hq // Hkv
    scale = D ** -0.5 if scale is None else float(scale)
    if k_cmp is None:
        k_cmp = _mean_pool(key, block_size)
    nkb = k_cmp.shape[2]
    kc = k_cmp.float().repeat_interleave(grp, dim=1)                       # [B, Hq, nkb, D]
    n_tiles = -(-Lq // q_tile)
    blk = torch.arange(nkb, device=query.device)
    out = []
    for t0 in range(0, n_tiles, chunk_tiles):
        t1 = min(n_tiles, t0 + chunk_tiles)
        r0, r1 = t0 * q_tile, min(Lq, t1 * q_tile)
        s = (query[:, :, r0:r1].float() @ kc.transpose(-1, -2)) * scale    # [B, Hq, n, nkb]
        t = torch.arange(r0, r1, device=query.device)
        vis = (blk[None, :] + 1) * block_size - 1 <= t[:, None]
        s = s.masked_fill(~vis, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)                       # rows with no block: 0
        p = torch.nn.functional.pad(p, (0, 0, 0, (t1 - t0) * q_tile - (r1 - r0)))
        imp = p.view(B, Hkv, grp, t1 - t0, q_tile, nkb).sum((2, 4))         # [B, Hkv, tiles, nkb]
        tiles = torch.arange(t0, t1, device=query.device)[:, None]
        last = (torch.clamp((tiles + 1) * q_tile, max=Lq) - 1) // block_size  # last block a query reaches
        forced = (blk[None, :] < n_init) | ((blk[None, :] <= last) & (blk[None, :] > last - n_local))
        imp = imp.masked_fill(forced, float("inf")).masked_fill(blk[None, :] > last, float("-inf"))
        out.append(_topk_blocks(imp, n_select))
    return BlockSelection(torch.cat(out, dim=2), q_tile, block_size)
