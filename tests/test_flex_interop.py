"""FlexAttention interop (issue 26 part 2): block_mask=, enable_gqa=, return_aux=, kernel_options=,
and the drop-ins ``attndsl.flex_attention`` / ``attndsl.create_block_mask``, against eager torch
flex_attention on CPU."""
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as F

import attndsl
import attndsl.reference

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() < 6


def softcap(score, b, h, q_idx, kv_idx):
    return 20 * torch.tanh(score / 20)


def qkv(Hq=2, Hkv=2, L=32, D=16, dtype=torch.float32, grad=False):
    return (torch.randn(1, Hq, L, D, dtype=dtype, requires_grad=grad),
            torch.randn(1, Hkv, L, D, dtype=dtype, requires_grad=grad),
            torch.randn(1, Hkv, L, D, dtype=dtype, requires_grad=grad))


def close(a, b, tol=1e-5):
    return float((a.detach().double() - b.detach().double()).abs().max()) < tol


@pytest.mark.parametrize("mask", [causal, window])
def test_torch_block_mask_and_score_mod_match_torch(mask):
    q, k, v = qkv(grad=True)
    bm = F.create_block_mask(mask, None, None, 32, 32, device="cpu")
    got = attndsl.flex_attention(q, k, v, score_mod=softcap, block_mask=bm)
    # torch's flex_attention has no CPU backward: gradients against the reference
    want = F.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=softcap, block_mask=bm)
    assert close(got, want)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=mask, score_mod=softcap)
    g2 = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    assert all(close(a, b, 1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_return_aux_and_return_lse(dtype):
    q, k, v = qkv(dtype=dtype)
    bm = F.create_block_mask(causal, 1, 1, 32, 32, device="cpu")
    try:
        out, aux = attndsl.flex_attention(q, k, v, block_mask=bm, return_aux=F.AuxRequest(lse=True))
    except TypeError as e:
        if dtype == torch.float64 and "supported" in str(e):
            pytest.skip("float64 inputs are not supported on this branch (issue 26 part 3)")
        raise
    want, waux = F.flex_attention(q, k, v, block_mask=bm, return_aux=F.AuxRequest(lse=True))
    assert isinstance(aux, F.AuxOutput) and aux.max_scores is None
    assert close(out, want, 1e-4) and close(aux.lse, waux.lse, 1e-4)
    out2, lse = attndsl.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert close(out2, out) and close(lse, aux.lse)
    with pytest.raises(ValueError, match="Cannot specify both"):
        attndsl.flex_attention(q, k, v, return_lse=True, return_aux=F.AuxRequest(lse=True))
    with pytest.raises(NotImplementedError, match="max_scores"):
        attndsl.flex_attention(q, k, v, return_aux=F.AuxRequest(max_scores=True))


def test_noop_block_mask_means_no_mask():
    q, k, v = qkv()
    bm = F.create_block_mask(F.noop_mask, None, None, 32, 32, device="cpu")
    assert close(attndsl.attention(q, k, v, block_mask=bm), attndsl.attention(q, k, v))


def test_create_block_mask_is_light_and_accepted_everywhere():
    bm = attndsl.create_block_mask(causal, None, None, 32, 32, device="cpu")
    assert isinstance(bm, attndsl.PatternMask) and bm.shape == (1, 1, 32, 32) and bm.mask_mod is causal
    assert not any(isinstance(x, torch.Tensor) for x in vars(bm).values())  # nothing materialised
    big = attndsl.create_block_mask(causal, 1, 1, 1 << 20, 1 << 20)  # O(1): no L² work or memory
    assert big.seq_lengths == (1 << 20, 1 << 20)
    q, k, v = qkv()
    want = F.flex_attention(q, k, v, block_mask=F.create_block_mask(causal, None, None, 32, 32, device="cpu"))
    assert close(attndsl.flex_attention(q, k, v, block_mask=bm), want)
    assert close(attndsl.attention(q, k, v, block_mask=bm), want)
    with pytest.raises(ValueError, match="lengths"):
        attndsl.attention(*qkv(L=48), block_mask=bm)
    with pytest.raises(ValueError, match="not both"):
        attndsl.attention(q, k, v, block_mask=bm, mask_mod=causal)


def test_enable_gqa_like_flex():
    q, k, v = qkv(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attndsl.flex_attention(q, k, v)  # Flex's default refuses differing heads: so does the drop-in
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attndsl.attention(q, k, v, enable_gqa=False)
    got = attndsl.flex_attention(q, k, v, score_mod=softcap, enable_gqa=True)
    assert close(got, F.flex_attention(q, k, v, score_mod=softcap, enable_gqa=True))
    assert close(attndsl.attention(q, k, v, score_mod=softcap), got)  # attndsl's own default accepts GQA


def test_kernel_options():
    q, k, v = qkv()
    got = attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16, "PRESCALE_QK": False})
    assert close(got, F.flex_attention(q, k, v))
    with pytest.raises(ValueError, match="unknown option"):
        attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_MM": 16})
    with pytest.raises(ValueError, match="positive int"):
        attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_M": 0})


def test_signature_matches_torch():
    import inspect
    ours = inspect.signature(attndsl.flex_attention)
    theirs = inspect.signature(F.flex_attention)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()]
