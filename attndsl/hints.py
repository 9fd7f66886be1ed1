"""Type aliases of the public API (for annotations; nothing here runs).

A mask is ``mask_mod(b, h, q_idx, kv_idx) -> bool`` and a score modifier
``score_mod(score, b, h, q_idx, kv_idx) -> score``, as in FlexAttention. Their arguments are
index values (symbolic while attndsl traces, tensors in the reference or FlexAttention), so the
aliases leave argument and result types open.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple, Union

import torch

#: ``mask_mod(b, h, q_idx, kv_idx) -> bool``
MaskMod = Callable[[Any, Any, Any, Any], Any]
#: ``score_mod(score, b, h, q_idx, kv_idx) -> score``
ScoreMod = Callable[[Any, Any, Any, Any, Any], Any]
#: What an attention call returns: the output, or ``(output, lse)`` with ``return_lse=True``.
AttentionResult = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]

__all__ = ["MaskMod", "ScoreMod", "AttentionResult"]
