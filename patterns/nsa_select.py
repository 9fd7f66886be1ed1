"""NSA's selection branch (Native Sparse Attention, Yuan et al., 2025, arXiv:2502.11089).

Compressed keys (one per block of ``block_size`` keys) give each query a softmax importance
over the blocks; the importance is summed over the query heads of a GQA group (NSA shares the
selection across the group) and the ``n_select`` best blocks are kept, always including the
first block and the local ones. attndsl selects per query tile of ``q_tile`` queries (the
importances summed over the tile) and runs the existing block-sparse kernels, causal inside:

    sel = nsa_blocks(q, k, block_size=64, n_select=16, q_tile=64)
    out = attndsl.attention(q, k, v, mask_mod=causal, blocks=sel)

The compressed keys default to mean pooling; pass ``k_cmp`` (``[B, Hkv, n_blocks, D]``) from
NSA's learned compression branch to use those instead. The full NSA output gates this branch
with the compression and sliding-window branches (``patterns.sliding_window``).
"""


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def nsa_blocks(q, k, block_size: int = 64, n_select: int = 16, q_tile: int = 64, n_init: int = 1,
               n_local: int = 2, k_cmp=None):
    """``BlockSelection [B, Hkv, n_q_tiles, n_select]`` shared by each GQA group."""
    from attndsl.selectors import nsa_select

    return nsa_select(q.detach(), k.detach(), block_size=block_size, n_select=n_select, q_tile=q_tile,
                      n_init=n_init, n_local=n_local, k_cmp=None if k_cmp is None else k_cmp.detach())


def nsa_selected_attention(q, k, v, block_size: int = 64, n_select: int = 16, q_tile: int = 64, scale=None):
    import attndsl

    sel = nsa_blocks(q, k, block_size=block_size, n_select=n_select, q_tile=q_tile)
    return attndsl.attention(q, k, v, mask_mod=causal, blocks=sel, scale=scale)
