"""The block-table kernels that classify tiles from per-tile bounds (``passes/tile_intervals.py``).

Two kernels per direction (forward tables: rows are query tiles; ``_t``: rows are key tiles):

* ``<name>_tbounds``: per column tile, the minimum and maximum of each frontier value that varies
  along the column axis, into a scratch tensor ``TBND[plane, value, lo|hi, tile]`` (int64). O(L).
* ``<name>_tclass``: one program per (row tile, batch/head plane). It reduces the row-axis frontier
  values over its row tile, then walks the column tiles of the closed-form outer range in chunks of
  ``BLOCK_T``: the plan's ``must`` / ``may`` on the chunk's intervals classify each tile as surely
  full, surely empty, or unknown; the mask is evaluated densely on the unknown tiles only (a
  document mask's diagonal and boundary tiles). Full and partial tiles are appended in ascending
  order (a prefix sum per chunk, no sort) in the dense table kernel's format (``codegen/table.py``),
  so the table equals the dense one exactly. O(tiles²) plus the unknown tiles' elements.

The ``_tbounds`` kernel exists only where the plan has column-axis frontier values.
"""
from __future__ import annotations

from attndsl import ir
from attndsl.passes.tile_intervals import TilePlan, axes, tile_plan
from attndsl.spec import KernelSpec

from .expr import ExprEmitter, literal
from .plan import _hoist_loads, _plan_lines
from .writer import Writer, kernel_def


def _program_head(w: Writer) -> None:
    w.code("""
        pid_t = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // TH
        h = pid_bh % TH
    """)


def _env(row: str | None, col: str | None) -> dict:
    env = {"b": ("b", 0), "h": ("h", 0)}
    if row:
        env.update({row: (f"{row}_idx", 1), f"{row}_lo": (f"{row}_lo", 1), f"{row}_hi": (f"{row}_hi", 1),
                    f"{row}_max": (f"{row}_max", 1)})
    if col:
        env.update({col: (f"{col}_idx", 2 if row else 1), f"{col}_max": (f"{col}_max", 1 if row else 0)})
    return env


def _lo_hi(code: str, boolean: bool, reduce_axis: str) -> tuple[str, str]:
    """Minimum and maximum of a frontier value over a tile (booleans as 0/1), as int64."""
    v = f"({code}).to(tl.int32)" if boolean else code
    return (f"tl.min({v}{reduce_axis}).to(tl.int64)", f"tl.max({v}{reduce_axis}).to(tl.int64)")


def _steps(front, axis: str, stage: int) -> tuple[ExprEmitter, list]:
    """Each integer frontier value at the next position of its tile (``{axis}_nxt``), for the
    contiguity test (every step at most 1: the tile's values fill their integer range); None for
    booleans. A second emitter, so the names differ from the values at the tile's positions."""
    env = {"b": ("b", 0), "h": ("h", 0), axis: (f"{axis}_nxt", stage)}
    em = ExprEmitter(env, stage + 1, prefix="w")
    return em, [None if f.node.dtype == ir.BOOL else em.emit(f.node, stage) for f in front]


def _contiguous(code: str, nxt: str, reduce_axis: str) -> str:
    return f"tl.max(tl.abs(({nxt}).to(tl.int64) - ({code}).to(tl.int64)){reduce_axis}) <= 1"


def bounds_kernel(spec: KernelSpec, plan: TilePlan, transposed: bool) -> str:
    """``<name>_tbounds[_t]``: per column tile, the bounds of each column-axis frontier value."""
    _, col = axes(transposed)
    c_len = "LQ" if col == "q" else "LKV"
    front = plan.along(col)
    em = ExprEmitter(_env(None, col), 2, prefix="v")
    codes = [em.emit(f.node, 1) for f in front]
    em2, nxt = _steps(front, col, 1)
    w = Writer(1)
    _program_head(w)
    w.emitted(em.take(0, w.ind))
    w.emitted(em2.take(0, w.ind))
    w.code(f"""
        tiles = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        # positions past the end repeat the last one: the bounds are over the sequence only
        {col}_max = {c_len} - 1
        {col}_idx = tl.minimum(tiles[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], {col}_max)
        {col}_nxt = tl.minimum({col}_idx + 1, tl.minimum(tiles[:, None] * BLOCK_C + BLOCK_C - 1, {col}_max))
    """)
    w.emitted(em.take(1, w.ind))
    w.emitted(em2.take(1, w.ind))
    w.line("ok = tiles < NT")
    w.line(f"out = TBND + pid_bh.to(tl.int64) * {3 * len(front)} * NT + tiles")
    for i, (f, code) in enumerate(zip(front, codes)):
        lo, hi = _lo_hi(code, f.node.dtype == ir.BOOL, ", 1")
        w.line(f"tl.store(out + {3 * i} * NT, {lo}, mask=ok)")
        w.line(f"tl.store(out + {3 * i + 1} * NT, {hi}, mask=ok)")
        ct = "ok" if nxt[i] is None else _contiguous(code, nxt[i], ", 1")  # (booleans: unused)
        w.line(f"tl.store(out + {3 * i + 2} * NT, ({ct}).to(tl.int64), mask=ok)")
    kernel = f"tbounds{'_t' if transposed else ''}"
    name = f"{spec.name}_{kernel}"
    doc = f'    """Per {col} tile: minimum, maximum and contiguity of each frontier value along {col} (int64)."""\n'
    return "\n" + kernel_def(name, spec.lowering.signature(kernel)) + doc + w.text()


