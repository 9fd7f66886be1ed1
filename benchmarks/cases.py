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
    # keyword arguments of the float64 reference besides mask_mod/score_mod (normalizer,
    # bias_factors, ...); ``lse``: the call can return a logsumexp (not for sigmoid attention)
    ref_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    lse: bool = True
    # tensors besides q, k, v that receive gradients in forward+backward (learnable tables,
    # low-rank factors): their .grad is reset between timed calls
    leaves: tuple = ()
    # SDPA for patterns it serves in a form of its own: ``sdpa_fn(q, k, v) -> out`` (used when
    # ``sdpa`` is None), e.g. the low-rank bias as extra head dims
    sdpa_fn: Optional[Callable] = None


@dataclasses.dataclass
class Case:
    name: str
    description: str
    build_fn: Callable[..., CaseInstance]
    fixed_L: Optional[int] = None
    small_L: int = 256
    # which keyword arguments build_fn understands is up to it; the harness passes
    # L, H, device, seed and B (all keyword)
    #: a model-shaped case fixes its whole shape: dict(B=, H=, Hkv=, L=, D=) (``--L/--D/--H/--B`` do
    #: not apply to it)
    shape: Optional[Dict[str, int]] = None
    #: the pattern family, for grouping the table in BENCHMARKS.md
    family: str = "mask"
    #: "attention": one attention call; "block": a torch.compile'd transformer block (harness.run_block_case)
    runner: str = "attention"
    #: per-case limit in seconds (default: --case-timeout-s)
    timeout_s: Optional[float] = None

    #: the case's KV heads when --Hkv is not given (DSA: one KV head shared by every query head)
    default_hkv: Optional[int] = None

    def build(self, *, L: int, H: int, device, seed: int = 0, B: int = 1,
              dtype: torch.dtype = torch.float32) -> CaseInstance:
        """The case at one size; ``dtype`` is the call's (tensors the call takes besides q/k/v use it)."""
        return self.build_fn(L=L, H=H, B=B, device=device, dtype=dtype, seed=case_seed(self.name, seed))


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


register_case(Case("dense", "no mask (SDPA, FlexAttention without block mask)", _dense, family="dense/causal"))
register_case(Case("causal", "q >= k", _causal, family="dense/causal"))
register_case(Case("sliding_window_1024", "causal, q - k < 1024", _sliding_window(1024),
                   small_L=2048))
register_case(Case("document_causal", "16 random-length documents, causal",
                   _document_causal))
register_case(Case("prefix_lm_2048", "k <= 2048 or causal", _prefix_lm(2048), small_L=3072))
register_case(Case("alibi_causal", "causal + ALiBi bias s - slope[h]*(q-k)", _alibi_causal, family="score mod"))
register_case(Case("softcap_causal", "causal + 30*tanh(s/30)", _softcap_causal, family="score mod"))

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
    def build(*, L, device, seed, B=1, **_):
        from attndsl.selectors import dense_selection_mask, random_causal_indices
        idx = random_causal_indices(L, topk, B=B, device=device, seed=seed)  # [B, 1, L, topk]
        n = int((idx >= 0).sum().item())
        inst = CaseInstance(ours_mask_mod=None, flex=L <= DSA_FLEX_MAX_L, density=n / (B * L * L),
                            call_kwargs=dict(indices=idx, check_indices=False),
                            notes=f"top-{topk} causal selection shared by all heads (G=1); "
                                  + ("flex: dense bool mask" if L <= DSA_FLEX_MAX_L else
                                     f"no flex: an [L, L] mask does not fit beyond L={DSA_FLEX_MAX_L}"))
        if inst.flex:
            sel = dense_selection_mask(idx, L)[:, 0]  # [B, L, L]
            if B == 1:
                sel = sel[0]
                inst.mask_mod = lambda b, h, q, k: sel[q, k]
            else:
                inst.mask_mod = lambda b, h, q, k: sel[b, q, k]
                inst.mask_uses_bh = True
        return inst
    return build


register_case(Case("dsa_topk1024", "DSA: each query attends its top-1024 of random causal scores "
                   "(ours: indices=, Flex: dense bool mask); one KV head unless --Hkv is given",
                   _dsa_topk(1024), small_L=2048, family="selector", default_hkv=1))
register_case(Case("dsa_topk2048", "DSA: top-2048 (DeepSeek-V3.2's k) of random causal scores",
                   _dsa_topk(2048), small_L=4096, family="selector", default_hkv=1))
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
                   _natten2d_k13, fixed_L=128 * 128, small_L=32 * 32, family="locality"))
register_case(Case("sta3d_16x32x32_tile4x8x8_win3", "sliding tile attention, 16x32x32 video, tile 4x8x8, "
                   "window 3x3x3 tiles", _sta3d, fixed_L=16384, small_L=6912, family="locality"))
register_case(Case("radial_16x1024", "radial attention, 16 frames x 1024 tokens (exact element mask)",
                   _radial, fixed_L=16384, small_L=4096, family="locality"))
LOCALITY_CASES = ["natten2d_128x128_k13", "sta3d_16x32x32_tile4x8x8_win3", "radial_16x1024"]


# ---------------------------------------------------------------------------------------
# issue 6: learnable tables, sigmoid attention, low-rank bias (formerly only in learnable.py)
# ---------------------------------------------------------------------------------------

