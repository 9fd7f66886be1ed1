"""Visit plans over layout coordinates: the kernel code for a :class:`~attndsl.spec.VisitBox`.

Per tile of the other index (stage 1) the plan computes the other tile's coordinate box from its
first and last position, then per axis ``a`` the range of target *tile coordinates*
``[bx_g{a}, bx_g{a} + bx_n{a})`` (``g = coordinate // tile extent``) and the sub-range of full
tiles ``[bx_f{a}, bx_e{a})``, and the 1-D ranges of the extra (non-grid) regions. The kernel then
runs one flattened loop of ``n_tiles = prod(bx_n) + sum(extra counts)`` iterations; an iteration
of the box decodes its tile coordinates with div/mod (last axis fastest), so consecutive
iterations walk rows of key tiles, and maps them to the tile's sequence index through the
layout's inverse (``index_expr``). A tile is full (no mask) when it lies in the full sub-box on
every axis; with ``tile_check`` a per-tile classification over the tile's coordinate box also
skips empty tiles. No block-mask tensor is read: everything is a few scalar integer ops.
"""
from __future__ import annotations

from attndsl import ir
from attndsl.ir import const, node
from attndsl.ir.coords import Grid
from attndsl.spec import VisitBox

from .expr import ExprEmitter


def _other(target: str) -> str:
    return "q" if target == "kv" else "kv"


def plan_lines(em: ExprEmitter, box: VisitBox, stage: int, t_max: str) -> list[str]:
    """Scalar code (per other tile) defining the box, the extras and ``n_tiles``."""
    grid = Grid(*box.grid)
    o = _other(box.target)
    nd = grid.ndim
    lines: list[str] = []
    # the other tile's coordinate box: corners are its first and last positions
    first = ir.var(f"{o}_lo")
    last = node("add", first, const(box.other_block - 1))
    for a in range(nd):
        lo_name, st = em._emit(ir.coord(first, grid.attr(a)), stage)
        if box.other_shape[a] == 1:
            em.env[f"{o}_c{a}"] = (lo_name, st)
            # constant over the tile: the mask reads this scalar instead of a per-element coordinate
            em.names[ir.coord(ir.var(o), grid.attr(a))] = (lo_name, st)
        else:
            hi_name, st2 = em._emit(ir.coord(last, grid.attr(a)), stage)
            em.env[f"{o}_c{a}_lo"] = (lo_name, st)
            em.env[f"{o}_c{a}_hi"] = (hi_name, st2)
    for a in range(nd):
        if box.tile_shape[a] == 1:
            # likewise for the target tile (any aligned tile, extras too, has one coordinate on this
            # axis): computed once per tile from its first position, so expressions of it (radial
            # attention's frame distance, bit_length, window, split rule) are per-tile scalars
            t = box.target
            em.names[ir.coord(ir.var(t), grid.attr(a))] = em._emit(ir.coord(ir.var(f"{t}_lo"), grid.attr(a)), 2)
    for a in range(nd):
        e, top = box.tile_shape[a], grid.shape[a] - 1
        olo, ohi = (em.emit_bound(x, stage) for x in box.box_outer[a])
        ilo, ihi = (em.emit_bound(x, stage) for x in box.box_inner[a])
        lines += [
            f"bx_lo{a} = tl.maximum({olo}, 0)",
            f"bx_hi{a} = tl.minimum({ohi}, {top})",
            f"bx_g{a} = bx_lo{a} // {e}",
            f"bx_n{a} = tl.where(bx_lo{a} <= bx_hi{a}, bx_hi{a} // {e} - bx_g{a} + 1, 0)",
            f"bx_f{a} = (tl.maximum({ilo}, 0) + {e - 1}) // {e}",
            f"bx_e{a} = (tl.minimum({ihi}, {top}) + 1) // {e}",
            f"bx_d{a} = tl.maximum(bx_n{a}, 1)",
        ]
    lines.append("bx_n = " + " * ".join(f"bx_n{a}" for a in range(nd)))
    total = ["bx_n"]
    B = box.block
    for k, x in enumerate(box.extras):
        r = x.range
        lo, hi = (em.emit_bound(v, stage) for v in r.outer)
        ilo, ihi = (em.emit_bound(v, stage) for v in r.inner)
        s = f"_x{k}"
        lines += [
            f"lo{s} = tl.maximum({lo}, 0)",
            f"hi{s} = tl.minimum({hi}, {t_max})",
            f"tb{s} = lo{s} // {B}",
            f"te{s} = tl.where(lo{s} <= hi{s}, hi{s} // {B} + 1, tb{s})",
            f"fb{s} = tl.maximum((tl.maximum({ilo}, 0) + {B - 1}) // {B}, tb{s})",
            f"fe{s} = tl.minimum((tl.minimum({ihi}, {t_max}) + 1) // {B}, te{s})",
            f"nf{s} = tl.maximum(fe{s} - fb{s}, 0)",
            f"fb{s} = tl.where(nf{s} > 0, fb{s}, te{s})",
            f"fe{s} = fb{s} + nf{s}",
            f"n1{s} = fb{s} - tb{s}",
            f"nt{s} = te{s} - tb{s}",
        ]
        total.append(f"nt{s}")
    lines.append("n_tiles = " + " + ".join(total))
    return lines


