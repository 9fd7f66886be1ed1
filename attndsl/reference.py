"""The float64 oracle: evaluates the same IR densely, with autograd.

``attention`` traces the pattern exactly as the compiler does and evaluates its IR on full
index grids in float64, so it checks the passes and codegen, not a second reading of the user's
function. Sizes: it materialises ``[B, Hq, Lq, Lkv]`` scores, so keep it to small shapes.
"""
from __future__ import annotations

import torch

from . import ir
from .dsl import trace
from .ir.evaluate import evaluate


def scores_and_mask(q, k, mask_mod=None, score_mod=None, scale=None, bias_factors=None):
    """Modified scores and the boolean mask, ``[B, Hq, Lq, Lkv]``, in float64."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    t = trace(mask_mod, score_mod)
    q64, k64 = q.to(torch.float64), k.to(torch.float64)
    k64 = k64.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("bhqd,bhkd->bhqk", q64, k64) * scale
    if bias_factors is not None:
        u, w = (x.to(torch.float64) for x in bias_factors)
        if w.shape[1] == Hkv and Hkv != Hq:
            w = w.repeat_interleave(Hq // Hkv, dim=1)
        s = s + u @ w.transpose(-1, -2)
    dev = q.device
    env = {"b": torch.arange(B, device=dev).view(B, 1, 1, 1), "h": torch.arange(Hq, device=dev).view(1, Hq, 1, 1),
           "q": torch.arange(Lq, device=dev).view(1, 1, Lq, 1), "kv": torch.arange(Lkv, device=dev).view(1, 1, 1, Lkv),
           "score": s}
    roots = [r for r in (t.mask, t.score) if r is not None]
    vals = evaluate(roots, env, t.tensors, device=dev) if roots else []
    mask = vals.pop(0) if t.mask is not None else torch.ones((), dtype=torch.bool, device=dev)
    if t.score is not None:
        s = vals.pop(0)
    s = torch.broadcast_to(s, (B, Hq, Lq, Lkv))
    mask = torch.broadcast_to(mask, (B, Hq, Lq, Lkv))
    return s, mask


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask_mod=None, score_mod=None,
              scale: float | None = None, normalizer: str = "softmax", sigmoid_bias=None,
              sinks: torch.Tensor | None = None, bias_factors: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, lse)`` in float64 (``lse`` is None for sigmoid); differentiable with respect to
    query, key, value, sinks, bias factors and captured tensors that require grad."""
    B, Hq, Lq, D = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    s, mask = scores_and_mask(query, key, mask_mod, score_mod, scale, bias_factors)
    v64 = value.to(torch.float64).repeat_interleave(Hq // Hkv, dim=1)
    if normalizer == "sigmoid":
        b = -torch.log(torch.tensor(float(Lkv), dtype=torch.float64)) if sigmoid_bias is None else sigmoid_bias
        p = torch.sigmoid(s + b) * mask
        return p @ v64, None
    s = s.masked_fill(~mask, float("-inf"))
    p, lse = _softmax(s, sinks)
    return p @ v64, lse


def _softmax(s, sinks=None):
    """``(p, lse)`` of scores ``s [B, Hq, Lq, K]`` (``-inf`` = masked), with per-head sink logits
    joining the denominator. A row whose every score (and sink) is ``-inf`` has ``p = 0`` and
    ``lse = -inf``, as the kernels give, and passes no NaN back to anything: the logsumexp runs on
    zeros in such rows (its backward would otherwise compute ``exp(-inf - -inf)``), and a ``-inf``
    sink means "no sink"."""
    B, Hq, Lq = s.shape[:3]
    if sinks is not None:
        sink = sinks.to(torch.float64).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
        full = torch.cat([s, sink], dim=-1)
    else:
        full = s
    dead = torch.isneginf(full).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(full.masked_fill(dead, 0.0), dim=-1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(dead, 0.0)
    lse = lse.masked_fill(dead, float("-inf")).squeeze(-1)
    return p, lse


def sparse_attention(query, key, value, indices, *, mask_mod=None, score_mod=None, scale=None,
                     normalizer="softmax", sigmoid_bias=None, sinks=None, bias_factors=None):
    """Token-selector oracle: ``(out, lse)`` in float64, gathering the selected keys explicitly.

    ``indices [B, G, Lq, K]``: query ``q`` of head ``h`` visits keys ``indices[b, h // (Hq // G), q, :]``;
    entries outside ``[0, Lkv)`` (``-1``) are unused; a key listed twice counts twice. The mask and
    score modifier apply on top with ``kv_idx`` = the gathered key's position. Differentiable with
    respect to query, key, value, sinks, bias factors and captured tensors that require grad.
    ``normalizer``/``sigmoid_bias``/``sinks``/``bias_factors`` as in :func:`attention` (sigmoid:
    ``lse`` is None). Materialises ``[B, Hq, Lq, K, D]``: keep it small.
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    G, K = indices.shape[1], indices.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    indices = indices.expand(B, -1, -1, -1)                                  # a batch of 1 broadcasts
    idx = indices.to(torch.int64).repeat_interleave(Hq // G, dim=1)          # [B, Hq, Lq, K]
    valid = (idx >= 0) & (idx < Lkv)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    kv_head = torch.arange(Hq, device=query.device) // (Hq // Hkv)
    k64 = key.to(torch.float64)[:, kv_head]                                  # [B, Hq, Lkv, D]
    v64 = value.to(torch.float64)[:, kv_head]
    flat = safe.reshape(B, Hq, Lq * K, 1)
    Dv = value.shape[3]
    ks = torch.gather(k64, 2, flat.expand(B, Hq, Lq * K, D)).view(B, Hq, Lq, K, D)
    vs = torch.gather(v64, 2, flat.expand(B, Hq, Lq * K, Dv)).view(B, Hq, Lq, K, Dv)
    s = torch.einsum("bhqd,bhqkd->bhqk", query.to(torch.float64), ks) * scale
    if bias_factors is not None:  # u·wᵀ at the gathered keys, before score_mod
        u, w = (x.to(torch.float64) for x in bias_factors)
        w = w[:, kv_head] if w.shape[1] == Hkv and Hkv != Hq else w.expand(-1, Hq, -1, -1)
        w = w.expand(B, -1, -1, -1)
        R = w.shape[3]
        ws = torch.gather(w, 2, flat.expand(B, Hq, Lq * K, R)).view(B, Hq, Lq, K, R)
        s = s + torch.einsum("bhqr,bhqkr->bhqk", u.expand(B, Hq, Lq, R), ws)
    t = trace(mask_mod, score_mod)
    dev = query.device
    env = {"b": torch.arange(B, device=dev).view(B, 1, 1, 1), "h": torch.arange(Hq, device=dev).view(1, Hq, 1, 1),
           "q": torch.arange(Lq, device=dev).view(1, 1, Lq, 1), "kv": safe, "score": s}
    roots = [r for r in (t.mask, t.score) if r is not None]
    vals = evaluate(roots, env, t.tensors, device=dev) if roots else []
    keep = valid
    if t.mask is not None:
        keep = keep & torch.broadcast_to(vals.pop(0), keep.shape)
    if t.score is not None:
        s = torch.broadcast_to(vals.pop(0), s.shape)
    if normalizer == "sigmoid":
        b = -torch.log(torch.tensor(float(Lkv), dtype=torch.float64)) if sigmoid_bias is None else sigmoid_bias
        return torch.einsum("bhqk,bhqkd->bhqd", torch.sigmoid(s + b) * keep, vs), None
    s = s.masked_fill(~keep, float("-inf"))
    p, lse = _softmax(s, sinks)
    out = torch.einsum("bhqk,bhqkd->bhqd", p, vs)
    return out, lse


def block_selection_mask(blocks, B, Hq, Lq, Lkv):
    """The dense ``[B, Hq, Lq, Lkv]`` boolean mask of a block selection (for the oracle and tests).

    ``blocks.indices [B|1, G, n_q_blocks, K]`` lists key blocks of ``blocks.kv_block`` keys per query
    block of ``blocks.q_block`` queries, shared by the heads of group ``g``; entries out of range are unused.
    """
    idx = blocks.indices.to(torch.int64)
    Bi, G, nqb, K = idx.shape
    nkb = -(-Lkv // blocks.kv_block)
    ok = (idx >= 0) & (idx < nkb)
    sel = torch.zeros((Bi, G, nqb, nkb + 1), dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, torch.where(ok, idx, torch.full_like(idx, nkb)), True)
    sel = sel[..., :nkb].repeat_interleave(Hq // G, dim=1).expand(B, Hq, nqb, nkb)
    qb = torch.arange(Lq, device=idx.device) // blocks.q_block
    kb = torch.arange(Lkv, device=idx.device) // blocks.kv_block
    qb = qb.clamp(max=nqb - 1)
    return sel[:, :, qb][:, :, :, kb] & (torch.arange(Lq, device=idx.device) // blocks.q_block < nqb)[:, None]


def block_sparse_attention(query, key, value, blocks, *, mask_mod=None, score_mod=None, scale=None):
    """Block-selector oracle: :func:`attention` restricted to the selected blocks, in float64."""
    B, Hq, Lq, D = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    scale = D ** -0.5 if scale is None else float(scale)
    sel = block_selection_mask(blocks, B, Hq, Lq, Lkv)
    s, mask = scores_and_mask(query, key, mask_mod, score_mod, scale)
    s = s.masked_fill(~(mask & sel), float("-inf"))
    p, lse = _softmax(s)
    out = p @ value.to(torch.float64).repeat_interleave(Hq // Hkv, dim=1)
    return out, lse
