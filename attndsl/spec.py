"""KernelSpec: everything codegen needs, nothing it must rediscover.

The fusion pass builds it from a trace; codegen renders it; the runtime keys its caches by
``spec.key`` (the structural hash of the IR and options). Shapes and lengths are not part of it:
one spec serves every batch, head count and sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .ir import Buffer, Node


@dataclass(frozen=True)
class VisitRange:
    """Closed-form visit range (IR over ``b, h, {other}_lo, {other}_hi, {target}_max``)."""

    target: str
    outer: tuple
    inner: tuple
    tile_check: bool


@dataclass(frozen=True)
class GradLoad:
    """A load of a learnable captured tensor inside score_mod, and ∂score_mod/∂(loaded value).

    ``scope`` says where its gradient can be reduced before it is written: "program" (index
    depends on b/h only: one scalar per program), "row" (index follows q: one vector per query
    tile), "exact" (the index is (..., q, kv) of distinct positions: written tile by tile with no
    atomics) or "scatter" (anything else: atomic adds).
    """

    load: Node
    grad: Node
    slot: int
    scope: str


@dataclass(frozen=True)
class KernelSpec:
    key: str
    mask: Node | None
    score: Node | None           # score_mod output as a function of the ``score`` variable
    dscore: Node | None          # ∂score_mod/∂score
    buffers: tuple[Buffer, ...]
    fwd_range: VisitRange        # kv range per q tile (forward, dQ)
    bwd_range: VisitRange        # q range per kv tile (dK/dV)
    tile_full: Node | None       # whole-tile "mask holds everywhere" over q_lo..q_hi, kv_lo..kv_hi
    tile_nonempty: Node | None   # whole-tile "mask may hold somewhere"
    data_dependent: bool         # needs a block table computed on the device
    mask_uses_b: bool
    mask_uses_h: bool
    name: str = "attn"
    options: tuple = field(default=())
    normalizer: str = "softmax"  # or "sigmoid": no row normalisation, no running maximum
    grad_loads: tuple = ()       # GradLoad entries: captured tensors that receive gradients

    @property
    def has_mask(self) -> bool:
        return self.mask is not None
