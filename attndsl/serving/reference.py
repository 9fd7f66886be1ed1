"""The decode call's float64 oracle: :func:`attndsl.reference.attention` (``sparse_attention`` for
indices) on the logical cache.

Each sequence's keys and values are gathered into a padded ``[B, Hkv, L, D]`` tensor (through the
page table for a paged pool), the query rows are placed at their positions ``q_offsets[b] + i`` of a
``[B, Hq, L, D]`` query, keys past ``seq_lens[b]`` are masked, and the rows asked for are returned.
Materialises ``[B, Hq, L, L]`` scores: small shapes only.
"""
from __future__ import annotations

import torch

from .. import reference


def logical_cache(k_cache, v_cache, seq_lens, page_table=None, length: int | None = None):
    """``(k, v)`` as contiguous ``[B, Hkv, length, D]`` copies of each sequence's logical cache
    (rows past ``seq_lens[b]`` zero)."""
    lens = [int(x) for x in seq_lens.tolist()]
    B = len(lens)
    L = length if length is not None else max(lens + [1])
    if page_table is None:
        k, v = k_cache[:, :, :L].clone(), v_cache[:, :, :L].clone()
    else:
        ps = k_cache.shape[1]
        pos = torch.arange(L, device=k_cache.device)
        pages = page_table.to(torch.int64)[:, (pos // ps).clamp(max=page_table.shape[1] - 1)]  # [B, L]
        rows = (pos % ps)[None, :].expand(B, L)
        k = k_cache[pages, rows].permute(0, 2, 1, 3).clone()
        v = v_cache[pages, rows].permute(0, 2, 1, 3).clone()
    for b, n in enumerate(lens):
        k[b, :, n:] = 0
        v[b, :, n:] = 0
    return k, v


def decode_reference(query, k_cache, v_cache, *, seq_lens, q_offsets=None, page_table=None, mask_mod=None,
                     score_mod=None, scale=None, normalizer="softmax", sigmoid_bias=None, sinks=None,
                     bias_factors=None, indices=None):
    """``(out, lse)`` in float64 with the meaning :func:`attndsl.serving.decode` documents."""
    B, Hq, Lq, D = query.shape
    offs = (seq_lens - Lq) if q_offsets is None else q_offsets
    lens = [int(x) for x in seq_lens.tolist()]
    offs_l = [int(x) for x in offs.tolist()]
    L = max([n for n in lens] + [o + Lq for o in offs_l] + [1])
    if bias_factors is not None:
        L = max(L, bias_factors[1].shape[2])
    k, v = logical_cache(k_cache, v_cache, seq_lens, page_table, L)
    qf = query.new_zeros((B, Hq, L, D))
    for b in range(B):
        qf[b, :, offs_l[b]:offs_l[b] + Lq] = query[b]
    lens_t = seq_lens.to(torch.int64).cpu()
    base = mask_mod

    def in_cache(b, h, q_idx, kv_idx):
        return kv_idx < lens_t[b]

    def full_mask(b, h, q_idx, kv_idx):
        m = in_cache(b, h, q_idx, kv_idx)
        return m & base(b, h, q_idx, kv_idx) if base is not None else m

    bf = None
    if bias_factors is not None:
        u, w = bias_factors
        uf = u.new_zeros((u.shape[0], u.shape[1], L, u.shape[3]))
        if u.shape[0] == 1:
            uf[:, :, offs_l[0]:offs_l[0] + Lq] = u  # one offset when u is shared by the batch
        else:
            for b in range(B):
                uf[b, :, offs_l[b]:offs_l[b] + Lq] = u[b]
        bf = (uf, w[:, :, :L])
    kw = dict(mask_mod=full_mask, score_mod=score_mod, scale=scale, normalizer=normalizer, sigmoid_bias=sigmoid_bias,
              sinks=sinks, bias_factors=bf)
    if indices is None:
        out, lse = reference.attention(qf, k, v, **kw)
    else:  # each query row's selection at its position (a key listed twice counts twice)
        full = torch.full((B, indices.shape[1], L, indices.shape[3]), -1, dtype=torch.int64, device=indices.device)
        for b in range(B):
            sel = indices[b].to(torch.int64)
            full[b, :, offs_l[b]:offs_l[b] + Lq] = torch.where(sel < lens[b], sel, -1)
        out, lse = reference.sparse_attention(qf, k, v, full, **kw)
    rows = torch.stack([torch.arange(o, o + Lq) for o in offs_l]).to(out.device)  # [B, Lq]
    out = torch.stack([out[b, :, rows[b]] for b in range(B)])
    if lse is not None:
        lse = torch.stack([lse[b, :, rows[b]] for b in range(B)])
    return out, lse
