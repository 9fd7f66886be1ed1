"""Index selectors on a CUDA GPU (skipped elsewhere): DSA top-k against FlexAttention with the
equivalent dense boolean mask, long sequences, the indexer's bounded memory, block selection.

    python -m pytest -q -m gpu tests/test_gpu_selectors.py -s      # -s shows the timings

Timings are printed (``do_bench``, median), not asserted; the benchmark harness records them
(``python -m benchmarks --cases dsa_topk1024 --L 8192,32768,131072 --Hkv 1 --bwd``).
"""
from __future__ import annotations

import pytest
import torch

import attndsl
from attndsl import reference
from attndsl.selectors import LightningIndexer, dense_selection_mask, moba_select, random_causal_indices

pytestmark = pytest.mark.gpu

DEV = "cuda"


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def qkv(B, H, Hkv, L, D, dtype=torch.bfloat16, seed=0, grad=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(s, generator=g, device=DEV, dtype=torch.float32).to(dtype).requires_grad_(grad)
            for s in ((B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, D))]


@pytest.mark.parametrize("Hkv", [1, 16])
def test_dsa_top1024_L8192_vs_flex(Hkv):
    """DSA top-1024 of L=8192 (the DESIGN.md anchor): ours with indices= vs FlexAttention with the
    dense boolean mask of the same selection, forward and gradients, then both timed."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    B, H, L, D, K = 1, 16, 8192, 128, 1024
    idx = random_causal_indices(L, K, device=DEV, seed=0)
    sel = dense_selection_mask(idx, L)[0, 0]
    bm = create_block_mask(lambda b, h, q, k: sel[q, k], None, None, L, L, device=DEV)
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = qkv(B, H, Hkv, L, D, grad=True)
    attn = attndsl.compile()
    ours = lambda a, b_, c: attn(a, b_, c, indices=idx, check_indices=False)  # noqa: E731
    theirs = lambda a, b_, c: flex(a, b_, c, block_mask=bm, enable_gqa=Hkv != H)  # noqa: E731
    o, of = ours(q, k, v), theirs(q, k, v)
    assert rel(o, of) < 2e-2
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    gf = torch.autograd.grad(of, (q, k, v), do)
    for name, a, b in zip(("dq", "dk", "dv"), g, gf):
        assert torch.isfinite(a).all() and rel(a, b) < 2e-2, name
    t = dict(ours_fwd=bench(lambda: ours(q, k, v)), flex_fwd=bench(lambda: theirs(q, k, v)),
             ours_fwd_bwd=bench(lambda: ours(q, k, v).backward(do)),
             flex_fwd_bwd=bench(lambda: theirs(q, k, v).backward(do)))
    print(f"\nDSA top-{K} L={L} H={H} Hkv={Hkv} D={D} bf16: " + ", ".join(f"{n} {ms:.3f} ms" for n, ms in t.items())
          + f"; flex/ours fwd {t['flex_fwd'] / t['ours_fwd']:.2f}x, fwd+bwd {t['flex_fwd_bwd'] / t['ours_fwd_bwd']:.2f}x")


@pytest.mark.parametrize("L", [32768, 131072])
def test_dsa_long(L):
    """Lengths where a dense mask is impractical: forward and backward run; a slice of query rows
    (their outputs and dQ depend only on their own selections) matches the float64 oracle."""
    B, H, Hkv, D, K = 1, 16, 1, 128, 1024
    idx = random_causal_indices(L, K, device=DEV, seed=1)
    q, k, v = qkv(B, H, Hkv, L, D, grad=True)
    attn = attndsl.compile()
    o = attn(q, k, v, indices=idx, check_indices=False)
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    for t in (o, dq, dk, dv):
        assert torch.isfinite(t).all() and (t != 0).any()
    rows = slice(L - 8, L)
    qs = q.detach()[:, :, rows].double().requires_grad_()
    ro, _ = reference.sparse_attention(qs, k.detach().double(), v.detach().double(), idx[:, :, rows])
    (rdq,) = torch.autograd.grad(ro, qs, do[:, :, rows].double())
    assert rel(o[:, :, rows], ro) < 2e-2 and rel(dq[:, :, rows], rdq) < 3e-2
    fwd = bench(lambda: attn(q, k, v, indices=idx, check_indices=False))
    fb = bench(lambda: attn(q, k, v, indices=idx, check_indices=False).backward(do))
    print(f"\nDSA top-{K} L={L} H={H} Hkv={Hkv} D={D} bf16: fwd {fwd:.3f} ms, fwd+bwd {fb:.3f} ms")


def test_dsa_with_mla_head_dims():
    """DSA on MLA-style heads (one selection and one K/V head for all query heads, query/key head dim
    192, value 128): output, lse and every gradient against the float64 gathering oracle."""
    B, H, Hkv, L, K = 1, 4, 1, 1024, 128
    idx = random_causal_indices(L, K, device=DEV, seed=2)
    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = [torch.randn(s, generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
               for s in ((B, H, L, 192), (B, Hkv, L, 192), (B, Hkv, L, 128))]
    sinks = torch.linspace(-1.0, 1.0, H, device=DEV)
    o, lse = attndsl.compile()(q, k, v, indices=idx, sinks=sinks, return_lse=True)
    assert o.shape == (B, H, L, 128)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ro, rlse = reference.sparse_attention(q64, k64, v64, idx, sinks=sinks.double())
    rgrads = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    assert rel(o, ro) < 1e-2 and rel(lse, rlse) < 1e-3
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        assert a.shape == b.shape and rel(a, b) < 2e-2, name


def test_dsa_trains_learnable_biases_and_low_rank_factors():
    """DSA top-128 with learnable ALiBi slopes, a learnable relative-position table, a learnable T5
    bucket table and low-rank factors (u per head, w shared), bf16 on the GPU: output, lse and every
    gradient against the float64 gathering oracle; then DSA top-1024 at L=8192 timed against Flex."""
    from attndsl.patterns.relative_bias import relative_position_bias, t5_bucket_bias
    B, H, Hkv, L, D, K = 1, 8, 1, 1024, 128, 128
    idx = random_causal_indices(L, K, device=DEV, seed=4)
    g = torch.Generator(device=DEV).manual_seed(5)
    q, k, v = qkv(B, H, Hkv, L, D, grad=True, seed=6)
    slopes = (torch.rand(H, generator=g, device=DEV) * 0.1).requires_grad_()
    table = (torch.randn(H, 2 * 64 + 1, generator=g, device=DEV) * 0.5).requires_grad_()
    rel_bias = relative_position_bias(table, 64)  # 129 entries: summed in three pieces of 64 bins
    buckets = (torch.randn(H, 32, generator=g, device=DEV) * 0.5).requires_grad_()
    t5_bias = t5_bucket_bias(buckets, 32, 128)  # 32 buckets: summed in bins (three TF32 products)

    def learned(s, b, h, q_idx, kv_idx):
        return t5_bias(rel_bias(s, b, h, q_idx, kv_idx), b, h, q_idx, kv_idx) - slopes[h] * (q_idx - kv_idx)

    u = (torch.randn(B, H, L, 16, generator=g, device=DEV) * 0.3).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(1, 1, L, 16, generator=g, device=DEV) * 0.3).to(torch.bfloat16).requires_grad_()
    attn = attndsl.compile(mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, score_mod=learned)
    o, lse = attn(q, k, v, indices=idx, bias_factors=(u, w), return_lse=True)
    do = torch.randn_like(o)
    leaves = (q, k, v, u, w, slopes, table, buckets)
    grads = torch.autograd.grad(o, leaves, do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    u64, w64 = (t.detach().double().requires_grad_() for t in (u, w))
    ro, rlse = reference.sparse_attention(q64, k64, v64, idx, mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                                          score_mod=learned, bias_factors=(u64, w64))
    rgrads = torch.autograd.grad(ro, (q64, k64, v64, u64, w64, slopes, table, buckets), do.double())
    assert rel(o, ro) < 1e-2 and rel(lse, rlse) < 1e-3
    for name, a, b in zip(("dq", "dk", "dv", "du", "dw", "dslopes", "dtable", "dbuckets"), grads, rgrads):
        assert a.shape == b.shape and torch.isfinite(a).all() and rel(a, b) < 3e-2, (name, rel(a, b))
    # timings at the DSA anchor's size, against FlexAttention with the selection's dense mask and the
    # same learnable score_mod (it has no low-rank bias; a float32 table does not compile there)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    L, K, H = 8192, 1024, 16
    idx = random_causal_indices(L, K, device=DEV, seed=0)
    sel = dense_selection_mask(idx, L)[0, 0]
    bm = create_block_mask(lambda b, h, q_idx, kv_idx: sel[q_idx, kv_idx], None, None, L, L, device=DEV)
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = qkv(B, H, Hkv, L, D, grad=True)
    slopes = (torch.rand(H, device=DEV) * 0.1).requires_grad_()
    t5 = torch.zeros(H, 32, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    rt = torch.zeros(H, 129, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    u = (torch.randn(B, H, L, 16, device=DEV) * 0.3).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(1, 1, L, 16, device=DEV) * 0.3).to(torch.bfloat16).requires_grad_()
    mods = {"plain": None, "learnable slopes": lambda s, b, h, q_idx, kv_idx: s - slopes[h] * (q_idx - kv_idx),
            "learnable T5 table (bf16)": t5_bucket_bias(t5, 32, 128),
            "learnable relative table (bf16, 129 entries)": relative_position_bias(rt, 64)}
    do = torch.randn(B, H, L, D, device=DEV, dtype=torch.bfloat16)
    lines = []
    for name, mod in mods.items():
        attn = attndsl.compile(score_mod=mod)
        ours = lambda: attn(q, k, v, indices=idx, check_indices=False)  # noqa: E731
        theirs = lambda: flex(q, k, v, score_mod=mod, block_mask=bm, enable_gqa=True)  # noqa: E731
        grads = torch.autograd.grad(ours(), (q, slopes, t5, rt), do, allow_unused=True)
        t = [bench(ours), bench(lambda: ours().backward(do))]
        try:
            fgrads = torch.autograd.grad(theirs(), (q, slopes, t5, rt), do, allow_unused=True)
        except Exception as e:  # Flex's limits are not ours to fail on
            lines.append(f"{name}: ours {t[0]:.3f} / {t[1]:.3f} ms, flex failed: {type(e).__name__}")
            continue
        for a, b in zip(grads, fgrads):
            assert (a is None) == (b is None) and (a is None or rel(a, b) < 3e-2), name
        t += [bench(theirs), bench(lambda: theirs().backward(do))]
        lines.append(f"{name}: ours {t[0]:.3f} / {t[1]:.3f} ms, flex {t[2]:.3f} / {t[3]:.3f} ms, "
                     f"flex/ours {t[2] / t[0]:.2f}x / {t[3] / t[1]:.2f}x")
    lowrank = attndsl.compile()
    t = [bench(lambda: lowrank(q, k, v, indices=idx, check_indices=False, bias_factors=(u, w))),
         bench(lambda: lowrank(q, k, v, indices=idx, check_indices=False, bias_factors=(u, w)).backward(do))]
    lines.append(f"low-rank R=16: ours {t[0]:.3f} / {t[1]:.3f} ms (no Flex counterpart)")
    print(f"\nDSA top-{K} L={L} H={H} Hkv={Hkv} D={D} bf16, fwd / fwd+bwd:\n  " + "\n  ".join(lines))


def test_indexer_long_bounded_memory():
    """L = 131072: an L×L float32 score matrix is 64 GiB; the indexer + top-2048 stays under 4 GiB extra."""
    B, HI, L, DI, K = 1, 16, 131072, 64, 2048
    g = torch.Generator(device=DEV).manual_seed(0)
    q_i = torch.randn(B, HI, L, DI, generator=g, device=DEV, dtype=torch.bfloat16)
    k_i = torch.randn(B, 1, L, DI, generator=g, device=DEV, dtype=torch.bfloat16)
    w = torch.rand(B, HI, L, generator=g, device=DEV)
    ix = LightningIndexer(topk=K)
    ix(q_i[:, :, :4096], k_i[:, :, :4096], w[:, :, :4096])  # compile
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    import time
    t0 = time.time()
    idx = ix(q_i, k_i, w)
    torch.cuda.synchronize()
    secs = time.time() - t0
    extra = torch.cuda.max_memory_allocated() - base
    print(f"\nindexer + top-{K} at L={L}, HI={HI}, DI={DI}: {secs:.2f} s, peak extra {extra / 2**30:.2f} GiB "
          f"(L×L float32 would be {L * L * 4 / 2**30:.0f} GiB)")
    assert extra < 4 * 2**30
    assert ((idx[0, 0] >= 0).sum(-1) == torch.clamp(torch.arange(L, device=DEV) + 1, max=K)).all()
    for t in (0, 5000, L - 1):  # spot-check rows by value against a dense row
        row = ((q_i[0, :, t].float() @ k_i[0, 0, : t + 1].float().T).clamp(min=0) * w[0, :, t, None]).sum(0)
        want = row.topk(min(K, t + 1)).values
        got = row[idx[0, 0, t][idx[0, 0, t] >= 0].long()].sort(descending=True).values
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_moba_blocks_bf16():
    B, H, Hkv, L, D = 1, 4, 2, 4096, 128
    q, k, v = qkv(B, H, Hkv, L, D, grad=True)
    sel = moba_select(q.detach(), k.detach(), block_size=256, topk=4)
    causal = lambda b, h, qi, ki: qi >= ki  # noqa: E731
    o = attndsl.attention(q, k, v, mask_mod=causal, blocks=sel)
    ro, _ = reference.block_sparse_attention(q.detach().double(), k.detach().double(), v.detach().double(), sel,
                                             mask_mod=causal)
    assert rel(o, ro) < 2e-2
    do = torch.randn_like(o)
    for t in torch.autograd.grad(o, (q, k, v), do):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("verify", [True, False])
def test_gather_memoised_direct_launches(verify, monkeypatch):
    """Repeated token-selector calls of one key launch both gather kernels from the runner's memo
    (``fastlaunch.Direct`` where this Triton allows it), give the first call's bits, output and
    gradients (sinks' too; dK/dV up to their atomic adds' order), and match the float64 oracle; with the suite's verification each memoised
    launch is also checked against a fresh one."""
    from attndsl.selectors import sparse
    monkeypatch.setattr(sparse, "VERIFY_MEMO", verify)
    B, H, Hkv, L, D, K = 1, 8, 2, 512, 64, 64
    q, k, v = qkv(B, H, Hkv, L, D, seed=13, grad=True)
    sinks = torch.randn(H, device=DEV, requires_grad=True)
    idx = random_causal_indices(L, K, B=B, G=Hkv, device=DEV, seed=13)
    attn = attndsl.compile(mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    runs = []
    for _ in range(3):
        out = attn(q, k, v, indices=idx, sinks=sinks, check_indices=False)
        runs.append((out, *torch.autograd.grad((out.float() ** 2).sum(), (q, k, v, sinks))))
    memo = sparse.gather_runner(attn, q)._memo
    assert len(memo) == 2, list(memo)
    for later in runs[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), runs[0], later):
            # dK/dV add up with atomics in no fixed order: equal up to the summation order
            assert torch.equal(a, b) if name not in ("dk", "dv") else rel(a, b) < 1e-3, name
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = reference.sparse_attention(*leaves[:3], idx, mask_mod=lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                                        sinks=leaves[3])
    assert rel(runs[-1][0], ref) < 2e-2
    for got, want in zip(runs[-1][1:], torch.autograd.grad((ref ** 2).sum(), leaves)):
        assert rel(got, want) < 3e-2
