"""Document (packed-sequence) masking.

Several documents are packed into one sequence; a token may only attend to tokens of its
own document (and, if ``causal``, only to earlier ones).  ``doc_ids[t]`` is the document
number of token ``t``; it is captured by the mask and becomes a kernel argument, so the
same compiled kernel serves every packing.  See Krell et al., "Efficient Sequence Packing
without Cross-contamination" (2021, arXiv:2107.02027) and the FlexAttention paper (Dong et
al., 2024, arXiv:2412.05496) for this pattern.

``doc_ids`` must be a 1-D integer tensor on the same device as q/k/v, at least
``max(Lq, Lkv)`` long.  ``doc_ids_from_lengths`` builds it from document lengths.
"""

import torch


def doc_ids_from_lengths(lengths, device=None) -> torch.Tensor:
    """``[3, 2]`` -> ``tensor([0, 0, 0, 1, 1], dtype=torch.int32)``."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device="cpu")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D, got shape {tuple(lengths.shape)}")
    if (lengths < 0).any():
        raise ValueError("document lengths must be >= 0")
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), dtype=torch.int32), lengths)
    return ids.to(device) if device is not None else ids


def document(doc_ids: torch.Tensor, causal: bool = True):
    """Mask: ``doc_ids[q_idx] == doc_ids[kv_idx]`` (and ``q_idx >= kv_idx`` if causal)."""
    if doc_ids.dim() != 1:
        raise ValueError(f"doc_ids must be 1-D, got shape {tuple(doc_ids.shape)}")

    if causal:
        def document_causal(b, h, q_idx, kv_idx):
            return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

        return document_causal

    def document_bidirectional(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    return document_bidirectional
