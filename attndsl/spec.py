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
class ExtraRange:
    """A 1-D visit range over target positions outside a layout's grid (prefix/suffix tokens),
    with that region's own per-tile classification when ``range.tile_check``."""

    range: VisitRange
    tile_full: Node | None = None
    tile_nonempty: Node | None = None


@dataclass(frozen=True)
class VisitBox:
    """Visit plan over layout coordinates (``passes/box_analysis.py``, ``codegen/box.py``).

    Per tile of the other index, the target tiles to visit are a box in the tile coordinates of
    the layout grid, plus 1-D ranges (``extras``) for target positions outside the grid. Ranges
    are inclusive, per axis, IR over ``b, h``, the other tile's ``{other}_lo/_hi`` and its
    coordinate box ``{other}_c{a}_lo/_hi`` (or the exact ``{other}_c{a}`` where ``other_shape[a]
    == 1``). The kernel tile sizes are part of the plan: ``block`` target tokens per tile (a box
    of ``tile_shape`` grid points), ``other_block`` tokens per other tile (``other_shape``).
    """

    target: str
    grid: tuple                  # (shape, tile, prefix) of the layout (ir/coords.py Grid)
    block: int
    other_block: int
    tile_shape: tuple
    other_shape: tuple
    box_outer: tuple             # per axis (lo, hi): coordinates the mask may allow
    box_inner: tuple             # per axis (lo, hi): coordinates allowed for every row of the tile
    tile_check: bool             # tiles of the outer box may be empty: classify each one
    tile_full: Node | None       # per target tile, over {target}_c{a}_lo/_hi (when tile_check)
    tile_nonempty: Node | None
    extras: tuple = ()           # ExtraRange per non-grid region of the target
    mask: Node | None = None     # the mask on coordinates, target inside the grid (explain, tile maps)
    exact_check: bool = False    # the interval classification can miss empty tiles (residues of a
    #                              coordinate, as with dilation): also test the mask on the tile
    flat: VisitRange | None = None  # the 1-D analysis of the same mask (one contiguous hull)

    @property
    def outer(self):
        """The 1-D outer range (``flat``), for code that treats every plan as a VisitRange."""
        return self.flat.outer

    @property
    def inner(self):
        return self.flat.inner


@dataclass(frozen=True)
class GradLoad:
    """A load of a learnable captured tensor inside score_mod, and ∂score_mod/∂(loaded value).

    ``scope`` says where its gradient can be reduced before it is written: "program" (index
    depends on b/h only: one scalar per program), "row" (index follows q: one vector per query
    tile), "exact" (the index is (..., q, kv) of distinct positions: written tile by tile with no
    atomics) or "scatter" (anything else: atomic adds).

    ``diagonal``: for a "scatter" load whose index depends on q and kv only through ``q - kv``
    (a relative-position table), that index as IR over ``dist = q - kv``; its gradient is summed
    per diagonal of a tile (``passes/diagonal.py``).
    """

    load: Node
    grad: Node
    slot: int
    scope: str
    diagonal: tuple | None = None


@dataclass(frozen=True)
class Param:
    """One kernel parameter: ``kind`` is "tensor" (a pointer), "int", "float" or "constexpr"."""

    name: str
    kind: str


@dataclass(frozen=True)
class Lowering:
    """Decisions codegen and the runtime both read (``passes/lower.py`` makes them)."""

    additive: Node | None = None   # R when score_mod is score + R (a bias): one multiply-add per score
    fwd_runs: bool = False         # constant-run loops (codegen/runs.py) in the forward,
    bwd_runs: bool = False         # ... the dK/dV kernel
    dq_runs: bool = False          # ... and the dQ kernel
    run_folds: bool = False        # the forward's run loop folds scale and the run's bias into exp2
    dq_whole_range: bool = False   # dQ visits its whole closed-form range (GL{i}_ZERO_FILL possible)
    binned: tuple = ()             # per grad load: the dim its gather gradient is binned along, or None
    max_bins: int = 256            # a binned dim has at most this many entries ...
    bin_piece: int = 64            # ... summed in pieces of at most this many bins
    load_stages: tuple = ()        # (load, "program" | "row" | "col" | "pair") per captured load of the mask
    required_length: int = 0       # Lq and Lkv must be at least this (a layout's box plan covers its whole grid)
    signatures: tuple = ()         # ((kernel, (Param, ...)), ...): each kernel's parameters in order

    def signature(self, kernel: str) -> tuple:
        """The parameters of ``kernel`` ("fwd", "bwd_dq", "gather_bwd", "table", ...)."""
        for k, params in self.signatures:
            if k == kernel:
                return params
        raise KeyError(f"no kernel {kernel!r} in this spec (have {[k for k, _ in self.signatures]})")


@dataclass(frozen=True)
class KernelSpec:
    key: str
    mask: Node | None
    score: Node | None           # score_mod output as a function of the ``score`` variable
    dscore: Node | None          # ∂score_mod/∂score
    buffers: tuple[Buffer, ...]
    fwd_range: VisitRange        # kv range per q tile (forward, dQ); a VisitBox for layout masks
    bwd_range: VisitRange        # q range per kv tile (dK/dV); a VisitBox for layout masks
    tile_full: Node | None       # whole-tile "mask holds everywhere" over q_lo..q_hi, kv_lo..kv_hi
    tile_nonempty: Node | None   # whole-tile "mask may hold somewhere"
    data_dependent: bool         # needs a block table computed on the device
    mask_uses_b: bool
    mask_uses_h: bool
    name: str = "attn"
    options: tuple = field(default=())
    normalizer: str = "softmax"  # or "sigmoid": no row normalisation, no running maximum
    grad_loads: tuple = ()       # GradLoad entries: captured tensors that receive gradients
    tiles: tuple | None = None   # (block_m, block_n) the visit plans were built for (VisitBox), else None
    dq_range: VisitRange | None = None  # kv range per q tile for dQ when its tiles differ from the forward's
    bwd_tiles: tuple | None = None      # (block_m, block_n) of the dK/dV box plan (VisitBox), else None
    dq_tiles: tuple | None = None       # (block_m, block_n) of the dQ box plan (VisitBox), else None
    uniform_loads: tuple = ()    # UniformLoad entries (passes/uniform.py): loads tested for one entry per tile
    #: integer nodes of this spec's IR computed in int64 (passes/int_width.py: their value can leave
    #: int32 at some batch/head/length below 2**30); every other integer node is int32
    wide_ints: frozenset = frozenset()
    lowering: Lowering = field(default_factory=Lowering)  # passes/lower.py, set by build_spec

    @property
    def has_mask(self) -> bool:
        return self.mask is not None

    @property
    def learnable_slots(self) -> frozenset:
        """The captured tensors that get gradients (a tensor read only by the mask never does)."""
        return frozenset(gl.slot for gl in self.grad_loads)
