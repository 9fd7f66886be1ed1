"""Index selectors: which keys a query may visit at all, before the mask.

* Token level (DeepSeek Sparse Attention): ``attndsl.attention(q, k, v, indices=idx)`` with
  ``idx [B, G, Lq, K]`` int32 (``-1`` = unused), shared by the query heads of group ``g``; see
  :mod:`attndsl.selectors.sparse` for the semantics and the checked/fast modes.
  :class:`LightningIndexer` / :func:`lightning_indexer` compute such indices (DSA's indexer,
  compiled from the DSL, top-k in bounded memory).
* Block level (MoBA, NSA's selection branch): ``attndsl.attention(q, k, v, blocks=sel)`` with a
  :class:`BlockSelection`; :func:`moba_select` and :func:`nsa_select` compute one from block scores.

Masks and score modifiers apply on top of either selection.
"""
from .blocks import BlockSelection, block_call, moba_select, nsa_select
from .indexer import LightningIndexer, lightning_indexer
from .sparse import dedupe, default_check, dense_selection_mask, random_causal_indices, sparse_call, validate_indices

__all__ = ["BlockSelection", "LightningIndexer", "lightning_indexer", "moba_select", "nsa_select", "dedupe",
           "validate_indices", "default_check", "random_causal_indices", "dense_selection_mask", "selected_call"]


def selected_call(compiled, query, key, value, *, indices=None, blocks=None, check_indices=None,
                  block_tables=None, **kw):
    """Dispatch of ``CompiledAttention.__call__`` when a selector is given."""
    if indices is not None and blocks is not None:
        raise ValueError("pass either indices= (token selection) or blocks= (block selection), not both")
    if indices is not None:
        if block_tables is not None:
            raise ValueError("block_tables= has no meaning with indices=")
        return sparse_call(compiled, query, key, value, indices, check_indices=check_indices, **kw)
    return block_call(compiled, query, key, value, blocks, block_tables=block_tables, **kw)
