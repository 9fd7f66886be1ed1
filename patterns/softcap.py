"""Logit soft-capping.

Scores are squashed smoothly into ``(-cap, cap)`` with ``cap * tanh(score / cap)``, as in
Gemma 2's attention (Gemma Team, 2024, arXiv:2408.00118; cap 50.0) and Grok-1.  The score
mod sees the already-scaled score ``q·k * scale``.
"""

import torch


def softcap(cap: float):
    """Score mod: ``cap * tanh(score / cap)``."""
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    cap = float(cap)

    def softcap_score(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return softcap_score
