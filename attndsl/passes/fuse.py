"""Fusion: mask + score modifier (+ later layouts, selectors, normalisers) → one KernelSpec."""
from __future__ import annotations

import weakref

from .. import ir
from ..ir import Node
from ..spec import KernelSpec, VisitRange
from .block_analysis import is_data_dependent, tile_class, tile_range
from .grad import derivative
from .simplify import simplify

SPEC_VERSION = 1  # bump when the meaning of a spec (and so of generated code) changes
_CACHE: dict = {}


def _range(mask, target) -> VisitRange:
    other = "q" if target == "kv" else "kv"
    if mask is None:
        t_max = ir.var(f"{target}_max")
        return VisitRange(target, (ir.const(0), t_max), (ir.const(0), t_max), False)
    tr = tile_range(mask, target)
    return VisitRange(target, tr.outer, tr.inner, tr.tile_check)


def build_spec(mask: Node | None, score: Node | None, buffers, name="attn", options=()) -> KernelSpec:
    """Run the passes on traced IR and assemble the KernelSpec (memoised by IR identity)."""
    ck = (mask, score, tuple(b.key() for b in buffers), name, options)
    hit = _CACHE.get(ck)
    if hit is not None:
        return hit
    if mask is not None:
        mask = simplify(mask)
        if ir.is_const(mask, True):
            mask = None
    if score is not None:
        score = simplify(score)
        if score is ir.var(ir.SCORE, ir.FLOAT):
            score = None
    dscore = derivative(score, ir.var(ir.SCORE, ir.FLOAT)) if score is not None else None
    full = nonempty = None
    if mask is not None:
        full, nonempty = tile_class(mask)
    fv = ir.free_vars(mask) if mask is not None else frozenset()
    key = ir.structural_hash(mask if mask is not None else "nomask", score if score is not None else "noscore",
                             tuple(b.key() for b in buffers), options, SPEC_VERSION)
    spec = KernelSpec(
        key=key, mask=mask, score=score, dscore=dscore, buffers=tuple(buffers),
        fwd_range=_range(mask, "kv"), bwd_range=_range(mask, "q"),
        tile_full=full, tile_nonempty=nonempty,
        data_dependent=mask is not None and is_data_dependent(mask),
        mask_uses_b="b" in fv, mask_uses_h="h" in fv, name=name, options=tuple(options))
    _CACHE[ck] = spec
    return spec
