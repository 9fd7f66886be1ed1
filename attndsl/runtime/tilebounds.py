"""Building one block table: from per-tile bounds (O(L + tiles²)) where the mask allows, else densely.

``passes/tile_intervals.py`` decides once per mask whether its tables can be classified from
per-tile bounds; ``codegen/tilebounds.py`` emits the two kernels that do it (``<name>_tbounds``:
per column tile, the minimum and maximum of each column-axis value such as ``doc_ids[kv_idx]``;
``<name>_tclass``: per row tile, interval classification of the column tiles, the mask evaluated
only on tiles the bounds leave undecided). A build is those two launches (one when no value varies
along the columns) and four allocations, with no host sync; its table equals the dense table
kernel's (``codegen/table.py``, O(L²)), which builds the tables of every other mask.
"""
from __future__ import annotations

import torch

from ..passes.tile_intervals import axes, bounds_signature, class_signature, tile_plan
from .launch import Table, buffer_args, cdiv, check_arguments

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


def _launch(runner, kernel: str, params, grid, args, consts) -> None:
    if runner.interpret:  # the same argument lists run on the GPU: checked where the tests run
        check_arguments(kernel, params, args, consts)
    with runner.mode(args[0]):
        runner._run(getattr(runner.mod, f"{runner.spec.name}_{kernel}"), grid, args, consts)


def dense_table(runner, shape, buffers, transposed: bool, br: int, bc: int, dev) -> Table:
    """The table evaluated on every (row, column) pair by the table kernel (``codegen/table.py``)."""
    spec = runner.spec
    TB, TH, R, C = _layout(runner, shape, transposed, br, bc)
    full, part, count = _outputs(TB, TH, R, C, dev)
    kname = "table_t" if transposed else "table"
    args = [full, part, count, TH * R * C, R * C, C, TH, shape[2], shape[3], *buffer_args(buffers)]
    _launch(runner, kname, spec.lowering.signature(kname), (R, TB * TH), args, dict(BLOCK_R=br, BLOCK_C=bc))
    return Table(full, part, count, spec.mask_uses_b, spec.mask_uses_h)


def bounded_table(runner, shape, buffers, transposed: bool, br: int, bc: int, dev) -> Table | None:
    """The same table from per-tile bounds, or None when ``tile_plan`` has no plan for the mask."""
    plan = tile_plan(runner.spec)
    if plan is None:
        return None
    spec = runner.spec
    TB, TH, R, C = _layout(runner, shape, transposed, br, bc)
    full, part, count = _outputs(TB, TH, R, C, dev)
    bufs = buffer_args(buffers)
    Lq, Lkv = shape[2], shape[3]
    sfx = "_t" if transposed else ""
    n_col = len(plan.along(axes(transposed)[1]))
    scratch = full  # not read when no value varies along the columns
    if n_col:
        scratch = torch.empty(TB * TH * 2 * n_col * C, dtype=torch.int64, device=dev)
        bt = min(_pow2(C), max(1, BOUNDS_POSITIONS // bc))
        _launch(runner, "tbounds" + sfx, bounds_signature(spec), (cdiv(C, bt), TB * TH),
                [scratch, TH, Lq, Lkv, C, *bufs], dict(BLOCK_C=bc, BLOCK_T=bt))
    _launch(runner, "tclass" + sfx, class_signature(spec), (R, TB * TH),
            [full, part, count, TH * R * C, R * C, C, scratch, TH, Lq, Lkv, C, *bufs],
            dict(BLOCK_R=br, BLOCK_C=bc, BLOCK_T=min(BLOCK_T, max(16, _pow2(C)))))
    return Table(full, part, count, spec.mask_uses_b, spec.mask_uses_h)
