"""What a benchmark figure is made of, with no GPU needed (unit-tested on the CPU): FLOPs and
TFLOP/s, ratios against an anchor, a mask's density, relative errors, how many calls a host-time
loop makes; the small formatting helpers the harness and the transformer-block case share."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# shared/bench/README.md: "4*B*H*Lq*Lkv*D*density for the forward (x2.5 for forward+backward)".
# (flex_anchors.py multiplies its fwd_bwd figure by 3.5 instead; ratios are unaffected.)
FWD_BWD_FLOP_FACTOR = 2.5

# host-time loops: calls for ~10 ms of GPU work (2 to 100), so that the launch queue never fills: a
# full queue makes the host wait for the GPU, and a kernel with large parameters (a Gluon kernel's
# three 128-byte TMA descriptors) fills it in far fewer launches than the ~1000 of a small kernel;
# HOST_LOOPS loops, a sync between them (outside the timing), the median per call
HOST_MIN_CALLS, HOST_MAX_CALLS, HOST_LOOP_MS, HOST_LOOPS = 2, 100, 10.0, 5


def host_calls(gpu_ms: Optional[float]) -> int:
    """How many calls a host-time loop makes for a call of ``gpu_ms`` GPU time: many for short calls
    (host time is what decides them), few for long ones (the launch queue must not fill up, and a
    2-second call must not cost 20 s)."""
    if gpu_ms is None or not (gpu_ms > 0):
        return HOST_MIN_CALLS
    return int(max(HOST_MIN_CALLS, min(HOST_MAX_CALLS, HOST_LOOP_MS / gpu_ms)))


def attention_flops(B: int, H: int, Lq: int, Lkv: int, D: int, density: float = 1.0,
                    fwd_bwd: bool = False, Dv: Optional[int] = None) -> float:
    """FLOPs of the attended fraction: 4*B*H*Lq*Lkv*D*density (x2.5 for fwd+bwd); with a value head
    dim ``Dv`` apart from D, 2*B*H*Lq*Lkv*(D + Dv)*density (QKᵀ over D, PV over Dv)."""
    f = 2.0 * B * H * Lq * Lkv * (D + (D if Dv is None else Dv)) * density
    return f * FWD_BWD_FLOP_FACTOR if fwd_bwd else f


def tflops(flops: float, ms: Optional[float]) -> Optional[float]:
    """TFLOP/s given FLOPs and milliseconds (None when ms is missing or not positive)."""
    if ms is None or not (ms > 0) or flops is None:
        return None
    return flops / (ms * 1e-3) / 1e12


def ratio(anchor_ms: Optional[float], ours_ms: Optional[float]) -> Optional[float]:
    """anchor time / our time (> 1 means we are faster); None when either is missing."""
    if anchor_ms is None or ours_ms is None or not (ours_ms > 0) or not (anchor_ms > 0):
        return None
    return anchor_ms / ours_ms


def _index_grid(device, B, H, qs, Lkv, uses_bh):
    kk = torch.arange(Lkv, device=device)[None, :]
    qq = qs[:, None]
    if not uses_bh:
        return [(0, 0, qq, kk)]
    return [(b, h, qq, kk) for b in range(B) for h in range(H)]


def mask_density(mask_mod: Optional[Callable], Lq: int, Lkv: Optional[int] = None, device="cpu",
                 chunk: int = 2048, B: int = 1, H: int = 1, uses_bh: bool = False) -> float:
    """Exact fraction of (q, k) pairs a mask attends, evaluated in chunks of query rows.

    Like ``mask_density`` in flex_anchors.py (b = h = 0), or averaged over every (b, h) when
    the mask reads them (``uses_bh``).
    """
    if mask_mod is None:
        return 1.0
    Lkv = Lq if Lkv is None else Lkv
    if Lq <= 0 or Lkv <= 0:
        return 0.0
    total = 0
    n_bh = B * H if uses_bh else 1
    for s in range(0, Lq, chunk):
        qs = torch.arange(s, min(Lq, s + chunk), device=device)
        for b, h, qq, kk in _index_grid(device, B, H, qs, Lkv, uses_bh):
            m = mask_mod(b, h, qq, kk)
            m = torch.as_tensor(m, device=device)
            total += int(torch.broadcast_to(m, (qq.shape[0], Lkv)).sum().item())
    return total / (Lq * Lkv * n_bh)


def rel_error(a: "torch.Tensor", b: "torch.Tensor") -> float:
    """||a - b|| / ||b|| in float64 accumulation (inf when b is all zero and a is not)."""
    a = a.detach().float()
    b = b.detach().to(a.device).float()
    num = torch.linalg.vector_norm((a - b).flatten(), dtype=torch.float64).item()
    den = torch.linalg.vector_norm(b.flatten(), dtype=torch.float64).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _randn(shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float32, device=device).to(dtype)


def _err(e: BaseException) -> str:
    msg = str(e).strip()
    return f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"[:300]
