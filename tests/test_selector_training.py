"""The token selector (``indices=``) with what training needs: learnable captured tensors and a
low-rank bias (issue #6's parts on issue #4's gather kernels), on the CPU interpreter.

Every case runs ``attndsl.attention(..., indices=idx)`` and ``reference.sparse_attention`` (float64,
autograd, gathers the selected keys explicitly) on the same fresh random inputs and compares the
output, the lse and the gradients of q, k, v, the sinks, the factors ``u``/``w`` and every captured
tensor that requires grad, with random output and lse cotangents. Selections hold ``-1`` slots
and duplicate keys; groupings cover MHA, GQA, MQA and selection groups that cut across K/V heads;
the factors broadcast over the batch and the heads in every way ``bias_factors`` allows.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attndsl
from attndsl import reference
from test_learnable import KINDS, _learnable
from test_selectors import GROUPINGS, causal, random_indices, softcap, window

F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: 5e-5, BF16: 6e-2}

#: beyond test_learnable's kinds, the ways the gather backward adds a table's gradient
#: (``codegen.selector._grad_code``): bins without a head dim, per element past the bin limit,
#: and per slot after a sum over the packed heads
GATHER_KINDS = ["shared_table", "pieced_table", "wide_table", "per_key"]


def _gather_learnable(kind, B, Hq, Lq, Lkv, gen, dtype):
    if kind not in GATHER_KINDS:
        return _learnable(kind, B, Hq, Lq, Lkv, gen, dtype)
    if kind == "shared_table":  # table[bucket]: binned, one row for every head
        t = torch.randn(9, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        return [t], lambda s, b, h, qi, kv: s + t[(qi - kv).clamp(-4, 4) + 4]
    if kind == "pieced_table":  # 129 entries along kv: bins in three pieces of 64, all reached at short lengths
        t = torch.randn(Hq, 129, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        return [t], lambda s, b, h, qi, kv: s + t[h, ((qi - kv) * 8).clamp(-64, 64) + 64]
    if kind == "wide_table":  # 301 entries along kv: over the bin limit, added per element
        t = torch.randn(Hq, 301, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        return [t], lambda s, b, h, qi, kv: s + t[h, (qi - kv).clamp(-150, 150) + 150]
    t = torch.randn(Lkv, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()  # per key: plain kv_idx
    return [t], lambda s, b, h, qi, kv: s + t[kv]


def _err(got, want):
    """max |got - want| over max |want| (finite entries; both must agree on which are finite)."""
    got, want = got.detach().double(), want.detach().double()
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "finiteness differs"
    if not fin.any():
        return 0.0
    return ((got[fin] - want[fin]).abs().max() / want[fin].abs().max().clamp_min(1e-6)).item()


def _factors(Lq, Lkv, R, shape, gen, dtype):
    """(u, w) with the batch/head dims ``shape`` picks: ``(u_batch, u_heads, w_batch, w_heads)``."""
    ub, uh, wb, wh = shape
    u = torch.randn(ub, uh, Lq, R, generator=gen, dtype=torch.float64) * 0.5
    w = torch.randn(wb, wh, Lkv, R, generator=gen, dtype=torch.float64) * 0.5
    return u.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()


def run_case(*, grouping, B, Lq, Lkv, K, D=16, Dv=16, mask=None, kind=None, factors=None, R=3,
             normalizer="softmax", sinks=False, block_n=16, dtype=F32, seed=0, dup=0.2):
    """Ours against the gathering oracle; returns the errors per compared tensor."""
    Hq, Hkv, G = grouping
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
               for s in ((B, Hq, Lq, D), (B, Hkv, Lkv, D), (B, Hkv, Lkv, Dv)))
    idx = random_indices(B, G, Lq, Lkv, K, seed + 1, p_dup=dup)
    learn, score_mod = _gather_learnable(kind, B, Hq, Lq, Lkv, gen, F32) if kind else ([], None)
    extras, leaves = {}, [("q", q), ("k", k), ("v", v)]
    if factors is not None:
        u, w = _factors(Lq, Lkv, R, factors, gen, dtype)
        extras["bias_factors"] = (u, w)
        leaves += [("u", u), ("w", w)]
    if sinks:
        s = (torch.randn(Hq, generator=gen, dtype=torch.float64)).to(F32).requires_grad_()
        extras["sinks"] = s
        leaves.append(("sinks", s))
    leaves += [(f"captured{i}", t) for i, t in enumerate(learn)]
    attn = attndsl.compile(mask_mod=mask, score_mod=score_mod, normalizer=normalizer, block_n=block_n)
    softmax = normalizer == "softmax"
    got = attn(q, k, v, indices=idx, return_lse=softmax, **extras)
    out, lse = got if softmax else (got, None)
    ref_extras = {n: (tuple(x.double() for x in t) if n == "bias_factors" else t.double()) for n, t in extras.items()}
    rout, rlse = reference.sparse_attention(q.double(), k.double(), v.double(), idx, mask_mod=mask, score_mod=score_mod,
                                            normalizer=normalizer, **ref_extras)
    errs = {"out": _err(out, rout)}
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    outs, routs, gos, rgos = [out], [rout], [do.to(out.dtype)], [do]
    if softmax:
        dead = torch.isneginf(rlse)
        assert torch.equal(torch.isneginf(lse.detach()), dead), "lse -inf rows differ"
        errs["lse"] = _err(torch.where(dead, 0.0, lse.detach().double()), torch.where(dead, 0.0, rlse.detach()))
        dl = torch.where(dead, 0.0, torch.randn(lse.shape, generator=gen, dtype=torch.float64))
        outs.append(lse), routs.append(torch.where(dead, 0.0, rlse)), gos.append(dl.float()), rgos.append(dl)
    tensors = [t for _, t in leaves]
    g = torch.autograd.grad(outs, tensors, gos, allow_unused=True)
    rg = torch.autograd.grad(routs, tensors, rgos, allow_unused=True)
    for (n, t), a, b in zip(leaves, g, rg):
        assert a is not None, f"no gradient for {n}"
        assert a.shape == t.shape and a.dtype == t.dtype, (n, a.shape, a.dtype, t.shape, t.dtype)
        errs["d" + n] = _err(a, b if b is not None else torch.zeros_like(a, dtype=torch.float64))
    return errs


def _check(errs, tol, ctx):
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors over {tol:g}: {bad} {ctx}"


# u batch/heads, w batch/heads: 1 or full; w's heads may also be the K/V heads (filled in per case)
FACTOR_SHAPES = ["full", "shared", "u per head, w per kv head", "w per query head", "batch broadcast"]


def _factor_shape(name, B, Hq, Hkv):
    return {"full": (B, Hq, B, Hq), "shared": (1, 1, 1, 1), "u per head, w per kv head": (B, Hq, B, Hkv),
            "w per query head": (1, 1, B, Hq), "batch broadcast": (1, Hq, 1, Hkv)}[name]


CASES = dict(grouping=st.sampled_from(GROUPINGS), B=st.integers(1, 2), Lq=st.integers(1, 20),
             Lkv=st.integers(1, 28), K=st.integers(1, 40), mask=st.sampled_from(["none", "causal", "window"]),
             kind=st.sampled_from([None, *KINDS, *GATHER_KINDS]), factors=st.sampled_from([None, *FACTOR_SHAPES]),
             R=st.integers(1, 5), normalizer=st.sampled_from(["softmax", "sigmoid"]), sinks=st.booleans(),
             block_n=st.sampled_from([16, 64]), seed=st.integers(0, 2**16))


def _property(grouping, B, Lq, Lkv, K, mask, kind, factors, R, normalizer, sinks, block_n, seed):
    Hq, Hkv, _ = grouping
    masks = {"none": None, "causal": causal, "window": window(5)}
    shape = _factor_shape(factors, B, Hq, Hkv) if factors else None
    ctx = (f"(grouping={grouping}, B={B}, Lq={Lq}, Lkv={Lkv}, K={K}, mask={mask}, kind={kind}, factors={factors}, "
           f"R={R}, {normalizer}, sinks={sinks}, block_n={block_n}, seed={seed})")
    errs = run_case(grouping=grouping, B=B, Lq=Lq, Lkv=Lkv, K=K, mask=masks[mask], kind=kind, factors=shape, R=R,
                    normalizer=normalizer, sinks=sinks and normalizer == "softmax", block_n=block_n, seed=seed)
    _check(errs, TOL[F32], ctx)


# 3 random draws in CI (each a new kernel, some 5 s on two cores); every kind and factor shape also has
# a fixed case below, and the slow twin runs 100
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_token_selector_trains_learnable_tensors_and_low_rank_factors(grouping, B, Lq, Lkv, K, mask, kind, factors, R,
                                                                       normalizer, sinks, block_n, seed):
    _property(grouping, B, Lq, Lkv, K, mask, kind, factors, R, normalizer, sinks, block_n, seed)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_token_selector_trains_learnable_tensors_and_low_rank_factors_many(grouping, B, Lq, Lkv, K, mask, kind, factors,
                                                                            R, normalizer, sinks, block_n, seed):
    _property(grouping, B, Lq, Lkv, K, mask, kind, factors, R, normalizer, sinks, block_n, seed)


@pytest.mark.parametrize("kind", KINDS + GATHER_KINDS)
def test_every_kind_of_learnable_tensor(kind):
    """Each way a captured tensor is indexed (per head, 0-d, relative table, T5 buckets, per query,
    pair bias [H, Lq, Lkv] and [B, H, Lq, Lkv], a table without a head dim, one too wide to bin, per
    key) with GQA, a causal mask and duplicate keys."""
    # a second batch where the tensor has a batch dim, and for slopes (a gradient summed over the batch);
    # one elsewhere (CI time)
    B = 2 if kind in ("pair_bhqk", "slopes") else 1
    _check(run_case(grouping=(4, 2, 1), B=B, Lq=13, Lkv=21, K=17, mask=causal, kind=kind, seed=3), TOL[F32], kind)


@pytest.mark.parametrize("factors", FACTOR_SHAPES)
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_low_rank_factors_of_every_shape(factors, normalizer):
    """u·wᵀ at the gathered keys, for every broadcast of u and w, with a softcap after it (the bias
    joins the score before score_mod) and a selection shared by the K/V heads' groups."""
    Hq, Hkv, G = 4, 2, 2
    errs = run_case(grouping=(Hq, Hkv, G), B=2, Lq=11, Lkv=19, K=14, mask=causal,
                    factors=_factor_shape(factors, 2, Hq, Hkv), R=4, normalizer=normalizer, seed=5)
    _check(errs, TOL[F32], factors)
    attn = attndsl.compile(score_mod=softcap, block_n=16)
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 5, 16, generator=gen), torch.randn(1, 1, 9, 16, generator=gen), torch.randn(1, 1, 9, 16)
    u, w = torch.randn(1, 2, 5, 2, generator=gen) * 20, torch.randn(1, 1, 9, 2, generator=gen)
    idx = torch.arange(9, dtype=torch.int32).expand(1, 1, 5, 9)
    got = attn(q, k, v, indices=idx, bias_factors=(u, w))
    want, _ = reference.sparse_attention(q.double(), k.double(), v.double(), idx, score_mod=softcap,
                                         bias_factors=(u.double(), w.double()))
    assert _err(got, want) < 1e-5


