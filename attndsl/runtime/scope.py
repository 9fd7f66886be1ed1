"""Where a launch runs. Triton launches on the current CUDA device (and its current stream), so a
launch enters the device of its tensors: a model on ``cuda:1`` while ``cuda:0`` is current would
otherwise hand one GPU's pointers to a kernel on another. CPU tensors run through the interpreter."""
from __future__ import annotations

import contextlib

import torch

from .interpreter import interpreting

#: the current CUDA device, asked of the driver directly: ``torch.cuda.current_device()`` first
#: checks CUDA's lazy initialisation in Python (a microsecond a launch); a CUDA tensor's existence
#: already proves it done. None on builds without CUDA (no CUDA tensor reaches it there).
_current_device = getattr(torch._C, "_cuda_getDevice", None)


def launch_scope(t: torch.Tensor, interpret: bool):
    """The context for launching kernels on ``t``'s data."""
    if interpret:
        return interpreting()
    index = t.get_device()  # -1 on the CPU; cheaper than ``t.device`` (no device object)
    if index >= 0 and index != _current_device():
        return torch.cuda.device(index)
    return NO_CONTEXT


#: a context with nothing to enter (a launch on the current device, with no scratch allocator);
#: shared, so entering it costs nothing
NO_CONTEXT = contextlib.nullcontext()
