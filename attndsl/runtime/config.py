"""Tile policy, in one place: tile configurations chosen by head dim and backend; the forward's also
by how many programs a call launches (a small grid gets smaller tiles, so every multiprocessor holds
several programs) and by the pattern (with neither mask nor score modifier, taller tiles); the
smaller tiles a launch retries with when shared memory overflows; grid sections; the head-dim
constants every attention kernel takes; the gather and indexer kernels' tiles; and how the backward
computes dQ and delta (``atomic_dq``, ``delta_in_dq``)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .switches import Switch


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    #: the forward reads K/V tiles through tensor descriptors (TMA) where the tensors allow it
    #: (``launch.tma_ready``); the backward kernels ignore it
    tma: bool = False

    def smaller(self) -> "TileConfig | None":
        """A configuration that needs less shared memory, or None when none is left."""
        if self.num_stages > 1:
            return replace(self, num_stages=self.num_stages - 1)
        if self.block_n > 16:
            return replace(self, block_n=self.block_n // 2, num_stages=2)
        if self.block_m > 16:
            return replace(self, block_m=self.block_m // 2, num_stages=2)
        return None


@dataclass(frozen=True)
class Configs:
    fwd: TileConfig
    dkdv: TileConfig
    dq: TileConfig
    #: forward tiles for calls whose default grid is small (see ``forward_tiles``); None: always ``fwd``
    fwd_small: TileConfig | None = None
    #: forward tiles for patterns with neither mask nor score modifier (every tile full, no per-score
    #: work beyond the normaliser), when the grid is not small; None: ``fwd``
    fwd_wide: TileConfig | None = None
    #: how the portable backward computes dQ (:func:`atomic_dq` decides per call): "kernel", the dQ
    #: kernel (one program per query tile, seven matrix products per tile pair in all), or "atomic",
    #: added by the dK/dV kernel into a float32 buffer (five); ``dq``'s tiles serve the first only
    dq_mode: str = "kernel"

    def __post_init__(self):
        if self.dq_mode not in DQ_MODES:
            raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {self.dq_mode!r}")


#: the portable backward's ways of computing dQ (``Configs.dq_mode``)
DQ_MODES = ("kernel", "atomic")
#: the environment variable that forces the dQ mode: "1" atomic, "0" the dQ kernel, unset: the configs'.
#: Read on first use and kept (calls do not read the environment); ``enable_atomic_dq(None)`` reads it again
ATOMIC_DQ_ENV = "ATTNDSL_ATOMIC_DQ"
#: the switch of :func:`enable_atomic_dq` / ``ATTNDSL_ATOMIC_DQ`` (None: the configs' mode)
SWITCH = Switch(ATOMIC_DQ_ENV)


def enable_atomic_dq(on: bool | None) -> None:
    """Force the portable backward's dQ mode for this process: True adds dQ in the dK/dV kernel
    (atomic adds), False runs the dQ kernel, None follows ``ATTNDSL_ATOMIC_DQ`` as the environment
    says now (read here and kept) and then each runner's ``Configs.dq_mode`` (a tuned entry's, else
    "kernel"). Deterministic backwards always run the dQ kernel."""
    SWITCH.set(on)


def forced_dq_mode() -> str | None:
    """The dQ mode :func:`enable_atomic_dq` or ``ATTNDSL_ATOMIC_DQ`` forces, or None (the configs')."""
    on = SWITCH.get()
    return None if on is None else ("atomic" if on else "kernel")


#: the environment variable that, set to "0", has the atomic dQ mode add dQ one element per atomic
#: instead of one TMA reduce-add per tile (where TMA serves: an sm_90 GPU, or the interpreter)
TMA_DQ_ENV = "ATTNDSL_DQ_TMA"
#: the switch of :func:`enable_dq_tma` / ``ATTNDSL_DQ_TMA`` (None or True: TMA reduce-adds where they serve)
TMA_SWITCH = Switch(TMA_DQ_ENV)


def enable_dq_tma(on: bool | None) -> None:
    """The atomic dQ mode's adds: True or None (the default, or ``ATTNDSL_DQ_TMA`` unless "0") one TMA
    reduce-add of each dQ tile where tensor descriptors serve (``launch.tma_ready``), False one
    atomic add per element."""
    TMA_SWITCH.set(on)


def dq_tma() -> bool:
    """Does the atomic dQ mode add dQ tiles by TMA reduce-adds (where they serve)? See :func:`enable_dq_tma`."""
    return TMA_SWITCH.get() is not False


def atomic_dq(cfgs: Configs, deterministic: bool) -> bool:
    """Does a portable backward with configs ``cfgs`` add dQ in the dK/dV kernel (and skip the dQ
    kernel)? The one place this is decided (``Runner.backward`` and its prepared launches ask it
    per call): never for ``deterministic`` runs (float atomic adds land in any order); else the
    mode :func:`forced_dq_mode` says (``enable_atomic_dq``, then ``ATTNDSL_ATOMIC_DQ``), else
    ``cfgs.dq_mode``. Off by default until a GPU measurement says where it wins."""
    if deterministic:
        return False
    return (forced_dq_mode() or cfgs.dq_mode) == "atomic"


def delta_in_dq(softmax: bool, dlse, atomic: bool, hop: bool) -> bool:
    """Does the backward's dQ kernel compute delta itself (``DELTA_HERE``) and run first, with no
    delta launch? Where nothing needs delta before any dQ program: a softmax call without an lse
    gradient to subtract, whose dQ is neither added by the dK/dV kernel (``atomic``, the dQ mode's)
    nor beside the Hopper backward (``hop``), whose kernels read delta first."""
    return softmax and dlse is None and not atomic and not hop


#: a call whose default forward grid has at most this many programs per multiprocessor takes
#: ``fwd_small``. On an H100 (bf16, H=16, D=128, causal, programs in grid sections; BENCHMARKS.md)
#: 64x64 tiles with 4 warps beat 128x64 with 8 at L=4096 (3.9 programs per SM: softmax 0.153 vs
#: 0.168 ms, sigmoid 0.168 vs 0.210) and lose at L=8192 (7.8 per SM: sigmoid 0.504 vs 0.482,
#: softmax 0.570 vs 0.553, GQA within 1%). Before grid sections the small tiles also won at 8192
SMALL_GRID_PER_SM = 4


def forward_tiles(cfgs: Configs, n_programs: int, n_sms: int) -> tuple[str, TileConfig]:
    """The forward's tiles for a call launching ``n_programs`` with the default tiles."""
    if cfgs.fwd_small is not None and n_programs <= SMALL_GRID_PER_SM * n_sms:
        return "fwd_small", cfgs.fwd_small
    if cfgs.fwd_wide is not None:
        return "fwd_wide", cfgs.fwd_wide
    return "fwd", cfgs.fwd


def retry_tiles(cfg: TileConfig, planned: bool) -> TileConfig | None:
    """The configuration to retry a launch with after a shared-memory overflow, or None (give up).
    ``planned``: the kernel's visit plans (layout box plans, ``spec.tiles``) were built for these
    tile sizes, so only the stages may shrink."""
    smaller = cfg.smaller()
    if smaller is not None and planned and (smaller.block_m, smaller.block_n) != (cfg.block_m, cfg.block_n):
        return None
    return smaller


@functools.lru_cache(maxsize=None)
def device_properties(index: int):
    """A CUDA device's properties, asked once (the launch path consults them on every call)."""
    return torch.cuda.get_device_properties(index)


def multiprocessors(device: torch.device, interpret: bool) -> int:
    """Multiprocessors of ``device`` (the interpreter counts as one)."""
    if interpret or device.type != "cuda":
        return 1
    return device_properties(device.index).multi_processor_count


def grid_section(device: torch.device, interpret: bool, n_heads: int, bytes_per_head: int) -> int:
    """Heads per section of a grid over ``n_heads`` rows (batch*head) on ``device`` whose programs
    each read ``bytes_per_head`` of their head (``section``; the interpreter's is fixed)."""
    if interpret or device.type != "cuda":
        return INTERPRETER_SECTION
    return section(bytes_per_head, device_properties(device.index).L2_cache_size, n_heads)


def for_pattern(cfgs: Configs, has_mask: bool, has_score_mod: bool, data_dependent: bool) -> Configs:
    """The configurations a pattern may use. Wide forward tiles only without mask or score modifier:
    on an H100 (bf16, H=16, D=128; BENCHMARKS.md) 256x64 tiles ran no-mask forwards 2-8% faster
    than 128x64 (dense L=8192 to 32768, Lq != Lkv, sinks, sigmoid, low-rank bias), but a score
    modifier's per-score work made them 7-15% slower (ALiBi, T5 buckets), and causal or sliding-
    window masks 4-11% slower (the diagonal band's partial tiles are twice as tall). Block tables
    are built once for the forward's tiles, so data-dependent masks keep one configuration."""
    if has_mask or has_score_mod:
        cfgs = replace(cfgs, fwd_wide=None)
    if data_dependent:
        cfgs = replace(cfgs, fwd_small=None, fwd_wide=None)
    return cfgs


#: heads per section of the grid (``codegen/module.py: _program_tile``): at most as many as keep the
#: rows that the section's programs read together (K/V in the forward and dQ, Q/dO in dK/dV) within
#: this share of the L2. On an H100 (50 MB; bf16, D=128, causal; BENCHMARKS.md) sections of 8 heads
#: at L=4096, 4 at 8192 and 2 at 16384 were the fastest or within noise of it, and 16 heads at 16384
#: lost 2-6% (the rows of the section no longer fit)
SECTION_L2_SHARE = 1 / 3
#: the interpreter's section: 3 heads, so that CPU tests with 4 or 8 heads cover a ragged last one
INTERPRETER_SECTION = 3


def section(bytes_per_head: int, l2_bytes: int, n_heads: int) -> int:
    """Heads per section of a grid over ``n_heads`` (batch*head) rows of programs that each read
    ``bytes_per_head`` of their head. Sections are balanced: a short last section would start the
    long tiles of its heads late, the tail that sections are there to avoid."""
    most = max(1, int(l2_bytes * SECTION_L2_SHARE) // max(1, bytes_per_head))
    n_sections = -(-n_heads // most)
    return -(-n_heads // n_sections)


def block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


@dataclass(frozen=True)
class HeadDims:
    """The head dims of a runner's kernels and their tiles: query/key ``head_dim`` in one power-of-two
    part ``bd`` or two (``bd`` + ``bd2``, ``split_head_dim``), value ``head_dim_v`` in ``bdv``."""

    head_dim: int
    head_dim_v: int

    @functools.cached_property
    def tiles(self) -> tuple[int, int, int]:
        return (*split_head_dim(self.head_dim), block_d(self.head_dim_v))

    @property
    def even(self) -> bool:
        """Both head dims fill their tiles: full rows load without a column mask (EVEN_KV, EVEN_Q)."""
        bd, bd2, bdv = self.tiles
        return self.head_dim == bd + bd2 and self.head_dim_v == bdv

    def consts(self, dtype: torch.dtype, interpret: bool) -> dict:
        """The constants every attention kernel (dense and gather) takes for inputs of ``dtype``: head
        dims, their tiles, bf16 dot upcast in the interpreter (its bf16 ``tl.dot`` is wrong) and the
        dot precision (exact for float32/float64 inputs, TF32 otherwise)."""
        bd, bd2, bdv = self.tiles
        return dict(HEAD_D=self.head_dim, BLOCK_D=bd, HAS_D2=bd2 > 0, BLOCK_D2=max(bd2, 16), HEAD_DV=self.head_dim_v,
                    BLOCK_DV=bdv, UPCAST=interpret and dtype == torch.bfloat16,
                    DOT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32")


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """The query/key head dim's tiles: ``(BLOCK_D, BLOCK_D2)``, a power-of-two first part and, where
    it multiplies fewer zeros than padding to the next power of two, a narrower second part
    (``BLOCK_D2`` 0: none). 192 = 128 + 64 where padding would give 256 (a quarter zeros); 24 stays
    32, as a second part is 16 wide at least (the smallest matrix-multiply depth)."""
    padded = block_d(head_dim)
    first = max(16, 1 << (head_dim.bit_length() - 1))
    if first >= head_dim:
        return padded, 0
    second = block_d(head_dim - first)
    return (first, second) if first + second < padded else (padded, 0)


def choose(head_dim: int, interpret: bool, block_m: int | None = None, block_n: int | None = None,
           num_warps: int | None = None, num_stages: int | None = None, element_size: int = 2,
           head_dim_v: int | None = None) -> Configs:
    """Heuristic tiles. On the interpreter small tiles keep CPU tests fast and multi-tile.
    ``element_size``: bytes per input element; float32 tiles at head dims over 128 start small, as
    the 16-bit ones would overflow shared memory and fall back one compile at a time.
    ``head_dim_v``: the value head dim (default ``head_dim``); tiles follow the wider of the two,
    but wide query/key heads with value heads of 128 or less (MLA) have their own."""
    if interpret:
        # TMA through the interpreter too, so the CPU suite runs that path (tests cover the other)
        bm, bn = block_m or 32, block_n or 32
        c = TileConfig(bm, bn, 4, 1, tma=True)
        return Configs(c, c, c)
    # measured on an H100 (bf16, L=16384, H=16; see BENCHMARKS.md): forward 128x64, 8 warps, 3 stages;
    # dK/dV over 128 keys x 64 queries; dQ over 128 queries x 64 keys. The forward's K/V through
    # TMA: 2% faster (softmax) and 5% (sigmoid) at L=16384, but 3% slower with the small grid's
    # 64x64 tiles at 4096 (BENCHMARKS.md)
    dv = block_d(head_dim if head_dim_v is None else head_dim_v)
    d = max(block_d(head_dim), dv)
    small = wide = None
    if d <= 128:
        fwd, dkdv, dq = TileConfig(128, 64, 8, 3, tma=True), TileConfig(64, 128, 8, 3), TileConfig(128, 64, 8, 3)
        small = TileConfig(64, 64, 4, 3)
        # measured at D=128 only (BENCHMARKS.md); smaller head dims keep 128-row tiles
        wide = TileConfig(256, 64, 8, 3, tma=True) if d == 128 else None
    else:
        # head dims 129-256 (tiles 256 wide), measured on an H100 at D=256 (bf16, L=16384; BENCHMARKS.md):
        # forward 128x64 with 8 warps and K/V through TMA, dK/dV over 64 keys x 64 queries, dQ over
        # 128 queries x 64 keys took 8.1 / 57 ms (dense, fwd / fwd+bwd) where 64x32 with 4 warps and
        # 32x32 backward tiles took 10.8 / 128
        fwd, dkdv, dq = TileConfig(128, 64, 8, 2, tma=True), TileConfig(64, 64, 8, 2), TileConfig(128, 64, 8, 2)
        if dv <= 128:
            # MLA-style heads (query/key over 128, value 128 or less), measured at 192/128 (H100, bf16,
            # L=16384; BENCHMARKS.md): the narrower V tiles leave room for a third forward stage
            # (forward 0.77-0.82x) and dK/dV over 128 keys x 32 queries (forward+backward 0.70-0.72x)
            fwd, dkdv = TileConfig(128, 64, 8, 3, tma=True), TileConfig(32, 128, 8, 2)
        if element_size > 2:
            fwd, dkdv, dq = TileConfig(64, 32, 4, 2), TileConfig(32, 32, 4, 1), TileConfig(32, 32, 4, 1)
    if block_m or block_n or num_warps or num_stages:
        small = wide = None  # the caller's tiles hold for every call
        fwd = replace(fwd, block_m=block_m or fwd.block_m, block_n=block_n or fwd.block_n,
                      num_warps=num_warps or fwd.num_warps, num_stages=num_stages or fwd.num_stages)
    if block_m or block_n:
        dkdv = replace(dkdv, block_m=block_m or dkdv.block_m, block_n=block_n or dkdv.block_n)
        dq = replace(dq, block_m=block_m or dq.block_m, block_n=block_n or dq.block_n)
    return Configs(fwd, dkdv, dq, small, wide)


# -- the gather (token selector) and indexer kernels -----------------------------------------
@dataclass(frozen=True)
class GatherConfig:
    """Slots per chunk of the gather kernels and their launch options."""

    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def gather_config(head_dim: int, interpret: bool, block_n: int | None = None) -> GatherConfig:
    """Slots per chunk and launch options (``block_n``: the ``attndsl.compile(block_n=...)`` override)."""
    if block_n:
        return replace(gather_config(head_dim, interpret), block_n=int(block_n))
    if interpret:
        return GatherConfig(64, 4, 1)
    d = block_d(head_dim)
    return GatherConfig(64 if d <= 128 else 32, 4, 2)


def indexer_tiles(interpret: bool) -> tuple[int, int]:
    """(query rows, keys) per program of the lightning indexer: large on the interpreter, where
    programs are costly."""
    return (256, 512) if interpret else (64, 64)
