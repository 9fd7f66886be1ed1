"""Decode kernels (attndsl.serving) against the float64 oracle, in Triton's CPU interpreter.

Every case compares ``attndsl.serving.decode`` with ``decode_reference``: ``attndsl.reference`` on
each sequence's logical cache (gathered through the page table) with the queries placed at their
positions, so a pattern must mean what it means in training.
"""
import math

import pytest
import torch

from attndsl.patterns import (alibi, alibi_slopes, causal, causal_bottom_right, chunked, document, prefix_lm,
                              relative_position_bias, sliding_window, softcap, t5_bucket_bias)
from attndsl.patterns.neighborhood import neighborhood_1d, neighborhood_2d
from attndsl.patterns.radial import radial, radial_block, radial_via_tables
from attndsl.patterns.sliding_tile import sliding_tile, sta_layout
from attndsl.patterns.tree import tree_ancestors, tree_mask
from attndsl.serving import PagedKVCache, decode
from attndsl.serving.decoding import visited_width
from attndsl.serving.reference import decode_reference, logical_cache

D = 16
TOL = dict(atol=2e-5, rtol=2e-5)


def _paged(B, Hkv, lens, page_size, seed, max_seq_len=128, dv=D, layout="NHD"):
    """A paged cache holding sequences of ``lens`` tokens (pages handed out interleaved, so a
    sequence's pages are not contiguous in the pool)."""
    g = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(2 * B * (max_seq_len // page_size) + 1, page_size, Hkv, D, head_dim_v=dv, max_batch=B,
                         max_seq_len=max_seq_len, dtype=torch.float32, layout=layout)
    cache.k_pool.normal_(generator=g)  # never-written rows hold garbage the kernel must not read
    cache.v_pool.normal_(generator=g)
    done = [0] * B
    while any(d < n for d, n in zip(done, lens)):
        for s, n in enumerate(lens):
            step = min(page_size, n - done[s])
            if step > 0:
                cache.prefill(s, torch.randn(Hkv, step, D, generator=g), torch.randn(Hkv, step, dv, generator=g))
                done[s] += step
    return cache


def _check(q, k, v, *, atol=TOL["atol"], **kw):
    out, lse = decode(q, k, v, return_lse=True, **kw)
    kw.pop("num_splits", None)
    kw.pop("kernel_options", None)
    kw.pop("max_seq_len", None)
    ro, rl = decode_reference(q, k, v, **kw)
    torch.testing.assert_close(out.double(), ro, atol=atol, rtol=TOL["rtol"])
    torch.testing.assert_close(lse.double(), rl, atol=atol, rtol=TOL["rtol"])
    return out, lse


def _contiguous(B, Hkv, L, seed, dv=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, dv, generator=g)


def _patterns(L, Hq):
    doc = torch.tensor([0] * 30 + [1] * 45 + [2] * (L - 75), dtype=torch.int32)
    rel = torch.randn(Hq, 2 * 8 + 1)
    t5 = torch.randn(Hq, 8)
    _, nb1 = neighborhood_1d(L, 9, tile=16)
    _, nb2 = neighborhood_2d(8, L // 8, 3, tile=(4, 4))
    sta = sliding_tile(sta_layout((8, L // 8), (4, 4)), (1, 3))
    return {
        "none": dict(),
        "causal": dict(mask_mod=causal),
        "causal_bottom_right": dict(mask_mod=causal_bottom_right(L, L)),
        "sliding_window": dict(mask_mod=sliding_window(24)),
        "sliding_window_bidirectional": dict(mask_mod=sliding_window(10, causal=False)),
        "chunked": dict(mask_mod=chunked(16)),
        "prefix_lm": dict(mask_mod=prefix_lm(20)),
        "document": dict(mask_mod=document(doc)),
        "alibi": dict(mask_mod=causal, score_mod=alibi(alibi_slopes(Hq))),
        "softcap": dict(mask_mod=causal, score_mod=softcap(5.0)),
        "relative_bias": dict(score_mod=relative_position_bias(rel, 8)),
        "t5": dict(mask_mod=causal, score_mod=t5_bucket_bias(t5, 8, 32)),
        "neighborhood_1d": dict(mask_mod=nb1),
        "neighborhood_2d": dict(mask_mod=nb2),
        "sliding_tile": dict(mask_mod=sta),
        "radial": dict(mask_mod=radial(4, L // 4, block=16, split_threshold=16)),
        "radial_block": dict(mask_mod=radial_block(4, L // 4, block=16, split_threshold=16)),
        "radial_tables": dict(mask_mod=radial_via_tables(4, L // 4, block=16, split_threshold=16)),
    }


PATTERN_NAMES = list(_patterns(128, 4))


@pytest.mark.parametrize("name", PATTERN_NAMES)
@pytest.mark.parametrize("lq", [1, 4, 16])
def test_patterns_paged(name, lq):
    """Every shipped pattern through a paged cache (page 16 < BLOCK_N: per-row page lookups), ragged
    lengths, GQA (4 query heads over 2 KV heads), one and three splits."""
    B, Hq, Hkv, L = 2, 4, 2, 128
    pat = _patterns(L, Hq)[name]
    lens = [L, 70 + lq]
    cache = _paged(B, Hkv, lens, 16, seed=lq)
    q = torch.randn(B, Hq, lq, D)
    for ns in (1, 3):
        _check(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table, num_splits=ns,
               **pat)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_equals_contiguous(page_size, layout):
    """The same logical cache, paged (scalar page lookup per tile at page 32, per row at 16; pools
    stored token-major or head-major) and contiguous, gives bit-identical results: same tiles, same
    arithmetic."""
    B, Hq, Hkv, lq = 3, 8, 2, 2
    lens = [37, 128, 96]
    cache = _paged(B, Hkv, lens, page_size, seed=page_size, layout=layout)
    # head-major storage: one head's rows of a page are contiguous
    assert cache.k_pool.transpose(1, 2).is_contiguous() == (layout == "HND") != cache.k_pool.is_contiguous()
    k, v = logical_cache(cache.k_pool, cache.v_pool, cache.seq_lens, cache.page_table, 128)
    q = torch.randn(B, Hq, lq, D)
    for pat in (dict(mask_mod=causal), dict(mask_mod=sliding_window(40), score_mod=softcap(4.0))):
        for ns in (1, 2):
            a = decode(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
                       num_splits=ns, return_lse=True, **pat)
            b = decode(q, k, v, seq_lens=cache.seq_lens, num_splits=ns, return_lse=True, **pat)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _check(q, k, v, seq_lens=cache.seq_lens, mask_mod=causal, num_splits=2)


def test_offsets_chunked_prefill():
    """Explicit q_offsets: a chunk of queries in the middle of a sequence whose cache already holds
    later tokens (they must be masked by causality, not by the length)."""
    B, Hq, Hkv, L, lq = 2, 4, 4, 96, 8
    k, v = _contiguous(B, Hkv, L, 3)
    q = torch.randn(B, Hq, lq, D)
    lens = torch.tensor([96, 60])
    offs = torch.tensor([40, 17])
    for pat in (dict(mask_mod=causal), dict(mask_mod=sliding_window(16)), dict(mask_mod=chunked(32))):
        _check(q, k, v, seq_lens=lens, q_offsets=offs, num_splits=2, **pat)


def test_split_counts_agree():
    B, Hq, Hkv, L, lq = 2, 8, 2, 128, 3
    k, v = _contiguous(B, Hkv, L, 4)
    q = torch.randn(B, Hq, lq, D)
    lens = torch.tensor([128, 77])
    outs = [decode(q, k, v, seq_lens=lens, mask_mod=causal, num_splits=n, return_lse=True) for n in (1, 2, 4, 7)]
    for o, l in outs[1:]:
        torch.testing.assert_close(o, outs[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l, outs[0][1], atol=1e-5, rtol=1e-5)
    # more splits than visited tiles: the empty splits write dead partials the merge ignores
    _check(q, k, v, seq_lens=lens, mask_mod=sliding_window(8), num_splits=6)


@pytest.mark.parametrize("parents", [[-1, 0, 0, 1, 1, 2, 3, -1], [-1, 0, 1, 2]])
def test_tree_mask(parents):
    """Speculative decoding: drafts appended to the cache, their tree given as parents or a bool mask."""
    B, Hq, Hkv = 2, 4, 2
    n = len(parents)
    par = torch.tensor(parents)
    prefix = torch.tensor([50, 90])
    cache = _paged(B, Hkv, [50 + n, 90 + n], 32, seed=n)
    q = torch.randn(B, Hq, n, D)
    _check(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
           mask_mod=tree_mask(par, prefix), num_splits=2)
    anc = tree_ancestors(par)
    _check(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table,
           mask_mod=tree_mask(anc, prefix))
    # the mask itself: draft i sees the prefix and exactly its ancestors
    m = tree_mask(par, prefix)
    for i in range(n):
        anc_i = {i}
        j = i
        while parents[j] >= 0:
            j = parents[j]
            anc_i.add(j)
        seen = [int(j) for j in range(n) if bool(m(0, 0, torch.tensor(50 + i), torch.tensor(50 + j)))]
        assert set(seen) == anc_i
        assert bool(m(0, 0, torch.tensor(50 + i), torch.tensor(49)))


def test_tree_64_drafts():
    """A 64-draft tree (Lq = 64: several row blocks of BLOCK_M packed heads x tokens)."""
    B, Hq, Hkv, n = 1, 2, 1, 64
    g = torch.Generator().manual_seed(7)
    par = torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)])
    k, v = _contiguous(B, Hkv, 128, 8)
    q = torch.randn(B, Hq, n, D)
    lens = torch.tensor([120])
    _check(q, k, v, seq_lens=lens, mask_mod=tree_mask(par, lens - n), num_splits=2)


def test_sinks_gqa_sigmoid():
    B, Hq, Hkv, L, lq = 2, 8, 2, 64, 2
    k, v = _contiguous(B, Hkv, L, 9)
    q = torch.randn(B, Hq, lq, D)
    lens = torch.tensor([64, 5])
    sinks = torch.randn(Hq)
    for ns in (1, 3):  # sinks in the kernel (one split) or in the merge
        _check(q, k, v, seq_lens=lens, mask_mod=causal, sinks=sinks, num_splits=ns)
    # a row with nothing to see: lse = the sink, output 0
    out, lse = decode(q, k, v, seq_lens=lens, mask_mod=lambda b, h, q_idx, kv_idx: kv_idx < 0, sinks=sinks,
                      num_splits=2, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, sinks.view(1, Hq, 1).expand(B, Hq, lq))
    for ns in (1, 2):
        o = decode(q, k, v, seq_lens=lens, mask_mod=causal, normalizer="sigmoid", sigmoid_bias=-2.0, num_splits=ns)
        ro, _ = decode_reference(q, k, v, seq_lens=lens, mask_mod=causal, normalizer="sigmoid", sigmoid_bias=-2.0)
        torch.testing.assert_close(o.double(), ro, **TOL)
    # default sigmoid bias: -log(seq_lens[b]) per sequence
    o = decode(q, k, v, seq_lens=lens, normalizer="sigmoid", num_splits=2)
    for b in range(B):
        n = int(lens[b])
        ro, _ = decode_reference(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], seq_lens=lens[b:b + 1],
                                 normalizer="sigmoid", sigmoid_bias=-math.log(n))
        torch.testing.assert_close(o[b:b + 1].double(), ro, **TOL)


def test_bias_factors_and_value_dim():
    B, Hq, Hkv, L, lq, R, dv = 2, 4, 2, 64, 3, 4, 32
    k, v = _contiguous(B, Hkv, L, 10, dv=dv)
    q = torch.randn(B, Hq, lq, D)
    u, w = torch.randn(B, Hq, lq, R), torch.randn(1, Hkv, L, R)
    lens = torch.tensor([64, 41])
    _check(q, k, v, seq_lens=lens, mask_mod=causal, bias_factors=(u, w), num_splits=2)


def test_learnable_alibi_read_in_forward():
    """A captured slope that requires grad is read (under no_grad); with autograd on, a clear error."""
    B, Hq, Hkv, L, lq = 2, 4, 2, 64, 2
    k, v = _contiguous(B, Hkv, L, 11)
    q = torch.randn(B, Hq, lq, D)
    lens = torch.tensor([64, 30])
    slopes = torch.nn.Parameter(alibi_slopes(Hq) * 3)
    with torch.no_grad():
        _check(q, k, v, seq_lens=lens, mask_mod=causal, score_mod=alibi(slopes), num_splits=2)
    with pytest.raises(RuntimeError, match="attndsl.attention"):
        decode(q, k, v, seq_lens=lens, mask_mod=causal, score_mod=alibi(slopes))
    with pytest.raises(RuntimeError, match="query requires grad.*attndsl.attention"):
        decode(q.requires_grad_(), k, v, seq_lens=lens)


def _layout(cache, paged):
    """``(k, v, kwargs)``: the cache's pools with its page table, or its logical cache contiguous."""
    if paged:
        return cache.k_pool, cache.v_pool, dict(page_table=cache.page_table)
    k, v = logical_cache(cache.k_pool, cache.v_pool, cache.seq_lens, cache.page_table, 128)
    return k, v, {}


@pytest.mark.parametrize("paged", [False, True])
def test_dsa_indices(paged):
    """Token selector (DSA top-k decode): only the selected rows, through the page table when paged;
    -1 slots, repeats and positions past the sequence's length are handled like the training path."""
    B, Hq, Hkv, lq, K = 2, 8, 4, 3, 24
    lens = [100, 57]
    g = torch.Generator().manual_seed(12)
    cache = _paged(B, Hkv, lens, 16, seed=12)
    idx = torch.randint(-1, 110, (B, 2, lq, K), generator=g).int()
    q = torch.randn(B, Hq, lq, D)
    kk, vv, kv = _layout(cache, paged)
    for pat in (dict(mask_mod=causal), dict(score_mod=softcap(3.0))):
        for ns in (1, 2):
            _check(q, kk, vv, seq_lens=cache.seq_lens, indices=idx, num_splits=ns, **kv, **pat)


def _streaming(b, h, q_idx, kv_idx):  # StreamingLLM: 4 attention-sink tokens and a 32-token window
    return (kv_idx < 4) | ((q_idx >= kv_idx) & (q_idx - kv_idx < 32))


def _dilated(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & ((q_idx - kv_idx) % 64 < 16)


@pytest.mark.parametrize("lq", [1, 4])
def test_tile_classified_plans(lq):
    """Masks whose closed-form hull holds empty tiles (sink tokens + window, a dilated band): the
    kernel tests each tile (spec.tile_full / tile_nonempty), skips the empty ones and masks the
    partial ones."""
    from attndsl.api import _compiled
    from codegen.decode import _plan
    B, Hq, Hkv = 2, 4, 2
    cache = _paged(B, Hkv, [128, 101], 16, seed=20 + lq)
    q = torch.randn(B, Hq, lq, D)
    for m in (_streaming, _dilated):
        assert _plan(_compiled(m, None, "softmax", False, None)[0].spec)[1]  # the per-tile test is on
        for ns in (1, 3):
            _check(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table, mask_mod=m,
                   num_splits=ns, kernel_options={"BLOCK_N": 16})


def test_rendered_defs_are_the_decode_signatures():
    """The decode, gather decode and merge kernels' ``def`` are the spec's "decode" and
    "decode_merge" signatures (spec.lowering), captured tensors' parameters included, in order."""
    import ast
    from attndsl import codegen
    from attndsl.api import _compiled
    from attndsl.serving.decoding import decode_spec
    doc = torch.tensor([0] * 50 + [1] * 78)
    for mask, score in ((causal, None), (document(doc), alibi(alibi_slopes(4)))):
        spec = decode_spec(_compiled(mask, score, "softmax", False, None)[0].spec)
        assert bool(spec.buffers) == (score is not None)  # the second case's include captured tensors
        defs = {f.name: f for f in ast.parse(codegen.render_decode(spec)).body if isinstance(f, ast.FunctionDef)}
        names = codegen.decode.kernel_names(spec)
        for kind, key in (("decode", "decode"), ("gather", "decode"), ("merge", "decode_merge")):
            got = [(a.arg, a.annotation is not None) for a in defs[names[kind]].args.args]
            assert got == [(p.name, p.kind == "constexpr") for p in spec.lowering.signature(key)], kind


def test_head_dependent_ranges():
    """A visit range that follows the head (a per-row vector in the packed rows) is reduced over the
    rows: a window per head, from arithmetic on ``h`` and from a captured table read at ``h``."""
    B, Hq, Hkv, L, lq = 2, 8, 2, 128, 2
    k, v = _contiguous(B, Hkv, L, 15)
    q = torch.randn(B, Hq, lq, D)
    lens = torch.tensor([128, 90])
    widths = torch.tensor([4, 60, 9, 33, 100, 1, 17, 64])

    def by_arith(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < 12 * (h + 1))

    def by_table(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < widths[h])
    for m in (by_arith, by_table):
        _check(q, k, v, seq_lens=lens, mask_mod=m, num_splits=3)


def test_visited_width_is_the_window():
    """The host's split planning sees the window, not the cache (no device read)."""
    from attndsl.api import _compiled
    comp, tensors = _compiled(sliding_window(4096), None, "softmax", False, None)
    assert visited_width(comp.spec, tensors, 32768, 1, 32) == 4096
    comp, tensors = _compiled(causal, None, "softmax", False, None)
    assert visited_width(comp.spec, tensors, 32768, 1, 32) == 32768
    doc = torch.zeros(64, dtype=torch.int32)
    comp, tensors = _compiled(document(doc), None, "softmax", False, None)
    assert visited_width(comp.spec, tensors, 64, 1, 4) == 64


def test_kernel_options_tiles():
    """Other tiles (BLOCK_N 16 with page 32: one page lookup per tile) give the same answers."""
    B, Hq, Hkv, lq = 2, 4, 2, 4
    cache = _paged(B, Hkv, [128, 66], 32, seed=13)
    q = torch.randn(B, Hq, lq, D)
    _check(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table, mask_mod=causal,
           kernel_options={"BLOCK_N": 16, "BLOCK_M": 16}, num_splits=3)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_paged_cache_helpers(layout):
    Hkv = 2
    cache = PagedKVCache(8, 16, Hkv, D, max_batch=2, max_seq_len=64, dtype=torch.float32, layout=layout)
    assert cache.layout == layout and cache.k_pool.shape == (8, 16, Hkv, D)
    k1, v1 = torch.randn(Hkv, 20, D), torch.randn(Hkv, 20, D)
    cache.prefill(1, k1, v1)
    assert cache.length(1) == 20 and cache.seq_lens.tolist() == [0, 20] and cache.free_pages == 6
    k2, v2 = torch.randn(2, Hkv, 3, D), torch.randn(2, Hkv, 3, D)
    cache.append(k2, v2)
    assert cache.seq_lens.tolist() == [3, 23]
    gk, gv = cache.gather(1)
    assert torch.equal(gk, torch.cat([k1, k2[1]], 1)) and torch.equal(gv, torch.cat([v1, v2[1]], 1))
    cache.reserve(0, 40)
    cache.reserve(1, 40)
    k3, v3 = torch.randn(2, Hkv, 1, D), torch.randn(2, Hkv, 1, D)
    cache.append_step(k3, v3)
    assert cache.seq_lens.tolist() == [4, 24] and cache.length(0) == 3  # the host sees it after a sync
    cache.sync_lengths()
    assert cache.length(0) == 4
    gk, _ = cache.gather(0)
    assert torch.equal(gk, torch.cat([k2[0], k3[0]], 1))
    cache.free(0)
    assert cache.length(0) == 0 and cache.seq_lens.tolist() == [0, 24]
    with pytest.raises(ValueError, match="exceed max_seq_len=64"):
        cache.reserve(0, 65)
    small = PagedKVCache(2, 16, Hkv, D, max_batch=2, max_seq_len=64, dtype=torch.float32)
    small.reserve(0, 20)
    with pytest.raises(RuntimeError, match="needs 1 more pages, 0 free"):
        small.reserve(1, 5)
    with pytest.raises(ValueError, match="power of two"):
        PagedKVCache(4, 24, 1, D, max_batch=1, max_seq_len=32)
    with pytest.raises(ValueError, match="layout must be 'NHD' or 'HND', got 'NDH'"):
        PagedKVCache(4, 16, 1, D, max_batch=1, max_seq_len=32, layout="NDH")


def test_bad_inputs():
    B, Hq, Hkv, L = 2, 4, 2, 32
    k, v = _contiguous(B, Hkv, L, 14)
    q = torch.randn(B, Hq, 1, D)
    lens = torch.tensor([32, 20])
    with pytest.raises(ValueError, match="seq_lens must be a \\[B=2\\]"):
        decode(q, k, v, seq_lens=torch.tensor([3]))
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode(torch.randn(B, 3, 1, D), k, v, seq_lens=lens)
    with pytest.raises(ValueError, match="page_table must be"):
        decode(q, k, v, seq_lens=lens, page_table=torch.zeros(3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="G=3 must divide"):
        decode(q, k, v, seq_lens=lens, indices=torch.zeros(B, 3, 1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias_factors w"):
        decode(q, k, v, seq_lens=lens, bias_factors=(torch.randn(B, Hq, 1, 2), torch.randn(B, Hq, L, 2)))
    with pytest.raises(ValueError, match="BLOCK_N must be a power of two"):
        decode(q, k, v, seq_lens=lens, kernel_options={"BLOCK_N": 24})


_SM90 = r"""
import torch
from attndsl import codegen
from attndsl.api import _compiled
from attndsl.patterns import alibi, causal, document, sliding_window
from attndsl.patterns.tree import tree_mask
from attndsl.runtime import cache
from attndsl.testing.sm90 import compile_kernels
from attndsl.serving.decoding import decode_spec

doc = torch.tensor([0] * 50 + [1] * 78, dtype=torch.int64)
prefix = torch.tensor([10, 20], dtype=torch.int64)
PTR = {"int64": "*i64", "int32": "*i32", "float32": "*fp32", "bool": "*i1", "uint8": "*u8"}
BF16 = {"Q", "K", "V", "Out", "U", "W"}
INTP = {"PT": "*i32", "SEQ": "*i64", "QOFF": "*i64", "IDX": "*i32", "CNT": "*i32"}
jobs = []
cases = [("causal", causal, None, "softmax"), ("window", sliding_window(4096), None, "softmax"),
         ("document", document(doc), None, "softmax"), ("alibi", causal, alibi(torch.rand(8)), "softmax"),
         ("tree", tree_mask(torch.tensor([-1, 0, 0, 1]), prefix), None, "softmax"),
         ("sigmoid", causal, None, "sigmoid"),
         ("streaming", lambda b, h, q, kv: (kv < 4) | ((q >= kv) & (q - kv < 32)), None, "softmax")]
for label, mask, score, norm in cases:
    comp, tensors = _compiled(mask, score, norm, False, None)
    spec = decode_spec(comp.spec)
    mod = cache.load(spec, False, render=codegen.render_decode)
    bufs = {f"buf{b.slot}": b for b in spec.buffers}
    names = codegen.decode.kernel_names(spec)
    for kind, paged, page, direct in (("decode", True, 128, False), ("decode", True, 16, True),
                                      ("decode", False, 1, True), ("gather", True, 16, False), ("merge", 0, 0, 0)):
        k = getattr(mod, names[kind])
        cx_all = dict(HEAD_D=128, BLOCK_M=16, BLOCK_N=64, BLOCK_D=128, HEAD_DV=128, BLOCK_DV=128, PAGED=bool(paged),
                      PAGE_SIZE=page, UPCAST=False, DOT_PRECISION="tf32", DIRECT=bool(direct), SIGMOID_DEFAULT=True,
                      HAS_SINKS=True, HAS_BIAS=True, BLOCK_R=16, BLOCK_ROWS=16, SOFTMAX=norm == "softmax",
                      QOFF_FROM_LEN=not direct, ROTATE=bool(direct), FUSED=not direct)
        sig, cx = {}, {}
        for name, p in zip(k.arg_names, k.params):
            if p.is_constexpr:
                sig[name], cx[name] = "constexpr", cx_all[name]
            elif name in bufs:
                sig[name] = PTR[bufs[name].torch_dtype]
            elif name in INTP:
                sig[name] = INTP[name]
            elif name[0].isupper() and name not in ("HQ", "HKV", "GROUP", "QPG", "LQ", "NSEL", "NSPLIT", "NROWB",
                                                    "NROWS", "W_GROUP", "RANK"):
                sig[name] = "*bf16" if name in BF16 else "*fp32"
            elif name in ("sm_scale", "sigmoid_bias"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        jobs.append((f"{label}:{kind}", k, sig, cx, dict(num_warps=4, num_stages=3)))
print("compiled", " ".join(compile_kernels(jobs)))
"""


@pytest.mark.compile_ahead("_SM90")
def test_decode_kernels_compile_for_sm90(tmp_path):
    """The decode, gather and merge kernels of several patterns (int64 lengths and offsets, paged with
    one lookup per tile or per row, contiguous, sinks, low-rank bias, sigmoid; the split ones with the
    fused merge's atomic counter) compile for sm_90
    (the interpreter does not check loop-carried types). In a fresh process, as test_codegen_sm90."""
    from attndsl.testing import sm90
    sm90.run_compile_script(_SM90, tmp_path, timeout=1500)


def test_serve_example_runs():
    """examples/serve_decode.py (eager on a CPU) runs and agrees with the oracle."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "examples" / "serve_decode.py"), "--steps", "2"], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout + r.stderr)[-3000:]


def test_empty_slot_and_bf16():
    """A slot holding no tokens (seq_lens 0) gives zeros and lse -inf (every element written: outputs
    are NaN-poisoned in the tests); bfloat16 inputs through the interpreter (dot operands upcast)."""
    B, Hq, Hkv, L, lq = 2, 4, 2, 64, 1
    k, v = _contiguous(B, Hkv, L, 16)
    q = torch.randn(B, Hq, lq, D)
    lens = torch.tensor([0, 50])
    for ns in (1, 2):
        out, lse = decode(q, k, v, seq_lens=lens, mask_mod=causal, num_splits=ns, return_lse=True)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and bool(torch.isneginf(lse[0]).all())
        ro, rl = decode_reference(q[1:], k[1:], v[1:], seq_lens=lens[1:], mask_mod=causal)
        torch.testing.assert_close(out[1:].double(), ro, **TOL)
    qb, kb, vb = (x.to(torch.bfloat16) for x in (q, k, v))
    lens = torch.tensor([64, 37])
    out = decode(qb, kb, vb, seq_lens=lens, mask_mod=sliding_window(20), num_splits=2)
    ro, _ = decode_reference(qb, kb, vb, seq_lens=lens, mask_mod=sliding_window(20))
    torch.testing.assert_close(out.double(), ro, atol=2e-2, rtol=2e-2)


def test_reads_only_the_visited_tiles():
    """K/V rows the plan never visits are never read: NaN there (which would poison a loaded tile even
    where masked, as 0 * NaN) leaves the output exact. A 24-token window at position 127 with 16-key
    tiles visits tiles 6 and 7 only; a DSA selection reads only its rows."""
    B, Hq, Hkv, L = 2, 4, 2, 128
    k, v = _contiguous(B, Hkv, L, 17)
    q = torch.randn(B, Hq, 1, D)
    lens = torch.tensor([128, 128])
    ro, _ = decode_reference(q, k, v, seq_lens=lens, mask_mod=sliding_window(24))
    kp, vp = k.clone(), v.clone()
    kp[:, :, :96] = float("nan")
    vp[:, :, :96] = float("nan")
    for ns in (1, 2):
        out = decode(q, kp, vp, seq_lens=lens, mask_mod=sliding_window(24), num_splits=ns,
                     kernel_options={"BLOCK_N": 16})
        torch.testing.assert_close(out.double(), ro, **TOL)
    idx = torch.tensor([3, 50, 77, -1, 120, 50]).int().view(1, 1, 1, 6).expand(B, 1, 1, 6).contiguous()
    ro, _ = decode_reference(q, k, v, seq_lens=lens, indices=idx)
    keep = torch.zeros(L, dtype=torch.bool)
    keep[[3, 50, 77, 120]] = True
    kp, vp = k.clone(), v.clone()
    kp[:, :, ~keep] = float("nan")
    vp[:, :, ~keep] = float("nan")
    out = decode(q, kp, vp, seq_lens=lens, indices=idx, num_splits=2)
    torch.testing.assert_close(out.double(), ro, **TOL)


def test_memoised_calls_take_new_tensors(monkeypatch):
    """A repeated call of one shape launches the memoised plan: no checks, no planning; its fresh
    inputs (data, lengths, offsets, page table, sinks, captured tensors) are the ones read."""
    from attndsl.serving import decoding
    B, Hq, Hkv, lq = 2, 4, 2, 2
    doc = torch.tensor([0] * 40 + [1] * 88, dtype=torch.int32)
    kw = lambda d: dict(mask_mod=document(d), sinks=torch.randn(Hq), num_splits=2)  # noqa: E731
    cache = _paged(B, Hkv, [128, 70], 16, seed=21)
    q = torch.randn(B, Hq, lq, D)
    _check(q, cache.k_pool, cache.v_pool, seq_lens=cache.seq_lens, page_table=cache.page_table, **kw(doc))
    planned = []

    def recorded(name, f):
        return lambda *a: (planned.append(name), f(*a))[1]
    monkeypatch.setattr(decoding, "_check", recorded("check", decoding._check))
    monkeypatch.setattr(decoding, "_plan", recorded("plan", decoding._plan))
    for seed in (22, 23):
        other = _paged(B, Hkv, [90, 128], 16, seed=seed)  # other pages, lengths, data: same shapes
        doc2 = torch.tensor([0] * 70 + [1] * 58, dtype=torch.int32)
        _check(torch.randn(B, Hq, lq, D), other.k_pool, other.v_pool, seq_lens=other.seq_lens,
               page_table=other.page_table, q_offsets=torch.tensor([3, 100]), **kw(doc2))
    assert planned == ["check", "plan"]  # q_offsets (first given here) is a new call key; then memoised


def test_memo_key_sees_shapes_and_options():
    """Another shape, stride or option is another plan (checked and planned again), never a stale one."""
    from attndsl.serving import decoding
    B, Hq, Hkv, L = 2, 4, 2, 64
    k, v = _contiguous(B, Hkv, L, 5)
    lens = torch.tensor([64, 33])
    q = torch.randn(B, Hq, 1, D)
    decoding._PLANS.clear()
    for _ in range(2):
        _check(q, k, v, seq_lens=lens, mask_mod=causal)
        _check(q, k, v, seq_lens=lens, mask_mod=causal, num_splits=3)
        _check(q, k[:, :, :48], v[:, :, :48], seq_lens=lens.clamp(max=48), mask_mod=causal)  # other extent
        _check(torch.randn(B, Hq, 3, D), k, v, seq_lens=lens, mask_mod=causal)
        assert len(decoding._PLANS) == 4
    with pytest.raises(ValueError, match="k_cache"):
        decode(q, k.half(), v, seq_lens=lens)  # a new key checks again


def _compiled_step(fn, *args):
    from torch._dynamo.testing import CompileCounterWithBackend
    cnt = CompileCounterWithBackend("aot_eager")
    return torch.compile(fn, fullgraph=True, backend=cnt), cnt


def test_fullgraph_compile_decode_contiguous():
    """A decode step under torch.compile(fullgraph=True) is the attndsl::decode op: compiled output
    equals eager, both match the oracle; new lengths and captured tensors need no recompile."""
    from torch._dynamo.testing import EagerAndRecordGraphs
    B, Hq, Hkv, L, Dm = 2, 4, 2, 64, 32
    torch.manual_seed(0)
    wq = torch.randn(Dm, Hq * D) / Dm ** 0.5
    sinks = torch.randn(Hq)
    slopes = alibi_slopes(Hq)
    k, v = _contiguous(B, Hkv, L, 31)
    # patterns made outside the compiled step (a closure made inside it that holds a tensor cannot be
    # resolved while dynamo traces: attndsl.attention's limit too)
    win, bias = sliding_window(24), alibi(slopes)

    def step(x, k, v, lens):
        q = (x @ wq).view(B, 1, Hq, D).transpose(1, 2)
        o, lse = decode(q, k, v, seq_lens=lens, mask_mod=win, score_mod=bias, sinks=sinks, return_lse=True)
        return o.transpose(1, 2).reshape(B, Hq * D), lse

    cstep, cnt = _compiled_step(step)
    with torch.no_grad():
        for lens in (torch.tensor([64, 17]), torch.tensor([40, 64])):
            x = torch.randn(B, Dm)
            eo, el = step(x, k, v, lens)
            co, cl = cstep(x, k, v, lens)
            torch.testing.assert_close(co, eo, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(cl, el, atol=1e-6, rtol=1e-6)
            q = (x @ wq).view(B, 1, Hq, D).transpose(1, 2)
            ro, rl = decode_reference(q, k, v, seq_lens=lens, mask_mod=win, score_mod=bias, sinks=sinks)
            torch.testing.assert_close(co.double(), ro.transpose(1, 2).reshape(B, Hq * D), **TOL)
            torch.testing.assert_close(cl.double(), rl, **TOL)
        assert cnt.frame_count == 1
        rec = EagerAndRecordGraphs()
        torch.compile(step, fullgraph=True, backend=rec)(torch.randn(B, Dm), k, v, torch.tensor([64, 17]))
        assert "attndsl.decode" in rec.graphs[0].code


def test_fullgraph_compile_paged_step_with_append():
    """A whole serving step compiled with fullgraph=True: project a token, append it to the paged
    cache (device ops only), decode over the cache. Compiled steps track eager steps on a copy of the
    cache, and every step matches the oracle on the logical cache."""
    B, Hq, Hkv, Dm, ps = 2, 4, 2, 32, 16
    torch.manual_seed(1)
    wq, wk, wv = (torch.randn(Dm, h * D) / Dm ** 0.5 for h in (Hq, Hkv, Hkv))

    def make():
        c = _paged(B, Hkv, [40, 21], ps, seed=41, max_seq_len=64)
        for s in range(B):
            c.reserve(s, 64)
        return c

    eager_cache, comp_cache = make(), make()

    def step(cache, x):
        q = (x @ wq).view(B, 1, Hq, D).transpose(1, 2)
        kn = (x @ wk).view(B, 1, Hkv, D).transpose(1, 2)
        vn = (x @ wv).view(B, 1, Hkv, D).transpose(1, 2)
        cache.append_step(kn, vn)
        return cache.decode(q, mask_mod=causal), q

    cstep, cnt = _compiled_step(step)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(B, Dm)
            eo, _ = step(eager_cache, x)
            co, q = cstep(comp_cache, x)
            torch.testing.assert_close(co, eo, atol=1e-6, rtol=1e-6)
            assert torch.equal(comp_cache.seq_lens, eager_cache.seq_lens)
            ro, _ = decode_reference(q, comp_cache.k_pool, comp_cache.v_pool, seq_lens=comp_cache.seq_lens,
                                     page_table=comp_cache.page_table, mask_mod=causal)
            torch.testing.assert_close(co.double(), ro, **TOL)
    assert cnt.frame_count == 1


def test_tuning_regimes_and_config():
    """The TUNING key of the benchmark's cases (an H100's 132 SMs), the wide-head adjustment and the
    kernel_options overrides."""
    from attndsl.serving.decoding import TUNING, decode_config, decode_layout, decode_regime
    sms = 132
    assert decode_regime(64 * 8, 4096, sms, False) == "many"       # B=64 at 4K
    assert decode_regime(8 * 8, 4096, sms, False) == "short"       # a 4096 window, B=8
    assert decode_regime(8 * 8, 32768, sms, False) == "long"       # B=8 at 32K
    assert decode_regime(1 * 8, 131072, sms, False) == "long"      # B=1 at 128K
    assert decode_regime(8 * 8, 2048, sms, True) == "gather"
    assert [decode_layout(p) for p in (0, 16, 32, 64, 256)] == ["contiguous", "paged_small", "paged_small", "paged",
                                                                 "paged"]
    assert all(len(v) == 5 for v in TUNING.values())
    bn, nw, ns, per_sm, rotate = TUNING[("short", "paged_small")]
    cfg = decode_config(128, False, None, ("short", "paged_small"))
    assert (cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.per_sm, cfg.rotate) == (bn, nw, ns, per_sm, bool(rotate))
    wide = decode_config(256, False, None, ("short", "paged_small"))
    assert wide.block_n == max(16, bn // 2) and wide.num_stages <= 2
    cfg = decode_config(128, False, {"BLOCK_N": 16, "per_sm": 8}, ("many", "contiguous"))
    assert (cfg.block_n, cfg.per_sm) == (16, 8)
    with pytest.raises(ValueError, match="per_sm"):
        decode_config(128, False, {"per_sm": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        decode_config(128, False, {"BLOCK_K": 16})


def test_split_counts_of_the_wave_heuristic(monkeypatch):
    """The split counts on an H100's 132 SMs: the smallest whose last wave is within the case's
    floor of the best efficiency (``WAVE_EFFICIENCY_BY_CASE``: a long contiguous cache, B=1 at 128K
    with 8 KV heads, takes 32 splits, 256 programs, measured faster than the 29 of the 0.85 floor
    the other cases keep); a grid that fills the GPU is not split; each split keeps two tiles."""
    from attndsl.serving import decoding
    monkeypatch.setattr(decoding, "_sms", lambda index: 132)
    dev = torch.device("cuda", 0)
    long = decoding.WAVE_EFFICIENCY_BY_CASE[("long", "contiguous")]
    assert decoding.num_splits_for(8, 2048, dev, False, efficiency=long) == 32
    assert decoding.num_splits_for(8, 2048, dev, False) == 29         # the default floor, 0.85
    assert decoding.num_splits_for(8, 2048, dev, False, per_sm=4) == 57  # pages of 16 count 4 per SM
    assert decoding.num_splits_for(64, 512, dev, False, efficiency=long) == 4  # B=8 at 32K: 256 of 264 slots
    assert decoding.num_splits_for(512, 64, dev, False) == 1          # B=64: the grid fills the GPU
    assert decoding.num_splits_for(8, 8, dev, False) == 4             # 8 tiles: at most 4 splits of 2
    assert decoding.num_splits_for(8, 2048, torch.device("cpu"), False) == 1


def test_tuning_rows_of_another_gpu(monkeypatch):
    """A GPU named in TUNING_BY_GPU takes its own row of a case where it has one and TUNING's
    elsewhere; every other GPU (and None) takes TUNING's; kernel_options still win."""
    from attndsl.serving import decoding
    own = {("long", "paged"): (32, 4, 4, 4, 1)}
    monkeypatch.setitem(decoding.TUNING_BY_GPU, "NVIDIA H200", own)
    assert decoding.tuning_row(("long", "paged"), "NVIDIA H200") == (32, 4, 4, 4, 1)
    assert decoding.tuning_row(("long", "paged"), "NVIDIA H100 80GB HBM3") == decoding.TUNING[("long", "paged")]
    assert decoding.tuning_row(("long", "paged")) == decoding.TUNING[("long", "paged")]
    assert decoding.tuning_row(("many", "contiguous"), "NVIDIA H200") == decoding.TUNING[("many", "contiguous")]
    cfg = decoding.decode_config(128, False, None, ("long", "paged"), "NVIDIA H200")
    assert (cfg.block_n, cfg.num_warps, cfg.num_stages, cfg.per_sm, cfg.rotate) == (32, 4, 4, 4, True)
    cfg = decoding.decode_config(128, False, {"BLOCK_N": 64}, ("long", "paged"), "NVIDIA H200")
    assert cfg.block_n == 64 and cfg.per_sm == 4
    # the interpreter's tiles do not depend on the GPU's rows
    interpreted = decoding.decode_config(128, True, None, ("long", "paged"), "NVIDIA H200")
    assert interpreted == decoding.decode_config(128, True)


@pytest.mark.parametrize("paged", [False, True])
def test_rotated_start(paged):
    """``rotate``: every program walks its key range from a tile of its own (wrapping); the answers
    are the oracle's for one split and several, with partial tiles (length, window edges) anywhere
    in the walk."""
    B, Hq, Hkv, lq = 3, 4, 2, 2
    cache = _paged(B, Hkv, [128, 70, 33], 16, seed=51)
    q = torch.randn(B, Hq, lq, D)
    k, v, kv = _layout(cache, paged)
    for pat in (dict(), dict(mask_mod=sliding_window(40)), dict(mask_mod=causal, score_mod=softcap(4.0))):
        for ns in (1, 3):
            _check(q, k, v, seq_lens=cache.seq_lens, num_splits=ns, kernel_options={"BLOCK_N": 16, "rotate": 1},
                   **kv, **pat)
