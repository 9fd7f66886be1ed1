"""MoBA: Mixture of Block Attention (Lu et al., 2025, arXiv:2502.13189).

Keys are split into blocks; a parameter-free gate scores each block by the query against the
mean-pooled keys of the block, each query attends to its top-k blocks, always including its
own block (causally masked inside), never a future block. attndsl selects per query *block*
(the gate averaged over the block's queries, i.e. the mean-pooled queries against the
mean-pooled keys) and runs the existing block-sparse kernels on the selected tiles:

    sel = moba_blocks(q, k, block_size=512, topk=3)
    out = attndsl.attention(q, k, v, mask_mod=causal, blocks=sel)
"""


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def moba_blocks(q, k, block_size: int = 512, topk: int = 3):
    """Per-head block selection ``BlockSelection [B, Hq, n_blocks, topk]`` (own block included)."""
    from attndsl.selectors import moba_select

    return moba_select(q.detach(), k.detach(), block_size=block_size, topk=topk)


def moba_attention(q, k, v, block_size: int = 512, topk: int = 3, scale=None):
    import attndsl

    return attndsl.attention(q, k, v, mask_mod=causal, blocks=moba_blocks(q, k, block_size, topk), scale=scale)
