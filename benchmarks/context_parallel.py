"""Context-parallel scaling: ring attention over 1, 2, 4 GPUs (torchrun), causal and document masks.

    torchrun --nproc_per_node 1 benchmarks/context_parallel.py --out cp.jsonl
    torchrun --nproc_per_node 2 benchmarks/context_parallel.py --out cp.jsonl
    torchrun --nproc_per_node 4 benchmarks/context_parallel.py --out cp.jsonl
    python benchmarks/context_parallel.py --table cp.jsonl        # the markdown table of all rows

Each configuration is timed three ways (CUDA events around a barrier, median of ``--iters``):

* ``ring``: the real thing, K/V blocks circulating while blocks compute;
* ``compute``: the same launches and merges with every transfer replaced by a local stand-in of
  the same shapes (``Group.offline``): what the ring would cost if communication were free;
* ``comm``: the ring's transfers alone (``P - 1`` K/V exchanges; backward also the returning
  float32 dK/dV), no compute.

``hidden = 1 - (ring - compute) / comm`` is the fraction of communication hidden behind compute
(1: fully overlapped, 0: fully exposed). Effective TFLOP/s count the (query, key) pairs the mask
allows, ``4·D`` FLOPs each forward and ``3.5×`` that for forward + backward, divided by the ring
time and the number of GPUs. Rows are JSON lines appended to ``--out`` by rank 0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("ATTNDSL_CHECK_INDICES", "0")  # no host sync per block call (ids are in range by construction)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from attndsl.distributed import ContextParallelAttention, Sharding, balance  # noqa: E402
from attndsl.distributed.comm import RingExchange  # noqa: E402
from attndsl.patterns import causal, doc_ids_from_lengths, document  # noqa: E402


def _doc_lengths(L: int, docs: int, seed: int = 0) -> list[int]:
    """``docs`` random document lengths summing to ``L`` (each at least 1)."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(L - 1, generator=g)[: docs - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [L])]


def _allowed_pairs(mask: str, L: int, lengths) -> int:
    """(query, key) pairs the causal / causal-document mask allows."""
    if mask == "causal":
        return L * (L + 1) // 2
    return sum(n * (n + 1) // 2 for n in lengths)


def _time(fn, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, every rank starting together."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        dist.barrier()
        times.append(a.elapsed_time(b))
    t = torch.tensor(statistics.median(times), device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    return float(t)


def _comm_only(cp, k, v, backward: bool):
    G = cp.group
    bufs = [k, v]
    grads = [torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
    for step in range(G.size - 1):
        bufs = RingExchange(G, bufs).wait()
    if backward:
        for step in range(G.size - 1):
            bufs = RingExchange(G, bufs).wait()
        for step in range(G.size):
            grads = RingExchange(G, grads, tag=8).wait()


def run(args):
    rank, P = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    rows = []
    for L in args.seq_lens:
        for mask in args.masks:
            lengths = None
            if mask == "causal":
                mask_mod, sharding = causal, Sharding.zigzag(L, P)
            else:
                lengths = _doc_lengths(L, args.docs)
                ids = doc_ids_from_lengths(lengths, device="cuda")
                mask_mod = document(ids)
                sharding = balance(mask_mod, L, P, chunks_per_rank=2, tile=128)
            cp = ContextParallelAttention(mask_mod, sharding=sharding, method=args.method)
            n = L // P
            g = torch.Generator(device="cuda").manual_seed(rank)
            q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, device="cuda", dtype=dtype, generator=g)
                       for _ in range(3))
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            dout = torch.randn_like(q)

            def fwd():
                with torch.no_grad():
                    cp(q, k, v)

            def fwd_bwd():
                out = cp(qg, kg, vg)
                out.backward(dout)

            res = {}
            for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                res[f"{name}_ms"] = _time(fn, args.iters, args.warmup)
                cp.group.offline = True
                try:
                    res[f"compute_{name}_ms"] = _time(fn, args.iters, args.warmup)
                finally:
                    cp.group.offline = False
                res[f"comm_{name}_ms"] = _time(lambda: _comm_only(cp, k, v, name == "fwd_bwd"), args.iters,
                                               args.warmup) if P > 1 else 0.0
            pairs = _allowed_pairs(mask, L, lengths)
            fwd_flops = 4.0 * args.head_dim * pairs * args.batch * args.heads
            row = {"bench": "context_parallel", "gpus": P, "L": L, "mask": mask, "method": args.method,
                   "B": args.batch, "H": args.heads, "D": args.head_dim, "dtype": args.dtype,
                   "docs": args.docs if mask == "document" else None, "sharding": repr(sharding),
                   "launches_per_rank": cp.launches(args.batch, args.heads), **res,
                   "tflops_per_gpu_fwd": fwd_flops / (res["fwd_ms"] * 1e-3) / P / 1e12,
                   "tflops_per_gpu_fwd_bwd": 3.5 * fwd_flops / (res["fwd_bwd_ms"] * 1e-3) / P / 1e12,
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__}
            for name in ("fwd", "fwd_bwd"):
                comm = res[f"comm_{name}_ms"]
                exposed = res[f"{name}_ms"] - res[f"compute_{name}_ms"]
                row[f"hidden_{name}"] = None if comm <= 0 else max(0.0, min(1.0, 1.0 - exposed / comm))
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
            del q, k, v, qg, kg, vg, dout, cp
            torch.cuda.empty_cache()
    return rows


def table(path: str) -> str:
    """A markdown table of the JSON rows in ``path``."""
    rows = [json.loads(x) for x in open(path) if x.strip()]
    rows.sort(key=lambda r: (r["mask"], r["L"], r["gpus"]))
    out = ["| mask | L | GPUs | fwd ms | fwd TFLOP/s/GPU | hidden fwd | fwd+bwd ms | fwd+bwd TFLOP/s/GPU | hidden fwd+bwd |",
           "|---|---|---|---|---|---|---|---|---|"]

    def pct(x):
        return "—" if x is None else f"{100 * x:.0f}%"

    for r in rows:
        out.append(f"| {r['mask']} | {r['L'] // 1024}K | {r['gpus']} | {r['fwd_ms']:.1f} | {r['tflops_per_gpu_fwd']:.0f} | "
                   f"{pct(r['hidden_fwd'])} | {r['fwd_bwd_ms']:.1f} | {r['tflops_per_gpu_fwd_bwd']:.0f} | "
                   f"{pct(r['hidden_fwd_bwd'])} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")], default=[65536, 131072, 262144])
    ap.add_argument("--masks", type=lambda s: s.split(","), default=["causal", "document"])
    ap.add_argument("--method", choices=["ring", "allgather"], default="ring")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--docs", type=int, default=64, help="documents packed in the sequence (document mask)")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=None, help="append JSON rows to this file")
    ap.add_argument("--table", default=None, help="print the markdown table of a JSON-lines file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/context_parallel.py needs CUDA GPUs (run it under torchrun, one process per GPU)")
    dist.init_process_group("nccl")
    try:
        run(args)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
