"""Per-call host time of the Python call path, forward and forward+backward, next to SDPA's.

Measures what issue 30 part 2 is about, the Python work around the launches: pattern lookup,
checks, runner and table lookups, autograd plumbing. Each case is timed as a loop of calls
without syncs, so a case whose kernels are short measures the host.

    python benchmarks/host_overhead.py [--calls 200] [--cases causal] [--profile]   # CPU, launches stubbed
    python benchmarks/host_overhead.py --gpu                                         # CUDA, real launches, bf16
    python benchmarks/host_overhead.py --gpu --calls 100 --cases causal --B 8 --H 12 --L 2048 --D 64  # GPT-2 step
    python benchmarks/host_overhead.py --gpu --calls 100 --cases causal --H 32 --Hkv 8 --L 8192 --D 128  # Llama-3-8B

CPU (default): kernel launches are replaced by no-ops and the launch context by the one a GPU
launch on the current device takes (the interpreter would dominate otherwise), so it runs on any
machine; timed by this process's CPU time (other processes on a shared machine do not count).
SDPA runs for real on tiny CPU tensors (L=16, D=16: its compute is a few microseconds, so its
figure is mostly its own host path). ``--gpu``: wall time, real launches on a small, host-bound
shape (B=1, H=4, L=128, D=64 bf16 by default; ``--L``/``--B``/``--H``/``--D`` change it; SDPA
runs the same shape).

Each figure is the fastest of 15 loops. Columns: ``fwd`` (inputs do not require grad:
inference), ``fwd+bwd`` (inputs require grad; one ``torch.autograd.grad`` of the output per call)
and each one's ratio to SDPA's on the same loop.
Aims (issue 30): one-shot ``attndsl.attention`` <= 2x SDPA, a compiled pattern <= 1.5x.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's attndsl, not an installed one


def stub_launches():
    """Kernel launches become no-ops, and the launch context the one a GPU launch on the current
    device takes (none), so the loop times the Python path alone."""
    from attndsl.runtime import launch
    from attndsl.runtime.scope import NO_CONTEXT
    from attndsl.selectors.sparse import GatherRunner
    launch.Runner._run = lambda self, *a, **k: None
    for runner in (launch.Runner, GatherRunner):  # the dense and the gather (token selector) kernels
        runner._prepared = lambda self, *a, **k: (lambda args: None)
        runner.mode = lambda self, t: NO_CONTEXT


def cases(dev, dtype, B, H, L, D, Hkv=None):
    """name -> make(requires_grad) -> (call, inputs): ``call()`` returns the output."""
    import attndsl
    from attndsl.patterns import doc_ids_from_lengths, document, sliding_window
    from attndsl.selectors import random_causal_indices
    ids = doc_ids_from_lengths([L // 4, L - L // 4], device=dev)
    top = random_causal_indices(L, min(L, 32), device=dev)  # DSA-like: 32 keys per query, shared by the heads
    slopes = torch.rand(H, device=dev)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    compiled = attndsl.compile(mask_mod=causal)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def inputs(grad):
        return [torch.randn(B, h, L, D, device=dev, dtype=dtype, requires_grad=grad) for h in (H, Hkv or H, Hkv or H)]

    def case(fn):
        def make(grad):
            q, k, v = inputs(grad)
            return (lambda: fn(q, k, v)), (q, k, v)
        return make

    def sdpa_case(grad):
        # tiny CPU tensors: SDPA computes for real on the CPU; its figure is mostly host time
        shapes = [(B, h, L, D) for h in (H, Hkv or H, Hkv or H)] if dev != "cpu" else [(1, 1, 16, 16)] * 3
        q, k, v = (torch.randn(*s, device=dev, dtype=dtype, requires_grad=grad) for s in shapes)
        gqa = dict(enable_gqa=True) if shapes[0][1] != shapes[1][1] else {}
        return (lambda: sdpa(q, k, v, is_causal=True, **gqa)), (q, k, v)

    return {
        "sdpa causal": sdpa_case,
        "attention causal": case(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal)),
        "compiled causal": case(lambda q, k, v: compiled(q, k, v)),
        "attention sliding_window(256) made per call": case(
            lambda q, k, v: attndsl.attention(q, k, v, mask_mod=sliding_window(256))),
        "attention causal+alibi": case(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal, score_mod=alibi)),
        "attention document(ids) made per call": case(
            lambda q, k, v: attndsl.attention(q, k, v, mask_mod=document(ids))),
        # token selection (gather kernels); the fast mode: no pass over the indices with a host sync
        "attention causal indices=top32 (fast mode)": case(
            lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal, indices=top, check_indices=False)),
        "compiled causal indices=top32 (fast mode)": case(
            lambda q, k, v: compiled(q, k, v, indices=top, check_indices=False)),
    }


def timeit(fn, calls: int, clock=time.perf_counter, sync=lambda: None) -> float:
    """The fastest of 15 loops of ``calls`` calls, in microseconds per call (no sync inside a loop;
    ``sync`` before each, so a GPU still busy with the last loop's kernels does not block this one's
    launches: keep ``calls`` times the launches of a call under CUDA's launch queue, ~1000)."""
    for _ in range(20):
        fn()
    best = []
    for _ in range(15):
        sync()
        t = clock()
        for _ in range(calls):
            fn()
        best.append((clock() - t) / calls * 1e6)
    return min(best)


def with_backward(call, inputs):
    """A call followed by the gradient of its output with respect to the inputs."""
    out = call()
    grad_out = torch.randn_like(out)

    def step():
        return torch.autograd.grad(call(), inputs, grad_out)
    return step


def profile(name, fwd, fwd_bwd, calls):
    """Print the functions taking the most time of ``calls`` calls of each (cProfile)."""
    import cProfile
    import pstats
    for what, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        for _ in range(20):
            fn()
        prof = cProfile.Profile(time.process_time)  # CPU time: the machine may be shared
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
        print(f"--- {name}, {what}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=200, help="calls per timed loop")
    p.add_argument("--gpu", action="store_true", help="real launches on CUDA (no stubs), bf16")
    p.add_argument("--cases", default="", help="only the cases whose name contains this")
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--Hkv", type=int, default=None, help="key/value heads (GQA; default --H)")
    p.add_argument("--L", type=int, default=None, help="default 64 (CPU), 128 (GPU)")
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--profile", action="store_true", help="cProfile each selected case's loop (fwd, fwd+bwd)")
    a = p.parse_args()
    dev, dtype = ("cuda", torch.bfloat16) if a.gpu else ("cpu", torch.float32)
    L = a.L or (128 if a.gpu else 64)
    if not a.gpu:
        stub_launches()
    sync = torch.cuda.synchronize if a.gpu else (lambda: None)
    # CPU: this process's CPU time (the machine may be shared); GPU: wall time (the GPU may lag)
    clock = time.perf_counter if a.gpu else time.process_time
    print(f"host time per call, us ({'CUDA ' + torch.cuda.get_device_name() if a.gpu else 'CPU, launches stubbed'}; "
          f"B={a.B} H={a.H} Hkv={a.Hkv or a.H} L={L} D={a.D} {str(dtype).split('.')[-1]}; torch {torch.__version__})")
    print(f"{'case':46s} {'fwd':>8s} {'x sdpa':>7s} {'fwd+bwd':>9s} {'x sdpa':>7s}")
    base = None
    for name, make in cases(dev, dtype, a.B, a.H, L, a.D, a.Hkv).items():
        if a.cases and a.cases not in name and not name.startswith("sdpa"):
            continue
        fwd, _ = make(False)
        if a.profile:
            profile(name, fwd, with_backward(*make(True)), a.calls)
            continue
        t_f = timeit(fwd, a.calls, clock, sync)
        sync()
        t_b = timeit(with_backward(*make(True)), a.calls, clock, sync)
        sync()
        if base is None:
            base = (t_f, t_b)
        print(f"{name:46s} {t_f:8.1f} {t_f / base[0]:6.2f}x {t_b:9.1f} {t_b / base[1]:6.2f}x")


if __name__ == "__main__":
    main()
