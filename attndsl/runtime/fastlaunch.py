"""Launching compiled kernels without Triton's per-call binding.

``kernel[grid](*args, **constexprs)`` binds every argument, specialises it, builds a cache key
string and looks the compiled kernel up: about 20 µs of host time per launch for our ~50
arguments, four launches per forward+backward. Here the first launch of each (kernel, constants,
device, argument specialisation) goes through Triton and keeps the compiled kernel it returns; the
next ones specialise the arguments with Triton's own function (so alignment and ``== 1`` /
``% 16`` integer specialisation key the same way) and call the compiled kernel directly.
Any Triton without these entry points, and AMD GPUs (whose backend specialises differently),
take the ordinary path.
"""
from __future__ import annotations

from itertools import repeat

import torch
import triton

try:
    from triton import knobs as _knobs
    from triton.backends.nvidia.compiler import CUDABackend as _Backend
    from triton.runtime.jit import native_specialize_impl as _specialize
except ImportError:  # another Triton layout: always the ordinary path
    _specialize = None


def _specialization(args) -> tuple:
    n = len(args)
    return tuple(map(_specialize, repeat(_Backend, n), args, repeat(False, n), repeat(True, n), repeat(True, n)))


class Launcher:
    """One JIT kernel's compiled variants, by constants, device and argument specialisation."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled: dict = {}
        names = list(getattr(kernel, "arg_names", ()))
        self.names = names
        self.enabled = (_specialize is not None and torch.version.hip is None and bool(names)
                        and not getattr(kernel, "pre_run_hooks", None))

    def __call__(self, grid: tuple, args: list, consts: dict, num_warps: int, num_stages: int) -> None:
        if not self.enabled:
            self.kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
            return
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        key = (device, num_warps, num_stages, _knobs.runtime.debug, tuple(consts.items()), _specialization(args))
        ck = self.compiled.get(key)
        if ck is None:
            ck = self.kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
            if hasattr(ck, "result"):
                ck = ck.result()
            tail = self.names[len(args):]
            if ck is None or set(tail) != set(consts):  # defaults we do not pass: keep Triton's path
                self.enabled = False
                return
            self.compiled[key] = (ck, tail)
            return
        ck, tail = ck
        bound = [*args, *(consts[n] for n in tail)]
        ck[(*grid, 1, 1)[:3]](*bound, stream=driver.get_current_stream(device))


def launcher(kernel) -> Launcher:
    """The launcher of a JIT kernel, kept on the kernel object (it lives and dies with its module)."""
    got = kernel.__dict__.get("_attndsl_launcher")
    if got is None:
        got = kernel._attndsl_launcher = Launcher(kernel)
    return got
