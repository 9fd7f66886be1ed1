"""The pattern cache of ``attndsl.attention`` (issue 30 part 1): traced once, tensors bound per call.

CPU tensors (Triton's interpreter); small shapes."""
import pytest
import torch

import attndsl
import attndsl.api
import attndsl.reference
from attndsl.runtime.patterns import PATTERNS, walk


@pytest.fixture(autouse=True)
def fresh_cache():
    attndsl.clear_cache()
    yield
    attndsl.clear_cache()


@pytest.fixture
def traces(monkeypatch):
    """Counts the pattern traces (``dsl.trace`` calls made by CompiledAttention)."""
    count = [0]
    real = attndsl.api.trace

    def counting(*a, **k):
        count[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(attndsl.api, "trace", counting)
    return count


def qkv(L=32, H=2, D=16, seed=None, grad=False):
    g = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    return [torch.randn(1, H, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


def check(out, q, k, v, **kw):
    want, _ = attndsl.reference.attention(q.detach().double(), k.detach().double(), v.detach().double(), **kw)
    err = float((out.detach().double() - want).abs().max())
    assert err < 1e-4, f"max error {err:.3e} against the float64 reference"


def sliding(w):
    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < w)
    return sliding_window


BIAS = torch.randn(2, 64)


def global_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, kv_idx]


def test_factory_closures_reuse_and_rekey(traces):
    q, k, v = qkv()
    for _ in range(3):  # a fresh closure per call, as inside forward
        out = attndsl.attention(q, k, v, mask_mod=sliding(4))
    check(out, q, k, v, mask_mod=sliding(4))
    assert traces[0] == 1 and PATTERNS.hits == 2
    out8 = attndsl.attention(q, k, v, mask_mod=sliding(8))  # another constant: another kernel
    check(out8, q, k, v, mask_mod=sliding(8))
    assert traces[0] == 2
    assert not torch.equal(out, out8)
    a = attndsl.api._compiled(sliding(4), None, "softmax", False, None)[0]
    b = attndsl.api._compiled(sliding(8), None, "softmax", False, None)[0]
    assert a is not b and a.spec.key != b.spec.key
    # typed constants: 4 and 4.0 trace differently
    assert walk(sliding(4), None)[0] != walk(sliding(4.0), None)[0]


def test_rebinding_a_global_is_honoured(traces):
    global BIAS
    q, k, v = qkv()
    old = BIAS
    try:
        first = attndsl.attention(q, k, v, score_mod=global_bias)
        check(first, q, k, v, score_mod=global_bias)
        BIAS = torch.randn(2, 64)
        second = attndsl.attention(q, k, v, score_mod=global_bias)
        check(second, q, k, v, score_mod=global_bias)  # the new tensor, never a stale one
        assert not torch.allclose(first, second)
        assert traces[0] == 1
        BIAS = torch.randn(2, 64, dtype=torch.float64)  # another dtype re-keys
        check(attndsl.attention(q, k, v, score_mod=global_bias), q, k, v, score_mod=global_bias)
        assert traces[0] == 2
        BIAS = torch.randn(2, 1, 64)[:, 0]  # same dtype and rank, other strides: bound, no retrace
        check(attndsl.attention(q, k, v, score_mod=global_bias), q, k, v, score_mod=global_bias)
        assert traces[0] == 2
    finally:
        BIAS = old


def test_rebinding_a_closure_cell_and_in_place_mutation(traces):
    table = torch.randn(2, 64)

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx]

    def rebind(t):
        nonlocal table
        table = t

    q, k, v = qkv()
    check(attndsl.attention(q, k, v, score_mod=bias), q, k, v, score_mod=bias)
    rebind(torch.randn(2, 64))
    check(attndsl.attention(q, k, v, score_mod=bias), q, k, v, score_mod=bias)
    table.mul_(-3.0)  # in place: seen
    check(attndsl.attention(q, k, v, score_mod=bias), q, k, v, score_mod=bias)
    assert traces[0] == 1
    rebind(torch.randn(2, 1, 64))  # another rank re-keys (and traces the new indexing)

    def bias3(score, b, h, q_idx, kv_idx):
        return score + table[h, 0, kv_idx]
    check(attndsl.attention(q, k, v, score_mod=bias3), q, k, v, score_mod=bias3)
    assert traces[0] == 2


def test_document_factory_binds_new_ids(traces):
    from attndsl.patterns import doc_ids_from_lengths, document
    q, k, v = qkv(L=48)
    for lengths in ([16, 32], [40, 8], [48]):
        ids = doc_ids_from_lengths(lengths)
        check(attndsl.attention(q, k, v, mask_mod=document(ids)), q, k, v, mask_mod=document(ids))
    assert traces[0] == 1


def test_learnable_capture_rekeys_and_gets_gradients(traces):
    slopes = torch.rand(2)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    q, k, v = qkv()
    attndsl.attention(q, k, v, score_mod=alibi)
    slopes = torch.rand(2, requires_grad=True)  # requires_grad re-keys: the spec has a learnable slot
    out = attndsl.attention(q, k, v, score_mod=alibi)
    assert traces[0] == 2
    out.sum().backward()
    s64 = slopes.detach().double().requires_grad_()
    want, _ = attndsl.reference.attention(q.double(), k.double(), v.double(),
                                          score_mod=lambda s, b, h, qi, ki: s + s64[h] * (ki - qi))
    want.sum().backward()
    assert torch.allclose(slopes.grad.double(), s64.grad, atol=1e-3, rtol=1e-3)


