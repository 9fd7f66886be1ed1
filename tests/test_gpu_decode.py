"""Decode kernels on a CUDA GPU (skipped elsewhere): a few cases against the float64 oracle, the
decode kernels compiled for the device, and one decode step captured in a CUDA graph and replayed.

    python -m pytest -q -m gpu tests/test_gpu_decode.py

Timings live in ``benchmarks/decode.py``.
"""
from __future__ import annotations

import pytest
import torch

from attndsl.patterns import alibi, alibi_slopes, causal, document, sliding_window, softcap
from attndsl.patterns.tree import tree_mask
from attndsl.serving import PagedKVCache, decode
from attndsl.serving.reference import decode_reference

pytestmark = pytest.mark.gpu

DEV = "cuda"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _cache(B, Hkv, D, lens, page_size, dtype, seed=0, max_seq_len=1024):
    g = torch.Generator(device=DEV).manual_seed(seed)
    cache = PagedKVCache(B * (max_seq_len // page_size) + 4, page_size, Hkv, D, max_batch=B, max_seq_len=max_seq_len,
                         dtype=dtype, device=DEV)
    cache.k_pool.normal_(generator=g)
    cache.v_pool.normal_(generator=g)
    for s, n in enumerate(lens):
        cache.prefill(s, torch.randn(Hkv, n, D, generator=g, device=DEV).to(dtype),
                      torch.randn(Hkv, n, D, generator=g, device=DEV).to(dtype))
    return cache


def _cases():
    return {
        "plain": dict(),
        "causal": dict(mask_mod=causal),
        "window": dict(mask_mod=sliding_window(200)),
        "softcap": dict(mask_mod=causal, score_mod=softcap(20.0)),
        "document": dict(mask_mod=document(torch.arange(1024, device=DEV, dtype=torch.int32) // 300)),
    }


CASE_NAMES = ["plain", "causal", "window", "softcap", "document"]


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("page_size", [16, 128])
@pytest.mark.parametrize("lq", [1, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_vs_reference(name, page_size, lq, dtype):
    B, Hq, Hkv, D = 4, 8, 2, 128
    lens = [1024, 777, 64 + lq, 300]
    cache = _cache(B, Hkv, D, lens, page_size, dtype)
    q = torch.randn(B, Hq, lq, D, device=DEV, dtype=dtype)
    pat = _cases()[name]
    for ns in (None, 1, 4):
        out, lse = cache.decode(q, return_lse=True, num_splits=ns, **pat)
        ro, rl = decode_reference(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens,
                                  page_table=cache.page_table, **pat)
        assert rel(out, ro) < 1e-2, (name, ns)
        assert (lse.double() - rl).abs().max().item() < 2e-2


def test_sinks_alibi_dsa_tree():
    B, Hq, Hkv, D = 3, 8, 2, 128
    dtype = torch.bfloat16
    lens = [900, 130, 512]
    cache = _cache(B, Hkv, D, lens, 64, dtype, seed=1)
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=dtype)
    sinks = torch.randn(Hq, device=DEV)
    kw = dict(mask_mod=causal, score_mod=alibi(alibi_slopes(Hq, device=DEV)), sinks=sinks)
    for ns in (1, 3):
        out = cache.decode(q, num_splits=ns, **kw)
        ro, _ = decode_reference(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
                                 **kw)
        assert rel(out, ro) < 1e-2
    idx = torch.randint(-1, 900, (B, 1, 1, 200), device=DEV, dtype=torch.int32)
    out = cache.decode(q, indices=idx, num_splits=2)
    ro, _ = decode_reference(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
                             indices=idx)
    assert rel(out, ro) < 1e-2
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 5, -1], device=DEV)
    qt = torch.randn(B, Hq, 8, D, device=DEV, dtype=dtype)
    mask = tree_mask(parents, cache.seq_lens - 8)
    out = cache.decode(qt, mask_mod=mask)
    ro, _ = decode_reference(qt, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
                             mask_mod=mask)
    assert rel(out, ro) < 1e-2


def test_cuda_graph_decode_step():
    """append_step + decode captured once, replayed for several steps: each replay matches an eager
    call on the same cache state (and the oracle)."""
    B, Hq, Hkv, D, steps = 4, 8, 2, 128, 5
    dtype = torch.bfloat16
    lens = [500, 33, 1000 - steps, 260]
    cache = _cache(B, Hkv, D, lens, 16, dtype, seed=2)
    for s, n in enumerate(lens):
        cache.reserve(s, n + steps)
    win = sliding_window(128)
    q_buf = torch.zeros(B, Hq, 1, D, device=DEV, dtype=dtype)
    k_buf = torch.zeros(B, Hkv, 1, D, device=DEV, dtype=dtype)
    v_buf = torch.zeros(B, Hkv, 1, D, device=DEV, dtype=dtype)

    def step():
        cache.append_step(k_buf, v_buf)
        return cache.decode(q_buf, mask_mod=win)

    # warm up (compiles the kernels) on a side stream, then undo its append
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    cache.seq_lens -= 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    # capture records the device ops without running them
    torch.cuda.synchronize()
    start = cache.seq_lens.clone()
    for t in range(steps):
        q_buf.copy_(torch.randn_like(q_buf))
        k_buf.copy_(torch.randn_like(k_buf))
        v_buf.copy_(torch.randn_like(v_buf))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(cache.seq_lens, start + t + 1)
        eager = cache.decode(q_buf, mask_mod=win)
        assert torch.equal(out, eager)
        ro, _ = decode_reference(q_buf, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens,
                                 page_table=cache.page_table, mask_mod=win)
        assert rel(out, ro) < 1e-2


def test_compiled_step_reduce_overhead():
    """A serving step (append_step + decode) under torch.compile(fullgraph=True,
    mode="reduce-overhead"): the attndsl::decode op inside inductor's CUDA graph; every replayed step
    equals an eager step on a copy of the cache and matches the oracle."""
    B, Hq, Hkv, D, steps = 4, 8, 2, 128, 4
    dtype = torch.bfloat16
    lens = [500, 33, 700, 260]
    caches = [_cache(B, Hkv, D, lens, 16, dtype, seed=3) for _ in range(2)]
    for c in caches:
        for s, n in enumerate(lens):
            c.reserve(s, n + steps)
    win = sliding_window(128)

    def step(cache, q, k, v):
        cache.append_step(k, v)
        return cache.decode(q, mask_mod=win)

    cstep = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    g = torch.Generator(device=DEV).manual_seed(4)
    with torch.no_grad():
        for _ in range(steps):
            q = torch.randn(B, Hq, 1, D, device=DEV, generator=g).to(dtype)
            k = torch.randn(B, Hkv, 1, D, device=DEV, generator=g).to(dtype)
            v = torch.randn(B, Hkv, 1, D, device=DEV, generator=g).to(dtype)
            eager = step(caches[0], q, k, v)
            comp = cstep(caches[1], q, k, v).clone()
            assert torch.equal(caches[0].seq_lens, caches[1].seq_lens)
            assert rel(comp, eager) < 1e-3
            ro, _ = decode_reference(q, caches[1].k_pool, caches[1].v_pool, seq_lens=caches[1].seq_lens,
                                     page_table=caches[1].page_table, mask_mod=win)
            assert rel(comp, ro) < 1e-2


@pytest.mark.parametrize("ko", [dict(BLOCK_N=16, num_stages=4), dict(BLOCK_N=32, num_warps=8, per_sm=4),
                                dict(BLOCK_N=128, num_warps=8, num_stages=2), dict(rotate=1),
                                dict(rotate=1, per_sm=8, num_stages=4)])
def test_sweep_options_are_correct(ko):
    """The tile options ``benchmarks/decode.py --sweep`` times give right answers (pages of 16)."""
    B, Hq, Hkv, D = 4, 32, 8, 128
    cache = _cache(B, Hkv, D, [1024, 777, 65, 300], 16, torch.bfloat16, seed=5)
    q = torch.randn(B, Hq, 1, D, device=DEV, dtype=torch.bfloat16)
    for pat in (dict(), dict(mask_mod=sliding_window(200))):
        for _ in range(2):  # the memoised launch too
            out = cache.decode(q, kernel_options=ko, **pat)
            ro, _ = decode_reference(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens,
                                     page_table=cache.page_table, **pat)
            assert rel(out, ro) < 1e-2, (ko, pat)


def test_cuda_graph_fused_merge():
    """The fused merge (the last split of each program's rows merges the partials after an acq_rel
    counter, and zeroes it) in one CUDA graph of several split calls (window, sinks, DSA indices;
    they share the device's counters), replayed with new inputs: every replay equals the merge
    kernel's eager result and the oracle (a counter left non-zero would skip or repeat a merge in
    the next call), and the counters are zero after it."""
    from attndsl.serving import decoding
    B, Hq, Hkv, D = 4, 32, 8, 128
    dtype = torch.bfloat16
    cache = _cache(B, Hkv, D, [1024, 777, 65, 300], 64, dtype, seed=7)
    g = torch.Generator(device=DEV).manual_seed(7)
    q = torch.zeros(B, Hq, 1, D, device=DEV, dtype=dtype)
    sinks = torch.randn(Hq, device=DEV)
    idx = torch.zeros(B, 1, 1, 256, device=DEV, dtype=torch.int32)
    calls = [dict(mask_mod=sliding_window(600), num_splits=4), dict(mask_mod=causal, sinks=sinks, num_splits=7),
             dict(indices=idx, num_splits=3), dict(mask_mod=sliding_window(600), num_splits=16)]

    def step(fused):
        return [cache.decode(q, kernel_options={"fused_merge": fused}, **kw) for kw in calls]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up: compiles, plans (the counters are made here, outside the capture)
        step(1)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(1)
    plans = [p for p in decoding._PLANS.values() if p.counters is not None]
    assert plans, "no fused plan"
    for _ in range(4):
        q.copy_(torch.randn(q.shape, device=DEV, generator=g).to(dtype))
        idx.copy_(torch.randint(-1, 1100, idx.shape, device=DEV, generator=g, dtype=torch.int32))
        for _ in range(3):  # replays of the same inputs give the same answer (each merges once)
            graph.replay()
        torch.cuda.synchronize()
        two = step(0)
        for out, ref2, kw in zip(outs, two, calls):
            assert rel(out, ref2) < 1e-3, kw
            ro, _ = decode_reference(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens,
                                     page_table=cache.page_table, **{n: a for n, a in kw.items() if n != "num_splits"})
            assert rel(out, ro) < 1e-2, kw
    for buf in decoding._COUNTERS[q.device]:
        assert int(buf.abs().sum()) == 0
