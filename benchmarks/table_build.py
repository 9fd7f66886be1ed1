"""Time building the block table of 64 packed documents (causal) in L tokens: the dense table
kernel (O(L²), ``codegen/table.py``) against the tile-bounds kernels (O(L + tiles²),
``codegen/tilebounds.py``), and the table cache's lookup when the table is reused.

    python benchmarks/table_build.py [--length 32768] [--docs 64] [--heads 1] [--device cuda]

Per build it prints the GPU time (CUDA events around ``--reps`` builds, after a warm-up) and the
host time of one build without a sync (a loop of builds timed on the host clock, the GPU left to
catch up afterwards), for the forward table (tiles of the forward kernel) and the dK/dV table.
On the CPU (Triton's interpreter) only small lengths are practical: ``--length 1024``.
"""
from __future__ import annotations

import argparse
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=50)
    a = p.parse_args()
    import attndsl
    from attndsl.passes.tile_intervals import why_not
    from attndsl.patterns import doc_ids_from_lengths, document
    from attndsl.runtime.tables import TABLES
    from attndsl.runtime.tilebounds import bounded_table, dense_table

    cuda = a.device == "cuda"
    g = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(a.length - 1, generator=g)[:a.docs - 1] + 1).values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([a.length])])).tolist()
    ids = doc_ids_from_lengths(lengths, device=a.device)
    attn = attndsl.compile(mask_mod=document(ids))
    print(f"tile bounds: {why_not(attn.spec) or 'yes'}")
    dtype = torch.bfloat16 if cuda else torch.float32
    q = torch.randn(1, a.heads, a.length, 64, device=a.device, dtype=dtype)
    r = attn.runner(q)
    shape = (1, a.heads, a.length, a.length)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    reps = a.reps if cuda else 2
    where = f"L={a.length}, {a.docs} documents, {a.heads} heads, {a.device}" + \
        (f" ({torch.cuda.get_device_name()})" if cuda else "")

    def gpu_ms(fn):
        if not cuda:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        sync()
        return start.elapsed_time(end) / reps

    def host_us(fn):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        dt = (time.perf_counter() - t) / reps * 1e6
        sync()
        return dt

    for what, transposed, br, bc in (("forward", False, r.cfg.fwd.block_m, r.cfg.fwd.block_n),
                                      ("dK/dV", True, r.cfg.dkdv.block_n, r.cfg.dkdv.block_m)):
        args = (r, shape, attn.tensors, transposed, br, bc, q.device)
        builds = {"tile bounds (O(L + tiles^2))": lambda: bounded_table(*args),
                  "dense table kernel (O(L^2))": lambda: dense_table(*args)}
        if not cuda:
            builds.pop("dense table kernel (O(L^2))")  # minutes in the interpreter at these lengths
        for name, fn in builds.items():
            fn()
            sync()
            print(f"{what:8s} {name:30s} GPU {gpu_ms(fn):8.4f} ms/build   host {host_us(fn):7.1f} us/build (no sync)"
                  f"   tiles {br}x{bc}, {where}")
    # reuse: the cache's lookup (what every later layer and step pays)
    tables = TABLES.get(r, q, q, attn.tensors)
    r.table(tables, attn.tensors, False, r.cfg.fwd.block_m, r.cfg.fwd.block_n)
    sync()
    t = time.perf_counter()
    n = 1000
    for _ in range(n):
        r.table(TABLES.get(r, q, q, attn.tensors), attn.tensors, False, r.cfg.fwd.block_m, r.cfg.fwd.block_n)
    print(f"cached table lookup (TABLES.get + Runner.table): {(time.perf_counter() - t) / n * 1e6:.1f} us")


if __name__ == "__main__":
    main()
