"""Human-readable account of a compiled pattern: IR, visit plan, generated source."""
from __future__ import annotations

from . import ir


def explain(compiled) -> str:
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
    if spec.mask is not None:
        for what, rng, other in (("forward/dQ: key range per query tile", spec.fwd_range, "q"),
                                 ("dK/dV: query range per key tile", spec.bwd_range, "kv")):
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
    out.append(f"generated Triton: {len(src.splitlines())} lines, cached at runtime.cache.source_path(spec)")
    return "\n".join(out)
