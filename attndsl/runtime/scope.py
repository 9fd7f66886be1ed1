"""Where a launch runs. Triton launches on the current CUDA device (and its current stream), so a
launch enters the device of its tensors: a model on ``cuda:1`` while ``cuda:0`` is current would
otherwise hand one GPU's pointers to a kernel on another. CPU tensors run through the interpreter."""
from __future__ import annotations

import contextlib

import torch

from .interpreter import interpreting


def launch_scope(t: torch.Tensor, interpret: bool):
    """The context for launching kernels on ``t``'s data."""
    if interpret:
        return interpreting()
    dev = t.device
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        return torch.cuda.device(dev)
    return _STAY


#: the context of a launch on the current device (the common case: nothing to enter)
_STAY = contextlib.nullcontext()
