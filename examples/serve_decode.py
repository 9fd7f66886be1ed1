"""A tiny serving loop: prefill a paged KV cache, then decode one token per step, the step captured
in a CUDA graph and replayed (on a CPU the same step runs eagerly through Triton's interpreter).

    python examples/serve_decode.py [--steps 8] [--window 64]

The "model" is one attention layer with random projections (the point is the cache and the call):

1. prefill: each sequence's prompt keys/values go into ``PagedKVCache`` (pages handed out on the host);
2. ``reserve`` pages for the whole generation, so a step needs no host work;
3. one step = project the last output to q/k/v, ``append_step`` (writes k/v at ``seq_lens[b]``, device ops
   only), ``decode`` with a sliding-window mask (its queries sit at ``seq_lens - 1``, the last cache
   position, by default) — captured once in a CUDA graph, replayed per token;
4. every step is checked against the float64 oracle on the same cache; exits non-zero on a mismatch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's attndsl first
from attndsl.patterns import sliding_window
from attndsl.serving import PagedKVCache, decode
from attndsl.serving.reference import decode_reference


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    B, Hq, Hkv, D, page = 3, 8, 2, (128 if cuda else 16), 16
    prompts = [40, 17, 90]
    max_len = max(prompts) + args.steps
    g = torch.Generator(device=dev).manual_seed(0)
    wq, wk, wv = (torch.randn(Hq * D, n, generator=g, device=dev).to(dtype) / (Hq * D) ** 0.5
                  for n in (Hq * D, Hkv * D, Hkv * D))
    mask = sliding_window(args.window)

    cache = PagedKVCache(B * -(-max_len // page) + 1, page, Hkv, D, max_batch=B, max_seq_len=max_len, dtype=dtype,
                         device=dev)
    for s, n in enumerate(prompts):  # 1. prefill (random prompt keys/values)
        cache.prefill(s, torch.randn(Hkv, n, D, generator=g, device=dev).to(dtype),
                      torch.randn(Hkv, n, D, generator=g, device=dev).to(dtype))
        cache.reserve(s, n + args.steps)  # 2. pages for the whole generation
    x = torch.randn(B, Hq * D, generator=g, device=dev).to(dtype)  # static input buffer of a step
    q_buf = torch.zeros(B, Hq, 1, D, device=dev, dtype=dtype)

    def step():  # 3. one decode step: device ops only
        q = (x @ wq).view(B, Hq, 1, D)
        q_buf.copy_(q)
        cache.append_step((x @ wk).view(B, Hkv, 1, D), (x @ wv).view(B, Hkv, 1, D))
        out = decode(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
                     mask_mod=mask, max_seq_len=cache.max_pages * page)
        return out.reshape(B, Hq * D)

    if cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: compile the kernels outside the capture
            step()
        torch.cuda.current_stream().wait_stream(side)
        cache.seq_lens -= 1  # undo the warm-up's append
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = step()
        run = graph.replay
    else:
        y = None
        run = None
    worst = 0.0
    for t in range(args.steps):
        if cuda:
            run()
            out = y
        else:
            out = step()
        ref, _ = decode_reference(q_buf, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens,
                                  page_table=cache.page_table, mask_mod=mask)
        err = ((out.view(B, Hq, 1, D).double() - ref).norm() / ref.norm()).item()
        worst = max(worst, err)
        print(f"step {t}: seq_lens={cache.seq_lens.tolist()} rel. error vs float64 {err:.2e}")
        x.copy_(out)  # feed the output back as the next token's input
    ok = worst < (2e-2 if cuda else 1e-5)
    print(("OK" if ok else "MISMATCH") + f" ({'CUDA graph replays' if cuda else 'eager, CPU interpreter'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
