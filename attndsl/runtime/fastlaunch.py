"""Launching compiled kernels without Triton's per-call binding.

``kernel[grid](*args, **constexprs)`` binds every argument, specialises it, builds a cache key
string and looks the compiled kernel up: about 20 µs of host time per launch for our ~50
arguments, four launches per forward+backward. Here the first launch of each (kernel, constants,
device, argument specialisation) goes through Triton and keeps the compiled kernel it returns; the
next ones specialise the arguments with Triton's own function (so alignment and ``== 1`` /
``% 16`` integer specialisation key the same way) and call the compiled kernel directly.
Any Triton without these entry points, and AMD GPUs (whose backend specialises differently),
take the ordinary path.

``Launcher.prepared`` goes one step further for callers that know every launch-time decision of a
call is fixed (``Runner`` keys them by the call's shapes, strides, dtypes and alignments): a
``Direct`` launch hands the arguments to the compiled kernel's C launcher with the grid, trailing
constants and metadata bound once: no specialisation, no binding, about 10 µs of host time.
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


#: the current raw stream of a CUDA device (what Triton's driver calls on CUDA builds); None without CUDA
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


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

    def __call__(self, grid: tuple, args: list, consts: dict, num_warps: int, num_stages: int):
        """Launch; returns the compiled kernel and the names of its trailing constants (None on
        Triton's own path)."""
        if not self.enabled:
            self.kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
            return None
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        key = (device, num_warps, num_stages, _knobs.runtime.debug, tuple(consts.items()), _specialization(args))
        entry = self.compiled.get(key)
        if entry is None:
            ck = self.kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
            if hasattr(ck, "result"):
                ck = ck.result()
            tail = self.names[len(args):]
            if ck is None or set(tail) != set(consts):  # defaults we do not pass: keep Triton's path
                self.enabled = False
                return None
            self.compiled[key] = entry = (ck, tail)
            return entry
        ck, tail = entry
        bound = [*args, *(consts[n] for n in tail)]
        ck[(*grid, 1, 1)[:3]](*bound, stream=driver.get_current_stream(device))
        return entry

    def prepared(self, grid: tuple, args: list, consts: dict, num_warps: int, num_stages: int):
        """A launch of these arguments' kernel with everything but the arguments fixed: after one
        ordinary launch, a ``Direct`` one where Triton's internals allow it, else this launcher's.
        Valid for later argument lists whose non-tensor values, dtypes and alignments are the same."""
        entry = self(grid, args, consts, num_warps, num_stages)
        direct = Direct.make(entry, grid, consts) if entry is not None else None
        if direct is not None:
            return direct
        return lambda a: self(grid, a, consts, num_warps, num_stages)


#: Triton versions whose C launcher takes the argument order ``Direct`` passes (checked on the GPU
#: tests); others launch through ``Launcher``
DIRECT_TRITON = ("3.6.",)


def _hooked(hook) -> bool:
    """Is a launch hook set? (None, or a chain of hooks with nothing in it, is not.)"""
    return hook is not None and bool(getattr(hook, "calls", True))


class Direct:
    """One compiled kernel launched through its C launcher with grid, metadata and trailing
    constants bound: the arguments go straight to the launcher, which reads each tensor's address.
    Launch hooks (profilers) take the compiled kernel's own path, which calls them."""

    __slots__ = ("ck", "launch", "function", "meta", "coop", "pdl", "grid", "tail", "scratch", "scratch_device", "device",
                 "stream")

    @staticmethod
    def make(entry, grid: tuple, consts: dict) -> "Direct | None":
        if not triton.__version__.startswith(DIRECT_TRITON):
            return None
        ck, tail = entry
        run = ck.run
        needed = ("launch", "global_scratch_size", "profile_scratch_size", "launch_cooperative_grid", "launch_pdl",
                  "num_ctas")
        if not all(hasattr(run, n) for n in needed) or run.profile_scratch_size:
            return None
        d = Direct()
        d.ck, d.launch, d.function, d.meta = ck, run.launch, ck.function, ck.packed_metadata
        d.coop, d.pdl = run.launch_cooperative_grid, run.launch_pdl
        d.grid = (*grid, 1, 1)[:3]
        d.tail = tuple(consts[n] for n in tail)
        n = d.grid[0] * d.grid[1] * d.grid[2]
        # the device of the launch that made it (the runner's: launches run inside its scope); its
        # current stream is asked per launch, of that device (not first which device is current)
        driver = triton.runtime.driver.active
        d.device = driver.get_current_device()
        d.stream = _raw_stream or driver.get_current_stream
        # device-side tensor descriptors live in global scratch, one slice per program, allocated per
        # launch (no tensor is kept between launches: one made during a CUDA-graph warm-up would hold
        # memory of the graph's pool)
        d.scratch = n * run.num_ctas * run.global_scratch_size if run.global_scratch_size else 0
        d.scratch_device = torch.device("cuda", d.device) if d.scratch else None
        return d

    def __call__(self, args: list) -> None:
        stream = self.stream(self.device)
        rt = _knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
        # ``_hooked``, inline (every launch asks)
        if ((enter is not None and getattr(enter, "calls", True))
                or (leave is not None and getattr(leave, "calls", True))):
            self.ck[self.grid](*args, *self.tail, stream=stream)
            return
        scratch = torch.empty(self.scratch, dtype=torch.int8, device=self.scratch_device) if self.scratch else None
        self.launch(*self.grid, stream, self.function, self.coop, self.pdl, scratch, None, self.meta, None,
                    None, None, *args, *self.tail)


def launcher(kernel) -> Launcher:
    """The launcher of a JIT kernel, kept on the kernel object (it lives and dies with its module)."""
    got = kernel.__dict__.get("_attndsl_launcher")
    if got is None:
        got = kernel._attndsl_launcher = Launcher(kernel)
    return got


def run(kernel, grid: tuple, args: list, consts: dict, interpret: bool, num_warps: int = 4, num_stages: int = 3):
    """One launch of ``kernel`` (inside its launch scope, ``scope.launch_scope``), for the dense and
    gather runners alike: through the interpreter, or the compiled kernel its ``Launcher`` keeps
    (Triton's defaults: 4 warps, 3 stages)."""
    if interpret:
        kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
    else:
        launcher(kernel)(grid, args, consts, num_warps, num_stages)


def prepared(kernel, grid: tuple, args: list, consts: dict, interpret: bool, num_warps: int, num_stages: int):
    """Launch (``run``), and return the launch of later argument lists whose non-tensor values,
    dtypes and alignments are these (``Launcher.prepared``; the interpreter's ordinary launch)."""
    if interpret:
        run(kernel, grid, args, consts, True, num_warps, num_stages)
        return lambda a: kernel[grid](*a, **consts, num_warps=num_warps, num_stages=num_stages)
    return launcher(kernel).prepared(grid, args, consts, num_warps, num_stages)
