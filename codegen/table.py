"""The block-table kernels: classify (row tile, column tile) pairs of a data-dependent mask on the
device into full / partial lists (``runtime/launch.py: Runner.table``)."""
from __future__ import annotations

from attndsl.spec import KernelSpec

from .expr import ExprEmitter
from .plan import _hoist_loads, _indent, _plan_lines
from .writer import kernel_def

I1, I2 = " " * 4, " " * 8


def block_table(spec: KernelSpec, transposed: bool) -> str:
    """Classify (row tile, column tile) pairs on the device: full / partial / empty lists.

    Forward tables have query tiles as rows and key tiles as columns; the transposed table
    (for dK/dV) the other way round. Only columns in the closed-form outer range are examined.
    """
    row, col = ("kv", "q") if transposed else ("q", "kv")
    rng = spec.bwd_range if transposed else spec.fwd_range
    env = {"b": ("b", 0), "h": ("h", 0),
           row: (f"{row}_idx", 1), f"{row}_lo": (f"{row}_lo", 1), f"{row}_hi": (f"{row}_hi", 1),
           f"{row}_max": (f"{row}_max", 1), f"{col}_max": (f"{col}_max", 1),
           col: (f"{col}_idx", 2), f"{col}_lo": (f"{col}_lo", 2), f"{col}_hi": (f"{col}_hi", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "col" if transposed else "row": 1})
    plan = _plan_lines(em, rng, 1, "BLOCK_C", f"{col}_max", False)
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    m = em.emit(spec.mask, 2)
    elem = em.take(2, I2)
    r_len, c_len = ("LKV", "LQ") if transposed else ("LQ", "LKV")
    r_shape, c_shape = ("offs_r[:, None]", "offs_c[None, :]")
    name = f"{spec.name}_table{'_t' if transposed else ''}"
    return f'''
{kernel_def(name, spec.lowering.signature("table_t" if transposed else "table"))}    """Block table: for one {row} tile, the {col} tiles where the mask holds everywhere / somewhere."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // TH
    h = pid_bh % TH
{pre0}
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    {row}_idx = {r_shape.replace("offs_r", "offs_r")}
    {row}_lo = pid_r * BLOCK_R
    {row}_hi = tl.minimum({row}_lo + BLOCK_R, {r_len}) - 1
    {row}_max = {r_len} - 1
    {col}_max = {c_len} - 1
    r_ok = offs_r[:, None] < {r_len}
{pre1}{_indent(plan, I1)}
    base = b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h + pid_r.to(tl.int64) * tbl_stride_r
    n_full = 0
    n_part = 0
    for tile in range(t_begin, t_end):
        {col}_lo = tile * BLOCK_C
        {col}_hi = {col}_lo + BLOCK_C - 1
        offs_c = {col}_lo + tl.arange(0, BLOCK_C)
        {col}_idx = {c_shape}
        valid = r_ok & (offs_c[None, :] < {c_len})
{elem}        keep = ({m}) & valid
        n_keep = tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
        n_valid = tl.sum(tl.sum(valid.to(tl.int32), 1), 0)
        if n_keep == BLOCK_R * BLOCK_C:
            tl.store(TBL_FULL + base + n_full, tile)
            n_full += 1
        elif n_keep > 0:
            tl.store(TBL_PART + base + n_part, tile)
            n_part += 1
    cnt = TBL_CNT + (base // tbl_stride_r) * 2
    tl.store(cnt, n_full)
    tl.store(cnt + 1, n_part)
'''
