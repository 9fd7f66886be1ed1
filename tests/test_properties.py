"""Property tests: attndsl's kernels against the float64 oracle, the oracle against FlexAttention.

Every example draws a shape (ragged lengths, ``Lq != Lkv``, GQA/MQA), a dtype (fp32, fp16,
bf16), tile sizes (16 or 32 each way) and a pattern: one of ``patterns/`` with random
parameters, or a random mask/score-modifier expression tree (``attndsl.testing``), then checks
output, logsumexp and dq/dk/dv with :func:`attndsl.testing.assert_matches_reference`.
conftest.py runs everything with ``ATTNDSL_POISON=1`` (outputs start as NaN).

The default run is sized for the CPU interpreter (about 3.5 minutes on two busy cores); the
``slow`` tests repeat the same properties with more examples and longer sequences (L up to 160,
D up to 64; about 15 minutes); ``gpu`` tests run them on CUDA tensors when a GPU is present.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, reject, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

import attndsl
import attndsl.patterns as P
from attndsl.testing import (LAYOUT_PATTERNS, MASK_PATTERNS, SCORE_PATTERNS, Mismatch, Shape, assert_matches_reference, dtypes,
                             masks, patterns, random_qkv, score_mods, shapes)

MAX_LEN = 64        # interpreter-sized; partial tiles at 16 and 32 are common
MAX_HEADS = 4
HEAD_DIMS = (16, 32)

TILES = st.sampled_from([(16, 16), (32, 32), (16, 32), (32, 16)])
SEEDS = st.integers(0, 2**31 - 1)
# the GPU property run is sharded on the device (each shard its own --hypothesis-seed) to fit one call
GPU_EXAMPLES = int(os.environ.get("ATTNDSL_GPU_EXAMPLES", "60"))
SCALES = st.one_of(st.none(), st.sampled_from([0.1, 0.5, 1.0]))

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                  HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------
# Known kernel bug (see test_known_bug_* below).
#
# When the forward kernel checks key tiles one by one (``tile_check``; since 612becb only where the
# visit range can have gaps, e.g. unions such as ``(q >= kv) | (q - kv <= 10)`` or
# ``(kv % 3 == 0) | (kv < 100)``, and ``torch.where`` masks), the whole-tile test ``tile_full``
# is evaluated with ``kv_hi = kv_lo + BLOCK_N - 1`` instead of ``min(kv_lo + BLOCK_N, Lkv) - 1``.
# When Lkv is not a multiple of BLOCK_N, a last key tile straddling Lkv is then taken as full,
# the mask (which also carries the ``kv_idx < LKV`` bound) is skipped, and the zero padding keys
# join the softmax.
# While it is open, the property tests recognise it semantically -- the same example passes when
# the mask is conjoined with ``(q_idx < Lq) & (kv_idx < Lkv)``, which cannot change a correct
# result -- and reject such examples (counted as a hypothesis event) instead of failing. Any
# other mismatch fails. Set this to False once the strict xfail tests below start passing.
KNOWN_BUG_PADDED_KEYS = False


def _bounded(mask_mod, Lq, Lkv):
    def bounded(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (q_idx < Lq) & (kv_idx < Lkv)

    bounded.__name__ = f"({getattr(mask_mod, '__name__', 'mask')}) & (q < {Lq}) & (kv < {Lkv})"
    return bounded


def check(q, k, v, mask_mod, score_mod, tiles=(None, None), *, scale=None, seed=None, api="compile"):
    """assert_matches_reference on ``attndsl.compile`` with the given tiles (or ``attndsl.attention``);
    examples of the known padded-keys bug are rejected (in hypothesis) or xfailed (elsewhere)."""
    if api == "compile":
        fn = attndsl.compile(mask_mod=mask_mod, score_mod=score_mod, block_m=tiles[0], block_n=tiles[1])
    else:
        fn = attndsl.attention
    try:
        assert_matches_reference(fn, q, k, v, mask_mod=mask_mod, score_mod=score_mod, scale=scale, seed=seed)
    except Mismatch as first:
        if not (KNOWN_BUG_PADDED_KEYS and mask_mod is not None):
            raise
        bm = _bounded(mask_mod, q.shape[2], k.shape[2])
        fn2 = attndsl.compile(mask_mod=bm, score_mod=score_mod, block_m=tiles[0], block_n=tiles[1])
        try:
            assert_matches_reference(fn2, q, k, v, mask_mod=bm, score_mod=score_mod, scale=scale, seed=seed)
        except Mismatch:
            raise first from None
        if not currently_in_test_context():
            pytest.xfail(f"known bug (padded keys in full tiles, see KNOWN_BUG_PADDED_KEYS): {first}")
        note(f"known bug (padded keys in full tiles): {str(first).splitlines()[0]}")
        event("rejected: known padded-keys bug")
        reject()


def _draw_case(shape, dtype, tiles, seed):
    q, k, v = random_qkv(shape, dtype, seed=seed)
    note(f"tiles (block_m, block_n) = {tiles}")
    return q, k, v


# ---------------------------------------------------------------------------------------------
# every ready-made pattern, forward / lse / gradients, all dtypes, GQA, Lq != Lkv, tiles 16/32


@pytest.mark.parametrize("name", MASK_PATTERNS + SCORE_PATTERNS)
@settings(max_examples=5, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, HEAD_DIMS), dtype=dtypes(), tiles=TILES, seed=SEEDS)
def test_builtin_pattern_matches_reference(name, data, shape, dtype, tiles, seed):
    case = data.draw(patterns(MAX_LEN, MAX_HEADS, include=[name]), label="pattern")
    shape = case.fit(shape)
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, case.mask_mod, case.score_mod, tiles, seed=seed)


#: value head dims drawn apart from the query/key ones: narrower, wider, not a power of two
VALUE_HEAD_DIMS = (16, 24, 48)
#: query/key head dims with one power-of-two part (16, 32) or two (48 = 32 + 16, 80 = 64 + 16,
#: 96 = 64 + 32: ``runtime.config.split_head_dim``)
SPLIT_HEAD_DIMS = (16, 32, 48)


@settings(max_examples=10, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, SPLIT_HEAD_DIMS, value_head_dims=VALUE_HEAD_DIMS),
       dtype=dtypes(), tiles=TILES, seed=SEEDS)
def test_value_head_dim_apart_from_query_key(data, shape, dtype, tiles, seed):
    """MLA-style layers give values their own head dim (DeepSeek V3: 192 for q/k, 128 for v): the
    output and dV are Dv wide, dQ/dK stay D wide, every kernel masks each dim on its own; a q/k
    head dim of two parts (48 = 32 + 16) runs every product over it as two."""
    case = data.draw(patterns(MAX_LEN, MAX_HEADS), label="pattern")
    shape = case.fit(shape)
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    assert v.shape[-1] == shape.dv
    check(q, k, v, case.mask_mod, case.score_mod, tiles, seed=seed)


@pytest.mark.slow
@settings(max_examples=40, **FAST)
@given(data=st.data(), shape=shapes(96, 2, MAX_HEADS, SPLIT_HEAD_DIMS + (64, 80, 96),
                                     value_head_dims=VALUE_HEAD_DIMS + (64,)),
       dtype=dtypes(), tiles=TILES, seed=SEEDS)
def test_value_head_dim_apart_from_query_key_many(data, shape, dtype, tiles, seed):
    case = data.draw(patterns(96, MAX_HEADS), label="pattern")
    shape = case.fit(shape)
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, case.mask_mod, case.score_mod, tiles, seed=seed)


def test_value_head_dim_with_sinks_low_rank_bias_learnable_and_sigmoid():
    """Dv != D together with the issue-6 tensors: sinks, u·wᵀ, a learnable table, and sigmoid; the
    query/key head dim in two parts (48 = 32 + 16)."""
    q, k, v = random_qkv(Shape(2, 4, 2, 37, 45, 48, 24), torch.float32, seed=3)
    assert v.shape == (2, 2, 45, 24)
    slopes = torch.tensor([0.25, -0.5, 0.1, 0.3], requires_grad=True)

    def learnable_alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    sinks = torch.tensor([0.3, -1.2, 0.0, 2.0], requires_grad=True)
    u, w = torch.randn(2, 4, 37, 4, requires_grad=True), torch.randn(1, 2, 45, 4, requires_grad=True)
    comp = attndsl.compile(mask_mod=P.causal, score_mod=learnable_alibi, block_m=16, block_n=16)
    errs = assert_matches_reference(comp, q, k, v, sinks=sinks, bias_factors=(u, w), seed=2)
    assert set(errs) == {"out", "lse", "dq", "dk", "dv", "dsinks", "du", "dw", "dcaptured0"}
    sig = attndsl.compile(mask_mod=P.causal, score_mod=learnable_alibi, normalizer="sigmoid", block_m=16, block_n=16)
    errs = assert_matches_reference(sig, q, k, v, bias_factors=(u, w), sigmoid_bias=-1.5, seed=4)
    assert set(errs) == {"out", "dq", "dk", "dv", "du", "dw", "dcaptured0"}


@settings(max_examples=10, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, HEAD_DIMS), dtype=dtypes(), tiles=TILES, seed=SEEDS,
       scale=SCALES)
def test_builtin_pattern_combinations(data, shape, dtype, tiles, seed, scale):
    case = data.draw(patterns(MAX_LEN, MAX_HEADS), label="pattern")
    shape = case.fit(shape)
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, case.mask_mod, case.score_mod, tiles, scale=scale, seed=seed)


# ---------------------------------------------------------------------------------------------
# random expression trees


@settings(max_examples=20, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, HEAD_DIMS), dtype=dtypes(), tiles=TILES, seed=SEEDS)
def test_random_masks_match_reference(data, shape, dtype, tiles, seed):
    mask_mod = data.draw(masks(MAX_LEN, MAX_HEADS), label="mask_mod")
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, mask_mod, None, tiles, seed=seed)


@settings(max_examples=16, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, HEAD_DIMS), dtype=dtypes(), tiles=TILES, seed=SEEDS,
       scale=SCALES)
def test_random_score_mods_match_reference(data, shape, dtype, tiles, seed, scale):
    score_mod = data.draw(score_mods(MAX_LEN, MAX_HEADS), label="score_mod")
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, None, score_mod, tiles, scale=scale, seed=seed)


@settings(max_examples=10, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, HEAD_DIMS), dtype=dtypes(), tiles=TILES, seed=SEEDS)
def test_random_mask_and_score_mod_match_reference(data, shape, dtype, tiles, seed):
    if data.draw(st.booleans(), label="random mask"):
        mask_mod = data.draw(masks(MAX_LEN, MAX_HEADS), label="mask_mod")
    else:
        case = data.draw(patterns(MAX_LEN, MAX_HEADS, include=MASK_PATTERNS), label="pattern")
        mask_mod, shape = case.mask_mod, case.fit(shape)
    score_mod = data.draw(score_mods(MAX_LEN, MAX_HEADS), label="score_mod")
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, mask_mod, score_mod, tiles, seed=seed)


@settings(max_examples=8, **FAST)
@given(data=st.data(), shape=shapes(64, 2, MAX_HEADS, (16,)), dtype=dtypes(), seed=SEEDS, scale=SCALES)
def test_one_shot_attention_api(data, shape, dtype, seed, scale):
    """``attndsl.attention`` (traced per call, default tiles) behaves like ``compile``."""
    case = data.draw(patterns(64, MAX_HEADS), label="pattern")
    shape = case.fit(shape)
    q, k, v = random_qkv(shape, dtype, seed=seed)
    check(q, k, v, case.mask_mod, case.score_mod, scale=scale, seed=seed, api="attention")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq,hkv", [(4, 1), (4, 2), (3, 1)])
def test_gqa_mqa_fixed_cases(hq, hkv, dtype):
    """Deterministic GQA/MQA cases with ragged, unequal lengths (always run, whatever hypothesis draws)."""
    q, k, v = random_qkv(Shape(2, hq, hkv, 37, 53, 32), dtype, seed=hq * 10 + hkv)
    slopes = P.alibi_slopes(hq)
    check(q, k, v, P.sliding_window(20), P.alibi(slopes), (16, 32), seed=1)
    check(q, k, v, P.causal_bottom_right(37, 53), P.softcap(5.0), (32, 16), seed=2)


# ---------------------------------------------------------------------------------------------
# the strategies themselves: generated functions trace, run on tensors, and agree


@settings(max_examples=60, deadline=None)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, (16,)))
def test_generated_functions_mean_the_same_traced_and_on_tensors(data, shape):
    """The reference evaluates the *traced IR*; evaluating the Python closures on index tensors
    (as FlexAttention does) must give the same mask and scores."""
    mask_mod = data.draw(st.one_of(st.none(), masks(MAX_LEN, MAX_HEADS)), label="mask_mod")
    score_mod = data.draw(st.one_of(st.none(), score_mods(MAX_LEN, MAX_HEADS)), label="score_mod")
    B, Hq, Hkv, Lq, Lkv, D, _ = shape
    q, k, _ = random_qkv(shape, torch.float64, requires_grad=False, seed=0)
    s_ir, m_ir = attndsl.reference.scores_and_mask(q, k, mask_mod, score_mod)
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    qi = torch.arange(Lq).view(1, 1, Lq, 1)
    kv = torch.arange(Lkv).view(1, 1, 1, Lkv)
    if mask_mod is not None:
        m = torch.broadcast_to(mask_mod(b, h, qi, kv), m_ir.shape)
        assert m.dtype == torch.bool
        assert torch.equal(m, m_ir), f"{mask_mod.__name__}: traced and eager masks differ"
    if score_mod is not None:
        s0 = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(Hq // Hkv, 1)) * D ** -0.5
        s = torch.broadcast_to(score_mod(s0, b, h, qi, kv), s_ir.shape)
        torch.testing.assert_close(s.to(torch.float64), s_ir, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{score_mod.__name__}: {m}")


def _exact(q, k, v, mask_mod=None, score_mod=None, scale=None, return_lse=False):
    """A stand-in for attndsl.attention that is the oracle itself (cast back to the input dtype)."""
    o, lse = attndsl.reference.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, scale=scale)
    return o.to(q.dtype), lse.float()


def test_assert_matches_reference_accepts_exact_and_rejects_wrong_results():
    q, k, v = random_qkv(Shape(1, 2, 1, 9, 12, 16), torch.float32, seed=0)

    def late(b, h, q_idx, kv_idx):  # rows 0 and 1 see nothing
        return (q_idx >= 2) & (q_idx >= kv_idx)

    errs = assert_matches_reference(_exact, q, k, v, mask_mod=late)
    assert set(errs) == {"out", "lse", "dq", "dk", "dv"} and max(errs.values()) < 1e-6

    def shifted(*a, **kw):
        o, lse = _exact(*a, **kw)
        return o + 1e-3, lse

    with pytest.raises(Mismatch, match=r"output: .* worst at index \(.*\): got"):
        assert_matches_reference(shifted, q, k, v, mask_mod=late)

    def with_nan(*a, **kw):
        o, lse = _exact(*a, **kw)
        return torch.where(torch.zeros_like(o, dtype=torch.bool).index_fill_(2, torch.tensor([5]), True),
                           float("nan"), o), lse

    with pytest.raises(Mismatch, match="non-finite"):
        assert_matches_reference(with_nan, q, k, v, mask_mod=late)

    def finite_dead_rows(*a, **kw):
        o, lse = _exact(*a, **kw)
        return o, torch.where(torch.isneginf(lse), 0.0, lse)

    with pytest.raises(Mismatch, match="-inf pattern"):
        assert_matches_reference(finite_dead_rows, q, k, v, mask_mod=late)

    def wrong_grad(q_, k_, v_, **kw):  # right values, gradient scaled by 1.01 through q
        o, lse = _exact(q_ * 1.01 - (q_ * 0.01).detach(), k_, v_, **kw)
        return o, lse

    with pytest.raises(Mismatch, match="dq: "):
        assert_matches_reference(wrong_grad, q, k, v, mask_mod=late)


def test_assert_matches_reference_in_the_readme_form_with_learnable_and_issue6_tensors():
    """``assert_matches_reference(q, k, v, ...)`` tests attndsl.attention; the gradients of sinks,
    low-rank factors and learnable captured tensors are compared too, and a wrong one is caught."""
    q, k, v = random_qkv(Shape(1, 2, 1, 17, 23, 16), torch.float32, seed=1)
    slopes = torch.tensor([0.25, -0.5], requires_grad=True)

    def learnable_alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    sinks = torch.tensor([0.3, -1.2])
    u, w = torch.randn(1, 2, 17, 4), torch.randn(1, 1, 23, 4)
    errs = assert_matches_reference(q, k, v, mask_mod=P.causal, score_mod=learnable_alibi, sinks=sinks,
                                    bias_factors=(u, w), seed=2)
    assert set(errs) == {"out", "lse", "dq", "dk", "dv", "dsinks", "du", "dw", "dcaptured0"}
    assert max(errs.values()) < 1e-5 and slopes.grad is None
    errs = assert_matches_reference(attndsl.compile(mask_mod=P.causal, normalizer="sigmoid"), q, k, v,
                                    sigmoid_bias=-1.5)
    assert set(errs) == {"out", "dq", "dk", "dv"}

    doubled = 2 * slopes - slopes.detach()  # the slopes' values, twice their gradient

    def slope_gradient_off(q_, k_, v_, *, mask_mod, score_mod, scale, **kw):
        o, lse = attndsl.reference.attention(q_, k_, v_, mask_mod=mask_mod, scale=scale,
                                             score_mod=lambda s, b, h, qi, ki: s - doubled[h] * (qi - ki).abs())
        return o.to(q_.dtype), lse.float()

    with pytest.raises(Mismatch, match="dcaptured0: "):
        assert_matches_reference(slope_gradient_off, q, k, v, mask_mod=P.causal, score_mod=learnable_alibi)


# ---------------------------------------------------------------------------------------------
# the oracle against PyTorch's FlexAttention (eager, CPU)

try:
    from torch.nn.attention import flex_attention as _flex
except ImportError:  # pragma: no cover - torch < 2.5
    _flex = None

needs_flex = pytest.mark.skipif(_flex is None, reason="this torch has no FlexAttention")


def _flex_out_lse(q, k, v, mask_mod, score_mod, scale):
    B, Hq, Lq, _ = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = None
        if mask_mod is not None:
            bm = _flex.create_block_mask(mask_mod, B, Hq, Lq, Lkv, device=q.device, BLOCK_SIZE=16)
        kw = dict(score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=Hq != Hkv)
        if hasattr(_flex, "AuxRequest"):
            out, aux = _flex.flex_attention(q, k, v, return_aux=_flex.AuxRequest(lse=True), **kw)
            return out, aux.lse
        return _flex.flex_attention(q, k, v, return_lse=True, **kw)


def _flex_vs_reference(data, shape, scale, seed, max_len):
    kind = data.draw(st.sampled_from(["patterns", "random"]), label="kind")
    if kind == "patterns":
        case = data.draw(patterns(max_len, MAX_HEADS), label="pattern")
        mask_mod, score_mod, shape = case.mask_mod, case.score_mod, case.fit(shape)
    else:
        mask_mod = data.draw(st.one_of(st.none(), masks(max_len, MAX_HEADS)), label="mask_mod")
        score_mod = data.draw(st.one_of(st.none(), score_mods(max_len, MAX_HEADS)), label="score_mod")
    q, k, v = random_qkv(shape, torch.float64, requires_grad=False, seed=seed)
    ref_out, ref_lse = attndsl.reference.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, scale=scale)
    out, lse = _flex_out_lse(q, k, v, mask_mod, score_mod, scale)
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead), "fully masked rows differ"
    # float32 pieces inside the pattern functions (captured float32 tables, .float()) make the two
    # differ by float32 rounding, not more
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[~dead], ref_lse[~dead], rtol=1e-5, atol=1e-5)


@needs_flex
@settings(max_examples=20, deadline=None)  # test_slow_reference_agrees_with_flex_eager: 400, L up to 200
@given(data=st.data(), shape=shapes(96, 2, MAX_HEADS, (16,)), scale=SCALES, seed=SEEDS)
def test_reference_agrees_with_flex_eager(data, shape, scale, seed):
    """``attndsl.reference`` (our oracle, evaluating the traced IR) vs FlexAttention's eager CPU path
    (evaluating the Python functions on tensors), float64, on patterns/ and random trees."""
    _flex_vs_reference(data, shape, scale, seed, 96)


@needs_flex
@pytest.mark.parametrize("lq,lkv", [(64, 64), (37, 100), (100, 37)])
def test_reference_agrees_with_flex_eager_fixed(lq, lkv):
    """Every shared pattern once with fixed parameters (independent of what hypothesis draws)."""
    H = 4
    q, k, v = random_qkv(Shape(1, H, 2, lq, lkv, 16), torch.float64, requires_grad=False, seed=lq + lkv)
    ids = P.doc_ids_from_lengths([7, 1, 30, 20, 50])
    cases = [
        (P.causal, None), (P.causal_bottom_right(lq, lkv), None), (P.sliding_window(9), None),
        (P.sliding_window(5, causal=False), None), (P.prefix_lm(12), None), (P.chunked(16), None),
        (P.chunked(10, causal=False), None), (P.document(ids), None), (P.document(ids, causal=False), None),
        (None, P.alibi(P.alibi_slopes(H))), (None, P.softcap(2.0)),
        (None, P.relative_position_bias(torch.randn(H, 13), 6)),
        (None, P.t5_bucket_bias(torch.randn(H, 32), 32, 128, bidirectional=True)),
        (None, P.t5_bucket_bias(torch.randn(H, 16), 16, 40, bidirectional=False)),
        (P.sliding_window(20), P.alibi(P.alibi_slopes(H))),
        (P.document(ids), P.softcap(1.5)),
    ]
    for mask_mod, score_mod in cases:
        ref_out, ref_lse = attndsl.reference.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
        out, lse = _flex_out_lse(q, k, v, mask_mod, score_mod, None)
        name = f"{getattr(mask_mod, '__name__', None)} / {getattr(score_mod, '__name__', None)}"
        dead = torch.isneginf(ref_lse)
        assert torch.equal(torch.isneginf(lse), dead), name
        torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(lse[~dead], ref_lse[~dead], rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------
# poisoned outputs: every element written, fully masked rows exact


def test_poison_is_active():
    """conftest.py sets ATTNDSL_POISON=1 before attndsl is imported; the runtime honours it."""
    if os.environ.get("ATTNDSL_POISON") != "1":
        pytest.skip("ATTNDSL_POISON was overridden in the environment")
    from attndsl.runtime import launch

    assert launch.POISON
    t = launch._new((3, 5), torch.empty(1))
    assert torch.isnan(t).all()


@pytest.mark.parametrize("lq,lkv,tiles", [(1, 1, (16, 16)), (17, 33, (16, 16)), (33, 17, (32, 16)),
                                          (45, 70, (32, 32))])
def test_every_output_element_written(lq, lkv, tiles):
    """With poisoned outputs, out/lse/dq/dk/dv have no NaN anywhere, rows whose keys are all masked
    give exactly 0 and -inf, and keys no query sees get exactly zero dK/dV."""
    shape = Shape(2, 4, 2, lq, lkv, 32)
    q, k, v = random_qkv(shape, torch.float32, seed=lq * 100 + lkv)

    def mask_mod(b, h, q_idx, kv_idx):  # rows q < 3 see nothing; head 3 sees nothing; keys >= 40 unseen
        return (q_idx >= 3) & (h < 3) & (kv_idx < 40) & (q_idx - kv_idx < 25)

    attn = attndsl.compile(mask_mod=mask_mod, block_m=tiles[0], block_n=tiles[1])
    out, lse = attn(q, k, v, return_lse=True)
    do = torch.randn_like(out)
    out.backward(do)
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    assert not torch.isnan(lse).any()
    _, ref_lse = attndsl.reference.attention(q, k, v, mask_mod=mask_mod)
    dead = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), dead)
    assert (out.detach()[dead] == 0).all()
    assert (q.grad[dead] == 0).all()
    if lkv > 40:
        assert (k.grad[:, :, 40:] == 0).all() and (v.grad[:, :, 40:] == 0).all()
    check(q.detach(), k.detach(), v.detach(), mask_mod, None, tiles, seed=0)


# ---------------------------------------------------------------------------------------------
# tile visiting: never skip a tile that holds an allowed pair, never visit past the end


def _visits_and_nonempty(mask_mod, shape, tiles):
    B, Hq, Hkv, Lq, Lkv, D, _ = shape
    q, k, v = random_qkv(shape, torch.float32, requires_grad=False, seed=0)
    attn = attndsl.compile(mask_mod=mask_mod, block_m=tiles[0], block_n=tiles[1])
    visits = attn.visit_counts(q, k, v).cpu()
    bm, bn = tiles
    nq, nk = math.ceil(Lq / bm), math.ceil(Lkv / bn)
    assert tuple(visits.shape) == (B * Hq, nq)
    _, mask = attndsl.reference.scores_and_mask(q, k, mask_mod)
    padded = torch.zeros(B, Hq, nq * bm, nk * bn, dtype=torch.bool)
    padded[..., :Lq, :Lkv] = mask
    nonempty = padded.view(B, Hq, nq, bm, nk, bn).any(dim=(3, 5)).sum(-1).view(B * Hq, nq)
    assert (visits >= nonempty).all(), f"a key tile with allowed pairs was skipped:\nvisits\n{visits}\nnon-empty\n{nonempty}"
    assert (visits <= nk).all(), f"more key tiles visited than exist ({nk}):\n{visits}"
    return visits, nonempty


#: the ready-made masks whose visit plans are exact (closed-form intervals or block tables)
EXACT_VISIT_PATTERNS = tuple(n for n in MASK_PATTERNS if n not in LAYOUT_PATTERNS)


@settings(max_examples=20, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 2, MAX_HEADS, (16,)), tiles=TILES)
def test_visit_counts_are_exact_for_builtin_masks(data, shape, tiles):
    """The interval and document masks have exact visit plans: each query tile visits exactly the
    key tiles that hold an allowed pair, never fewer (wrong) nor more (slow)."""
    case = data.draw(patterns(MAX_LEN, MAX_HEADS, include=EXACT_VISIT_PATTERNS), label="pattern")
    visits, nonempty = _visits_and_nonempty(case.mask_mod, shape, tiles)
    assert torch.equal(visits, nonempty), f"visits\n{visits}\nnon-empty key tiles\n{nonempty}"


@settings(max_examples=25, **FAST)
@given(data=st.data(), shape=shapes(MAX_LEN, 1, 2, (16,)), tiles=TILES)
def test_visit_counts_cover_every_nonempty_tile(data, shape, tiles):
    """Random masks and the layout patterns (whose plans may be conservative): never skip a key
    tile that holds an allowed pair, never visit past the end."""
    if data.draw(st.booleans(), label="random mask"):
        mask_mod = data.draw(masks(MAX_LEN, 2), label="mask_mod")
    else:
        case = data.draw(patterns(MAX_LEN, 2, include=LAYOUT_PATTERNS), label="pattern")
        mask_mod, shape = case.mask_mod, case.fit(shape)
    _visits_and_nonempty(mask_mod, shape, tiles)


# ---------------------------------------------------------------------------------------------
# regressions found by these properties (minimal reproducers)


def _always(b, h, q_idx, kv_idx):
    return q_idx >= 0


@pytest.mark.parametrize("mask_name", ["q_idx >= 0", "prefix_lm(16)"])
def test_regression_padded_keys_in_full_tiles(mask_name):
    """Found at 5481ac9, fixed by 612becb: when the forward checked key tiles one by one, the
    whole-tile test used ``kv_lo + BLOCK_N - 1`` instead of ``min(.., Lkv - 1)``, so a last key tile
    straddling Lkv was taken as full, the mask and the ``kv < Lkv`` bound were skipped and the zero
    padding keys joined the softmax. Minimal: B = H = 1, Lq = Lkv = 1, D = 16, tiles 16x16, fp32
    (output 0.28 instead of 2.30)."""
    mask_mod = _always if mask_name == "q_idx >= 0" else P.prefix_lm(16)
    q, k, v = random_qkv(Shape(1, 1, 1, 1, 1, 16), torch.float32, seed=0)
    assert_matches_reference(attndsl.compile(mask_mod=mask_mod, block_m=16, block_n=16), q, k, v, seed=0)


def test_regression_prefix_lm_longer_than_sequence():
    """The same bug seen through a ready-made pattern: prefix_lm(53) at Lq = 17, Lkv = 19 (default tiles)."""
    q, k, v = random_qkv(Shape(1, 3, 1, 17, 19, 16), torch.float32, seed=0)
    assert_matches_reference(attndsl.compile(mask_mod=P.prefix_lm(53)), q, k, v, seed=0)


_BUG_REASON = ("kernel bug: per-tile full test uses kv_lo + BLOCK_N - 1, not min(.., Lkv - 1): a key tile straddling "
               "Lkv counts as full, mask and kv < Lkv bound skipped, zero padding keys join the softmax "
               "(see KNOWN_BUG_PADDED_KEYS)")


def _union_halfplanes(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) | (q_idx - kv_idx <= 10)


def _union_strided(b, h, q_idx, kv_idx):
    return (kv_idx % 3 == 0) | (kv_idx < 100)


@pytest.mark.parametrize("mask_mod", [_union_halfplanes, _union_strided], ids=["q>=kv|q-kv<=10", "kv%3==0|kv<100"])
def test_known_bug_padded_keys_in_full_tiles_minimal(mask_mod):
    """Minimal reproducer: B = H = 1, Lq = Lkv = 1, D = 16, tiles 16x16, float32. Both masks allow
    every pair; the output mixes in 15 zero padding keys (0.28 instead of 2.30)."""
    q, k, v = random_qkv(Shape(1, 1, 1, 1, 1, 16), torch.float32, seed=0)
    assert_matches_reference(attndsl.compile(mask_mod=mask_mod, block_m=16, block_n=16), q, k, v, seed=0)


def test_known_bug_padded_keys_in_full_tiles_realistic():
    """The same at a realistic shape: Lq = 80, Lkv = 79, tiles 32x32 (every row is wrong)."""
    q, k, v = random_qkv(Shape(1, 2, 1, 80, 79, 32), torch.float32, seed=0)
    attn = attndsl.compile(mask_mod=_union_halfplanes, block_m=32, block_n=32)
    assert_matches_reference(attn, q, k, v, seed=0)


def test_known_bug_padded_keys_with_layout_text_tokens():
    """The same bug through a ready-made pattern: NATTEN neighborhood on a 3x4 grid with 5 text
    tokens after it (extra="global": text keys are seen by everyone, so ``is_extra(kv)`` is true
    past the end too), L = 17, tiles 16x16: every output row is wrong."""
    from attndsl.layout import Layout
    from attndsl.patterns.neighborhood import neighborhood

    mask_mod = neighborhood(Layout((3, 4), suffix=5), 3)
    q, k, v = random_qkv(Shape(1, 1, 1, 17, 17, 16), torch.float32, seed=0)
    assert_matches_reference(attndsl.compile(mask_mod=mask_mod, block_m=16, block_n=16), q, k, v, seed=0)


# ---------------------------------------------------------------------------------------------
# bigger runs


@pytest.mark.slow
@settings(max_examples=100, **FAST)
@given(data=st.data(), shape=shapes(160, 2, MAX_HEADS, (16, 32, 64)), dtype=dtypes(), tiles=TILES, seed=SEEDS,
       scale=SCALES)
def test_slow_builtin_patterns(data, shape, dtype, tiles, seed, scale):
    case = data.draw(patterns(160, MAX_HEADS), label="pattern")
    shape = case.fit(shape)
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, case.mask_mod, case.score_mod, tiles, scale=scale, seed=seed)


@pytest.mark.slow
@settings(max_examples=160, **FAST)
@given(data=st.data(), shape=shapes(160, 2, MAX_HEADS, (16, 32, 64)), dtype=dtypes(), tiles=TILES, seed=SEEDS)
def test_slow_random_trees(data, shape, dtype, tiles, seed):
    mask_mod = data.draw(st.one_of(st.none(), masks(160, MAX_HEADS, max_depth=3)), label="mask_mod")
    score_mod = data.draw(st.one_of(st.none(), score_mods(160, MAX_HEADS, max_depth=3)), label="score_mod")
    q, k, v = _draw_case(shape, dtype, tiles, seed)
    check(q, k, v, mask_mod, score_mod, tiles, seed=seed)


@pytest.mark.slow
@needs_flex
@settings(max_examples=400, deadline=None)
@given(data=st.data(), shape=shapes(200, 2, MAX_HEADS, (16,)), scale=SCALES, seed=SEEDS)
def test_slow_reference_agrees_with_flex_eager(data, shape, scale, seed):
    _flex_vs_reference(data, shape, scale, seed, 200)


# ---------------------------------------------------------------------------------------------
# on a GPU: the same properties with CUDA tensors (compiled Triton, not the interpreter)


@pytest.mark.gpu
@settings(max_examples=GPU_EXAMPLES, **FAST)
@given(data=st.data(), shape=shapes(300, 2, 8, (32, 64, 128)), dtype=dtypes(), seed=SEEDS)
def test_gpu_patterns_and_random_trees(data, shape, dtype, seed):
    dev = "cuda"
    if data.draw(st.booleans(), label="builtin"):
        case = data.draw(patterns(300, 8, device=dev), label="pattern")
        mask_mod, score_mod, shape = case.mask_mod, case.score_mod, case.fit(shape)
    else:
        mask_mod = data.draw(st.one_of(st.none(), masks(300, 8, device=dev)), label="mask_mod")
        score_mod = data.draw(st.one_of(st.none(), score_mods(300, 8, device=dev)), label="score_mod")
    q, k, v = random_qkv(shape, dtype, device=dev, seed=seed)
    check(q, k, v, mask_mod, score_mod, seed=seed)