@pytest.mark.parametrize("kind", ["slopes", "rel_table", "pair_bhqk"])
def test_bf16_with_learnable_tensors_and_factors(kind):
    """16-bit inputs with float32 captured tensors and bf16 factors, top-K of a causal past with
    sinks, as a DSA layer that learns its biases runs."""
    errs = run_case(grouping=(4, 1, 1), B=1, Lq=24, Lkv=24, K=12, mask=causal, kind=kind, factors=(1, 4, 1, 1),
                    sinks=True, dtype=BF16, seed=7, dup=0.0)
    _check(errs, TOL[BF16], kind)


def test_two_part_head_dim_and_value_head_dim_with_factors_and_a_table():
    """192 = 128 + 64 would be slow here; 48 = 32 + 16 runs the same two-part kernels, with Dv=24."""
    errs = run_case(grouping=(2, 1, 1), B=1, Lq=6, Lkv=10, K=8, D=48, Dv=24, mask=causal, kind="rel_table",
                    factors=(1, 2, 1, 1), seed=9)
    _check(errs, TOL[F32], "D=48, Dv=24")


def test_deterministic_refuses_learnable_tensors_on_the_token_path():
    slopes = torch.tensor([0.1, 0.2], requires_grad=True)
    attn = attndsl.compile(score_mod=lambda s, b, h, q, kv: s - slopes[h] * (q - kv), deterministic=True)
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 1, 6, 16), torch.randn(1, 1, 6, 16)
    idx = torch.zeros(1, 1, 4, 2, dtype=torch.int32)
    with pytest.raises(NotImplementedError, match=r"deterministic=True with indices=.*#0"):
        attn(q, k, v, indices=idx)
    slopes.requires_grad_(False)  # a constant table: nothing to add atomically but dK/dV
    assert attn(q, k, v, indices=idx).shape == (1, 2, 4, 16)


