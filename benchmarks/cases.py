"""Benchmark cases: the masks and score modifiers of DESIGN.md's anchor table.

Each case is written as plain FlexAttention-style lambdas with the same definitions as
``shared/bench/flex_anchors.py``, so the harness does not depend on ``patterns/`` and ours
and FlexAttention are handed the very same function objects.

A :class:`Case` is a recipe; ``case.build(L=..., H=..., device=..., seed=...)`` returns a
:class:`CaseInstance` holding the functions (and the tensors they capture) for one
sequence length.  New cases (neighborhood, sliding tile, radial, DSA, ...) are added with
:func:`register_case`; nothing else in the harness needs to change.  Cases whose layout
fixes the sequence length set ``fixed_L`` (the harness then ignores ``--L``), and
``small_L`` picks the size of the float64-reference check (the default 256 is too short to
see a 1024-token window, hence the overrides below).
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class CaseInstance:
    """The functions of one case at one size.  ``mask_mod is None`` means dense."""

    mask_mod: Optional[Callable] = None
    score_mod: Optional[Callable] = None
    # SDPA can serve the pattern: None (no), "dense" or "causal"
    sdpa: Optional[str] = None
    # the mask reads b or h: create_block_mask / density must then see every (b, h)
    mask_uses_bh: bool = False
    # extra keyword arguments for attndsl.compile / for each call of the compiled attention
    compile_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    call_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: str = ""
    # index selectors (DSA): ours compiles this mask instead of ``mask_mod`` (SAME: the same one),
    # FlexAttention runs only where ``flex`` (its dense mask fits), and ``density`` replaces
    # evaluating ``mask_mod`` over every (q, k) pair
    ours_mask_mod: Any = "same"
    flex: bool = True
    density: Optional[float] = None


@dataclasses.dataclass
class Case:
    name: str
    description: str
    build_fn: Callable[..., CaseInstance]
    fixed_L: Optional[int] = None
    small_L: int = 256
    # which keyword arguments build_fn understands is up to it; the harness passes
    # L, H, device and seed (all keyword)

    def build(self, *, L: int, H: int, device, seed: int = 0) -> CaseInstance:
        return self.build_fn(L=L, H=H, device=device, seed=case_seed(self.name, seed))


CASES: Dict[str, Case] = {}


def register_case(case: Case, *, replace: bool = False) -> Case:
    if case.name in CASES and not replace:
        raise ValueError(f"benchmark case {case.name!r} is already registered")
    CASES[case.name] = case
    return case


def case_names() -> List[str]:
    return list(CASES)


def get_case(name: str) -> Case:
    try:
        return CASES[name]
    except KeyError:
        raise KeyError(f"unknown benchmark case {name!r}; known: {', '.join(CASES)}") from None


def case_seed(name: str, seed: int) -> int:
    """A seed that depends on the case name, not on the order cases run in."""
    return (zlib.crc32(name.encode()) + 1_000_003 * int(seed)) % (2**31)


def _generator(device, seed: int) -> torch.Generator:
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    return g


# ---------------------------------------------------------------------------------------
# the cases of DESIGN.md's anchor table (same definitions as flex_anchors.py)
# ---------------------------------------------------------------------------------------

def _dense(**_):
    return CaseInstance(mask_mod=None, score_mod=None, sdpa="dense")


def _causal(**_):
    causal = lambda b, h, q, k: q >= k  # noqa: E731
    return CaseInstance(mask_mod=causal, sdpa="causal")


def _sliding_window(W):
    def build(**_):
        return CaseInstance(mask_mod=lambda b, h, q, k: (q >= k) & (q - k < W))
    return build


def document_ids(L: int, device, seed: int, n_docs: int = 16) -> torch.Tensor:
    """flex_anchors.py's construction: 15 random cut points, cumulative sum (<= 16 docs)."""
    g = _generator(device, seed)
    cuts = torch.sort(torch.randint(1, L, (n_docs - 1,), device=device, generator=g)).values
    doc = torch.zeros(L, dtype=torch.int32, device=device)
    doc[cuts] = 1
    return torch.cumsum(doc, 0)


def _document_causal(*, L, device, seed, **_):
    doc = document_ids(L, device, seed)
    return CaseInstance(mask_mod=lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k),
                        notes=f"{int(doc[-1].item()) + 1} documents")


def _prefix_lm(n):
    def build(**_):
        return CaseInstance(mask_mod=lambda b, h, q, k: (k <= n) | (q >= k))
    return build


def alibi_slopes_anchor(H: int, device) -> torch.Tensor:
    """flex_anchors.py's slopes ``exp2(-8 * [1..16] / 16)``, generalised to H heads."""
    return torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H)


def _alibi_causal(*, H, device, **_):
    slopes = alibi_slopes_anchor(H, device)
    return CaseInstance(mask_mod=lambda b, h, q, k: q >= k,
                        score_mod=lambda s, b, h, q, k: s - slopes[h] * (q - k))


def _softcap_causal(**_):
    return CaseInstance(mask_mod=lambda b, h, q, k: q >= k,
                        score_mod=lambda s, b, h, q, k: 30.0 * torch.tanh(s / 30.0))


register_case(Case("dense", "no mask (SDPA, FlexAttention without block mask)", _dense))
register_case(Case("causal", "q >= k", _causal))
register_case(Case("sliding_window_1024", "causal, q - k < 1024", _sliding_window(1024),
                   small_L=2048))
register_case(Case("document_causal", "16 random-length documents, causal",
                   _document_causal))
register_case(Case("prefix_lm_2048", "k <= 2048 or causal", _prefix_lm(2048), small_L=3072))
register_case(Case("alibi_causal", "causal + ALiBi bias s - slope[h]*(q-k)", _alibi_causal))
register_case(Case("softcap_causal", "causal + 30*tanh(s/30)", _softcap_causal))

