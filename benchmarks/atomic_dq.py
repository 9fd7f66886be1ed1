"""The portable backward's dQ modes on a GPU: the dQ kernel (two kernels, seven matrix products per
tile pair) against dQ added by the dK/dV kernel into float32 (five; ``Configs.dq_mode``,
``ATTNDSL_ATOMIC_DQ``), each tile by one TMA reduce-add (``atomic``, ``config.dq_tma``) or one atomic
add per element (``atomic-elements``, ``ATTNDSL_DQ_TMA=0``), with SDPA in the same run.

    python -m benchmarks.atomic_dq [--sweep] [--json PATH]

Cases (bf16, causal): GPT-2 (B=8, H=12, L=2048, D=64) and Llama-3-8B attention (B=1, Hq=32, Hkv=8,
L=8192, D=128). Per case, forward+backward milliseconds (``triton.testing.do_bench``, median; one
``torch.autograd.grad`` of q, k, v per step) of SDPA (cuDNN/FlashAttention underneath) and of a
compiled ``attndsl`` pattern in each mode (the Hopper backward off: ``ATTNDSL_HOPPER_BWD=0``), after
checking the atomic mode's gradients against the dQ kernel's and float32 SDPA's (max error relative
to the largest gradient, under 2e-2). ``--sweep``: also each mode with every dK/dV tile of
``SWEEP`` (the atomic dK/dV kernel may want other tiles than the default, tuned for the two-kernel
mode). Rows go to ``$OUT/atomic_dq.json`` (or ``--json``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

import torch

os.environ.setdefault("ATTNDSL_HOPPER_BWD", "0")  # the portable backward: the one with the two modes

CASES = {"gpt2": (8, 12, 12, 2048, 64), "llama3_8b": (1, 32, 8, 8192, 128)}
DTYPE = torch.bfloat16
DEVICE = "cuda"
TOL = 2e-2
#: dK/dV tiles tried with --sweep: (key rows, query columns, warps, stages)
SWEEP = [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 128, 8, 2)]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def rel(got, want) -> float:
    return float((got.float() - want.float()).abs().max()) / max(float(want.float().abs().max()), 1e-6)


def run_case(name: str, sweep: bool) -> list:
    import triton.testing

    import attndsl
    from attndsl.runtime import config
    B, Hq, Hkv, L, D = CASES[name]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, h, L, D, device=DEVICE, dtype=DTYPE, generator=gen).requires_grad_()
               for h in (Hq, Hkv, Hkv))
    do = torch.randn(B, Hq, L, D, device=DEVICE, dtype=DTYPE, generator=gen)
    attn = attndsl.compile(mask_mod=causal)
    rows = []

    def ours(a=attn):
        return torch.autograd.grad(a(q, k, v), (q, k, v), do)

    def sdpa():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=Hq != Hkv)
        return torch.autograd.grad(o, (q, k, v), do)

    ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
    o32 = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True, enable_gqa=Hq != Hkv)
    want = torch.autograd.grad(o32, ref, do.float())
    grads = {}
    for mode in MODES:
        _set_mode(config, mode)
        grads[mode] = ours()
    _set_mode(config, None)
    for mode in MODES[1:]:
        errs = {n: max(rel(a, b) for a, b in zip(grads[mode], ref_)) for n, ref_ in
                (("vs_kernel_mode", grads["kernel"]), ("vs_sdpa_fp32", want))}
        print(f"{name}: dq={mode} gradients, max relative error {errs}", flush=True)
        if max(errs.values()) > TOL:
            raise AssertionError(f"{name}: the dq={mode} gradients differ: {errs}")

    def row(variant, ms, tiles=None):
        r = {"case": name, "B": B, "Hq": Hq, "Hkv": Hkv, "Lq": L, "Lkv": L, "D": D,
             "dtype": str(DTYPE).replace("torch.", ""), "pass": "fwd+bwd", "variant": variant, "ms": ms, "dkdv_tiles": tiles,
             "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        rows.append(r)
        print(f"  {variant:<28} {ms:8.3f} ms" + (f"  dK/dV tiles {tiles}" if tiles else ""), flush=True)

    sdpa_ms = float(triton.testing.do_bench(sdpa, warmup=50, rep=300))
    row("sdpa", sdpa_ms)
    default = attn.runner(q, D, k).cfg  # the call's tiles (a shipped or tuned entry's where there is one)
    tiles = [None] + ([dataclasses.replace(default.dkdv, block_n=n, block_m=m, num_warps=w, num_stages=s)
                       for n, m, w, s in SWEEP] if sweep else [])
    for mode in MODES:
        _set_mode(config, mode)
        for t in tiles:
            a = attn
            if t is not None:  # a fresh pattern object: its runner has no launches memoised with other tiles
                a = attndsl.compile(mask_mod=causal)
                a.runner(q, D, k).cfg = dataclasses.replace(default, dkdv=t)
            try:
                ms = float(triton.testing.do_bench(lambda: ours(a), warmup=50, rep=300))
            except Exception as e:  # noqa: BLE001 - a tile that does not fit is reported, not fatal
                print(f"  {mode} {t}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            ran = a.runner(q, D, k).cfg.dkdv  # a launch that overflowed shared memory retried with smaller tiles
            row(f"attndsl dq={mode}", ms, f"{ran.block_n}x{ran.block_m} w{ran.num_warps} s{ran.num_stages}")
            rows[-1]["vs_sdpa"] = sdpa_ms / ms
    _set_mode(config, None)
    return rows


#: the dQ modes timed: the dQ kernel, the dK/dV kernel's atomic adds of dQ tiles by TMA reduce-adds
#: (``config.dq_tma``), and by one atomic add per element
MODES = ("kernel", "atomic", "atomic-elements")


def _set_mode(config, mode: str | None) -> None:
    """Force one of ``MODES`` (None: back to the defaults)."""
    config.enable_atomic_dq(None if mode is None else mode != "kernel")
    config.enable_dq_tma(None if mode is None else mode != "atomic-elements")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="also try the dK/dV tiles of SWEEP in each mode")
    ap.add_argument("--json", default=None, help="where to write the rows (default $OUT/atomic_dq.json)")
    ap.add_argument("--case", choices=sorted(CASES), action="append", help="only these cases")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(args.json or Path(os.environ.get("OUT", ".")) / "atomic_dq.json")
    rows, failed = [], False
    for name in args.case or CASES:
        try:
            rows += run_case(name, args.sweep)
        except Exception:  # noqa: BLE001 - report and go on with the next case
            traceback.print_exc()
            failed = True
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
    print(f"rows written to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
