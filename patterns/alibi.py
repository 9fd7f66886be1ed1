"""ALiBi: Attention with Linear Biases.

Press, Smith and Lewis, "Train Short, Test Long: Attention with Linear Biases Enables
Input Length Extrapolation" (ICLR 2022, arXiv:2108.12409).  Each head ``h`` adds
``-slopes[h] * (q_idx - kv_idx)`` to the score, i.e. a penalty linear in distance.
The slopes are a geometric sequence; ``alibi_slopes`` reproduces the paper's reference
code, including its rule for head counts that are not a power of two.

``alibi`` is written in FlexAttention's form ``score + slopes[h] * (kv_idx - q_idx)``;
for ``kv_idx > q_idx`` (non-causal use) the bias is positive, exactly as in FlexAttention's
ALiBi example.  Combine it with ``causal`` for the paper's setting.
"""

import math

import torch


def _slopes_power_of_2(n: int) -> list[float]:
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]


def _slopes(n: int) -> list[float]:
    if math.log2(n).is_integer():
        return _slopes_power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return _slopes_power_of_2(closest) + _slopes(2 * closest)[0::2][: n - closest]


def alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The paper's per-head slopes as a float32 tensor of shape ``[num_heads]``.

    For 8 heads: ``1/2, 1/4, ..., 1/256``.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    return torch.tensor(_slopes(num_heads), dtype=torch.float32, device=device)


def alibi(slopes: torch.Tensor):
    """Score mod: ``score + slopes[h] * (kv_idx - q_idx)``.

    ``slopes`` is a 1-D float tensor with one entry per *query* head, on the same device
    as q/k/v (see ``alibi_slopes``).
    """
    if slopes.dim() != 1:
        raise ValueError(f"slopes must be 1-D [num_heads], got shape {tuple(slopes.shape)}")

    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return alibi_bias