DEFAULT_CASES = ["dense", "causal", "sliding_window_1024", "document_causal",
                 "prefix_lm_2048", "alibi_causal", "softcap_causal"]
QUICK_CASES = ["causal", "sliding_window_1024", "document_causal"]

# ---------------------------------------------------------------------------------------
# DSA (issue 4): token top-k selection against FlexAttention with the equivalent dense mask
# ---------------------------------------------------------------------------------------
SAME = "same"
#: FlexAttention gets the selection as a dense [L, L] boolean tensor only up to this length
#: (1 GiB at 32768); beyond it only ours runs.
DSA_FLEX_MAX_L = 32768


def _dsa_topk(topk: int):
    def build(*, L, device, seed, **_):
        from attndsl.selectors import dense_selection_mask, random_causal_indices
        idx = random_causal_indices(L, topk, device=device, seed=seed)  # [1, 1, L, topk]
        n = int((idx >= 0).sum().item())
        inst = CaseInstance(ours_mask_mod=None, flex=L <= DSA_FLEX_MAX_L, density=n / (L * L),
                            call_kwargs=dict(indices=idx, check_indices=False),
                            notes=f"top-{topk} causal selection shared by all heads (G=1); "
                                  + ("flex: dense bool mask" if L <= DSA_FLEX_MAX_L else
                                     f"no flex: an [L, L] mask does not fit beyond L={DSA_FLEX_MAX_L}"))
        if inst.flex:
            sel = dense_selection_mask(idx, L)[0, 0]
            inst.mask_mod = lambda b, h, q, k: sel[q, k]
        return inst
    return build


register_case(Case("dsa_topk1024", "DSA: each query attends its top-1024 of random causal scores "
                   "(ours: indices=, Flex: dense bool mask); use --Hkv 1 for DSA's shared KV head",
                   _dsa_topk(1024), small_L=2048))
register_case(Case("dsa_topk2048", "DSA: top-2048 (DeepSeek-V3.2's k) of random causal scores",
                   _dsa_topk(2048), small_L=4096))
DSA_CASES = ["dsa_topk1024", "dsa_topk2048"]
#: the issue-4 runs: lengths 8192, 32768, 131072, forward and backward, e.g.
#: python -m benchmarks --cases dsa_topk1024 --L 8192,32768,131072 --Hkv 1 --bwd
DSA_LENGTHS = [8192, 32768, 131072]


# ---------------------------------------------------------------------------------------
# issue 3: locality patterns on layouts (patterns/neighborhood.py, sliding_tile.py, radial.py)
# ---------------------------------------------------------------------------------------
# The masks are the pattern files' own functions: tile-major layouts for ours *and* Flex (the
# same function objects; Flex's block mask then also profits from the token order). The sizes of
# DESIGN.md's anchor table are fixed by the layouts; the float64 reference check runs a smaller
# instance of the same pattern (``small_L`` below picks it).

def _natten2d_k13(*, L, **_):
    import math

    from attndsl import Layout
    from attndsl.patterns.neighborhood import neighborhood
    side = math.isqrt(L)
    if side * side != L or side % 8 or side < 13:
        raise ValueError(f"natten2d needs a square image of 8x8 tiles, side >= 13; L={L}")
    lay = Layout((side, side), tile=(8, 8))
    return CaseInstance(mask_mod=neighborhood(lay, 13), compile_kwargs=dict(block_m=128, block_n=64),
                        notes=f"{side}x{side} image, 8x8 tile-major layout, query tiles 8x16, key tiles 8x8")


def _sta3d(*, L, **_):
    from attndsl.patterns.sliding_tile import sliding_tile_3d
    shapes = {16384: (16, 32, 32), 6912: (12, 24, 24)}
    if L not in shapes:
        raise ValueError(f"sta3d runs at L in {sorted(shapes)}")
    lay, mask = sliding_tile_3d(shapes[L], (4, 8, 8), (3, 3, 3))
    return CaseInstance(mask_mod=mask, compile_kwargs=dict(block_m=128, block_n=128),
                        notes=f"video {shapes[L]}, STA tiles 4x8x8 (tile-major), window 3x3x3 tiles; all visited tiles full")


def _radial(*, L, device, **_):
    from attndsl.patterns.radial import radial, radial_via_tables
    F = 16 if L >= 16384 else 4
    if L % F or (L // F) % 128:
        raise ValueError(f"radial needs frames of a multiple of 128 tokens; L={L}")
    N = L // F
    return CaseInstance(mask_mod=radial_via_tables(F, N, device=device), ours_mask_mod=radial(F, N),
                        compile_kwargs=dict(block_m=128, block_n=64),
                        notes=f"{F} frames x {N} tokens, hunyuan, decay 1; ours traces bit_length, Flex reads "
                              "the same mask from per-distance tables")


register_case(Case("natten2d_128x128_k13", "2-D neighborhood attention (NATTEN), 128x128 image, kernel 13",
                   _natten2d_k13, fixed_L=128 * 128, small_L=32 * 32))
register_case(Case("sta3d_16x32x32_tile4x8x8_win3", "sliding tile attention, 16x32x32 video, tile 4x8x8, "
                   "window 3x3x3 tiles", _sta3d, fixed_L=16384, small_L=6912))
register_case(Case("radial_16x1024", "radial attention, 16 frames x 1024 tokens (exact element mask)",
                   _radial, fixed_L=16384, small_L=4096))
LOCALITY_CASES = ["natten2d_128x128_k13", "sta3d_16x32x32_tile4x8x8_win3", "radial_16x1024"]
