"""Input validation: every mistake is reported before any kernel is launched."""
from __future__ import annotations

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(query, key, value, scale=None):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D], got rank {t.dim()} ({tuple(t.shape)})")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lkv, Dk = key.shape
    if tuple(value.shape[:3]) != (Bk, Hkv, Lkv):
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, heads and length")
    if Bk != B:
        raise ValueError(f"batch sizes differ: query has {B}, key/value have {Bk}")
    if Dk != D:
        raise ValueError(f"head dims differ: query has {D}, key has {Dk}")
    if value.shape[3] != D:
        raise ValueError(f"value head dim {value.shape[3]} differs from query/key head dim {D} (not supported)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA/MQA")
    if not 16 <= D <= 256:
        raise ValueError(f"head dim {D} is outside the supported range 16..256")
    if min(B, Hq, Lq, Lkv) == 0:
        raise ValueError(f"empty input: query {tuple(query.shape)}, key {tuple(key.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")


def check_captured(tensors, device):
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"the pattern captures a tensor (#{i}, shape {tuple(t.shape)}) on {t.device}, "
                             f"but the inputs are on {device}; move it with .to({str(device)!r})")
        if t.requires_grad and t.dtype.is_floating_point:
            raise NotImplementedError(
                f"captured tensor #{i} (shape {tuple(t.shape)}) requires grad: gradients into captured tensors "
                "are not supported yet; detach it or use it as a constant")
