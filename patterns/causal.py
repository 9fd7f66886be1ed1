"""Causal masks.

``causal`` is the standard autoregressive mask, aligned at the top-left corner of the
score matrix: query ``i`` sees keys ``0..i``.  This is FlexAttention's usual
``q_idx >= kv_idx`` and PyTorch's ``CausalVariant.UPPER_LEFT``.

``causal_bottom_right`` aligns the diagonal with the bottom-right corner instead, which
is what you want when the queries are the *last* ``q_len`` tokens of a ``kv_len``-token
sequence (decoding with a KV cache, chunked prefill): query ``i`` sees keys
``0..i + (kv_len - q_len)``.  This is FlashAttention >= 2.1's causal convention and
PyTorch's ``CausalVariant.LOWER_RIGHT``.  When ``q_len > kv_len`` the first
``q_len - kv_len`` query rows see nothing (they get output 0).
"""


def causal(b, h, q_idx, kv_idx):
    """Top-left aligned causal mask: query ``i`` sees keys ``j <= i``."""
    return q_idx >= kv_idx


def causal_bottom_right(q_len: int, kv_len: int):
    """Bottom-right aligned causal mask for ``q_len`` queries over ``kv_len`` keys."""
    offset = kv_len - q_len

    def causal_bottom_right_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_bottom_right_mask
