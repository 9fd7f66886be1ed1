"""Chunked (block-local) attention.

The sequence is cut into consecutive chunks of ``chunk`` tokens and a query attends only
to keys of its own chunk (causally, if asked).  This is the local attention of Llama 4's
"iRoPE" layers (Meta, 2025: chunk size 8192, causal), also known as block-diagonal
attention.
"""


def chunked(chunk: int, causal: bool = True):
    """Mask: ``q_idx // chunk == kv_idx // chunk`` (and ``q_idx >= kv_idx`` if causal)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")

    if causal:
        def chunked_causal(b, h, q_idx, kv_idx):
            return (q_idx // chunk == kv_idx // chunk) & (q_idx >= kv_idx)

        return chunked_causal

    def chunked_bidirectional(b, h, q_idx, kv_idx):
        return q_idx // chunk == kv_idx // chunk

    return chunked_bidirectional
