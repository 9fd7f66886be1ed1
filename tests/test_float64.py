"""float64 on CPU (issue 26, part 3): the kernels compute and accumulate in float64 (their
``ACC_DTYPE``) through Triton's interpreter, so ``torch.autograd.gradcheck`` passes on the public
call; float64 elsewhere is refused (tests/test_errors.py)."""
from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl.runtime import cache

F64 = torch.float64


def randn(*shape, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(requires_grad)


def mask(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx) & (q_idx - kv_idx < 5)


def call(q, k, v, slope, **kw):
    """Masked, score-modified attention with a learnable per-head slope (captured tensor)."""
    def score_mod(score, b, h, q_idx, kv_idx):
        return score - slope[h] * (q_idx - kv_idx)

    return attndsl.attention(q, k, v, mask_mod=mask, score_mod=score_mod, **kw)


def test_float64_matches_the_reference_to_float64_precision():
    q, k, v = (randn(1, 2, 20, 16, seed=s) for s in range(3))
    slope = torch.tensor([0.3, -0.2], dtype=F64, requires_grad=True)
    out, lse = call(q, k, v, slope, return_lse=True)
    assert out.dtype == F64 and lse.dtype == F64
    ref, ref_lse = attndsl.reference.attention(q, k, v, mask_mod=mask,
                                               score_mod=lambda s, b, h, q_idx, kv_idx: s - slope[h] * (q_idx - kv_idx))
    assert (out - ref).abs().max() < 1e-12 and (lse - ref_lse).abs().max() < 1e-12
    got = torch.autograd.grad((out.square().sum() + lse.sum()), [q, k, v, slope])
    want = torch.autograd.grad((ref.square().sum() + ref_lse.sum()), [q, k, v, slope])
    for g, w in zip(got, want):
        assert g.dtype == F64 and (g - w).abs().max() < 1e-11


@pytest.mark.parametrize("D", [16, 48])
def test_float64_mask_only_is_exact(D):
    """No score modifier: the scale is not folded into the exponent (it would be rounded to float32)."""
    q, k, v = (randn(1, 2, 40, D, seed=s, requires_grad=False) for s in range(20, 23))
    out = attndsl.attention(q, k, v, mask_mod=mask)
    ref, _ = attndsl.reference.attention(q, k, v, mask_mod=mask)
    assert (out - ref).abs().max() < 1e-12


def test_gradcheck_mask_score_mod_learnable():
    """The standard check of an autograd op, on the public call: every input that learns is
    perturbed (q, k, v and the captured slope), outputs out and lse."""
    q, k, v = (randn(1, 2, 6, 16, seed=s) for s in range(3, 6))
    slope = torch.tensor([0.25, -0.4], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: call(*x, return_lse=True), (q, k, v, slope), fast_mode=True)
    # every element of the learnable tensor, the full way (on a 2-element projection of the output:
    # full mode runs one backward per output element)
    fixed = [t.detach() for t in (q, k, v)]
    w = randn(1, 2, 6, 16, seed=12, requires_grad=False)
    assert torch.autograd.gradcheck(lambda s: (call(*fixed, s) * w).sum(dim=(-1, -2)), (slope,))


def test_gradcheck_sinks_and_bias_factors():
    q, k, v = (randn(1, 2, 6, 16, seed=s) for s in range(6, 9))
    sinks = randn(2, seed=9)
    u, w = randn(1, 2, 6, 3, seed=10), randn(1, 2, 6, 3, seed=11)

    def f(q, k, v, sinks, u, w):
        return attndsl.attention(q, k, v, mask_mod=mask, sinks=sinks, bias_factors=(u, w), return_lse=True)

    assert torch.autograd.gradcheck(f, (q, k, v, sinks, u, w), fast_mode=True)


def test_float64_uses_a_module_of_its_own():
    """float32 and float64 calls of one pattern run different copies of one generated source."""
    comp = attndsl.compile(mask_mod=mask)
    x32 = torch.randn(1, 1, 8, 16)
    comp(x32, x32, x32)
    comp(x32.double(), x32.double(), x32.double())
    m32 = cache._MODULES[(comp.spec.key, comp.spec.name, True, False)]
    m64 = cache._MODULES[(comp.spec.key, comp.spec.name, True, True)]
    assert m32 is not m64
    assert m32.ACC_DTYPE.value == torch.float32 or str(m32.ACC_DTYPE.value) == "fp32"
    assert str(m64.ACC_DTYPE.value) == "fp64"


def test_float64_empty_call():
    q = randn(1, 2, 0, 16)
    k = v = randn(1, 2, 5, 16)
    out, lse = attndsl.attention(q, k, v, return_lse=True)
    assert out.dtype == F64 and lse.dtype == F64 and out.shape == (1, 2, 0, 16)


def test_float64_refused_with_token_selectors():
    q = torch.zeros(1, 2, 8, 16, dtype=F64)
    idx = torch.zeros(1, 1, 8, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="float64.*index selectors"):
        attndsl.attention(q, q, q, indices=idx)
