"""DSA's lightning indexer (compiled from the DSL) and its bounded-memory top-k, on the CPU.

Scores are checked against a dense torch computation; selections are checked by *value* (the
scores of the keys we picked, sorted, equal the reference top-k values), so ties between equal
scores (ReLU makes many zeros) may be broken either way. The memory test runs the indexer in a
subprocess at a length where an ``L×L`` float32 score matrix is far larger than the budget the
test allows for the whole call, measured as peak RSS growth.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attndsl
from attndsl import reference
from attndsl.selectors import LightningIndexer, lightning_indexer


def dense_scores(q_i, k_i, w, f=lambda s: s.clamp(min=0), mask=None, scale=1.0):
    """Reference ``I[b, g, t, s]`` in float64: ``[B, G, Lq, Lkv]``."""
    B, HI, Lq, DI = q_i.shape
    G, Lkv = k_i.shape[1], k_i.shape[2]
    kk = k_i.double().repeat_interleave(HI // G, dim=1)
    s = f(torch.einsum("bjtd,bjsd->bjts", q_i.double(), kk) * scale)
    if w is not None:
        s = s * w.double()[..., None]
    s = s.view(B, G, HI // G, Lq, Lkv).sum(2)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def causal_mask(Lq, Lkv):
    return torch.arange(Lq)[:, None] >= torch.arange(Lkv)[None, :]


def assert_same_selection(idx, ref_scores, K, atol=1e-4):
    """Our picks have the reference top-K score values; -1 exactly where fewer keys are allowed."""
    Lkv = ref_scores.shape[-1]
    assert idx.dtype == torch.int32 and idx.shape[-1] == K
    assert ((idx >= -1) & (idx < Lkv)).all()
    got = torch.gather(ref_scores, -1, idx.clamp(min=0).long()).masked_fill(idx < 0, float("-inf"))
    got = got.sort(-1, descending=True).values
    kk = min(K, Lkv)
    want = torch.full_like(got, float("-inf"))
    want[..., :kk] = ref_scores.topk(kk, dim=-1).values
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin), "a masked key was selected, or an allowed slot left empty"
    assert (got[fin] - want[fin]).abs().max().item() <= atol * max(1.0, want[fin].abs().max().item())
    # no key twice in a row
    srt = idx.sort(-1).values
    assert not ((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any()


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), groups=st.sampled_from([(1, 1), (4, 1), (4, 2), (3, 3)]), Lq=st.integers(1, 300),
       Lkv=st.integers(1, 300), DI=st.sampled_from([16, 32]), weights=st.booleans(), seed=st.integers(0, 999))
def test_scores_match_dense(B, groups, Lq, Lkv, DI, weights, seed):
    HI, G = groups
    q_i, k_i = rand(B, HI, Lq, DI, seed=seed), rand(B, G, Lkv, DI, seed=seed + 1)
    w = rand(B, HI, Lq, seed=seed + 2) if weights else None
    ix = LightningIndexer(scale=0.5)
    got = ix.scores(q_i, k_i, w)
    want = dense_scores(q_i, k_i, w, mask=causal_mask(Lq, Lkv), scale=0.5)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    if fin.any():
        torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-5, atol=1e-4)


def test_scores_of_a_row_and_column_window():
    q_i, k_i, w = rand(1, 2, 90, 16), rand(1, 1, 120, 16, seed=1), rand(1, 2, 90, seed=2)
    ix = LightningIndexer()
    want = dense_scores(q_i, k_i, w, mask=causal_mask(90, 120))
    got = ix.scores(q_i, k_i, w, rows=(17, 70), cols=(5, 66))
    torch.testing.assert_close(got.double(), want[:, :, 17:70, 5:66], rtol=1e-5, atol=1e-4)


def test_custom_score_mod_and_mask_fuse():
    """The indexer is a DSL pattern: other activations and masks compile the same way."""
    def square(s, b, h, q_idx, kv_idx):
        return s * s * (h + 1)

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 7)

    q_i, k_i = rand(1, 2, 50, 16), rand(1, 1, 50, 16, seed=1)
    ix = LightningIndexer(score_mod=square, mask_mod=window, topk=4)
    j = torch.arange(2, dtype=torch.float64).view(1, 2, 1, 1)
    f = lambda s: s * s * (j + 1)  # noqa: E731
    m = causal_mask(50, 50) & (torch.arange(50)[:, None] - torch.arange(50)[None, :] < 7)
    want = dense_scores(q_i, k_i, None, f=f, mask=m)
    torch.testing.assert_close(ix.scores(q_i, k_i).double(), want, rtol=1e-5, atol=1e-4)
    assert ix.key_range(20, 30, 1, 1, 50, 50, "cpu") == (14, 30)  # window's closed form bounds each chunk
    assert_same_selection(ix(q_i, k_i), want, 4)


@pytest.mark.parametrize("K", [1, 7, 64, 500])
def test_topk_matches_dense_topk(K):
    """Including K larger than the number of causal keys of every row (500 > L)."""
    B, HI, L, DI = 2, 4, 257, 32
    q_i, k_i, w = rand(B, HI, L, DI), rand(B, 1, L, DI, seed=1), rand(B, HI, L, seed=2)
    idx = lightning_indexer(q_i, k_i, w, topk=K)
    assert tuple(idx.shape) == (B, 1, L, K)
    assert_same_selection(idx, dense_scores(q_i, k_i, w, mask=causal_mask(L, L)), K)
    assert (idx[:, :, 0] >= 0).sum() == B  # the first query sees one key


def test_chunking_does_not_change_the_selection():
    B, HI, L, DI, K = 1, 2, 300, 16, 16
    q_i, k_i, w = rand(B, HI, L, DI), rand(B, 1, L, DI, seed=1), rand(B, HI, L, seed=2)
    ix = LightningIndexer(topk=K)
    a, va = ix(q_i, k_i, w, max_chunk_elems=1, return_scores=True)     # one tile of rows per chunk
    b, vb = ix(q_i, k_i, w, max_chunk_elems=1 << 30, return_scores=True)  # everything at once
    torch.testing.assert_close(va.sort(-1).values, vb.sort(-1).values)
    assert_same_selection(a, dense_scores(q_i, k_i, w, mask=causal_mask(L, L)), K)


def test_bf16_inputs():
    q_i, k_i, w = rand(1, 4, 130, 32, dtype=torch.bfloat16), rand(1, 1, 130, 32, seed=1, dtype=torch.bfloat16), \
        rand(1, 4, 130, seed=2)
    got = LightningIndexer().scores(q_i, k_i, w)
    want = dense_scores(q_i, k_i, w, mask=causal_mask(130, 130))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-3, atol=1e-2)


def test_indexer_errors():
    ix = LightningIndexer()
    with pytest.raises(ValueError, match="multiple"):
        ix(rand(1, 3, 8, 16), rand(1, 2, 8, 16))
    with pytest.raises(ValueError, match="weights"):
        ix(rand(1, 2, 8, 16), rand(1, 1, 8, 16), rand(1, 8, 2))


def test_indexer_checks_captured_indices_per_role_of_h():
    """In the score modifier h is the indexer head (HI of them), in the mask the key group (G):
    a per-head table sized HI and a per-group table sized G are both in range; a per-group table
    read by the score modifier is refused before any launch."""
    HI, G = 4, 2
    per_head, per_group = rand(HI, seed=6), torch.tensor([3, 5])

    def scaled(s, b, h, q_idx, kv_idx):
        return s.clamp(min=0) * per_head[h]

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < per_group[h])

    q_i, k_i = rand(1, HI, 30, 16, seed=7), rand(1, G, 30, 16, seed=8)
    ix = LightningIndexer(score_mod=scaled, mask_mod=window, topk=3)
    j = per_head.double().view(1, HI, 1, 1)
    d = torch.arange(30)[:, None] - torch.arange(30)[None, :]
    m = torch.stack([(d >= 0) & (d < w) for w in (3, 5)]).view(1, G, 30, 30)
    want = dense_scores(q_i, k_i, None, f=lambda s: s.clamp(min=0) * j).masked_fill(~m, float("-inf"))
    torch.testing.assert_close(ix.scores(q_i, k_i).double(), want, rtol=1e-5, atol=1e-4)

    def by_group(s, b, h, q_idx, kv_idx):
        return s * per_group[h]

    with pytest.raises(IndexError, match=r"tensor #0 \(shape \(2,\)\).*`h` is 2 at h=2"):
        LightningIndexer(score_mod=by_group).scores(q_i, k_i)


def test_indexer_then_sparse_attention_end_to_end():
    """indexer -> top-k -> sparse attention -> backward, against the gathering oracle."""
    B, H, HI, L, D, DI, K = 1, 4, 2, 40, 32, 16, 12
    q, k, v = rand(B, H, L, D), rand(B, 1, L, D, seed=1), rand(B, 1, L, D, seed=2)
    idx = lightning_indexer(rand(B, HI, L, DI, seed=3), rand(B, 1, L, DI, seed=4), rand(B, HI, L, seed=5), topk=K)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = attndsl.attention(qg, kg, vg, indices=idx)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    want, _ = reference.sparse_attention(q64, k64, v64, idx)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    do = rand(*out.shape, seed=6)
    out.backward(do)
    want.backward(do.double())
    for a, b in ((qg, q64), (kg, k64), (vg, v64)):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------
# bounded memory
# -------------------------------------------------------------------------------------------
_MEM_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time, torch
    from attndsl.selectors import LightningIndexer
    L, budget_elems = int(sys.argv[1]), int(sys.argv[2])
    HI, DI, K = 2, 16, 64
    ix = LightningIndexer(topk=K, max_chunk_elems=budget_elems)
    q_i = torch.randn(1, HI, L, DI); k_i = torch.randn(1, 1, L, DI); w = torch.rand(1, HI, L)
    ix(q_i[:, :, :300], k_i[:, :, :300], w[:, :, :300])  # compile and warm up the interpreter
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    base = rss(); t0 = time.time()
    idx = ix(q_i, k_i, w)
    extra = rss() - base
    ok = bool(((idx >= 0).sum(-1) == torch.clamp(torch.arange(L) + 1, max=K)).all())
    print(json.dumps(dict(extra=extra, seconds=time.time() - t0, ok=ok)))
""")


def _peak_extra(L: int, budget_elems: int) -> dict:
    import json
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", _MEM_SCRIPT, str(L), str(budget_elems)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_indexer_memory_is_bounded():
    """L = 4096: an L×L float32 matrix is 64 MiB; the whole call must stay under 24 MiB of extra RSS."""
    L, budget = 4096, 1 << 20
    res = _peak_extra(L, budget)
    assert res["ok"]
    assert L * L * 4 > 2.5 * (24 << 20)
    assert res["extra"] < (24 << 20), f"peak RSS grew by {res['extra'] / 2**20:.1f} MiB"


@pytest.mark.slow
def test_indexer_memory_is_bounded_long():
    """L = 16384: L×L float32 is 1 GiB; the call stays under 48 MiB of extra RSS."""
    res = _peak_extra(16384, 1 << 21)
    assert res["ok"] and res["extra"] < (48 << 20), res
