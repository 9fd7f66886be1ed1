"""deterministic=True: gradients of learnable captured tensors without atomic adds, against the
float64 reference and bitwise equal across repeated backward passes."""
import pytest
import torch

import attndsl

causal = lambda b, h, q, k: q >= k  # noqa: E731


def _grad(attn, mod, learn, q, k, v, do):
    o = attn(q, k, v)
    return torch.autograd.grad(o, [q, learn], do)


KINDS = ["program", "zero_dim", "row", "exact", "t5", "t5_oblong", "clipped_wide", "grid", "col", "col_broadcast"]


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_learnable_gradients(kind):
    torch.manual_seed(1)
    # one batch (the programs the interpreter runs halve) but where the table is indexed by batch
    B, Hq, Hkv, Lq, Lkv, D = 2 if kind == "exact" else 1, 4, 2, 50, 70, 32
    if kind == "program":
        t = torch.rand(Hq, requires_grad=True)
        mod = lambda s, b, h, q, k: s - t[h] * (q - k)  # noqa: E731
    elif kind == "zero_dim":
        t = torch.tensor(15.0, requires_grad=True)
        mod = lambda s, b, h, q, k: t * torch.tanh(s / t)  # noqa: E731
    elif kind == "row":
        t = torch.randn(Lq, requires_grad=True)
        mod = lambda s, b, h, q, k: s * torch.sigmoid(t[q])  # noqa: E731
    elif kind == "exact":
        t = torch.randn(B, Hq, Lq, Lkv, requires_grad=True)
        mod = lambda s, b, h, q, k: s + t[b, h, q, k]  # noqa: E731
    elif kind in ("t5", "t5_oblong"):  # scatter: tiles of one bucket (uniform) and, summed per diagonal, of a few
        from attndsl.patterns.relative_bias import t5_bucket_bias
        t = torch.randn(Hq, 16, requires_grad=True)
        mod = t5_bucket_bias(t, 16, 24, bidirectional=False)
    elif kind == "grid":  # scatter not along diagonals (a 2-D grid distance): per entry of each tile
        t = torch.randn(Hq, 17, 15, requires_grad=True)
        mod = lambda s, b, h, q, k: s + t[h, q // 8 - k // 8 + 8, q % 8 - k % 8 + 7]  # noqa: E731
    elif kind == "clipped_wide":  # scatter with no head index: one row per program over the whole table
        t = torch.randn(2 * 60 + 1, requires_grad=True)
        mod = lambda s, b, h, q, k: s + t[(q - k).clamp(-60, 60) + 60]  # noqa: E731
    elif kind == "col":  # index follows kv only, two keys per entry
        t = torch.randn(Hq, Lkv // 2 + 1, requires_grad=True)
        mod = lambda s, b, h, q, k: s + t[h, k // 2]  # noqa: E731
    else:  # col, one table for every head
        t = torch.randn(Lkv, requires_grad=True)
        mod = lambda s, b, h, q, k: s * torch.sigmoid(t[k])  # noqa: E731
    q = torch.randn(B, Hq, Lq, D, requires_grad=True)
    k, v = torch.randn(B, Hkv, Lkv, D), torch.randn(B, Hkv, Lkv, D)
    block_m = 32 if kind == "t5_oblong" else 16  # the diagonals' rotation wraps twice or three times
    attn = attndsl.compile(mask_mod=causal, score_mod=mod, deterministic=True, block_m=block_m, block_n=16)
    do = torch.randn(B, Hq, Lq, D)
    dq1, dt1 = _grad(attn, mod, t, q, k, v, do)
    dq2, dt2 = _grad(attn, mod, t, q, k, v, do)
    assert torch.equal(dt1, dt2) and torch.equal(dq1, dq2)
    ro, _ = attndsl.reference.attention(q, k, v, mask_mod=causal, score_mod=mod)
    rq, rt = torch.autograd.grad(ro, [q, t], do.double())
    # a 0-d or per-head gradient sums ~10^4 fp32 terms that largely cancel: allow their rounding
    assert (dt1.double() - rt).abs().max() <= 1e-4 * rt.abs().max() + 2e-5
    assert (dq1.double() - rq).abs().max() <= 1e-4 * rq.abs().max()


def test_deterministic_refuses_oversized_partials_before_launch(monkeypatch):
    """A shared table keeps one row of partial sums per query tile: past the limit, a clear error
    at the call, before any kernel runs."""
    from attndsl.runtime import gradients
    monkeypatch.setattr(gradients, "MAX_PRIVATE_PARTIALS", 1000)
    table = torch.randn(2, 9, requires_grad=True)
    attn = attndsl.compile(score_mod=lambda s, b, h, q, k: s + table[h, (q - k).clamp(-4, 4) + 4], deterministic=True)
    x = torch.full((1, 2, 1024, 16), float("nan"))  # a kernel that ran would leave NaNs, not raise
    with pytest.raises(ValueError, match="deterministic=True.*partial sums"):
        attn(x, x, x)


def test_deterministic_refuses_broadcast_full_bias_before_launch():
    bias = torch.randn(2, 16, 16, requires_grad=True)  # no batch dim, called with B=2
    attn = attndsl.compile(score_mod=lambda s, b, h, q, k: s + bias[h, q, k], deterministic=True)
    x = torch.randn(2, 2, 16, 16)
    with pytest.raises(NotImplementedError, match="atomic"):
        attn(x, x, x)