class _IntervalEmitter:
    """``must`` / ``may`` of a tile plan as Triton: integers in int64, booleans as int1 vectors of
    ``BLOCK_T`` column tiles. Sub-expressions of ``b``/``h`` only go to the kernel's ExprEmitter
    (emitted once per program, with its integer widths)."""

    def __init__(self, em: ExprEmitter, leaves: dict, w: Writer):
        self.em, self.leaves, self.w = em, leaves, w
        self.names: dict = {}
        self.fv: dict = {}

    def __call__(self, n) -> str:
        got = self.names.get(n)
        if got is not None:
            return got
        if n.op == "var" and n.attr in self.leaves:
            return self.leaves[n.attr]
        if n.op == "const":
            if n.dtype == ir.BOOL:
                code = f"tl.full([BLOCK_T], {int(n.attr[1])}, tl.int1)"
            else:
                return literal(n)
        elif not (ir.free_vars(n, self.fv) - {"b", "h"}):
            code = self.em.emit(n, 0)
            if n.dtype == ir.INT:
                code = f"({code}).to(tl.int64)"
        else:
            a = [self(x) for x in n.args]
            code = self.em._expr(n, a)  # the same operator spelling, on int64 / int1 operands
        name = self.w.fresh("iv")
        self.w.line(f"{name} = {code}")
        self.names[n] = name
        return name


