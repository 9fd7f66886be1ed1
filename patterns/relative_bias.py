"""Learned relative-position biases.

``relative_position_bias``: one learned scalar per head and clipped distance, added to the
score — the scalar-bias form of Shaw, Uszkoreit and Vaswani, "Self-Attention with
Relative Position Representations" (2018, arXiv:1803.02155), with distances clipped to
``[-max_distance, max_distance]``.  ``table`` has shape ``[H, 2 * max_distance + 1]``;
column ``max_distance + (q_idx - kv_idx)`` is used.

``t5_bucket_bias``: T5's relative-position buckets (Raffel et al., 2020,
arXiv:1910.10683).  Small distances get one bucket each, larger ones share
logarithmically wider buckets up to ``max_distance``, beyond which everything falls into
the last bucket.  With ``bidirectional=True`` keys after the query use the upper half of
the buckets.  The arithmetic follows the reference implementation
(``_relative_position_bucket`` in Mesh TensorFlow / Hugging Face ``T5Attention``),
computed in float32 in the same order, so a pretrained T5 table can be used as is.
``table`` has shape ``[H, num_buckets]`` (T5 stores it transposed, as an embedding
``[num_buckets, H]``: pass ``weight.T``).

Both tables are captured tensors: they become kernel arguments, on the device of q/k/v.
"""

import math

import torch


def relative_position_bias(table: torch.Tensor, max_distance: int):
    """Score mod: ``score + table[h, clamp(q_idx - kv_idx, -D, D) + D]`` with ``D = max_distance``."""
    if table.dim() != 2 or table.shape[1] != 2 * max_distance + 1:
        raise ValueError(
            f"table must be [H, 2*max_distance+1] = [H, {2 * max_distance + 1}], "
            f"got shape {tuple(table.shape)}"
        )

    def relative_position_bias_score(score, b, h, q_idx, kv_idx):
        rel = (q_idx - kv_idx).clamp(-max_distance, max_distance)
        return score + table[h, rel + max_distance]

    return relative_position_bias_score


def t5_bucket(q_idx, kv_idx, num_buckets: int, max_distance: int, bidirectional: bool = True):
    """T5 relative-position bucket of the pair (works on tensors and traced indices)."""
    if bidirectional:
        num_buckets = num_buckets // 2
        distance = (kv_idx - q_idx).abs()
    else:
        distance = torch.where(q_idx > kv_idx, q_idx - kv_idx, 0)  # future keys -> bucket 0
    max_exact = num_buckets // 2
    # log-spaced buckets for max_exact <= distance.  Clamping first keeps log() finite
    # where the small-distance branch is taken (the reference takes log(0) = -inf there)
    # and does not change the bucket of any distance: past max_distance the result is
    # num_buckets - 1 either way.
    far = distance.clamp(max_exact, max_distance).float()
    log_ratio = torch.log(far / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + torch.floor(log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max_exact, num_buckets - 1)
    bucket = torch.where(distance < max_exact, distance, large)
    if bidirectional:
        # keys after the query (kv_idx > q_idx) use the upper half of the buckets
        bucket = bucket + torch.where(kv_idx > q_idx, num_buckets, 0)
    return bucket


def t5_bucket_bias(table: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool = True):
    """Score mod: ``score + table[h, t5_bucket(q_idx, kv_idx)]``; ``table`` is ``[H, num_buckets]``."""
    if table.dim() != 2 or table.shape[1] != num_buckets:
        raise ValueError(
            f"table must be [H, num_buckets] = [H, {num_buckets}], got shape {tuple(table.shape)}"
        )
    half = num_buckets // 2 if bidirectional else num_buckets
    if half // 2 < 1 or max_distance <= half // 2:
        raise ValueError(
            "need num_buckets >= 4 (bidirectional) or >= 2, and max_distance > the number "
            f"of exact buckets ({half // 2}); got num_buckets={num_buckets}, "
            f"max_distance={max_distance}"
        )

    def t5_bucket_bias_score(score, b, h, q_idx, kv_idx):
        return score + table[h, t5_bucket(q_idx, kv_idx, num_buckets, max_distance, bidirectional)]

    return t5_bucket_bias_score
