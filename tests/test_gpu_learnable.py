"""Issue 6 on the GPU: learnable captured tensors, sinks, sigmoid and low-rank bias at realistic sizes
in bf16, compiled Triton (not the interpreter), against the float64 reference on the same device.

Uses the CPU suite's comparison (``test_learnable.compare``: out, lse and the gradients of q, k, v
and of every learnable tensor, reduced gradients measured against the size of their terms) with
the GPU's default tiles. Skipped without CUDA.
"""
import math

import pytest
import torch

import attndsl
from attndsl.patterns.relative_bias import relative_position_bias, t5_bucket_bias
from test_learnable import _dense_ref_kw, causal, causal_offset, compare, sliding

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
BF16 = torch.bfloat16
# bf16 q/k/v: outputs measured <= 4e-3 and gradients <= 6e-3 on the dense GPU suite (test_gpu.py)
TOL = 3e-2


def leaf(*shape, gen, dtype=BF16, scale=1.0, grad=True):
    t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEV)
    return t.requires_grad_(grad)


def qkv(B, Hq, Hkv, Lq, Lkv, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return gen, (leaf(B, Hq, Lq, D, gen=gen), leaf(B, Hkv, Lkv, D, gen=gen), leaf(B, Hkv, Lkv, D, gen=gen))


def run(q, k, v, name, **kw):
    errs = compare(q, k, v, block=None, tol=TOL, name=name, **kw)
    print(f"\n[attndsl-gpu-learnable] {name}: " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()))


@pytest.mark.parametrize("table_dtype", [BF16, torch.float32])
def test_t5_table_causal_gqa(table_dtype):
    """2048 tokens, 128x64 tiles: most tiles read one bucket (the uniform path), the diagonal band not."""
    gen, (q, k, v) = qkv(1, 8, 2, 2048, 2048, 128, seed=1)
    table = leaf(8, 32, gen=gen, dtype=table_dtype, scale=0.5)
    run(q, k, v, f"t5 causal {table_dtype}", mask_mod=causal,
        score_mod=t5_bucket_bias(table, 32, 128, bidirectional=False), learn=[table])


def test_t5_table_bidirectional_lq_ne_lkv():
    gen, (q, k, v) = qkv(2, 4, 4, 1000, 1500, 64, seed=2)
    table = leaf(4, 32, gen=gen, dtype=torch.float32, scale=0.5)
    run(q, k, v, "t5 bidirectional", score_mod=t5_bucket_bias(table, 32, 128), learn=[table])


def test_clipped_relative_table_sliding():
    gen, (q, k, v) = qkv(1, 4, 2, 1536, 1536, 128, seed=3)
    table = leaf(4, 2 * 64 + 1, gen=gen, scale=0.5)
    run(q, k, v, "clipped table sliding", mask_mod=sliding(300), score_mod=relative_position_bias(table, 64),
        learn=[table])


def test_alibi_slopes_and_temperature():
    gen, (q, k, v) = qkv(1, 8, 8, 1024, 1024, 64, seed=4)
    slopes = leaf(8, gen=gen, dtype=torch.float32, scale=0.05)
    temp = torch.tensor(0.8, device=DEV, requires_grad=True)
    run(q, k, v, "alibi slopes + temperature", mask_mod=causal,
        score_mod=lambda s, b, h, qi, kv: s * temp + slopes[h] * (kv - qi), learn=[slopes, temp])


@pytest.mark.parametrize("batched", [False, True])
def test_pair_bias(batched):
    """A full-size bias: its gradient is written tile by tile (no atomics) in its own dtype."""
    B, L = (2, 768) if batched else (1, 1024)
    gen, (q, k, v) = qkv(B, 4, 2, L, L, 128, seed=5)
    bias = leaf(*((B,) if batched else ()), 4, L, L, gen=gen, scale=0.5)
    mod = (lambda s, b, h, qi, kv: s + bias[b, h, qi, kv]) if batched else (lambda s, b, h, qi, kv: s + bias[h, qi, kv])
    run(q, k, v, f"pair bias batched={batched}", mask_mod=causal, score_mod=mod, learn=[bias])


def test_sinks_dead_rows_lse():
    gen, (q, k, v) = qkv(1, 8, 4, 1024, 1024, 128, seed=6)
    sinks = leaf(8, gen=gen, dtype=torch.float32)
    run(q, k, v, "sinks dead rows", mask_mod=causal_offset(100), extras=dict(sinks=sinks), lse_loss=True)


def test_sinks_document_with_learnable_slopes():
    gen, (q, k, v) = qkv(1, 4, 4, 1024, 1024, 64, seed=7)
    sinks = leaf(4, gen=gen, dtype=torch.float32)
    slopes = leaf(4, gen=gen, dtype=torch.float32, scale=0.05)
    ids = torch.sort(torch.randint(0, 5, (1024,), generator=gen)).values.to(DEV)
    mask = lambda b, h, qi, kv: (ids[qi] == ids[kv]) & (qi >= kv)  # noqa: E731
    run(q, k, v, "sinks document slopes", mask_mod=mask, score_mod=lambda s, b, h, qi, kv: s + slopes[h] * (kv - qi),
        extras=dict(sinks=sinks), learn=[slopes])


def test_sigmoid_causal_and_with_score_mod():
    gen, (q, k, v) = qkv(1, 8, 2, 2048, 2048, 128, seed=8)
    run(q, k, v, "sigmoid causal", mask_mod=causal, normalizer="sigmoid")
    table = leaf(8, 32, gen=gen, dtype=torch.float32, scale=0.5)
    run(q, k, v, "sigmoid t5 sliding", mask_mod=sliding(700), normalizer="sigmoid",
        score_mod=t5_bucket_bias(table, 32, 128, bidirectional=False), learn=[table],
        extras=dict(sigmoid_bias=-math.log(700)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (BF16, 1e-2)])
