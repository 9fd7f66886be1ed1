"""Prepared launches of Gluon kernels that read host-built TMA tensor descriptors (the Hopper forward).

An ordinary launch, ``kernel.run(*descriptors, *args, grid=..., **constexprs)``, binds and
specialises every argument (a descriptor's type is the text of its block shape and shared-memory
layout), builds the cache key and looks the compiled kernel up, checks the globals it read, asks
for launch metadata, and then Triton 3.6's launcher wrapper (``wrap_handle_tensordesc``) turns
each descriptor into a ``CUtensorMap`` (``cuTensorMapEncodeTiled``) and its shape and strides.
Here, the first launch of a key (the caller's: shapes, strides, dtypes, alignments, tiles,
device) goes that way and keeps the compiled kernel it returns; later launches of the key hand
the arguments to the kernel's C launcher directly (``fastlaunch.Direct``, with the launcher under
Triton's descriptor wrapper), each descriptor expanded from the tensor's address. Everything in
a descriptor but the address is fixed by the key, and a tensor map is a pure function of its
inputs, so the expansion is kept per address: a model whose allocator hands the same blocks back
step after step builds no tensor map at all.

Triton versions other than ``fastlaunch.DIRECT_TRITON``, launchers not shaped like 3.6's, kernels
with pre-run hooks and launches under a launch hook (profilers) take the ordinary path.
On by default: its GPU tests (``tests/test_gpu_hopper.py -k prepared``: fresh inputs per call against
the float64 oracle, a re-keyed layout, sinks and a captured tensor) passed on an H200 (2026-12-06).
``ATTNDSL_GLUON_PREPARED=0`` (read at import) or ``PREPARED = False`` turns prepared launches off.
"""
from __future__ import annotations

import os

import torch

from . import fastlaunch
from .fastlaunch import Direct, _hooked
from .memo import MEMO_SIZE
from .scope import NO_CONTEXT, launch_scope

#: prepared launches on (``ATTNDSL_GLUON_PREPARED=0`` at import turns them off; assign to change)
PREPARED = os.environ.get("ATTNDSL_GLUON_PREPARED", "1") != "0"

#: expanded descriptors kept per prepared launch and descriptor, by address, before starting over
MAPS_KEPT = 64


def _expand(desc, meta) -> list:
    """The launcher's arguments of one descriptor (Triton 3.6's ``make_tensordesc_arg``: a tensor
    map, shape and strides where the kernel reads it through TMA, ``meta`` its metadata)."""
    from triton.backends.nvidia.driver import make_tensordesc_arg
    return make_tensordesc_arg(desc, meta)


def _unwrap(launch):
    """``(launcher, descriptor positions, their metadata)`` under Triton 3.6's descriptor wrapper
    ``launch`` (``wrap_handle_tensordesc``'s ``inner``), or None when ``launch`` is not one."""
    code = getattr(launch, "__code__", None)
    names = ("launcher", "tensordesc_indices", "tensordesc_meta")
    if code is None or code.co_name != "inner" or not set(names) <= set(code.co_freevars):
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__)))
    return tuple(cells[n] for n in names)


class _Slot:
    """One descriptor parameter: the descriptor's fields but its base, and the expansions made so far."""

    __slots__ = ("make", "meta", "maps")

    def __init__(self, desc, meta):
        kind, shape, strides, block, layout, pad = type(desc), desc.shape, desc.strides, desc.block_shape, \
            desc.layout, desc.padding
        # a new address builds (and so validates: 16-byte base) the descriptor the ordinary path would
        self.make = lambda t: kind(t, shape, strides, block, layout, pad)
        self.meta = meta
        self.maps: dict = {}

    def expand(self, t) -> list:
        if self.meta is None:  # no TMA: the expansion holds the tensor itself, nothing to keep
            return _expand(self.make(t), None)
        ptr = t.data_ptr()
        got = self.maps.get(ptr)
        if got is None:
            if len(self.maps) >= MAPS_KEPT:
                self.maps.clear()
            got = self.maps[ptr] = _expand(self.make(t), self.meta)
        return got


class Prepared:
    """The launch of one compiled Gluon kernel for one key: ``prepared(tensors, rest)`` launches it
    with ``tensors`` (one per descriptor parameter, which lead the signature) read through the
    first launch's descriptors, and ``rest`` the remaining runtime arguments. Returns False, having
    launched nothing, while a launch hook is set (the caller launches the ordinary way)."""

    __slots__ = ("direct", "slots")

    @staticmethod
    def make(kernel, ck, grid: tuple, args: list, consts: dict) -> "Prepared | None":
        """After ``ck = kernel.run(*args, grid=grid, **consts, ...)`` launched (inside the launch's
        device scope): its prepared launch, or None where this Triton's internals do not allow one."""
        if ck is None or getattr(kernel, "pre_run_hooks", None) or torch.version.hip is not None:
            return None
        names = list(getattr(kernel, "arg_names", ()))
        tail = names[len(args):]
        if not names or set(tail) != set(consts):
            return None
        direct = Direct.make((ck, tail), grid, consts)
        got = _unwrap(getattr(ck.run, "launch", None)) if direct is not None else None
        if got is None:
            return None
        raw, indices, metas = got
        n = len(indices)
        if sorted(indices) != list(range(n)) or len(metas) != n or any(
                type(a).__name__ != "TensorDescriptor" for a in args[:n]):
            return None  # descriptors must lead the signature
        p = Prepared()
        direct.launch = raw  # this launch expands the descriptors itself
        p.direct, p.slots = direct, tuple(_Slot(d, m) for d, m in zip(args[:n], metas))
        return p

    def __call__(self, tensors, rest) -> bool:
        rt = fastlaunch._knobs.runtime
        # asked here, before ``Direct``, whose own hooked path would hand Triton expanded descriptors
        if _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
            return False
        args = []
        for slot, t in zip(self.slots, tensors):
            args += slot.expand(t)
        args += rest
        self.direct(args)
        return True


def launch_kept(prepared: dict, key, q: torch.Tensor, tensors, rest) -> bool:
    """Launch the prepared launch ``prepared`` keeps for ``key`` (in ``q``'s launch scope) with the
    call's ``tensors`` (one per descriptor) and other runtime arguments ``rest``. False, having
    launched nothing, where there is none (a first call, a Triton that allows none) or it declines
    (a launch hook is set): the caller launches the ordinary way (:func:`run_and_keep`)."""
    prep = prepared.get(key) if key is not None else None
    if prep is None:
        return False
    scope = launch_scope(q, False)
    if scope is NO_CONTEXT:
        return prep(tensors, rest)
    with scope:
        return prep(tensors, rest)


def run_and_keep(prepared: dict, key, kernel, q: torch.Tensor, descs: list, rest: list, consts: dict, grid: tuple,
                 warmup: bool = False) -> None:
    """The ordinary launch, ``kernel.run`` (in ``q``'s launch scope, four warps), and for a ``key``
    not met before its prepared launch kept in ``prepared`` (None where this Triton allows none:
    not asked again; at most ``MEMO_SIZE`` keys, then started over). ``key`` None: none kept."""
    with launch_scope(q, False):
        ck = kernel.run(*descs, *rest, **consts, num_warps=4, grid=grid, warmup=warmup)
        if key is not None and key not in prepared:
            if len(prepared) >= MEMO_SIZE:
                prepared.clear()
            prepared[key] = Prepared.make(kernel, ck, grid, [*descs, *rest], consts)