def test_factor_errors_on_the_token_path():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    idx = torch.zeros(1, 1, 8, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="ranks disagree"):
        attndsl.attention(q, k, v, indices=idx, bias_factors=(torch.zeros(1, 4, 8, 2), torch.zeros(1, 2, 8, 3)))
    with pytest.raises(ValueError, match="w heads"):
        attndsl.attention(q, k, v, indices=idx, bias_factors=(torch.zeros(1, 4, 8, 2), torch.zeros(1, 3, 8, 2)))
    with pytest.raises(ValueError, match="w length"):
        attndsl.attention(q, k, v, indices=idx, bias_factors=(torch.zeros(1, 4, 8, 2), torch.zeros(1, 2, 7, 2)))


def test_each_table_takes_the_way_its_index_allows():
    """Which way each kind's gradient is added (so the cases above cover every way): bins (in pieces
    of 64) for tables whose one kv-indexed dim has at most 256 entries and is head-free, per element
    otherwise (no pieces)."""
    from attndsl.passes import lower
    from attndsl.selectors.sparse import gather_runner
    gen = torch.Generator().manual_seed(0)
    want = {"rel_table": (64, 1), "t5": (32, 1), "shared_table": (16, 1), "pieced_table": (64, 3),
            "wide_table": (64, 0), "per_key": (64, 0), "pair_hqk": (64, 0), "slopes": (64, 0)}
    assert (lower.MAX_BINS, lower.BIN_PIECE) == (256, 64)
    for kind, (bins, pieces) in want.items():
        learn, score_mod = _gather_learnable(kind, 1, 2, 8, 8, gen, F32)
        attn = attndsl.compile(score_mod=score_mod)
        r = gather_runner(attn, torch.zeros(1, 2, 8, 16))
        consts = r._grad_consts(tuple(attn.tensors))
        assert (consts["GL0_BINS"], consts["GL0_PIECES"]) == (bins, pieces), (kind, consts)
