"""Integer functions torch lacks, usable in pattern files on traced values and on tensors alike."""
from __future__ import annotations

import torch

from ..ir.intmath import bit_length_value
from .capture import bit_length_op, tracing


def bit_length(x):
    """``int.bit_length`` of ``|x|`` (``floor(log2|x|) + 1``, and 0 for 0), elementwise.

    Traced, it is the IR op ``bit_length`` (exact integer arithmetic in the kernels, with interval
    rules for block analysis); on tensors (FlexAttention, references) a branch-free binary search
    over shifts; on Python ints ``abs(x).bit_length()``. ``2 ** bit_length(x)`` is ``1 << bit_length(x)``.
    """
    if isinstance(x, torch.Tensor) and tracing():
        if x.is_floating_point():
            from .errors import PatternError
            raise PatternError("bit_length of a floating value", "convert with .long() first")
        return bit_length_op(x)
    return bit_length_value(x)