class Opaque:
    def __init__(self, w):
        self.w = w


def test_uncacheable_closure_falls_back_to_tracing(traces):
    cfg = Opaque(4)

    def m(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < cfg.w

    q, k, v = qkv()
    check(attndsl.attention(q, k, v, mask_mod=m), q, k, v, mask_mod=m)
    cfg.w = 9  # an object's state is opaque to the cache: traced per call, so this is seen
    check(attndsl.attention(q, k, v, mask_mod=m), q, k, v, mask_mod=m)
    assert traces[0] == 2 and PATTERNS.uncacheable == 2 and not PATTERNS.entries


def test_lru_bound_and_clear(traces, monkeypatch):
    monkeypatch.setattr(PATTERNS, "size", 2)
    q, k, v = qkv()
    for w in (2, 3, 4):
        attndsl.attention(q, k, v, mask_mod=sliding(w))
    assert len(PATTERNS.entries) == 2
    attndsl.attention(q, k, v, mask_mod=sliding(2))  # dropped first: traced again
    assert traces[0] == 4
    attndsl.clear_cache()
    assert not PATTERNS.entries
    attndsl.attention(q, k, v, mask_mod=sliding(4))
    assert traces[0] == 5


def test_composed_and_partial_patterns_are_cached(traces):
    import functools

    def window(b, h, q_idx, kv_idx, w):
        return q_idx - kv_idx < w

    causal = attndsl.mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
    q, k, v = qkv()
    for _ in range(2):
        m = causal & attndsl.mask(functools.partial(window, w=5))
        out = attndsl.attention(q, k, v, mask_mod=m)
    check(out, q, k, v, mask_mod=m)
    assert traces[0] == 1


def test_selectors_bind_the_current_tensors(traces):
    from attndsl.selectors import BlockSelection
    global BIAS
    old = BIAS
    q, k, v = qkv()
    sel = BlockSelection(torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32), 16, 16)
    try:
        first = attndsl.attention(q, k, v, score_mod=global_bias, blocks=sel)
        BIAS = torch.randn(2, 64)
        second = attndsl.attention(q, k, v, score_mod=global_bias, blocks=sel)
        assert not torch.allclose(first, second)
        third = attndsl.attention(q, k, v, score_mod=global_bias, blocks=sel)
        assert torch.equal(second, third) and traces[0] == 1
        dense = attndsl.attention(q, k, v, score_mod=global_bias,
                                  mask_mod=lambda b, h, qi, ki: (ki // 16 == 0) | (qi // 16 == 1))
        assert torch.allclose(second, dense, atol=1e-5)  # the selection as a mask, with the new BIAS
    finally:
        BIAS = old


def test_unrolled_captured_size_is_part_of_the_entry(traces):
    """``torch.dot`` over a captured row unrolls its length into the IR (``Trace.sized``): a fresh
    closure holding a row of another length is traced again, one of the same length is a hit."""
    def rope_bias(rope):
        def mod(score, b, h, q_idx, kv_idx):
            return score + torch.dot(rope[b, h, q_idx], rope[b, h, kv_idx]) * 0.1
        return mod

    q, k, v = qkv()
    for d, n_traces in ((4, 1), (8, 2), (8, 2)):
        mod = rope_bias(torch.randn(1, 2, 32, d))
        out = attndsl.attention(q, k, v, score_mod=mod)
        check(out, q, k, v, score_mod=mod)
        assert traces[0] == n_traces


def test_layout_patterns_are_cached(traces):
    """The locality patterns hold a ``Layout`` (keyed by its value, ``__attndsl_key__``) and reach
    attndsl's own ``tracing`` (keyed by identity, not walked into its thread-local): traced once,
    for the very mask and for a fresh one from the same factory; another layout re-keys. (Before,
    each one-shot call traced them again: 17-35 ms of host per call on an H100.)"""
    from attndsl import Layout
    from attndsl.patterns.neighborhood import neighborhood
    from attndsl.patterns.radial import radial
    from attndsl.patterns.sliding_tile import sliding_tile_3d

    q, k, v = qkv(L=64)
    lay = Layout((8, 8), tile=(4, 4))
    m = neighborhood(lay, 3)
    for _ in range(2):
        out = attndsl.attention(q, k, v, mask_mod=m)
    attndsl.attention(q, k, v, mask_mod=neighborhood(Layout((8, 8), tile=(4, 4)), 3))  # an equal layout
    check(out, q, k, v, mask_mod=m)
    assert traces[0] == 1 and PATTERNS.uncacheable == 0
    other = neighborhood(Layout((8, 8), tile=(2, 2)), 3)  # another tile order: other coordinates
    check(attndsl.attention(q, k, v, mask_mod=other), q, k, v, mask_mod=other)
    assert traces[0] == 2
    assert walk(m, None)[0] != walk(other, None)[0]
    for mask in (sliding_tile_3d((2, 4, 8), (1, 2, 4), (1, 1, 1))[1], radial(2, 32, block=16)):
        before = traces[0]
        for _ in range(2):
            out = attndsl.attention(q, k, v, mask_mod=mask)
        check(out, q, k, v, mask_mod=mask)
        assert traces[0] == before + 1 and PATTERNS.uncacheable == 0
