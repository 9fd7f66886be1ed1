"""Fusion: mask + score modifier (+ later layouts, selectors, normalisers) → one KernelSpec."""
from __future__ import annotations

import dataclasses
import weakref

from .. import ir
from ..ir import Node
from ..spec import GradLoad, KernelSpec, VisitRange
from .block_analysis import is_data_dependent, tile_class, tile_range
from .box_analysis import box_plans
from .diagonal import diagonal_index
from .grad import derivative
from .lower import lower
from .simplify import simplify
from .uniform import uniform_loads

SPEC_VERSION = 2  # bump when the meaning of a spec (and so of generated code) changes
_CACHE: dict = {}


def _range(mask, target) -> VisitRange:
    other = "q" if target == "kv" else "kv"
    if mask is None:
        t_max = ir.var(f"{target}_max")
        return VisitRange(target, (ir.const(0), t_max), (ir.const(0), t_max), False)
    tr = tile_range(mask, target)
    return VisitRange(target, tr.outer, tr.inner, tr.tile_check)


def _scope(load: Node) -> str:
    """Where the gradient of one learnable load can be reduced (see GradLoad)."""
    fv = ir.free_vars(load)
    if not fv & {"q", "kv"}:
        return "program"
    if "kv" not in fv:
        return "row"
    if "q" not in fv:
        return "col"
    args = load.args
    if all(a.op == "var" for a in args) and len({a.attr for a in args}) == len(args) and {"q", "kv"} <= fv:
        return "exact"
    return "scatter"


def grad_loads(score: Node | None, learnable: frozenset) -> tuple:
    """∂score_mod/∂(each load of a learnable captured tensor), derived on the IR."""
    if score is None or not learnable:
        return ()
    out = []
    for ld in ir.loads([score]):
        if ld.attr[0] in learnable and ld.dtype == ir.FLOAT:
            scope = _scope(ld)
            diagonal = diagonal_index(ld) if scope == "scatter" else None
            out.append(GradLoad(ld, derivative(score, ld), ld.attr[0], scope, diagonal))
    return tuple(out)


def run_lowering(spec: KernelSpec) -> KernelSpec:
    """``spec`` with its lowering decisions recorded (``passes/lower.py``): the last pass."""
    return dataclasses.replace(spec, lowering=lower(spec))


def build_spec(mask: Node | None, score: Node | None, buffers, name="attn", options=(),
               normalizer="softmax", learnable=frozenset(), tiles=None) -> KernelSpec:
    """Run the passes on traced IR and assemble the KernelSpec (memoised by IR identity).

    ``learnable``: slots of captured tensors (read by score_mod) that receive gradients.
    ``tiles``: requested ``(block_m, block_n)`` (entries may be None); a mask on layout
    coordinates gets box visit plans built for these tile sizes (or for sizes the layout picks),
    recorded in ``spec.tiles``."""
    if normalizer not in ("softmax", "sigmoid"):
        raise ValueError(f"normalizer must be 'softmax' or 'sigmoid', got {normalizer!r}")
    learnable = frozenset(learnable)
    tiles = tuple(tiles) if tiles is not None else (None, None)
    ck = (mask, score, tuple(b.key() for b in buffers), name, options, normalizer, learnable, tiles)
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
    data_dependent = mask is not None and is_data_dependent(mask)
    fwd_range, bwd_range, box_tiles = _range(mask, "kv"), _range(mask, "q"), None
    dq_range = bwd_tiles = dq_tiles = None
    if mask is not None and not data_dependent:
        boxes = box_plans(mask, *tiles)
        if boxes is not None:
            fwd_range, bwd_range, dq_range, box_tiles, bwd_tiles, dq_tiles = boxes
    key = ir.structural_hash(mask if mask is not None else "nomask", score if score is not None else "noscore",
                             tuple(b.key() for b in buffers), options, normalizer, sorted(learnable), SPEC_VERSION,
                             *(("tiles", box_tiles, bwd_tiles, dq_tiles),) if box_tiles else ())
    spec = KernelSpec(
        key=key, mask=mask, score=score, dscore=dscore, buffers=tuple(buffers),
        fwd_range=fwd_range, bwd_range=bwd_range,
        tile_full=full, tile_nonempty=nonempty,
        data_dependent=data_dependent,
        mask_uses_b="b" in fv, mask_uses_h="h" in fv, name=name, options=tuple(options),
        normalizer=normalizer, grad_loads=grad_loads(score, learnable), tiles=box_tiles,
        dq_range=dq_range, bwd_tiles=bwd_tiles, dq_tiles=dq_tiles, uniform_loads=uniform_loads(score))
    spec = run_lowering(spec)
    _CACHE[ck] = spec
    return spec
