"""DeepSeek Sparse Attention (DSA), as in DeepSeek-V3.2-Exp (DeepSeek-AI, 2025).

A lightning indexer scores every (query ``t``, key ``s``) pair cheaply,
``I[t, s] = Σ_j w[t, j] · ReLU(q_I[t, j] · k_I[s])`` over a few small indexer heads ``j``, causal;
each query then attends only to its top-k keys (k = 2048), with all query heads sharing one
selection and (MLA) one key/value head. With attndsl:

    idx = dsa_indexer(topk=2048)(q_i, k_i, w)                  # [B, 1, L, topk] int32, -1 unused
    out = attndsl.attention(q, k, v, mask_mod=causal, indices=idx)

``indexer_relu`` and ``causal`` are ordinary DSL functions: the indexer kernel is traced and
compiled from them like any pattern (swap in another activation or mask to experiment).
"""

import torch


def causal(b, h, q_idx, kv_idx):
    """Keys at or before the query (the indexer's mask; harmless on top of the selection)."""
    return q_idx >= kv_idx


def indexer_relu(score, b, h, q_idx, kv_idx):
    """The indexer's activation on ``q_I[t, j] · k_I[s]`` (``h`` is the indexer head ``j``)."""
    return torch.clamp(score, min=0.0)


def dsa_indexer(topk: int = 2048, scale: float = 1.0):
    """The compiled lightning indexer: ``indexer(q_i [B,HI,L,DI], k_i [B,1,L,DI], w [B,HI,L])``."""
    from attndsl.selectors import LightningIndexer

    return LightningIndexer(score_mod=indexer_relu, mask_mod=causal, topk=topk, scale=scale)


def dsa_attention(q, k, v, q_i, k_i, w, topk: int = 2048, scale=None):
    """Indexer → top-k → sparse attention (differentiable in q, k, v; the selection is not)."""
    import attndsl

    with torch.no_grad():
        idx = dsa_indexer(topk)(q_i, k_i, w)
    return attndsl.attention(q, k, v, mask_mod=causal, indices=idx, scale=scale)
