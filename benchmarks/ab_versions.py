"""Same-run A/B of two checkouts of attndsl on the protocol cases (GPU).

``python -m benchmarks.ab_versions --a PATH_A --b PATH_B [--rounds 3] [--L 16384] [--json OUT]``

Each round runs one worker subprocess per checkout (``PYTHONPATH`` = that checkout, its own
kernel source cache), alternating A, B, A, B, ... so that both see the same machine state. A
worker builds every case through the public API only (``attndsl.compile`` with prebuilt block
tables, and the one-shot ``attndsl.attention`` where the case has no extra call arguments),
checks its output against the float64 reference at a small size, and times forward and
forward+backward with ``triton.testing.do_bench(warmup=50, rep=200, return_mode="median")``.
The parent reports, per case and pass, the median over rounds of each checkout and the ratio
B / A (above 1: B is slower).

Works with checkouts from before the package layout change (top-level ``patterns``) and after
(``attndsl.patterns``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

CASES = ["dense", "causal", "sliding_window", "document", "alibi", "softcap", "natten2d", "sta3d",
         "radial", "dsa_topk1024", "t5_table", "sigmoid", "lowrank"]


def _patterns():
    try:
        import attndsl.patterns as P  # noqa: F401
        from attndsl.patterns import neighborhood, radial, relative_bias, sliding_tile
    except ImportError:  # a checkout from before attndsl.patterns
        import patterns as P  # noqa: F401
        from patterns import neighborhood, radial, relative_bias, sliding_tile
    return neighborhood, radial, relative_bias, sliding_tile


def build(name, L, H, D, dev, dt):
    """``(compile_kwargs, call_kwargs, L, Hkv)`` of a case; every captured tensor made here."""
    import torch

    import attndsl
    neighborhood, radial, relative_bias, sliding_tile = _patterns()
    causal = lambda b, h, q, k: q >= k  # noqa: E731
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    if name == "dense":
        return {}, {}, L, H
    if name == "causal":
        return dict(mask_mod=causal), {}, L, H
    if name == "sliding_window":
        return dict(mask_mod=lambda b, h, q, k: (q >= k) & (q - k < 1024)), {}, L, H
    if name == "document":
        cuts = torch.sort(torch.randint(1, L, (15,), device=dev, generator=g)).values
        doc = torch.zeros(L, dtype=torch.int32, device=dev)
        doc[cuts] = 1
        doc = torch.cumsum(doc, 0)
        return dict(mask_mod=lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k)), {}, L, H
    if name == "alibi":
        slopes = torch.exp2(-8.0 * torch.arange(1, H + 1, device=dev) / H)
        return dict(mask_mod=causal, score_mod=lambda s, b, h, q, k: s - slopes[h] * (q - k)), {}, L, H
    if name == "softcap":
        return dict(mask_mod=causal, score_mod=lambda s, b, h, q, k: 30.0 * torch.tanh(s / 30.0)), {}, L, H
    if name == "natten2d":
        side = 128
        lay = attndsl.Layout((side, side), tile=(8, 8))
        return dict(mask_mod=neighborhood.neighborhood(lay, 13), block_m=128, block_n=64), {}, side * side, H
    if name == "sta3d":
        lay, mask = sliding_tile.sliding_tile_3d((16, 32, 32), (4, 8, 8), (3, 3, 3))
        return dict(mask_mod=mask, block_m=128, block_n=128), {}, 16384, H
    if name == "radial":
        return dict(mask_mod=radial.radial(16, 1024), block_m=128, block_n=64), {}, 16384, H
    if name == "dsa_topk1024":
        from attndsl.selectors import random_causal_indices
        idx = random_causal_indices(L, 1024, device=dev, seed=0)
        return {}, dict(indices=idx, check_indices=False), L, 1
    if name == "t5_table":
        table = (0.1 * torch.randn(H, 32, device=dev, dtype=dt, generator=g)).requires_grad_()
        mod = relative_bias.t5_bucket_bias(table, 32, 128, bidirectional=False)
        return dict(mask_mod=causal, score_mod=mod), {}, L, H
    if name == "sigmoid":
        return dict(mask_mod=causal, normalizer="sigmoid"), dict(sigmoid_bias=-math.log(L)), L, H
    if name == "lowrank":
        u = (0.3 * torch.randn(1, H, L, 16, device=dev, dtype=dt, generator=g)).requires_grad_()
        w = (0.3 * torch.randn(1, H, L, 16, device=dev, dtype=dt, generator=g)).requires_grad_()
        return {}, dict(bias_factors=(u, w)), L, H
    raise KeyError(name)


def worker(args) -> None:
    import torch
    import triton

    import attndsl
    dev, dt, H, D = "cuda", torch.bfloat16, args.H, args.D
    rows = []
    for name in args.cases.split(","):
        try:
            ck, call, L, Hkv = build(name, args.L, H, D, dev, dt)
            mk = {k: ck[k] for k in ("mask_mod", "score_mod") if k in ck}
            q = torch.randn(1, H, L, D, device=dev, dtype=dt, requires_grad=True)
            k = torch.randn(1, Hkv, L, D, device=dev, dtype=dt, requires_grad=True)
            v = torch.randn(1, Hkv, L, D, device=dev, dtype=dt, requires_grad=True)
            do = torch.randn_like(q)
            attn = attndsl.compile(**ck)
            tables = None if "indices" in call else attn.build_block_tables(q, k, v)
            fn = lambda: attn(q, k, v, block_tables=tables, **call) if tables is not None else attn(q, k, v, **call)  # noqa: E731
            out = fn()
            # checked before timed: the first 1024 query rows of two heads against the float64
            # reference (query positions keep their values: rows 0..1023)
            m, hq = min(L, 1024), 2
            hk = max(1, hq * Hkv // H)
            qs, ks, vs = q[:, :hq, :m].float(), k[:, :hk].float(), v[:, :hk].float()
            ref_kw = dict(mk)
            if "normalizer" in ck:
                ref_kw.update(normalizer=ck["normalizer"], sigmoid_bias=call["sigmoid_bias"])
            if "bias_factors" in call:
                u, w = call["bias_factors"]
                ref_kw["bias_factors"] = (u[:, :hq, :m].float(), w[:, :hq].float())
            if "indices" in call:
                ref, _ = attndsl.reference.sparse_attention(qs, ks, vs, call["indices"][:, :, :m])
            else:
                ref, _ = attndsl.reference.attention(qs, ks, vs, **ref_kw)
            o = out[:, :hq, :m].double()
            err = float((o - ref).norm() / ref.norm())
            leaves = [t for t in (q, k, v) if t.requires_grad] + [
                t for t in list(call.get("bias_factors", ())) if t.requires_grad]
            f_ms = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")

            def fb():
                o = fn()
                torch.autograd.grad(o, leaves, do)
            fb_ms = triton.testing.do_bench(fb, warmup=50, rep=200, return_mode="median")
            rows.append(dict(case=name, L=L, fwd_ms=f_ms, fwdbwd_ms=fb_ms, err=err))
        except Exception as e:  # one failing case must not stop the others
            rows.append(dict(case=name, error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    print("ROWS " + json.dumps(rows), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_versions")
    p.add_argument("--a", required=True, help="checkout A (the baseline)")
    p.add_argument("--b", required=True, help="checkout B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--L", type=int, default=16384)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", default=None)
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip the untimed round that compiles both sides' kernels in parallel")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    caches = {x: tempfile.mkdtemp(prefix=f"ab-{x}-") for x in ("a", "b")}
    results = {"a": [], "b": []}

    def command(side):
        path = os.path.abspath(getattr(args, side))
        env = dict(os.environ, PYTHONPATH=path, ATTNDSL_CACHE_DIR=caches[side])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--a", args.a, "--b", args.b,
               "--L", str(args.L), "--H", str(args.H), "--D", str(args.D), "--cases", args.cases]
        return cmd, env, path

    if args.warmup:
        # compile both sides' kernels at once (Triton's disk cache keeps them); timings discarded
        procs = [subprocess.Popen(c, env=e, cwd=p, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for c, e, p in (command("a"), command("b"))]
        for pr in procs:
            pr.wait()
        print("warm-up done", flush=True)
    for r in range(args.rounds):
        for side in ("a", "b"):
            cmd, env, path = command(side)
            proc = subprocess.run(cmd, env=env, cwd=path, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS ")), None)
            if line is None:
                print(f"round {r} {side}: worker failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            results[side].append({row["case"]: row for row in json.loads(line[5:])})
            print(f"round {r} {side} done", flush=True)
    table = []
    for name in args.cases.split(","):
        row = dict(case=name)
        for side in ("a", "b"):
            runs = [res[name] for res in results[side] if name in res and "fwd_ms" in res[name]]
            errs = [res[name].get("error") for res in results[side] if name in res and "error" in res[name]]
            row[side] = dict(fwd_ms=statistics.median([x["fwd_ms"] for x in runs]) if runs else None,
                             fwdbwd_ms=statistics.median([x["fwdbwd_ms"] for x in runs]) if runs else None,
                             err=runs[0]["err"] if runs else None, error=errs[0] if errs else None)
        for ps in ("fwd_ms", "fwdbwd_ms"):
            a, b = row["a"][ps], row["b"][ps]
            row[f"{ps}_b_over_a"] = (b / a) if a and b else None
        table.append(row)
    print(f"{'case':16s} {'A fwd':>8s} {'B fwd':>8s} {'B/A':>6s} {'A f+b':>8s} {'B f+b':>8s} {'B/A':>6s}  err A / B")
    for row in table:
        a, b = row["a"], row["b"]

        def f(x):
            return f"{x:8.3f}" if x else "       -"

        def rr(x):
            return f"{x:6.3f}" if x else "     -"
        print(f"{row['case']:16s} {f(a['fwd_ms'])} {f(b['fwd_ms'])} {rr(row['fwd_ms_b_over_a'])} "
              f"{f(a['fwdbwd_ms'])} {f(b['fwdbwd_ms'])} {rr(row['fwdbwd_ms_b_over_a'])}  "
              f"{a['err'] if a['err'] is None else format(a['err'], '.1e')} / "
              f"{b['err'] if b['err'] is None else format(b['err'], '.1e')} {a['error'] or ''} {b['error'] or ''}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(args=vars(args), rows=table), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
