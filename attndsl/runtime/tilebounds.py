"""Building one block table: from per-tile bounds (O(L + tiles²)) where the mask allows, else densely.

``passes/tile_intervals.py`` decides once per mask whether its tables can be classified from
per-tile bounds; ``codegen/tilebounds.py`` emits the two kernels that do it (``<name>_tbounds``:
per column tile, the minimum and maximum of each column-axis value such as ``doc_ids[kv_idx]``;
``<name>_tclass``: per row tile, interval classification of the column tiles, the mask evaluated
only on tiles the bounds leave undecided). A build is those two launches (one when no value varies
along the columns, both memoised per call shape) and four allocations, with no host sync; its table
equals the dense table kernel's (``codegen/table.py``, O(L²)), which builds the tables of every
other mask.
"""
from __future__ import annotations

import weakref

import torch

from ..passes.tile_intervals import axes, bounds_signature, class_signature, tile_plan
from .launch import Table, buffer_args, cdiv, check_arguments, tensor_key

#: column tiles per chunk of the classifier (one vector of interval tests, one prefix sum)
BLOCK_T = 128
#: positions per program of the bounds kernel
BOUNDS_POSITIONS = 4096


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _layout(runner, shape, transposed: bool, br: int, bc: int):
    B, Hq, Lq, Lkv = shape
    spec = runner.spec
    TB = B if spec.mask_uses_b else 1
    TH = Hq if spec.mask_uses_h else 1
    rows, cols = (Lkv, Lq) if transposed else (Lq, Lkv)
    return TB, TH, cdiv(rows, br), cdiv(cols, bc)


def _outputs(TB: int, TH: int, R: int, C: int, dev):
    full = torch.empty((TB, TH, R, C), dtype=torch.int32, device=dev)
    part = torch.empty((TB, TH, R, C), dtype=torch.int32, device=dev)
    count = torch.empty((TB, TH, R, 2), dtype=torch.int32, device=dev)
    return full, part, count


def dense_table(runner, shape, buffers, transposed: bool, br: int, bc: int, dev) -> Table:
    """The table evaluated on every (row, column) pair by the table kernel (``codegen/table.py``)."""
    spec = runner.spec
    TB, TH, R, C = _layout(runner, shape, transposed, br, bc)
    full, part, count = _outputs(TB, TH, R, C, dev)
    kname = "table_t" if transposed else "table"
    args = [full, part, count, TH * R * C, R * C, C, TH, shape[2], shape[3], *buffer_args(buffers)]
    consts = dict(BLOCK_R=br, BLOCK_C=bc)
    check_arguments(kname, spec.lowering.signature(kname), args, consts)
    with runner.mode(full):
        runner._run(_kernel(runner, kname), (R, TB * TH), args, consts)
    return Table(full, part, count, spec.mask_uses_b, spec.mask_uses_h)


class _Build:
    """What one bounded build's key fixes (call shape, tiles, captured tensors' layout): the
    table's layout and the memoised launches of its kernels (``Runner._prepared``)."""

    __slots__ = ("TB", "TH", "R", "C", "n_col", "ints", "bounds", "classify")


#: per runner: (transposed, br, bc, call shape, device, captured tensors' keys) -> _Build
_BUILDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: builds memoised per runner before its memo starts over
MAX_BUILDS = 64


def bounded_table(runner, shape, buffers, transposed: bool, br: int, bc: int, dev) -> Table | None:
    """The same table from per-tile bounds, or None when ``tile_plan`` has no plan for the mask.
    Host work of a build after the first of its key: three or four allocations and one or two
    memoised launches, no sync."""
    memo = _BUILDS.get(runner)
    if memo is None:
        memo = _BUILDS[runner] = {}
    key = (transposed, br, bc, shape, dev, *map(tensor_key, buffers))
    m = memo.get(key)
    if m is None:
        plan = tile_plan(runner.spec)
        if plan is None:
            return None
        m = _Build()
        m.TB, m.TH, m.R, m.C = _layout(runner, shape, transposed, br, bc)
        m.n_col = len(plan.along(axes(transposed)[1]))
        m.ints, m.bounds, m.classify = [m.TH, shape[2], shape[3], m.C], None, None
    TB, TH, R, C = m.TB, m.TH, m.R, m.C
    full, part, count = _outputs(TB, TH, R, C, dev)
    bufs = buffer_args(buffers)
    # the scratch is not read when no value varies along the columns
    scratch = torch.empty(TB * TH * 3 * m.n_col * C, dtype=torch.int64, device=dev) if m.n_col else full
    bounds_args = [scratch, *m.ints, *bufs]
    class_args = [full, part, count, TH * R * C, R * C, C, scratch, *m.ints, *bufs]
    with runner.mode(full):
        if m.classify is not None:
            if m.n_col:
                m.bounds(bounds_args)
            m.classify(class_args)
        else:  # the first build of this key: through Triton, arguments checked, launches kept
            sfx = "_t" if transposed else ""
            spec = runner.spec
            if m.n_col:
                bt = min(_pow2(C), max(1, BOUNDS_POSITIONS // bc))
                consts = dict(BLOCK_C=bc, BLOCK_T=bt)
                check_arguments("tbounds" + sfx, bounds_signature(spec), bounds_args, consts)
                m.bounds = runner._prepared(_kernel(runner, "tbounds" + sfx), (cdiv(C, bt), TB * TH), bounds_args,
                                            consts, 4, 3)
            consts = dict(BLOCK_R=br, BLOCK_C=bc, BLOCK_T=min(BLOCK_T, max(16, _pow2(C))))
            check_arguments("tclass" + sfx, class_signature(spec), class_args, consts)
            m.classify = runner._prepared(_kernel(runner, "tclass" + sfx), (R, TB * TH), class_args, consts, 4, 3)
            if len(memo) >= MAX_BUILDS:
                memo.clear()
            memo[key] = m
    return Table(full, part, count, runner.spec.mask_uses_b, runner.spec.mask_uses_h)


def _kernel(runner, suffix: str):
    return getattr(runner.mod, f"{runner.spec.name}_{suffix}")
