"""Time building the block table of 64 packed documents (causal) in L tokens: the dense table
kernel (O(L²)) against the per-tile-bounds builder (O(L + tiles²), runtime/tilebounds.py).

    python benchmarks/table_build.py [--length 32768] [--docs 64] [--device cuda]

The CPU run times only the bounds builder (the interpreter would take minutes for the kernel).
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    import attndsl
    from attndsl.patterns import doc_ids_from_lengths, document
    from attndsl.runtime.tilebounds import TileBounds
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(a.length - 1, generator=g)[:a.docs - 1] + 1).values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([a.length])])).tolist()
    ids = doc_ids_from_lengths(lengths, device=a.device)
    attn = attndsl.compile(mask_mod=document(ids))
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    q = torch.randn(1, 1, a.length, 64, device=a.device, dtype=dtype)
    r = attn.runner(q)
    br, bc = r.cfg.fwd.block_m, r.cfg.fwd.block_n
    shape = (1, 1, a.length, a.length)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)

    def bounds():
        return TileBounds(attn.spec, attn.tensors, shape, q.device).table(False, br, bc)

    def kernel():
        return r.table(r.new_tables(q, q, attn.tensors), attn.tensors, False, br, bc)

    todo = {"bounds (O(L + tiles^2))": bounds}
    if a.device == "cuda":
        todo["dense table kernel (O(L^2))"] = kernel
    for name, fn in todo.items():
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        sync()
        print(f"{name:32s} {(time.perf_counter() - t) / a.reps * 1e3:8.3f} ms  (L={a.length}, {a.docs} documents, "
              f"tiles {br}x{bc}, {a.device})")


if __name__ == "__main__":
    main()