def class_kernel(spec: KernelSpec, plan: TilePlan, transposed: bool) -> str:
    """``<name>_tclass[_t]``: the table of one row tile from the bounds, unknown tiles evaluated."""
    row, col = axes(transposed)
    r_len, c_len = ("LKV", "LQ") if transposed else ("LQ", "LKV")
    rng = spec.bwd_range if transposed else spec.fwd_range
    em = ExprEmitter(_env(row, col), 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "col" if transposed else "row": 1})
    plan_lines = _plan_lines(em, rng, 1, "BLOCK_C", f"{col}_max", False)
    row_front, col_front = plan.along(row), plan.along(col)
    row_codes = [em.emit(f.node, 1) for f in row_front]
    em2, row_nxt = _steps(row_front, row, 1)
    iw = Writer(2)  # the chunk's interval code (inside the chunk loop)
    leaves = {f"{row}_lo": f"{row}_lo", f"{row}_hi": f"{row}_hi", f"{col}_lo": "c_lo", f"{col}_hi": "c_hi"}
    for f in row_front + col_front:
        leaves.update({f"{f.name}_{x}": f"{f.name}_{x}" for x in ("lo", "hi", "ct")})
    ive = _IntervalEmitter(em, leaves, iw)
    must, may = ive(plan.must), ive(plan.may)
    known = None if plan.exact is None or ir.is_const(plan.exact, False) else ive(plan.exact)
    # the loop over unknown tiles: the mask per element (its row-level and b/h-only parts emitted
    # above, first, so that they stay there)
    m = em.emit(spec.mask, 2)
    elem = em.take(2, " " * 12)

    w = Writer(1)
    _program_head(w)
    w.emitted(em.take(0, w.ind))
    w.emitted(em2.take(0, w.ind))
    w.code(f"""
        pid_r = pid_t
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        # rows past the end repeat the last one: harmless for the bounds, masked by r_ok per element
        {row}_idx = tl.minimum(offs_r, {r_len} - 1)[:, None]
        {row}_lo = pid_r * BLOCK_R
        {row}_hi = tl.minimum({row}_lo + BLOCK_R, {r_len}) - 1
        {row}_max = {r_len} - 1
        {col}_max = {c_len} - 1
        r_ok = offs_r[:, None] < {r_len}
        r_edge = {row}_lo + BLOCK_R > {r_len}
        {row}_nxt = tl.minimum({row}_idx + 1, {row}_hi)
    """)
    w.emitted(em.take(1, w.ind))
    w.emitted(em2.take(1, w.ind))
    for f, code, nxt in zip(row_front, row_codes, row_nxt):
        lo, hi = _lo_hi(code, f.node.dtype == ir.BOOL, "")
        w.line(f"{f.name}_lo = {lo}")
        w.line(f"{f.name}_hi = {hi}")
        if nxt is not None:
            w.line(f"{f.name}_ct = {_contiguous(code, nxt, '')}")
        if f.node.dtype == ir.BOOL:
            w.line(f"{f.name}_lo = {f.name}_lo != 0")
            w.line(f"{f.name}_hi = {f.name}_hi != 0")
    for ln in plan_lines:
        w.line(ln)
    w.code(f"""
        base = b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h + pid_r.to(tl.int64) * tbl_stride_r
        bnd = TBND + pid_bh.to(tl.int64) * {3 * len(col_front)} * NT
        n_full = pid_r * 0
        n_part = pid_r * 0
    """)
    with w.block("for c0 in range(t_begin, t_end, BLOCK_T):"):
        w.code(f"""
            tiles = c0 + tl.arange(0, BLOCK_T)
            live = tiles < t_end
            c_lo = tiles * BLOCK_C
            c_hi = tl.minimum(c_lo + BLOCK_C, {c_len}) - 1
        """)
        for i, f in enumerate(col_front):
            for j, side in enumerate(("lo", "hi", "ct")):
                v = f"tl.load(bnd + {3 * i + j} * NT + tiles, mask=live, other=0)"
                w.line(f"{f.name}_{side} = {v}{' != 0' if f.node.dtype == ir.BOOL or side == 'ct' else ''}")
        w.emitted(iw.text() if iw.text().strip() else "")
        w.code(f"""
            sure = ({must}) & live
            maybe = ({may}) & live
            edge = r_edge | (c_lo + BLOCK_C > {c_len})
            # surely full: full, unless cut by a sequence end (then partial, as the dense kernel says)
            is_full = (sure & (edge == 0)).to(tl.int32)
            is_part = (sure & edge).to(tl.int32)
            unknown = (maybe & (sure == 0)).to(tl.int32)
        """)
        if known is not None:  # where the bounds' verdict is exact, a maybe tile is partial as it stands
            w.code(f"""
                decided = unknown * ({known}).to(tl.int32)
                is_part = is_part | decided
                unknown = unknown - decided
            """)
        with w.block("for _ in range(0, tl.sum(unknown, 0)):"):
            w.code(f"""
                tile = tl.min(tl.where(unknown != 0, tiles, t_end), 0)
                offs_c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
                {col}_idx = offs_c[None, :]
                valid = r_ok & (offs_c[None, :] < {c_len})
            """)
            w.emitted(elem)
            w.code(f"""
                keep = ({m}) & valid
                n_keep = tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
                hit = (tiles == tile).to(tl.int32)
                is_full = is_full | (hit * (n_keep == BLOCK_R * BLOCK_C).to(tl.int32))
                is_part = is_part | (hit * ((n_keep > 0) & (n_keep < BLOCK_R * BLOCK_C)).to(tl.int32))
                unknown = unknown * (1 - hit)
            """)
        w.code("""
            # ascending column lists: each chunk's tiles go after the previous chunks' (a prefix sum)
            tl.store(TBL_FULL + base + n_full + tl.cumsum(is_full, 0) - is_full, tiles, mask=is_full != 0)
            tl.store(TBL_PART + base + n_part + tl.cumsum(is_part, 0) - is_part, tiles, mask=is_part != 0)
            n_full += tl.sum(is_full, 0)
            n_part += tl.sum(is_part, 0)
        """)
    w.code("""
        cnt = TBL_CNT + (base // tbl_stride_r) * 2
        tl.store(cnt, n_full)
        tl.store(cnt + 1, n_part)
    """)
    kernel = f"tclass{'_t' if transposed else ''}"
    name = f"{spec.name}_{kernel}"
    doc = (f'    """Block table from per-tile bounds: for one {row} tile, the {col} tiles where the mask holds '
           f'everywhere / somewhere."""\n')
    return "\n" + kernel_def(name, spec.lowering.signature(kernel)) + doc + w.text()


def render(spec: KernelSpec) -> str:
    """The per-tile-bounds table kernels of ``spec`` ("" when :func:`tile_plan` gives none)."""
    plan = tile_plan(spec)
    if plan is None:
        return ""
    parts = []
    for transposed in (False, True):
        if plan.along(axes(transposed)[1]):
            parts.append(bounds_kernel(spec, plan, transposed))
        parts.append(class_kernel(spec, plan, transposed))
    return "\n".join(parts)