def _t5_causal(*, H, device, seed, dtype=torch.float32, **_):
    from attndsl.patterns.relative_bias import t5_bucket_bias
    g = _generator(device, seed)
    # in the call's dtype, as a bf16 model holds it (FlexAttention fails to compile a float32 table
    # with bf16 inputs: docs/experiments.md)
    table = (0.1 * torch.randn(H, 32, device=device, generator=g)).to(dtype).requires_grad_()
    causal = lambda b, h, q, k: q >= k  # noqa: E731
    return CaseInstance(mask_mod=causal, score_mod=t5_bucket_bias(table, 32, 128, bidirectional=False),
                        leaves=(table,), notes=f"learnable {str(dtype).replace('torch.', '')} table [H, 32], T5 buckets up to "
                                                    "128, causal")


def _sigmoid_causal(*, L, **_):
    import math
    causal = lambda b, h, q, k: q >= k  # noqa: E731
    return CaseInstance(mask_mod=causal, compile_kwargs=dict(normalizer="sigmoid"), flex=False, lse=False,
                        ref_kwargs=dict(normalizer="sigmoid", sigmoid_bias=-math.log(L)),
                        notes="sigmoid attention, bias -log(L): FlexAttention and SDPA have no sigmoid "
                              "normaliser (checked against the float64 reference only)")


def _lowrank(rank: int):
    def build(*, B, H, L, device, seed, dtype=torch.float32, **_):
        g = _generator(device, seed)
        u, w = ((0.3 * torch.randn(B, H, L, rank, device=device, generator=g)).to(dtype).requires_grad_()
                for _ in range(2))

        def sdpa_fn(q, k, v):
            # SDPA's own form of a low-rank bias: R extra head dims, u pre-divided by the scale
            import torch.nn.functional as F
            scale = q.shape[-1] ** -0.5
            return F.scaled_dot_product_attention(torch.cat([q, u / scale], -1), torch.cat([k, w], -1),
                                                  F.pad(v, (0, rank)), scale=scale)[..., :v.shape[-1]]
        return CaseInstance(mask_mod=None, flex=False, sdpa_fn=sdpa_fn, call_kwargs=dict(bias_factors=(u, w)),
                            ref_kwargs=dict(bias_factors=(u, w)), leaves=(u, w),
                            notes=f"bias u·wᵀ of rank {rank} (u, w [B, H, L, {rank}] learnable); SDPA: the "
                                  "same bias as extra head dims; FlexAttention: not run (no score_mod form "
                                  "of a per-pair dot product)")
    return build


register_case(Case("t5_causal", "causal + learnable T5 relative-position table [H, 32]", _t5_causal,
                   family="learnable"))
register_case(Case("sigmoid_causal", "causal sigmoid attention (no row normalisation)", _sigmoid_causal,
                   family="learnable"))
register_case(Case("lowrank_r16", "no mask + learnable low-rank bias u·wᵀ, rank 16", _lowrank(16),
                   family="learnable"))
LEARNABLE_CASES = ["t5_causal", "sigmoid_causal", "lowrank_r16"]


# ---------------------------------------------------------------------------------------
# issue 30 part 5: model-shaped cases (fixed shapes), as model code calls attention
# ---------------------------------------------------------------------------------------

def causal_mask(b, h, q_idx, kv_idx):
    """Module-level causal mask: model code passes one function object to every call."""
    return q_idx >= kv_idx


def _model_causal(**_):
    return CaseInstance(mask_mod=causal_mask, sdpa="causal")


def _packed_documents(n_docs: int):
    def build(*, L, device, seed, **_):
        doc = document_ids(L, device, seed, n_docs=n_docs)
        return CaseInstance(mask_mod=lambda b, h, q, k: (doc[q] == doc[k]) & (q >= k),
                            notes=f"{int(doc[-1].item()) + 1} documents of random lengths packed in {L} "
                                  "tokens, causal within each")
    return build


register_case(Case("llama3_8b", "Llama-3-8B attention: causal, GQA 32 query / 8 KV heads", _model_causal,
                   shape=dict(B=1, H=32, Hkv=8, L=8192, D=128), family="model", small_L=256))
register_case(Case("gpt2_step", "GPT-2 training step attention: causal, B=8, 12 heads", _model_causal,
                   shape=dict(B=8, H=12, Hkv=12, L=2048, D=64), family="model"))
register_case(Case("vit_b16", "ViT-B/16 attention: no mask, 197 tokens, B=32", _dense,
                   shape=dict(B=32, H=12, Hkv=12, L=197, D=64), family="model", small_L=197))
register_case(Case("packed_docs_64x32k", "64 packed documents in 32K tokens, causal document mask",
                   _packed_documents(64), shape=dict(B=1, H=16, Hkv=16, L=32768, D=128), family="model",
                   small_L=1024))
register_case(Case("transformer_block_gpt2", "torch.compile'd pre-LN transformer block (LayerNorm, attention, "
                   "MLP; d_model 768), causal, each attention inside", _model_causal, runner="block",
                   shape=dict(B=8, H=12, Hkv=12, L=2048, D=64), family="model", timeout_s=420.0))
MODEL_CASES = ["llama3_8b", "gpt2_step", "vit_b16", "packed_docs_64x32k", "transformer_block_gpt2"]

# the protocol cases of shared/bench/README.md (at --L/--D; the locality cases fix their L)
PROTOCOL_CASES = (DEFAULT_CASES + LOCALITY_CASES + ["dsa_topk2048"] + LEARNABLE_CASES)
#: named groups for ``--cases``: "full" is what BENCHMARKS.md's table is made from, models first
#: (a --budget-s that runs out skips the tail)
GROUPS = {
    "default": DEFAULT_CASES,
    "quick": QUICK_CASES,
    "models": MODEL_CASES,
    "protocol": PROTOCOL_CASES,
    "locality": LOCALITY_CASES,
    "learnable": LEARNABLE_CASES,
    "full": MODEL_CASES + PROTOCOL_CASES,
}
