"""The float64 oracle (``attndsl.reference``) itself: the bugs of issue 31 item 6 (part 5), and a
deterministic cross-check against FlexAttention's eager CPU path (uncompiled, float64) over the
shipped patterns and the issue's cases.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import attndsl
import attndsl.patterns as P
from attndsl import reference

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def randn(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


# --- bug 1: a captured tensor added after a score mod that makes a whole row -inf ----------------
def test_captured_gradient_with_a_row_made_minus_inf_by_the_score_mod():
    L = 12
    bias = randn(L, seed=1).requires_grad_()

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx == 3, float("-inf"), score) + bias[kv_idx]

    q, k, v = (randn(1, 2, L, 16, seed=s) for s in (2, 3, 4))
    out, lse = reference.attention(q, k, v, score_mod=score_mod)
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3])) and torch.isneginf(lse[:, :, 3]).all()
    (g,) = torch.autograd.grad(out.square().sum(), bias)
    assert torch.isfinite(g).all(), g
    # the dead row contributes nothing: the same gradient as with that row masked out
    bias2 = bias.detach().clone().requires_grad_()
    out2, _ = reference.attention(q, k, v, mask_mod=lambda b, h, q_idx, kv_idx: q_idx != 3,
                                  score_mod=lambda score, b, h, q_idx, kv_idx: score + bias2[kv_idx])
    (g2,) = torch.autograd.grad(out2.square().sum(), bias2)
    torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-12)
    # and the kernels agree (float32)
    b32 = bias.detach().float().requires_grad_()
    got = attndsl.attention(*(x.float() for x in (q, k, v)),
                            score_mod=lambda score, b, h, q_idx, kv_idx: torch.where(q_idx == 3, float("-inf"), score)
                            + b32[kv_idx])
    (g32,) = torch.autograd.grad(got.square().sum(), b32)
    torch.testing.assert_close(g32.double(), g, rtol=1e-4, atol=1e-4)


# --- bug 2: sinks = -inf and a fully masked row ---------------------------------------------------
@pytest.mark.parametrize("kernel", [False, True])
def test_minus_inf_sink_with_a_fully_masked_row(kernel):
    L = 10
    q, k, v = (randn(1, 2, L, 16, seed=s) for s in (5, 6, 7))
    sinks = torch.tensor([float("-inf"), 0.25], dtype=torch.float64)

    def mask(b, h, q_idx, kv_idx):
        return (q_idx != 4) & (kv_idx <= q_idx)

    out, lse = reference.attention(q, k, v, mask_mod=mask, sinks=sinks)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, 4], torch.zeros_like(out[:, :, 4]))
    assert lse[0, 0, 4].item() == float("-inf") and lse[0, 1, 4].item() == 0.25
    # gradients flow without NaN too (sinks included)
    s = sinks.clone().requires_grad_()
    x = [t.clone().requires_grad_() for t in (q, k, v)]
    o, _ = reference.attention(*x, mask_mod=mask, sinks=s)
    grads = torch.autograd.grad(o.sum(), [*x, s])
    assert all(torch.isfinite(g).all() for g in grads)
    if kernel:
        got, got_lse = attndsl.attention(*(t.float() for t in (q, k, v)), mask_mod=mask, sinks=sinks.float(),
                                         return_lse=True)
        torch.testing.assert_close(got.double(), out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_lse.double(), lse, rtol=1e-4, atol=1e-4)


# --- bug 3: .float() rounds to float32, as torch and the kernels do -------------------------------
BIG = 16777216  # 2**24: above it, float32 holds only even integers


def rounding_mask(b, h, q_idx, kv_idx):
    # (kv + 2**24) in float32 rounds odd kv to even (ties to even): the mask differs from kv <= q
    return ((kv_idx + BIG).float() - BIG) <= q_idx


def rounding_score(score, b, h, q_idx, kv_idx):
    return score + ((q_idx * 3 + kv_idx + BIG).float() - BIG) * 0.5


def test_float_cast_rounds_like_torch():
    L = 20
    q, k, _ = (randn(1, 1, L, 16, seed=s) for s in (8, 9, 10))
    s, mask = reference.scores_and_mask(q, k, rounding_mask, rounding_score)
    qi, ki = torch.arange(L).view(1, 1, L, 1), torch.arange(L).view(1, 1, 1, L)
    want_mask = rounding_mask(0, 0, qi, ki)
    assert not torch.equal(want_mask, ki <= qi)  # the pattern does exercise the rounding
    assert torch.equal(mask, want_mask.expand_as(mask))
    raw = (q @ k.transpose(-1, -2)) * 16 ** -0.5
    want_s = rounding_score(raw, 0, 0, qi, ki)  # float32 rounding of the cast, float64 elsewhere
    torch.testing.assert_close(s, want_s, rtol=0, atol=1e-12)


def test_float_cast_kernel_matches_reference():
    L = 20
    q, k, v = (randn(1, 1, L, 16, seed=s, dtype=torch.float32) for s in (11, 12, 13))
    got = attndsl.attention(q, k, v, mask_mod=rounding_mask, score_mod=rounding_score)
    ref, _ = reference.attention(q, k, v, mask_mod=rounding_mask, score_mod=rounding_score)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# --- cross-check against FlexAttention's eager CPU path (float64) ----------------------------------
def _flex(q, k, v, mask_mod=None, score_mod=None):
    """Eager (uncompiled) flex_attention in float64, with the mask applied as a score mod (its
    block mask would need create_block_mask, and -inf scores are what a mask means)."""
    def mod(score, b, h, q_idx, kv_idx):
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        if mask_mod is not None:
            score = torch.where(mask_mod(b, h, q_idx, kv_idx), score, float("-inf"))
        return score

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = flex.flex_attention(q, k, v, score_mod=mod, return_lse=True)
    return out, lse


def _cases():
    H = 4
    slopes = P.alibi_slopes(H).double()
    table = randn(H, 2 * 8 + 1, seed=20)
    t5 = randn(H, 8, seed=21)
    docs = P.doc_ids_from_lengths([5, 11, 1, 7])  # 24 tokens
    return [
        ("causal", P.causal, None),
        ("causal_bottom_right", P.causal_bottom_right(24, 24), None),
        ("sliding_window", P.sliding_window(5), None),
        ("sliding_window_bidirectional", P.sliding_window(4, causal=False), None),
        ("chunked", P.chunked(7), None),
        ("prefix_lm", P.prefix_lm(6), None),
        ("document", P.document(docs), None),
        ("alibi", P.causal, P.alibi(slopes)),
        ("relative_position_bias", None, P.relative_position_bias(table, 8)),
        ("t5_bucket_bias", None, P.t5_bucket_bias(t5, 8, 16)),
        ("softcap", P.causal, P.softcap(3.0)),
        # issue 31's cases
        ("row_made_minus_inf", None, lambda s, b, h, q_idx, kv_idx: torch.where(q_idx == 3, float("-inf"), s)),
        ("fully_masked_row", lambda b, h, q_idx, kv_idx: (q_idx != 5) & (kv_idx <= q_idx), None),
        ("plus_inf_score", None, lambda s, b, h, q_idx, kv_idx: torch.where((q_idx == 3) & (kv_idx == 2),
                                                                               float("inf"), s)),
        ("float32_rounding", rounding_mask, rounding_score),
    ]


@pytest.mark.parametrize("name,mask_mod,score_mod", _cases(), ids=[c[0] for c in _cases()])
def test_reference_matches_flex_eager(name, mask_mod, score_mod):
    q, k, v = (randn(1, 4, 24, 16, seed=s) for s in (30, 31, 32))
    out, lse = reference.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
    f_out, f_lse = _flex(q, k, v, mask_mod, score_mod)
    # same values, same NaN and infinity positions (fully masked rows: 0 and -inf in both)
    torch.testing.assert_close(out, f_out.double(), rtol=1e-10, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(lse, f_lse.double(), rtol=1e-10, atol=1e-10, equal_nan=True)