def _index_lines(grid: Grid, box: VisitBox) -> list[str]:
    """``bx_tile = layout position of the tile's first grid point // block`` (coords are >= 0)."""
    tile, inner = None, None
    for a in range(grid.ndim):
        ta = grid.tile[a]
        td = f"bx_c{a} // {ta}" if ta != 1 else f"bx_c{a}"
        tile = td if tile is None else f"({tile}) * {grid.counts[a]} + {td}"
        if ta != 1:
            d = f"bx_c{a} % {ta}"
            inner = d if inner is None else f"({inner}) * {ta} + {d}"
    pos = f"({tile}) * {grid.volume}" if grid.volume != 1 else f"({tile})"
    if inner is not None:
        pos += f" + {inner}"
    if grid.prefix:
        pos += f" + {grid.prefix}"
    return [f"bx_tile = ({pos}) // {box.block}"]


def iteration_lines(box: VisitBox) -> list[str]:
    """Per iteration ``it``: ``tile`` and ``is_partial`` (box first, then the extras)."""
    grid = Grid(*box.grid)
    t = box.target
    nd = grid.ndim
    lines = ["bx_r = it"]
    for a in reversed(range(nd)):
        if a:
            lines += [f"bx_j{a} = bx_r % bx_d{a}", f"bx_r = bx_r // bx_d{a}"]
        else:
            lines.append(f"bx_j{a} = bx_r")
    full = []
    for a in range(nd):
        e = box.tile_shape[a]
        lines.append(f"bx_t{a} = bx_g{a} + bx_j{a}")
        lines.append(f"bx_c{a} = bx_t{a} * {e}" if e != 1 else f"bx_c{a} = bx_t{a}")
        if e != 1:
            lines.append(f"{t}c{a}_lo = bx_c{a}")
            lines.append(f"{t}c{a}_hi = bx_c{a} + {e - 1}")
        full.append(f"(bx_t{a} >= bx_f{a}) & (bx_t{a} < bx_e{a})")
    lines += _index_lines(grid, box)
    lines.append("bx_full = " + " & ".join(full))
    if not box.extras:
        return lines + ["tile = bx_tile", "is_partial = bx_full == 0"]
    tile, part = "bx_tile", "bx_full == 0"
    lines.append("jx_0 = it - bx_n")
    sel = []
    for k, _ in enumerate(box.extras):
        s = f"_x{k}"
        if k:
            lines.append(f"jx_{k} = jx_{k - 1} - nt_x{k - 1}")
        lines += [
            f"jj{s} = jx_{k} - nf{s}",
            f"tile{s} = tl.where(jj{s} < 0, fb{s} + jx_{k}, tl.where(jj{s} < n1{s}, tb{s} + jj{s}, fe{s} + (jj{s} - n1{s})))",
        ]
        sel.append((f"jx_{k} < nt{s}", f"tile{s}", f"jj{s} >= 0"))
    # the last extra is the fallback of the selection chain
    t_expr, p_expr = sel[-1][1], sel[-1][2]
    for cond, tk, pk in reversed(sel[:-1]):
        t_expr = f"tl.where({cond}, {tk}, {t_expr})"
        p_expr = f"tl.where({cond}, {pk}, {p_expr})"
    lines.append(f"tile = tl.where(it < bx_n, {tile}, {t_expr})")
    lines.append(f"is_partial = tl.where(it < bx_n, {part}, {p_expr})")
    return lines


def register_tile_vars(em: ExprEmitter, box: VisitBox, stage: int):
    """Make the current target tile's coordinate box visible to emitted IR."""
    grid = Grid(*box.grid)
    t = box.target
    for a in range(grid.ndim):
        if box.tile_shape[a] == 1:
            em.env[f"{t}_c{a}"] = (f"bx_c{a}", stage)
        else:
            em.env[f"{t}_c{a}_lo"] = (f"{t}c{a}_lo", stage)
            em.env[f"{t}_c{a}_hi"] = (f"{t}c{a}_hi", stage)


def tile_class(em: ExprEmitter, box: VisitBox, stage: int, mask=None):
    """``(full, nonempty)`` code for the current tile when some part of the plan needs per-tile
    checks, else None. With ``box.exact_check`` the element mask (``mask``, the kernel's own) is
    evaluated here too and a tile with no allowed pair is skipped; the mask block of the tile then
    reuses these values."""
    checks = [box.tile_check] + [x.range.tile_check and x.tile_full is not None for x in box.extras]
    if not any(checks):
        return None
    register_tile_vars(em, box, stage)
    parts = []
    if box.tile_check:
        ne = em.emit(box.tile_nonempty, stage)
        if box.exact_check and mask is not None:
            keep = em.emit(mask, stage)
            ne = (f"({ne}) & (tl.max(tl.max((({keep}) & (q_idx < LQ) & (kv_idx < LKV)).to(tl.int32), 1), 0) > 0)")
        parts.append((em.emit(box.tile_full, stage), ne))
    else:
        parts.append(("False", "True"))
    t = box.target
    for x in box.extras:
        if x.range.tile_check and x.tile_full is not None:
            # a tile straddling the end of the sequence is never full (its padding must be masked)
            full = f"({em.emit(x.tile_full, stage)}) & ({t}_hi <= {t}_max)"
            parts.append((full, em.emit(x.tile_nonempty, stage)))
        else:
            parts.append(("False", "True"))
    if len(parts) == 1:
        return parts[0]
    conds = ["it < bx_n"] + [f"jx_{k} < nt_x{k}" for k in range(len(box.extras) - 1)]
    full, nonempty = parts[-1]
    for cond, (f, ne) in reversed(list(zip(conds, parts[:-1]))):
        full = f"tl.where({cond}, {f}, {full})"
        nonempty = f"tl.where({cond}, {ne}, {nonempty})"
    return full, nonempty
