"""The Hopper (Gluon, warp-specialised) forward against our Triton forward, SDPA (cuDNN) and
FlexAttention, on an H100.

    python -m benchmarks.hopper [--quick] [--sweep] [--barriers [--causal]] [--backward] [--json PATH]

Cases: B=1, H=16, D=128, bf16, L in {4096, 16384} (``--quick``: 4096 only), dense and causal;
``--shape gpt2``: B=8, H=12, D=64, L=2048 (the forward, ``--sweep`` and ``--backward`` rows).
Per case, forward only: ``attndsl`` Hopper forward (``HopperForward.forward``), ``attndsl``
portable Triton forward (the runtime with the Hopper forward off), SDPA with the cuDNN backend
(and the FlashAttention backend as a second anchor), FlexAttention compiled (block mask built
once, outside the timing). Then forward+backward: the runtime with the Hopper forward on (Hopper
forward, portable backward) and off. Every timed call is first checked against SDPA (max relative
error under 2e-2). Timings: ``triton.testing.do_bench`` (median ms); TFLOP/s counts
4·B·H·Lq·Lkv·D for the forward (half that under a causal mask), 3.5× that for forward+backward
(the backward counted as 2.5 forwards).
``--sweep``: instead of the default rows, per case SDPA, our Triton forward and every configuration
of ``hopper.sweep_configs(D)`` (ping-pong on/off, pipelined/plain, 2 or 3 stages, key tiles of 64
or 128, where they fit in shared memory; compiled up front in parallel), then the winner (ms,
TFLOP/s, speed relative to cuDNN) and the winner with the other program order (heaviest query
tiles first or not). ``--sweep --quick``: L=4096 only.
``--barriers``: instead, the A/B of the main loop's CTA barriers (docs/hopper.md, "Barriers in the
main loop"): dense L=4096 and 16384 (``--quick``: 4096 only; ``--causal``: the causal mask too),
SDPA cuDNN, then ``config_for(D)`` as it is, with ``thread_arrive`` on, with ``thread_arrive`` and
ping-pong on, and with ``thread_arrive`` and ``unroll=2`` (all compiled up front), each with its
speed relative to cuDNN. First the new configurations run small forwards (rings that wrap, odd
and even tile counts) in a child process with a time limit (:func:`barrier_smoke`): a hang or a
wrong result leaves the reference configuration's rows only.
``--backward``: instead, the Hopper backward (``codegen/hopper_bwd.py``) on the same cases: the
backward alone (``torch.autograd.grad`` of one forward's output, delta included) and
forward+backward, for the runtime with the Hopper backward (atomic and deterministic dQ, after the
portable and after the Hopper forward), the portable backward, and SDPA (cuDNN, FlashAttention).
Every variant's gradients are first checked against SDPA's (max relative error under 2e-2).
Each case runs in its own try/except and prints its full traceback on failure; rows are written to
``$OUT/hopper.json`` (or ``--json``) after every case.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import traceback
from pathlib import Path

import torch

B, H, D = 1, 16, 128
#: ``--shape``: (B, H, D, lengths); the first length alone under ``--quick``
SHAPES = {"h16": (1, 16, 128, (4096, 16384)), "gpt2": (8, 12, 64, (2048,))}
DTYPE = torch.bfloat16
TOL = 2e-2


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) / max(float(b.float().abs().max()), 1e-6)


def tflops(L: int, is_causal: bool, ms: float, bwd: bool = False) -> float:
    flops = 4.0 * B * H * L * L * D * (0.5 if is_causal else 1.0) * (3.5 if bwd else 1.0)
    return flops / (ms * 1e-3) / 1e12


def bench(fn, quick: bool) -> float:
    import triton
    return float(triton.testing.do_bench(fn, warmup=25 if quick else 100, rep=100 if quick else 500,
                                         return_mode="median"))


def row(rows, out_path, **kw):
    rows.append(kw)
    ms = kw.get("ms")
    extra = f"  {kw['note']}" if kw.get("note") else ""
    print(f"{kw['case']:<18} {kw['impl']:<34} " + (f"{ms:8.3f} ms  {kw['tflops']:6.1f} TFLOP/s" if ms is not None
                                                    else "   failed") + extra, flush=True)
    if out_path is not None:
        out_path.write_text(json.dumps(rows, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="L=4096 only, shorter timing")
    ap.add_argument("--sweep", action="store_true", help="time the Hopper forward's tile configurations instead")
    ap.add_argument("--barriers", action="store_true",
                    help="A/B the main loop's barriers (thread_arrive) on dense attention against cuDNN instead")
    ap.add_argument("--causal", action="store_true", help="with --barriers: the causal mask too")
    ap.add_argument("--backward", action="store_true", help="time the Hopper backward instead of the forward")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="h16",
                    help="B, H, D and lengths of the forward's cases: h16 (B=1, H=16, D=128, L=4096/16384) or "
                         "gpt2 (B=8, H=12, D=64, L=2048: the model table's GPT-2 step); for the forward, "
                         "--sweep and --backward rows")
    ap.add_argument("--json", default=None, help="where to write the rows (default $OUT/hopper.json)")
    args = ap.parse_args(argv)
    global B, H, D
    B, H, D, args.lengths = SHAPES[args.shape]
    if not torch.cuda.is_available():
        print("benchmarks.hopper needs a CUDA device")
        return 1
    if args.backward:
        return backward_main(args)
    if args.barriers:
        return barriers_main(args)
    import attndsl
    from attndsl.runtime import hopper
    out_path = start(args, "hopper.json")
    rows: list = []
    # small Hopper forwards in a child process with a time limit: a hang or a wrong result skips
    # the Hopper rows instead of stalling the whole run
    smoke = hopper.smoke_test()
    hopper_ok = smoke is None
    if not hopper_ok:
        print(f"Hopper forward smoke test FAILED, its rows are skipped:\n{smoke}", flush=True)
    lengths = list(args.lengths[:1] if args.quick else args.lengths)
    for L in lengths:
        for is_causal in (False, True):
            case = f"{'causal' if is_causal else 'dense'} L={L}" + (f" {args.shape}" if args.shape != "h16" else "")
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=DTYPE) for _ in range(3))
            scale = 1.0 / math.sqrt(D)
            want = None
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel
                from torch.nn.functional import scaled_dot_product_attention as sdpa
                for name, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                                      ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
                    try:
                        with sdpa_kernel(backend):
                            got = sdpa(q, k, v, is_causal=is_causal, scale=scale)
                            want = got if want is None else want
                            ms = bench(lambda: sdpa(q, k, v, is_causal=is_causal, scale=scale), args.quick)
                        row(rows, out_path, case=case, impl=name, ms=ms, tflops=tflops(L, is_causal, ms))
                    except Exception:
                        traceback.print_exc()
                        row(rows, out_path, case=case, impl=name, ms=None, note="failed")
            except Exception:
                traceback.print_exc()
            try:
                comp = attndsl.compile(mask_mod=causal if is_causal else None)
                hf = hopper.HopperForward(comp.spec)
            except Exception:
                traceback.print_exc()
                continue

            def checked(name, fn, **extra):
                try:
                    got = fn()
                    got = got[0] if isinstance(got, tuple) else got
                    err = rel(got, want) if want is not None else float("nan")
                    if want is not None and not err <= TOL:
                        row(rows, out_path, case=case, impl=name, ms=None, note=f"WRONG: rel err {err:.3g} vs SDPA")
                        return
                    ms = bench(fn, args.quick)
                    row(rows, out_path, case=case, impl=name, ms=ms, tflops=tflops(L, is_causal, ms), err=err, **extra)
                except Exception:
                    traceback.print_exc()
                    row(rows, out_path, case=case, impl=name, ms=None, note="failed")

            # the Hopper forward itself (no runtime around it)
            if hopper_ok and not args.sweep:
                checked("attndsl Hopper fwd (Gluon)", lambda: hf.forward(q, k, v, scale))
                nopipe = hopper.HopperConfig(**{**vars(hopper.config_for(D)), "pipeline": False})
                checked("attndsl Hopper fwd, no pipelining", lambda: hf.forward(q, k, v, scale, nopipe))
            # our portable forward through the runtime
            hopper.enable(False)
            try:
                checked("attndsl Triton fwd", lambda: comp(q, k, v, scale=scale))
            finally:
                hopper.enable(None)
            if args.sweep:
                if hopper_ok:
                    sweep(hf, q, k, v, scale, case, rows, checked)
                del q, k, v
                torch.cuda.empty_cache()
                continue
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                flex = torch.compile(flex_attention, dynamic=False)
                bm = create_block_mask(causal, None, None, L, L, device="cuda") if is_causal else None
                checked("FlexAttention (compiled)", lambda: flex(q, k, v, block_mask=bm, scale=scale))
            except Exception:
                traceback.print_exc()
                row(rows, out_path, case=case, impl="FlexAttention (compiled)", ms=None, note="failed")
            # forward+backward: Hopper forward + portable backward, and all portable
            qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
            dout = torch.randn_like(q)

            def fwd_bwd():
                qg.grad = kg.grad = vg.grad = None
                o = comp(qg, kg, vg, scale=scale)
                o.backward(dout)
                return o

            for on, name in ((True, "attndsl fwd+bwd, Hopper fwd"), (False, "attndsl fwd+bwd, Triton fwd")):
                if on and not hopper_ok:
                    continue
                hopper.enable(on)
                try:
                    o = fwd_bwd()
                    err = rel(o, want) if want is not None else float("nan")
                    ms = bench(fwd_bwd, args.quick)
                    row(rows, out_path, case=case, impl=name, ms=ms, tflops=tflops(L, is_causal, ms, bwd=True), err=err)
                except Exception:
                    traceback.print_exc()
                    row(rows, out_path, case=case, impl=name, ms=None, note="failed")
                finally:
                    hopper.enable(None)
            del q, k, v, qg, kg, vg
            torch.cuda.empty_cache()
    return 0


def label(cfg) -> str:
    return f"  Hopper pp={int(cfg.pingpong)} pipe={int(cfg.pipeline)} s={cfg.stages} bn={cfg.block_n}"


def sweep(hf, q, k, v, scale, case, rows, checked) -> None:
    """``--sweep``'s rows of one case: every configuration of ``sweep_configs``, then the winner
    beside cuDNN, and the winner with the other program order."""
    from attndsl.runtime import hopper
    cfgs = hopper.sweep_configs(q.shape[-1])
    try:  # compile them all at once (threads); a failure here shows again at its launch
        hopper.compile_ahead([(hf, (q, k, v, scale, c), {}) for c in cfgs])
    except Exception:
        traceback.print_exc()
    start = len(rows)
    for cfg in cfgs:
        checked(label(cfg), lambda: hf.forward(q, k, v, scale, cfg), config=dataclasses.asdict(cfg),
                heavy_first=hf.heavy_first)
    timed = [r for r in rows[start:] if r.get("ms") is not None]
    if not timed:
        return
    best = min(timed, key=lambda r: r["ms"])
    cudnn = next((r["ms"] for r in rows if r["case"] == case and r["impl"] == "SDPA cuDNN" and r.get("ms")), None)
    vs = f", {cudnn / best['ms']:.3f}x cuDNN's speed" if cudnn else ""
    print(f"{case:<18} best: {best['impl'].strip()} {best['ms']:.3f} ms ({best['tflops']:.1f} TFLOP/s){vs}, "
          f"heavy_first={hf.heavy_first}", flush=True)
    cfg = hopper.HopperConfig(**best["config"])
    other = not hf.heavy_first
    checked(label(cfg) + f" heavy_first={int(other)}", lambda: hf.forward(q, k, v, scale, cfg, heavy_first=other),
            config=best["config"], heavy_first=other)


def barrier_configs(head_dim: int) -> list:
    """``--barriers``' Gluon configurations: ``config_for(head_dim)`` as it is (the reference), with
    ``thread_arrive`` on, with ``thread_arrive`` and ping-pong on, and with ``thread_arrive`` and
    ``unroll=2``."""
    from attndsl.runtime import hopper
    base = hopper.config_for(head_dim)
    return [base, dataclasses.replace(base, thread_arrive=True),
            dataclasses.replace(base, thread_arrive=True, pingpong=True),
            dataclasses.replace(base, thread_arrive=True, unroll=2)]


_BARRIER_SMOKE = r"""
import dataclasses, math, torch
import attndsl
from attndsl.runtime import hopper
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
runs = []
for mask in (None, causal):
    hf = hopper.HopperForward(attndsl.compile(mask_mod=mask).spec)
    # 1 to 9 key tiles (odd and even counts for unroll=2); from 4 on the ring of 3 wraps (every
    # buffer freed and refilled)
    for L in (100, 300, 1000, 1100):
        q, k, v = (torch.randn(1, 2, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for kw in (dict(pipeline=True), dict(pipeline=False), dict(pipeline=True, pingpong=True),
                   dict(pipeline=False, pingpong=True), dict(pipeline=True, unroll=2)):
            cfg = dataclasses.replace(hopper.config_for(128), thread_arrive=True, **kw)
            runs.append((hf, (q, k, v, 1 / math.sqrt(128), cfg), {}, mask is not None))
hopper.check_runs(runs)
"""


def barrier_smoke(timeout: float = 180) -> str | None:
    """Small forwards of every ``thread_arrive`` configuration (pipelined and plain, ping-pong on
    and off, ``unroll=2``; dense and causal, 1 to 9 key tiles) in a child process with a time
    limit, against SDPA (``hopper.smoke_test``'s child). None when they pass, else what went
    wrong (a hang kills the child)."""
    from attndsl.runtime import hopper
    return hopper.smoke_test(timeout, _BARRIER_SMOKE)


def start(args, name: str):
    """The rows' file (``--json``, else ``$OUT/name``, else None) after printing the device line."""
    from attndsl.runtime import hopper
    print(f"device: {torch.cuda.get_device_name()} (cc {torch.cuda.get_device_capability()}), "
          f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
          f"gluon ready: {hopper.gluon_available()}", flush=True)
    return Path(args.json) if args.json else (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else None)


def barriers_main(args) -> int:
    """The ``--barriers`` rows (see the module docstring)."""
    import attndsl
    from attndsl.runtime import hopper
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    out_path = start(args, "hopper_barriers.json")
    smoke = barrier_smoke()
    cfgs = barrier_configs(D)
    if smoke is not None:  # the reference configuration only
        print(f"thread_arrive smoke test FAILED, its rows are skipped:\n{smoke}", flush=True)
        cfgs = cfgs[:1]
    rows: list = []
    lengths = [4096] if args.quick else [4096, 16384]
    for L in lengths:
        for is_causal in ((False, True) if args.causal else (False,)):
            case = f"{'causal' if is_causal else 'dense'} L={L}"
            torch.manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=DTYPE) for _ in range(3))
            scale = 1.0 / math.sqrt(D)
            hf = hopper.HopperForward(attndsl.compile(mask_mod=causal if is_causal else None).spec)
            hopper.compile_ahead([(hf, (q, k, v, scale, c), {}) for c in cfgs])
            cudnn = None
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    want = sdpa(q, k, v, is_causal=is_causal, scale=scale)
                    cudnn = bench(lambda: sdpa(q, k, v, is_causal=is_causal, scale=scale), args.quick)
                row(rows, out_path, case=case, impl="SDPA cuDNN", ms=cudnn, tflops=tflops(L, is_causal, cudnn))
            except Exception:
                traceback.print_exc()
                want = sdpa(q, k, v, is_causal=is_causal, scale=scale)
            for cfg in cfgs:
                name = (f"Gluon ta={int(cfg.thread_arrive)} pp={int(cfg.pingpong)} unroll={cfg.unroll} s={cfg.stages} "
                        f"bn={cfg.block_n}")
                try:
                    got, _ = hf.forward(q, k, v, scale, cfg)
                    err = rel(got, want)
                    if not err <= TOL:
                        row(rows, out_path, case=case, impl=name, ms=None, note=f"WRONG: rel err {err:.3g} vs SDPA")
                        continue
                    ms = bench(lambda: hf.forward(q, k, v, scale, cfg), args.quick)
                    note = f"{cudnn / ms:.3f}x cuDNN" if cudnn else ""
                    row(rows, out_path, case=case, impl=name, ms=ms, tflops=tflops(L, is_causal, ms), err=err,
                        config=dataclasses.asdict(cfg), note=note)
                except Exception:
                    traceback.print_exc()
                    row(rows, out_path, case=case, impl=name, ms=None, note="failed")
            del q, k, v
            torch.cuda.empty_cache()
    return 0


def backward_main(args) -> int:
    """The ``--backward`` rows (see the module docstring)."""
    import attndsl
    from attndsl.runtime import hopper, hopper_bwd
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa
    out_path = start(args, "hopper_bwd.json")
    rows: list = []
    smoke = hopper_bwd.smoke_test()
    bwd_ok = smoke is None
    if not bwd_ok:
        print(f"Hopper backward smoke test FAILED, its rows are skipped:\n{smoke}", flush=True)
    fwd_ok = hopper.smoke_test() is None if bwd_ok else False
    lengths = list(args.lengths[:1] if args.quick else args.lengths)
    for L in lengths:
        for is_causal in (False, True):
            case = f"{'causal' if is_causal else 'dense'} L={L}" + (f" {args.shape}" if args.shape != "h16" else "")
            torch.manual_seed(0)
            q, k, v, dout = (torch.randn(B, H, L, D, device="cuda", dtype=DTYPE) for _ in range(4))
            scale = 1.0 / math.sqrt(D)
            leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            want = None

            def timed(name, forward, bwd_only_too=True):
                """Check ``forward``'s gradients against SDPA's, then time forward+backward and
                (``bwd_only_too``) the backward alone."""
                try:
                    o = forward()
                    # keep the graph: the backward-only timing below replays it
                    got = torch.autograd.grad(o, leaves, dout, retain_graph=bwd_only_too)
                    err = max(rel(g, w) for g, w in zip(got, want)) if want is not None else float("nan")
                    if want is not None and not err <= TOL:
                        row(rows, out_path, case=case, impl=name, ms=None,
                            note=f"WRONG: grad rel err {err:.3g} vs SDPA")
                        return
                    if bwd_only_too:
                        ms = bench(lambda: torch.autograd.grad(o, leaves, dout, retain_graph=True), args.quick)
                        row(rows, out_path, case=case, impl=name + ", bwd only", ms=ms,
                            tflops=tflops(L, is_causal, ms) * 2.5, err=err)
                    ms = bench(lambda: torch.autograd.grad(forward(), leaves, dout), args.quick)
                    row(rows, out_path, case=case, impl=name + ", fwd+bwd", ms=ms,
                        tflops=tflops(L, is_causal, ms, bwd=True), err=err)
                except Exception:
                    traceback.print_exc()
                    row(rows, out_path, case=case, impl=name, ms=None, note="failed")

            for name, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION),
                                  ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        o = sdpa(*leaves, is_causal=is_causal, scale=scale)
                        got = torch.autograd.grad(o, leaves, dout)
                        want = got if want is None else want
                        timed(name, lambda: sdpa(*leaves, is_causal=is_causal, scale=scale))
                except Exception:
                    traceback.print_exc()
                    row(rows, out_path, case=case, impl=name, ms=None, note="failed")
            mask = causal if is_causal else None
            variants = [("attndsl Triton fwd + Triton bwd", False, "0", False)]
            if bwd_ok:
                variants += [("attndsl Triton fwd + Hopper bwd", False, "1", False),
                             ("attndsl Triton fwd + Hopper bwd (det.)", False, "1", True)]
                if fwd_ok:
                    variants += [("attndsl Hopper fwd + Hopper bwd", True, "1", False)]
            for name, fwd_on, bwd_env, det in variants:
                comp = attndsl.compile(mask_mod=mask, deterministic=det)
                hopper_bwd.enable_backward(bwd_env == "1")  # (the environment is read once, not per call)
                hopper.enable(fwd_on)
                try:
                    timed(name, lambda: comp(*leaves, scale=scale))
                finally:
                    hopper.enable(None)
                    hopper_bwd.enable_backward(None)
            del q, k, v, dout, leaves, want
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
