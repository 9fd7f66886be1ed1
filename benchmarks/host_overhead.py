"""Per-call host time of the Python call path, with every kernel launch stubbed out (CPU).

Measures what issue 30 part 2 is about, the Python work around the launches: pattern lookup,
checks, runner and table lookups, autograd plumbing. Kernels are replaced by no-ops (the
interpreter would dominate otherwise), so run it on any machine:

    python benchmarks/host_overhead.py [--calls 2000]

On a GPU, time the real path against SDPA with ``--gpu`` (no stubs, no syncs inside the loop).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def stub_launches():
    from attndsl.runtime import launch
    launch.Runner._run = lambda self, *a, **k: None
    launch.Runner._prepared = lambda self, *a, **k: (lambda args: None)


def cases(dev, dtype):
    import attndsl
    from attndsl.patterns import doc_ids_from_lengths, document, sliding_window
    L = 64 if dev == "cpu" else 256  # short kernels: the loop measures the host, not the GPU
    q, k, v = (torch.randn(1, 4, L, 64, device=dev, dtype=dtype) for _ in range(3))
    ids = doc_ids_from_lengths([L // 4, L - L // 4], device=dev)
    slopes = torch.rand(4, device=dev)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    compiled = attndsl.compile(mask_mod=causal)
    return {
        "attention causal": lambda: attndsl.attention(q, k, v, mask_mod=causal),
        "attention sliding_window(256) made per call": lambda: attndsl.attention(q, k, v,
                                                                                 mask_mod=sliding_window(256)),
        "attention causal+alibi": lambda: attndsl.attention(q, k, v, mask_mod=causal, score_mod=alibi),
        "attention document(ids) made per call": lambda: attndsl.attention(q, k, v, mask_mod=document(ids)),
        "compiled causal": lambda: compiled(q, k, v),
        "sdpa causal": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def timeit(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    best = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(best)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--gpu", action="store_true", help="real launches on CUDA (no stubs), bf16")
    a = p.parse_args()
    dev, dtype = ("cuda", torch.bfloat16) if a.gpu else ("cpu", torch.float32)
    if not a.gpu:
        stub_launches()
    for name, fn in cases(dev, dtype).items():
        if name.startswith("sdpa") and not a.gpu:
            continue  # CPU SDPA computes for real: not a host-time figure
        print(f"{name:48s} {timeit(fn, a.calls):8.1f} us/call")
    if a.gpu:
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
