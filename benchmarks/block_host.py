"""Per-call host time of a ``torch.compile``d transformer block with each attention inside: the one-shot
``attndsl.attention(q, k, v, mask_mod=causal)`` in the forward vs a pattern from ``attndsl.compile``
(issue 30 part 3: the one-shot call under torch.compile must cost what a compiled pattern costs).

    python benchmarks/block_host.py                   # CPU, launches stubbed, inductor, process CPU time
    python benchmarks/block_host.py --backend aot_eager --profile
    python benchmarks/block_host.py --gpu             # CUDA, real launches, bf16 (B=8, L=2048, 12 x 64)

Variants are timed in interleaved rounds (att, ours, sdpa, then the reverse order), so an order or
warm-up effect shows as a spread instead of a difference; each figure is the fastest round. The
number of frames dynamo compiled per variant is printed after timing: more than the first call's
means the block recompiled (or fell back to eager) while it was timed.
``--gpu``: host time is a short loop of calls without syncs (few enough that the launch queue does
not fill: a full queue makes host time equal GPU time), GPU time by CUDA events.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's attndsl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--grad", action="store_true", help="training forward (inputs and weights require grad)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--calls", type=int, default=None, help="calls per round (default 100 CPU, 10 GPU)")
    p.add_argument("--profile", action="store_true", help="cProfile 200 calls of each attndsl variant")
    a = p.parse_args(argv)
    import attndsl
    from attndsl.patterns import causal
    from benchmarks.block import TransformerBlock
    from benchmarks.host_overhead import stub_launches
    if a.gpu:
        dev, dt, (B, L, H, D) = "cuda", torch.bfloat16, (8, 2048, 12, 64)
    else:
        stub_launches()
        torch.set_num_threads(1)  # a shared machine: threads spinning on other cores would count as CPU time
        dev, dt, (B, L, H, D) = "cpu", torch.float32, (1, 64, 2, 16)
    calls = a.calls or (10 if a.gpu else 100)
    clock = time.perf_counter if a.gpu else time.process_time
    sync = torch.cuda.synchronize if a.gpu else (lambda: None)
    torch.manual_seed(0)
    comp = attndsl.compile(mask_mod=causal)
    variants = {"att": lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal),
                "ours": lambda q, k, v: comp(q, k, v),
                "sdpa": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
    x = torch.randn(B, L, H * D, device=dev, dtype=dt, requires_grad=a.grad)
    blocks, frames = {}, {}
    for who, attention in variants.items():
        cnt = torch._dynamo.testing.CompileCounterWithBackend(a.backend)
        blk = TransformerBlock(H * D, H, attention).to(dev, dt).requires_grad_(a.grad)
        c = torch.compile(blk, fullgraph=True, backend=cnt)
        for _ in range(3):
            c(x)
        sync()
        blocks[who], frames[who] = c, (cnt, cnt.frame_count)
    host = {w: [] for w in blocks}
    gpu = {w: [] for w in blocks}
    for i in range(a.rounds):
        for who in (list(blocks) if i % 2 == 0 else list(blocks)[::-1]):
            c = blocks[who]
            sync()
            if a.gpu:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t = clock()
            for _ in range(calls):
                c(x)
            host[who].append((clock() - t) / calls * 1e6)
            if a.gpu:
                e1.record()
                sync()
                gpu[who].append(e0.elapsed_time(e1) / calls * 1e3)
    for who in blocks:
        cnt, first = frames[who]
        line = f"{who:5s} host {min(host[who]):8.1f} us/call (median {sorted(host[who])[len(host[who]) // 2]:8.1f})"
        if a.gpu:
            line += f"   gpu {min(gpu[who]):8.1f} us/call"
        line += f"   frames compiled: {first} after warm-up, {cnt.frame_count} after timing"
        print(line)
    print(f"device {dev}, backend {a.backend}, grad {a.grad}, B={B} L={L} H={H} D={D} {dt}, "
          f"{a.rounds} rounds x {calls} calls{'' if a.gpu else ', launches stubbed, process CPU time'}")
    if a.profile:
        import cProfile
        import pstats
        for who in ("att", "ours"):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                blocks[who](x)
            prof.disable()
            print(f"===== {who}")
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
