"""Visit plans and loop structure of the dense kernels: which tiles a program visits (closed-form
ranges, layout boxes, block tables), the loop heads over them, per-tile classification, and the
decisions to split a loop in two (made while writing, never by editing written text)."""
from __future__ import annotations

from attndsl.spec import KernelSpec, VisitBox, VisitRange

from . import box as _box
from . import runs as _runs
from .expr import ExprEmitter

I1 = " " * 4


def _plan_lines(em: ExprEmitter, rng: VisitRange, stage: int, block: str, t_max: str, table: bool) -> list[str]:
    """Scalar code computing the tiles to visit along the target index (closed form)."""
    if table:
        return []
    if isinstance(rng, VisitBox):  # a box of tiles over layout coordinates (codegen/box.py)
        return _box.plan_lines(em, rng, stage, t_max)
    lo, hi = (em.emit_bound(x, stage) for x in rng.outer)
    ilo, ihi = (em.emit_bound(x, stage) for x in rng.inner)
    return [
        f"lo = tl.maximum({lo}, 0)",
        f"hi = tl.minimum({hi}, {t_max})",
        f"t_begin = lo // {block}",
        f"t_end = tl.where(lo <= hi, hi // {block} + 1, t_begin)",
        f"f_begin = tl.maximum((tl.maximum({ilo}, 0) + {block} - 1) // {block}, t_begin)",
        f"f_end = tl.minimum((tl.minimum({ihi}, {t_max}) + 1) // {block}, t_end)",
        "n_full = tl.maximum(f_end - f_begin, 0)",
        "f_begin = tl.where(n_full > 0, f_begin, t_end)",
        "f_end = f_begin + n_full",
        "n_first = f_begin - t_begin",
        "n_tiles = t_end - t_begin",
    ]


def _table_plan_lines(prefix: str, bh_off: str, row: str) -> list[str]:
    return [
        f"tbl_off = {bh_off} + {row}.to(tl.int64) * tbl_stride_r",
        "n_full = tl.load(TBL_CNT + tbl_off // tbl_stride_r * 2)",
        "n_tiles = n_full + tl.load(TBL_CNT + tbl_off // tbl_stride_r * 2 + 1)",
    ]


def _tile_of_iteration(table: bool, rng=None, runs: bool = False, part: str = "both") -> list[str]:
    """Full tiles first (no mask), then the partial ones. Beside a run loop (``codegen/runs.py``)
    the loop starts at ``n_run`` and its full tiles are the ones between the two runs. ``part``:
    the tile of a loop over the full tiles only ("full") or the partial ones only ("partial")."""
    if isinstance(rng, VisitBox) and not table:
        return _box.iteration_lines(rng)
    if part == "full":
        return ["tile = tl.load(TBL_FULL + tbl_off + it)" if table else f"tile = f_begin + it{' - n_suf' if runs else ''}"]
    if part == "partial":
        if table:
            return ["tile = tl.load(TBL_PART + tbl_off + (it - n_full))"]
        return ["j = it - n_full", "tile = tl.where(j < n_first, t_begin + j, f_end + (j - n_first))"]
    if table:
        return [
            "is_partial = it >= n_full",
            "tile = tl.load(tl.where(is_partial, TBL_PART + tbl_off + (it - n_full), TBL_FULL + tbl_off + it))",
        ]
    return [
        "j = it - n_full",
        "is_partial = j >= 0",
        f"tile = tl.where(j < 0, f_begin + it{' - n_suf' if runs else ''}, tl.where(j < n_first, t_begin + j, f_end + (j - n_first)))",
    ]


def _tile_class(spec: KernelSpec, rng, em: ExprEmitter, table: bool):
    """``(full, nonempty)`` code of the current tile when the plan asks for per-tile checks."""
    if table:
        return None
    if isinstance(rng, VisitBox):
        return _box.tile_class(em, rng, 2, spec.mask)
    if rng.tile_check and spec.tile_full is not None:
        return em.emit(spec.tile_full, 2), em.emit(spec.tile_nonempty, 2)
    return None


def _split_extras(rng, table: bool, visit_if: str) -> bool:
    """Two loops where a box plan's per-tile test is only for its extra (non-grid) ranges?

    ``if nonempty:`` around a loop body keeps Triton from pipelining the K/V loads of every
    iteration. When only the extras need that test (the box itself is exact), the box's tiles get
    a loop of their own without it (``range(0, bx_n)``) and the extras keep theirs
    (``range(bx_n, n_tiles)``); both run the same iteration code."""
    return not table and bool(visit_if) and isinstance(rng, VisitBox) and not rng.tile_check and bool(rng.extras)


def _hoist_loads(spec: KernelSpec, em: ExprEmitter, stages: dict) -> None:
    """Emit the mask's captured loads whose loop level (``spec.lowering.load_stages``) is in
    ``stages`` (level -> emitter stage) ahead of the loops: a document mask's ``doc_ids[q_idx]``
    is then read once per query tile, not on every partial tile or column tile."""
    for ld, level in spec.lowering.load_stages:
        if level in stages:
            em.emit(ld, stages[level])


def _split_loop(spec: KernelSpec, rng, cls) -> bool:
    """Visit the full and the partial tiles in two loops (the first with no mask code) rather than
    one loop with ``if is_partial:``? For the sigmoid forward: on an H100 (bf16, causal, H=16,
    D=128, L=16384) 4% faster with pointer loads and 1.5% with TMA loads; at L=4096 within noise;
    the softmax forward was 1-3% slower split (BENCHMARKS.md). Per-tile classification and box
    plans set ``is_partial`` per tile and keep one loop."""
    return spec.normalizer == "sigmoid" and cls is None and not isinstance(rng, VisitBox)


def _split_backward(spec: KernelSpec, rng, cls, runs: bool) -> bool:
    """The dK/dV and dQ loops over the full and the partial tiles as two loops, the first with no
    mask code? On an H100 (bf16, D=128; BENCHMARKS.md) forward+backward 2-5% faster (causal softmax
    and sigmoid, GQA, sliding window, pair bias), but 3% slower beside constant-run loops (T5
    table), which keep one general loop. Per-tile classification and box plans set
    ``is_partial`` per tile: one loop."""
    return cls is None and not runs and not isinstance(rng, VisitBox)


def _loop_head(spec: KernelSpec, run: bool, runs: bool, table: bool, rng, inner: str, ind: str,
               part: str = "both", bounds: tuple | None = None) -> str:
    """``for it in ...:`` and the iteration's tile: a constant-run loop (``codegen/runs.py``) or the
    general loop (beside run loops it starts at ``n_run``), whole or split into its full and its
    partial tiles (``part``)."""
    if run:
        return f"{ind}for it in range(0, n_run):\n{_indent(_runs.tile_lines(spec, inner), ind + I1)}"
    first = "n_run" if runs else "0"
    bounds = bounds or {"both": (first, "n_tiles"), "full": (first, "n_full"), "partial": ("n_full", "n_tiles")}[part]
    return (f"{ind}for it in range({bounds[0]}, {bounds[1]}):\n"
            f"{_indent(_tile_of_iteration(table, rng, runs, part), ind + I1)}")


def _indent(lines, ind):
    return "".join(ind + line + "\n" for line in lines)
