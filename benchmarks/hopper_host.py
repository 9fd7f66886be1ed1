"""Host time per call of the Hopper (Gluon) forward: its ordinary launch (Gluon's ``kernel.run``)
against its prepared launch (``attndsl/runtime/gluonlaunch.py``), next to the portable forward
and SDPA.

    python benchmarks/hopper_host.py --gpu                                   # H100, B=1 H=4 L=256 D=128 bf16, causal
    python benchmarks/hopper_host.py --gpu --B 1 --H 32 --Hkv 8 --L 8192 --calls 5   # the Llama-3-8B row
    PYTHONPATH=. /work/gvenv/bin/python benchmarks/hopper_host.py            # CPU, Triton 3.6, launcher faked

Rows: ``HopperForward.forward`` alone, ordinary and prepared; ``attndsl.attention`` (one-shot,
causal) with the Hopper forward, ordinary and prepared; the same with the portable forward
(``hopper.enable(False)``); SDPA. Each row is timed as ``--rounds`` loops of ``--calls`` calls
without a sync (the sync after a loop is outside its timing), the rows interleaved in a fresh
random order per round; reported: the median µs per call over rounds and the 10th-90th percentile.
Keep the shape small for host time (the kernel must be shorter than the host work, or the loop
waits on the launch queue: the Llama row's kernels are ~1 ms, so few calls per loop).

CPU mode (Triton 3.6's Gluon installed, no GPU): the Gluon JIT, binder, cache lookup, launch
metadata and Triton's descriptor wrapper run for real; the driver (device, stream, target), the
compile (a prepared stand-in of the compiled kernel is cached) and the C side (``fill_tma_descriptor``
and the C launcher) are stand-ins, so the figures count the Python work only; the tensors are
CPU tensors. SDPA and the one-shot call are left out there (no launch to fake).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's attndsl


def fake_gpu(setattr=setattr, launched: list | None = None):
    """Triton 3.6's driver (device, stream, target, ``fill_tma_descriptor``), compile and C launcher
    replaced by stand-ins (CPU mode; ``tests/test_hopper_launch.py`` passes ``monkeypatch.setattr``).
    The compiled kernel's launcher is Triton's own class with Triton's descriptor wrapper around a
    C launcher that appends its arguments to ``launched`` (when given)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaLauncher, wrap_handle_tensordesc
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction

    class Utils:
        @staticmethod
        def fill_tma_descriptor(ptr, swizzle, elem_size, elem_type, block, shape, strides, padding):
            return ("tensor map", ptr, swizzle, elem_size, elem_type, tuple(block), tuple(shape), tuple(strides),
                    padding)

    class Driver:
        utils = Utils()

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    def compiled(signature):
        ck = object.__new__(CompiledKernel)
        ck.name, ck.function, ck.packed_metadata, ck.src, ck.module = "fwd", 1, (4, 1, 0), None, 1
        ck._init_handles = lambda: None
        run = object.__new__(CudaLauncher)
        metas = [dict(swizzle=128, elem_size=2, elem_type=10, block_size=[1, 1, 64, 128], fp4_padded=False)
                 for s in signature.values() if str(s).startswith("tensordesc")]
        run.launch = wrap_handle_tensordesc(lambda *a: None if launched is None else launched.append(a), signature,
                                            metas)
        run.num_ctas, run.global_scratch_size, run.global_scratch_align = 1, 0, 1
        run.profile_scratch_size, run.profile_scratch_align = 0, 1
        run.launch_cooperative_grid = run.launch_pdl = False
        ck._run = run
        return ck

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        ck = compiled(signature)
        self.device_caches[device][0][key] = ck
        return ck

    setattr(triton.runtime.driver, "_active", Driver())
    setattr(JITFunction, "_do_compile", do_compile)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--Hkv", type=int, default=None)
    ap.add_argument("--L", type=int, default=256)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--calls", type=int, default=50)
    a = ap.parse_args(argv)
    import attndsl
    from attndsl.runtime import gluonlaunch, hopper
    from attndsl.patterns import causal
    if a.gpu:
        dev = "cuda"
        if torch.cuda.get_device_capability() != (9, 0) or not hopper.gluon_available():
            print("needs an sm_90 GPU and Triton 3.6's Gluon")
            return 1
        sync = torch.cuda.synchronize
    else:
        fake_gpu()
        dev, sync = "cpu", (lambda: None)
    Hkv = a.Hkv or a.H
    q = torch.randn(a.B, a.H, a.L, a.D, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(a.B, Hkv, a.L, a.D, device=dev, dtype=torch.bfloat16) for _ in range(2))
    scale = 1 / math.sqrt(a.D)
    comp = attndsl.compile(mask_mod=causal)
    hf = hopper.HopperForward(comp.spec)

    def switched(prepared: bool, fn):
        def call():
            gluonlaunch.PREPARED = prepared
            fn()
        return call

    rows = {"HopperForward.forward, ordinary": switched(False, lambda: hf.forward(q, k, v, scale)),
            "HopperForward.forward, prepared": switched(True, lambda: hf.forward(q, k, v, scale))}
    if a.gpu:
        def one_shot(on: bool, prepared: bool):
            def call():
                hopper.enable(on)
                gluonlaunch.PREPARED = prepared
                attndsl.attention(q, k, v, mask_mod=causal, scale=scale)
            return call
        rows.update({"attndsl.attention, Hopper ordinary": one_shot(True, False),
                     "attndsl.attention, Hopper prepared": one_shot(True, True),
                     "attndsl.attention, portable": one_shot(False, True),
                     "SDPA": lambda: torch.nn.functional.scaled_dot_product_attention(
                         q, k, v, is_causal=True, scale=scale, enable_gqa=Hkv != a.H)})
    # warm up every row (compiles; the prepared launches are made on their first call)
    for fn in rows.values():
        for _ in range(3):
            fn()
    sync()
    # the switch is set once per loop (by its first call): time loops of calls of one row
    times: dict = {n: [] for n in rows}
    for _ in range(a.rounds):
        order = list(rows)
        random.shuffle(order)
        for name in order:
            fn = rows[name]
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            t1 = time.perf_counter()
            sync()
            times[name].append((t1 - t0) / a.calls * 1e6)
    hopper.enable(None)
    gluonlaunch.PREPARED = True
    print(f"{'gpu' if a.gpu else 'cpu (launcher faked)'}: B={a.B} Hq={a.H} Hkv={Hkv} L={a.L} D={a.D} bf16 causal, "
          f"{a.rounds} rounds x {a.calls} calls")
    for name, ts in times.items():
        ts = sorted(ts)
        p10, p90 = ts[len(ts) // 10], ts[min(len(ts) - 1, len(ts) * 9 // 10)]
        print(f"  {name:40s} {statistics.median(ts):8.1f} us/call  (p10 {p10:.1f}, p90 {p90:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
