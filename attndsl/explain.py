"""Human-readable account of a compiled pattern: IR, visit plan, generated source."""
from __future__ import annotations

from . import ir
from .spec import VisitBox


def _box_lines(what, box, other) -> list:
    """A box visit plan (passes/box_analysis.py) in words."""
    shape, tile, prefix = box.grid
    axes = "x".join(map(str, shape))
    out = [f"{what}: box of tiles over layout {axes} (tile {'x'.join(map(str, tile))}"
           f"{f', grid at {prefix}' if prefix else ''}); {box.target} tiles of {box.block} tokens = "
           f"{'x'.join(map(str, box.tile_shape))} grid points, {other} tiles of {box.other_block} = "
           f"{'x'.join(map(str, box.other_shape))}; per axis over the {other} tile's coordinates {other}_c*_lo..hi:"]
    for a, (o, i) in enumerate(zip(box.box_outer, box.box_inner)):
        out.append(f"  axis {a}: visit [{ir.expr_str(o[0])}, {ir.expr_str(o[1])}]")
        out.append(f"          full  [{ir.expr_str(i[0])}, {ir.expr_str(i[1])}]")
    if box.tile_check:
        out.append("  tiles of the box are classified one by one over their coordinate boxes"
                   + (" and by evaluating the mask (coordinate residues)" if box.exact_check else ""))
    for x in box.extras:
        r = x.range
        out.append(f"  outside the grid: visit [{ir.expr_str(r.outer[0])}, {ir.expr_str(r.outer[1])}], "
                   f"full [{ir.expr_str(r.inner[0])}, {ir.expr_str(r.inner[1])}]"
                   + (" (checked per tile)" if r.tile_check else ""))
    return out


def explain(compiled) -> str:
    """The account ``CompiledAttention.explain()`` returns: the simplified IR, captured tensors and
    their gradients, the visit plans (key range per query tile, query range per key tile) and the
    generated source's size, kernels and file in the kernel cache."""
    spec = compiled.spec
    out = [f"pattern {spec.key}"]
    roots = {}
    if spec.mask is not None:
        roots["mask"] = spec.mask
    if spec.score is not None:
        roots["score_mod"] = spec.score
        roots["d score_mod/d score"] = spec.dscore
    out.append("IR (after simplify):")
    out.append(ir.listing(roots) if roots else "  dense: no mask, no score_mod")
    if spec.buffers:
        out.append("captured tensors: " + ", ".join(f"buf{b.slot}: {b.torch_dtype}[{b.ndim}-d]" for b in spec.buffers))
    for gl in spec.grad_loads:
        out.append(f"learnable buf{gl.slot}: gradient scope {gl.scope!r} (program: one sum per program; row: per "
                   "query; col: per key; exact: written tile by tile; scatter: per entry of each tile)")
        if gl.diagonal is not None:
            out.append(f"  its index depends on q and kv only through dist = q - kv: "
                       f"{', '.join(ir.expr_str(a) for a in gl.diagonal)}; the gradient is summed per diagonal "
                       "of each tile and added once per diagonal (deterministic=True: the diagonals' sums "
                       "added per entry, in order)")
    for ul in spec.uniform_loads:
        out.append(f"buf{ul.load.attr[0]} is read once per constant run: the full tiles at either end of each "
                   "range where its index bounds meet get one scalar load (and one gradient add per run); "
                   "block tables and layout plans test each tile instead")
    if spec.mask is not None:
        plans = [("forward/dQ: key range per query tile", spec.fwd_range, "q"),
                 ("dK/dV: query range per key tile", spec.bwd_range, "kv")]
        if spec.tiles:
            plans[0] = (f"forward: key range per query tile (tiles {spec.tiles[0]}x{spec.tiles[1]})", spec.fwd_range, "q")
            plans[1] = (f"dK/dV: query range per key tile (tiles {spec.bwd_tiles[0]}x{spec.bwd_tiles[1]})",
                        spec.bwd_range, "kv")
            if spec.dq_range is not None and spec.dq_range is not spec.fwd_range:
                plans.insert(1, (f"dQ: key range per query tile (tiles {spec.dq_tiles[0]}x{spec.dq_tiles[1]})",
                                 spec.dq_range, "q"))
        for what, rng, other in plans:
            if isinstance(rng, VisitBox):
                out += _box_lines(what, rng, other)
                continue
            out.append(f"{what} ({other}_lo..{other}_hi):")
            out.append(f"  visit  [{ir.expr_str(rng.outer[0])}, {ir.expr_str(rng.outer[1])}]")
            out.append(f"  full   [{ir.expr_str(rng.inner[0])}, {ir.expr_str(rng.inner[1])}]")
            if rng.tile_check:
                out.append("  tiles in the visit range are checked one by one (the mask is not convex)")
        if spec.data_dependent:
            out.append("data-dependent mask: a generated block-table kernel classifies tiles on the device")
        else:
            out.append("closed form: no block-mask tensor is built")
    src = compiled.source
    kernels = [line.split("def ", 1)[1].split("(", 1)[0] for line, prev in zip(src.splitlines()[1:], src.splitlines())
               if prev.strip().startswith("@triton.jit") and line.lstrip().startswith("def ")]
    from .runtime.cache import source_path
    path = source_path(spec)
    out.append(f"generated Triton: {len(src.splitlines())} lines, {len(kernels)} @triton.jit functions "
               f"({', '.join(kernels)})")
    out.append(f"  source file: {path}" + ("" if path.exists() else " (written on the first call)"))
    out.append("  print it with attn.source, or: attndsl show PATTERN --source")
    return "\n".join(out)
