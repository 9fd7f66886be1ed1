"""Ready-made attention patterns for attndsl (and FlexAttention).

Every pattern is written with plain torch operations, so the same function works with
``attndsl.attention`` / ``attndsl.compile`` and with
``torch.nn.attention.flex_attention``.  Masks have the signature
``mask_mod(b, h, q_idx, kv_idx) -> bool``; score modifiers
``score_mod(score, b, h, q_idx, kv_idx) -> score``.  Functions named after a pattern are
factories returning the mod, except ``causal``, which is the mask itself.
"""

from .alibi import alibi, alibi_slopes
from .causal import causal, causal_bottom_right
from .chunked import chunked
from .document import doc_ids_from_lengths, document
from .prefix_lm import prefix_lm
from .relative_bias import relative_position_bias, t5_bucket, t5_bucket_bias
from .sliding_window import sliding_window
from .softcap import softcap
from .tree import tree_ancestors, tree_mask

__all__ = [
    "alibi",
    "alibi_slopes",
    "causal",
    "causal_bottom_right",
    "chunked",
    "doc_ids_from_lengths",
    "document",
    "prefix_lm",
    "relative_position_bias",
    "sliding_window",
    "softcap",
    "t5_bucket",
    "t5_bucket_bias",
    "tree_ancestors",
    "tree_mask",
]
