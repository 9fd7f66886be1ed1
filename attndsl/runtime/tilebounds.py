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

from ..passes.tile_intervals import axes, tile_plan
from .blocktables import Table
from .marshal import buffer_layout, buffer_tensors, fill
from .memo import VERIFY_MEMO, Memo, arg_classes, cdiv, own_slots, tensor_key

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


def _table_outputs(full, part, count) -> dict:
    """The table outputs' pointer parameters by name."""
    return {"TBL_FULL": full, "TBL_PART": part, "TBL_CNT": count}


def _table_strides(TH: int, R: int, C: int) -> dict:
    """The table outputs' strides: a kernel writes the whole ``[TB, TH, R, C]`` table, so its batch
    and head strides are never 0 here (``Table.args`` makes them 0 where the mask ignores b or h)."""
    return {"tbl_stride_b": TH * R * C, "tbl_stride_h": R * C, "tbl_stride_r": C}


def _fixed(shape, TH: int, bufs: dict) -> dict:
    """The table kernels' parameters the call shape and the captured tensors' layout fix."""
    return {"TH": TH, "LQ": shape[2], "LKV": shape[3], **buffer_layout(bufs)}


def dense_table(runner, shape, buffers, transposed: bool, br: int, bc: int, dev) -> Table:
    """The table evaluated on every (row, column) pair by the table kernel (``codegen/table.py``)."""
    spec = runner.spec
    TB, TH, R, C = _layout(runner, shape, transposed, br, bc)
    full, part, count = _outputs(TB, TH, R, C, dev)
    kname = "table_t" if transposed else "table"
    bufs = buffer_tensors(buffers)
    consts = dict(BLOCK_R=br, BLOCK_C=bc)
    args = fill(kname, spec.lowering.signature(kname), {**_table_outputs(full, part, count), **bufs,
                                                        **_table_strides(TH, R, C), **_fixed(shape, TH, bufs)}, consts)
    with runner.mode(full):
        runner._run(_kernel(runner, kname), (R, TB * TH), args, consts)
    return Table(full, part, count, spec.mask_uses_b, spec.mask_uses_h)


class _Build:
    """What one bounded build's key fixes (call shape, tiles, captured tensors' layout): the
    table's layout and the memoised launches of its kernels (``memo.Memo``: a later build puts its
    own tensors, the outputs, the scratch and the captured tensors, into the memo's arguments)."""

    __slots__ = ("TB", "TH", "R", "C", "n_col", "bounds", "classify")


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
        m.bounds = m.classify = None
    TB, TH, R, C = m.TB, m.TH, m.R, m.C
    full, part, count = _outputs(TB, TH, R, C, dev)
    bufs = buffer_tensors(buffers)
    # the scratch is not read when no value varies along the columns
    scratch = torch.empty(TB * TH * 3 * m.n_col * C, dtype=torch.int64, device=dev) if m.n_col else full
    # the build's own tensors, in the same order every build (``Memo.args`` places them by it)
    bounds_own = {"TBND": scratch, **bufs}
    class_own = {**_table_outputs(full, part, count), "TBND": scratch, **bufs}
    with runner.mode(full):
        if m.classify is not None and not VERIFY_MEMO:
            if m.n_col:
                m.bounds.launch(m.bounds.args(bounds_own))
            m.classify.launch(m.classify.args(class_own))
        else:  # the first build of this key: arguments filled by name, launches kept
            sfx = "_t" if transposed else ""
            fixed = {**_fixed(shape, TH, bufs), "NT": C}
            if m.n_col:
                bt = min(_pow2(C), max(1, BOUNDS_POSITIONS // bc))
                m.bounds = _memoised(runner, "tbounds" + sfx, (cdiv(C, bt), TB * TH), bounds_own, fixed,
                                     dict(BLOCK_C=bc, BLOCK_T=bt), m.bounds)
            consts = dict(BLOCK_R=br, BLOCK_C=bc, BLOCK_T=min(BLOCK_T, max(16, _pow2(C))))
            m.classify = _memoised(runner, "tclass" + sfx, (R, TB * TH), class_own,
                                   {**fixed, **_table_strides(TH, R, C)}, consts, m.classify)
            if key not in memo:
                if len(memo) >= MAX_BUILDS:
                    memo.clear()
                memo[key] = m
    return Table(full, part, count, runner.spec.mask_uses_b, runner.spec.mask_uses_h)


def _memoised(runner, kname: str, grid: tuple, own: dict, fixed: dict, consts: dict, hit: Memo | None) -> Memo:
    """Launch ``kname`` with its arguments filled by name (``own`` and ``fixed``) and return its
    :class:`Memo`. ``hit``: the memo of an earlier build of the key (only under ``VERIFY_MEMO``):
    checked to give this build's grid, constants and arguments, then launched."""
    params = runner.spec.lowering.signature(kname)
    args = fill(kname, params, {**own, **fixed}, consts)
    check = (grid, consts, arg_classes(args))
    if hit is not None:
        if check != hit.check:
            raise AssertionError(f"table build memo of {kname}: memoised with {hit.check}, this build needs {check}")
        hit.verify(kname, own, args)
        hit.launch(args)
        return hit
    launch = runner._prepared(_kernel(runner, kname), grid, args, consts, 4, 3)
    return Memo(launch, args, own_slots(kname, params, own), check, False)


def _kernel(runner, suffix: str):
    return getattr(runner.mod, f"{runner.spec.name}_{suffix}")