def test_sigmoid_hardware_tanh_only_for_16_bit_inputs(dtype, tol):
    """16-bit inputs take sigmoid through tanh.approx (its error, about 1e-4 of the output, is under
    bf16 rounding); float32 inputs keep exp2 and a division, so they stay near float32 accuracy."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = [torch.randn(1, 4, 1024, 64, generator=gen, dtype=torch.float64).to(dtype).to(DEV) for _ in range(3)]
    out = attndsl.attention(q, k, v, mask_mod=causal, normalizer="sigmoid")
    s = (q.double() @ k.double().transpose(-1, -2)) / 8.0 - math.log(1024)
    keep = torch.ones(1024, 1024, dtype=torch.bool, device=DEV).tril()
    ref = torch.sigmoid(s).masked_fill(~keep, 0.0) @ v.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err


def test_low_rank_bias_against_dense():
    gen, (q, k, v) = qkv(1, 4, 2, 1024, 1280, 128, seed=9)
    u = leaf(1, 4, 1024, 16, gen=gen, scale=0.5)
    w = leaf(1, 2, 1280, 16, gen=gen, scale=0.5)
    run(q, k, v, "low-rank R=16", extras=dict(bias_factors=(u, w)), ref_kw=_dense_ref_kw(u, w, 4))


def test_one_module_for_every_length():
    """Lengths are runtime arguments: one render and one import serve every length (Triton may still
    specialise its own binary on a length's divisibility by 16)."""
    from attndsl.runtime import cache
    table = torch.randn(4, 32, device=DEV, requires_grad=True)
    fn = attndsl.compile(mask_mod=causal, score_mod=t5_bucket_bias(table, 32, 128))
    before = dict(cache.STATS)
    for L in (100, 1000, 1537, 4096):
        q = torch.randn(1, 4, L, 64, device=DEV, dtype=BF16, requires_grad=True)
        fn(q, q, q).sum().backward()
    assert {k_: cache.STATS[k_] - before[k_] for k_ in ("render", "import")} in (
        {"render": 1, "import": 1}, {"render": 0, "import": 1})  # rendered by an earlier run: on disk
    assert len(fn._runners) == 1


@pytest.mark.parametrize("kind", ["t5", "col", "slopes", "row"])
def test_deterministic_shared_tables_are_bitwise_repeatable(kind):
    """Atomic adds into a shared table differ from run to run in their last bits on a GPU;
    deterministic=True reduces per-program rows in a fixed order: bitwise equal, and equal to the
    atomic path within rounding."""
    gen, (q, k, v) = qkv(1, 8, 2, 2048, 2048, 128, seed=10)
    if kind == "t5":
        table = leaf(8, 32, gen=gen, dtype=torch.float32, scale=0.5)
        mod = t5_bucket_bias(table, 32, 128, bidirectional=False)
    elif kind == "col":
        table = leaf(8, 2048, gen=gen, dtype=torch.float32, scale=0.5)
        mod = lambda s, b, h, qi, kv: s + table[h, kv]  # noqa: E731
    elif kind == "slopes":  # one sum per program
        table = leaf(8, gen=gen, dtype=torch.float32, scale=0.01)
        mod = lambda s, b, h, qi, kv: s + table[h] * (kv - qi)  # noqa: E731
    else:  # one sum per query row (a per-query temperature: an additive row bias has gradient 0)
        table = leaf(8, 2048, gen=gen, dtype=torch.float32, scale=0.2)
        mod = lambda s, b, h, qi, kv: s * (1.0 + table[h, qi])  # noqa: E731
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(DEV, BF16)
    det = attndsl.compile(mask_mod=causal, score_mod=mod, deterministic=True)
    fast = attndsl.compile(mask_mod=causal, score_mod=mod)
    g1 = torch.autograd.grad(det(q, k, v), [q, table], do)
    g2 = torch.autograd.grad(det(q, k, v), [q, table], do)
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    g3 = torch.autograd.grad(fast(q, k, v), [q, table], do)
    scale = g3[1].abs().max()
    assert (g1[1] - g3[1]).abs().max() <= 1e-4 * scale, ((g1[1] - g3[1]).abs().max(), scale)


def test_wide_forward_tiles_without_mask_or_score_mod():
    """Patterns with neither mask nor score modifier run 256-row forward tiles on grids that are not
    small: dense (with the lse's gradient), sinks, sigmoid and a low-rank bias, with lengths that are
    not multiples of the tiles and GQA."""
    from attndsl.runtime.config import SMALL_GRID_PER_SM
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    B, Hq, Hkv, Lkv = 2, 8, 2, 3001
    Lq = 128 * (SMALL_GRID_PER_SM * sms // (B * Hq) + 2) - 37
    gen, (q, k, v) = qkv(B, Hq, Hkv, Lq, Lkv, 128, seed=31)
    which, cfg = attndsl.compile().runner(q).forward_tiles(q)
    assert which == "fwd_wide" and cfg.block_m == 256, (which, cfg)
    run(q, k, v, "wide dense", lse_loss=True)
    run(q, k, v, "wide sinks", extras=dict(sinks=leaf(Hq, gen=gen, dtype=torch.float32)), lse_loss=True)
    run(q, k, v, "wide sigmoid", normalizer="sigmoid")
    u = leaf(B, Hq, Lq, 16, gen=gen, scale=0.5)
    w = leaf(1, Hkv, Lkv, 16, gen=gen, scale=0.5)
    run(q, k, v, "wide low-rank R=16", extras=dict(bias_factors=(u, w)), ref_kw=_dense_ref_kw(u, w, Hq))
