"""The fused merge of split-KV decode (the last split of a program's rows merges the partials,
counted by an atomic counter it resets) against the merge-kernel path and the float64 oracle, and
the serving call's memo of constant-only pattern functions (CPU interpreter, small sizes)."""
from __future__ import annotations

import pytest
import torch

import attndsl

from attndsl.patterns import causal, sliding_window, softcap
from attndsl.serving import PagedKVCache, decode, decoding
from attndsl.serving.reference import decode_reference

D = 16
TOL = dict(atol=2e-5, rtol=2e-5)
FUSED, TWO = {"fused_merge": 1}, {"fused_merge": 0}


def _cache(B, Hkv, lens, page_size, seed):
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(2 * B * (128 // page_size) + 1, page_size, Hkv, D, max_batch=B, max_seq_len=128,
                         dtype=torch.float32)
    cache.k_pool.normal_(generator=g)
    cache.v_pool.normal_(generator=g)
    for s, n in enumerate(lens):
        cache.prefill(s, torch.randn(Hkv, n, D, generator=g), torch.randn(Hkv, n, D, generator=g))
    return cache


def _both(q, k, v, **kw):
    """The fused and the merge-kernel call, each checked against the oracle; their outputs agree."""
    ref_kw = {n: a for n, a in kw.items() if n != "num_splits"}
    ro, rl = decode_reference(q, k, v, **ref_kw)
    got = []
    for ko in (FUSED, TWO):
        out, lse = decode(q, k, v, return_lse=True, kernel_options=ko, **kw)
        torch.testing.assert_close(out.double(), ro, **TOL)
        torch.testing.assert_close(lse.double(), rl, **TOL)
        got.append((out, lse))
    torch.testing.assert_close(got[0][0], got[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[0][1], got[1][1], atol=1e-6, rtol=1e-6)


def _counters_zero():
    for bufs in decoding._COUNTERS.values():
        for b in bufs:
            assert int(b.abs().sum()) == 0, "a fused decode left a merge counter non-zero"


@pytest.mark.parametrize("lq", [1, 4])
@pytest.mark.parametrize("paged", [False, True])
def test_fused_matches_merge_kernel_and_oracle(lq, paged):
    """Plain, window, causal + softcap and sinks, GQA (4 query heads per KV head), ragged lengths,
    several splits (more than the window's tiles too: dead partials)."""
    B, Hq, Hkv = 3, 8, 2
    cache = _cache(B, Hkv, [128, 70, 33], 16, seed=61)
    q = torch.randn(B, Hq, lq, D)
    sinks = torch.randn(Hq)
    if paged:
        k, v, kv = cache.k_pool, cache.v_pool, dict(page_table=cache.page_table)
    else:
        from attndsl.serving.reference import logical_cache
        k, v = logical_cache(cache.k_pool, cache.v_pool, cache.seq_lens, cache.page_table, 128)
        kv = {}
    for pat in (dict(), dict(mask_mod=sliding_window(40)), dict(mask_mod=causal, score_mod=softcap(4.0)),
                dict(mask_mod=causal, sinks=sinks)):
        for ns in (2, 5):
            _both(q, k, v, seq_lens=cache.seq_lens, num_splits=ns, **kv, **pat)
    _counters_zero()


@pytest.mark.parametrize("paged", [False, True])
def test_fused_dsa_indices(paged):
    """The gather decode (DSA top-k) merges through the same fused path: -1 slots, repeats, positions
    past the length."""
    B, Hq, Hkv, lq, K = 2, 8, 4, 3, 24
    cache = _cache(B, Hkv, [100, 57], 16, seed=62)
    idx = torch.randint(-1, 110, (B, 2, lq, K), generator=torch.Generator().manual_seed(62)).int()
    q = torch.randn(B, Hq, lq, D)
    if paged:
        k, v, kv = cache.k_pool, cache.v_pool, dict(page_table=cache.page_table)
    else:
        from attndsl.serving.reference import logical_cache
        k, v = logical_cache(cache.k_pool, cache.v_pool, cache.seq_lens, cache.page_table, 128)
        kv = {}
    for ns in (2, 3):
        _both(q, k, v, seq_lens=cache.seq_lens, indices=idx, num_splits=ns, sinks=torch.randn(Hq), **kv)
    _counters_zero()


def test_fused_sigmoid():
    B, Hq, Hkv = 2, 4, 2
    cache = _cache(B, Hkv, [128, 40], 32, seed=63)
    q = torch.randn(B, Hq, 2, D)
    kw = dict(seq_lens=cache.seq_lens, page_table=cache.page_table, mask_mod=causal, normalizer="sigmoid",
              sigmoid_bias=-2.0)
    ro, _ = decode_reference(q, cache.k_pool, cache.v_pool, **kw)
    for ko in (FUSED, TWO):
        out = decode(q, cache.k_pool, cache.v_pool, num_splits=3, kernel_options=ko, **kw)
        torch.testing.assert_close(out.double(), ro, **TOL)


def test_counters_reset_between_calls():
    """Consecutive fused calls share the device's counter buffer (one plan, and another plan of
    another shape): each call leaves it zero, so the next merges exactly once per program."""
    B, Hq, Hkv = 2, 8, 2
    cache = _cache(B, Hkv, [128, 90], 16, seed=64)
    kv = dict(seq_lens=cache.seq_lens, page_table=cache.page_table, num_splits=4, mask_mod=sliding_window(64))
    decoding._PLANS.clear()
    for lq in (1, 1, 3, 1):  # the same plan twice, another plan, the first again
        q = torch.randn(B, Hq, lq, D)
        _both(q, cache.k_pool, cache.v_pool, **kv)
        _counters_zero()
    plans = [p for p in decoding._PLANS.values() if p.counters is not None]
    assert plans and all(p.counters.data_ptr() == plans[0].counters.data_ptr() for p in plans)


def test_fused_is_recorded_in_the_plan():
    """One split writes the output directly (no counters); several: the fused merge by default
    (``FUSED_MERGE``), the merge kernel with ``fused_merge=0``; the option keys the memo."""
    B, Hq, Hkv = 2, 4, 2
    cache = _cache(B, Hkv, [64, 50], 16, seed=65)
    q = torch.randn(B, Hq, 1, D)
    decoding._PLANS.clear()
    kv = dict(seq_lens=cache.seq_lens, page_table=cache.page_table)
    decode(q, cache.k_pool, cache.v_pool, num_splits=1, **kv)
    decode(q, cache.k_pool, cache.v_pool, num_splits=3, **kv)
    decode(q, cache.k_pool, cache.v_pool, num_splits=3, kernel_options=TWO, **kv)
    plans = list(decoding._PLANS.values())
    assert [p.direct for p in plans] == [True, False, False]
    assert plans[0].counters is None and plans[2].counters is None
    assert (plans[1].counters is not None) == decoding.FUSED_MERGE
    assert plans[1].decode.consts["FUSED"] == decoding.FUSED_MERGE and not plans[2].decode.consts["FUSED"]
    assert decoding.decode_config(D, True, TWO).fused_merge is False


def test_patterns_met_again_skip_the_pattern_walk(monkeypatch):
    """decode finds its pattern through ``attndsl.attention``'s pattern cache, which meets a function
    it has seen before (``sliding_window(W)``) by identity, without walking it. Another window, a
    rebound cell, or a held tensor rebound walk again, and every answer is right (the tensor bound
    is the one held now)."""
    from attndsl.runtime import patterns
    attndsl.clear_cache()
    walks = [0]
    real = patterns._walk_kept
    monkeypatch.setattr(patterns, "_walk_kept", lambda *a: walks.__setitem__(0, walks[0] + 1) or real(*a))
    B, Hq, Hkv, L = 2, 4, 2, 64
    g = torch.Generator().manual_seed(66)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    q = torch.randn(B, Hq, 1, D, generator=g)
    lens = torch.tensor([64, 40])

    def check(mask, times=1):
        for _ in range(times):
            out = decode(q, k, v, seq_lens=lens, mask_mod=mask)
            ro, _ = decode_reference(q, k, v, seq_lens=lens, mask_mod=mask)
            torch.testing.assert_close(out.double(), ro, **TOL)

    win = sliding_window(8)
    check(win, 3)  # walked, then recorded: met again by identity from here on
    n = walks[0]
    check(win, 2)
    assert walks[0] == n  # found by identity
    check(sliding_window(20))  # a fresh closure: walked (another window, right answer)
    assert walks[0] == n + 1

    width = 8

    def rebound(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < width)
    check(rebound, 3)
    n = walks[0]
    width = 30  # the cell now holds another int: walked again
    check(rebound)
    assert walks[0] == n + 1

    ids = torch.zeros(L, dtype=torch.int32)

    def holds_tensor(b, h, q_idx, kv_idx):
        return ids[kv_idx] == ids[q_idx]
    check(holds_tensor, 3)
    n = walks[0]
    check(holds_tensor)
    assert walks[0] == n  # met by identity, its tensor bound per call
    ids = torch.arange(L, dtype=torch.int32) // 5  # rebound: walked, and the new ids are the ones read
    check(holds_tensor)
    assert walks[0] == n + 1
