"""Prefix-LM mask.

The first ``prefix_len`` tokens (the prefix, e.g. a prompt or an image) are visible to
every query — bidirectional attention inside the prefix — and the rest of the sequence is
causal.  Used by UniLM (Dong et al., 2019, arXiv:1905.03197), the T5 prefix-LM objective
(Raffel et al., 2020, arXiv:1910.10683) and PaliGemma-style vision-language models.
"""


def prefix_lm(prefix_len: int):
    """Mask: ``(kv_idx < prefix_len) | (q_idx >= kv_idx)``."""
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_len) | (q_idx >= kv_idx)

    return prefix_lm_mask
