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


def check_extras(query, key, *, normalizer, return_lse, sinks, bias_factors, sigmoid_bias):
    """Validate the keywords of issue #6 (sinks, low-rank bias, sigmoid) before any launch."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    if normalizer == "sigmoid":
        if return_lse:
            raise ValueError("return_lse=True is not available with normalizer='sigmoid' (there is no row normaliser)")
        if sinks is not None:
            raise ValueError("sinks join the softmax denominator; they have no meaning with normalizer='sigmoid'")
    elif sigmoid_bias is not None:
        raise ValueError("sigmoid_bias is only used with normalizer='sigmoid'")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a tensor of shape [{Hq}], got {type(sinks).__name__}")
        if sinks.dim() != 1 or sinks.shape[0] != Hq:
            raise ValueError(f"sinks must have shape [Hq] = [{Hq}], got {tuple(sinks.shape)}")
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks must be floating, got {sinks.dtype}")
        if sinks.device != query.device:
            raise ValueError(f"sinks are on {sinks.device}, the inputs on {query.device}")
    if bias_factors is not None:
        try:
            u, w = bias_factors
        except (TypeError, ValueError):
            raise TypeError("bias_factors must be a pair (u, w)") from None
        for n, t in (("u", u), ("w", w)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"bias_factors {n} must be a 4-D tensor [B, H, L, R], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"bias_factors {n} must be floating, got {t.dtype}")
            if t.device != query.device:
                raise ValueError(f"bias_factors {n} is on {t.device}, the inputs on {query.device}")
        if u.dtype != w.dtype:
            raise TypeError(f"bias_factors u and w must share a dtype, got {u.dtype} and {w.dtype}")
        if u.shape[3] != w.shape[3]:
            raise ValueError(f"bias_factors ranks disagree: u has R={u.shape[3]}, w has R={w.shape[3]}")
        if not 1 <= u.shape[3] <= 256:
            raise ValueError(f"bias_factors rank {u.shape[3]} is outside 1..256")
        if u.shape[0] not in (1, B) or w.shape[0] not in (1, B):
            raise ValueError(f"bias_factors batch dims must be 1 or {B}: u {tuple(u.shape)}, w {tuple(w.shape)}")
        if u.shape[1] not in (1, Hq):
            raise ValueError(f"bias_factors u heads must be 1 or Hq={Hq}, got {u.shape[1]}")
        if w.shape[1] not in (1, Hq, Hkv):
            raise ValueError(f"bias_factors w heads must be 1, Hq={Hq} or Hkv={Hkv}, got {w.shape[1]}")
        if u.shape[2] != Lq:
            raise ValueError(f"bias_factors u length {u.shape[2]} differs from the query length {Lq}")
        if w.shape[2] != Lkv:
            raise ValueError(f"bias_factors w length {w.shape[2]} differs from the key length {Lkv}")
