"""Block tables of data-dependent masks kept across calls and layers (issue 30 part 4), and
index checks of captured values once per tensor version (part 2)."""
import pytest
import torch

import attndsl
import attndsl.reference
from attndsl.patterns import doc_ids_from_lengths
from attndsl.runtime import tables
from attndsl.runtime.tables import TABLES
from attndsl.runtime.tilebounds import bounded_table, dense_table

H, D = 2, 16


@pytest.fixture(autouse=True)
def fresh():
    attndsl.clear_cache()
    yield
    attndsl.clear_cache()


def _count_builds(monkeypatch, count, bounded: bool):
    """Count the tables built by the dense kernel (and, with ``bounded``, by the tile-bounds kernels)."""
    real_dense, real_bounded = tables.dense_table, tables.bounded_table

    def dense(*a):
        count[0] += 1
        return real_dense(*a)

    def bounds(*a):
        t = real_bounded(*a)
        count[0] += bounded and t is not None
        return t

    monkeypatch.setattr(tables, "dense_table", dense)
    monkeypatch.setattr(tables, "bounded_table", bounds)


@pytest.fixture(params=["kernel", "bounds"])
def table_launches(monkeypatch, request):
    """Counts tables built: by the dense table kernels or, with the O(L + tiles²) builder on, by it."""
    count = [0]
    _count_builds(monkeypatch, count, True)
    monkeypatch.setattr(tables, "BOUNDS", request.param == "bounds")
    return count


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts tables built by the dense table kernels only."""
    count = [0]
    _count_builds(monkeypatch, count, False)
    return count


IDS = doc_ids_from_lengths([10, 14, 8])


def doc(b, h, q_idx, kv_idx):
    return (IDS[q_idx] == IDS[kv_idx]) & (q_idx >= kv_idx)


def qkv(L=32, grad=False):
    return [torch.randn(1, H, L, D, requires_grad=grad) for _ in range(3)]


def check(out, q, k, v):
    want, _ = attndsl.reference.attention(q.detach().double(), k.detach().double(), v.detach().double(), mask_mod=doc)
    assert float((out.detach().double() - want).abs().max()) < 1e-4


def test_table_built_once_across_calls_and_layers(table_launches):
    layers = [qkv(grad=True) for _ in range(2)]
    for q, k, v in layers:  # two layers, forward
        check(attndsl.attention(q, k, v, mask_mod=doc), q, k, v)
    assert table_launches[0] == 1
    out = sum(attndsl.attention(q, k, v, mask_mod=doc).sum() for q, k, v in layers)
    before = table_launches[0]
    out.backward()  # the backward's (transposed) tables: built once too, for both layers
    assert table_launches[0] - before <= 2  # dK/dV table, and dQ's when its tiles differ from the forward's
    after = table_launches[0]
    sum(attndsl.attention(q, k, v, mask_mod=doc).sum() for q, k, v in layers).backward()
    assert table_launches[0] == after  # everything reused


def test_in_place_change_rebuilds(table_launches):
    global IDS
    old = IDS.clone()
    q, k, v = qkv()
    try:
        check(attndsl.attention(q, k, v, mask_mod=doc), q, k, v)
        IDS.copy_(doc_ids_from_lengths([20, 12]))  # in place: the version counter moves
        check(attndsl.attention(q, k, v, mask_mod=doc), q, k, v)
        assert table_launches[0] == 2
    finally:
        IDS.copy_(old)


def test_rebinding_and_new_length_rebuild(table_launches):
    global IDS
    old = IDS
    q, k, v = qkv()
    try:
        check(attndsl.attention(q, k, v, mask_mod=doc), q, k, v)
        IDS = doc_ids_from_lengths([5, 27])  # another tensor
        check(attndsl.attention(q, k, v, mask_mod=doc), q, k, v)
        assert table_launches[0] == 2
        IDS = doc_ids_from_lengths([16, 32])  # another length
        q, k, v = qkv(L=48)
        check(attndsl.attention(q, k, v, mask_mod=doc), q, k, v)
        assert table_launches[0] == 3
    finally:
        IDS = old


def test_score_only_tensors_do_not_key_the_table(table_launches):
    bias = torch.randn(H, 32)

    def sm(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx]

    q, k, v = qkv()
    attndsl.attention(q, k, v, mask_mod=doc, score_mod=sm)
    bias.add_(1.0)
    attndsl.attention(q, k, v, mask_mod=doc, score_mod=sm)
    assert table_launches[0] == 1


def test_explicit_build_once_api_still_works(table_launches):
    attn = attndsl.compile(mask_mod=doc)
    q, k, v = qkv()
    built = attn.build_block_tables(q, k)
    for _ in range(2):
        check(attn(q, k, v, block_tables=built), q, k, v)
    assert table_launches[0] == 1 and not TABLES.entries


def test_value_index_checks_once_per_version(monkeypatch):
    from attndsl.runtime import checks
    calls = [0]
    real = checks._value_extremes

    def counting(*a):
        calls[0] += 1
        return real(*a)

    monkeypatch.setattr("attndsl.runtime.indexcheck._value_extremes", counting)
    ids = torch.tensor([0, 1, 2, 3] * 8)
    table = torch.randn(4)

    def sm(score, b, h, q_idx, kv_idx):
        return score + table[ids[kv_idx]]

    q, k, v = qkv()
    for _ in range(3):
        attndsl.attention(q, k, v, score_mod=sm)
    assert calls[0] == 1  # once for this version of ids
    attndsl.attention(q, k, v, score_mod=sm, check_indices=True)
    assert calls[0] == 2  # explicit: every call
    ids[3] = 7  # in place, now out of range: checked again and refused
    with pytest.raises(IndexError, match="out of range"):
        attndsl.attention(q, k, v, score_mod=sm)
    attndsl.attention(q, k, v, score_mod=sm, check_indices=False)  # off: no check, clamped by the kernels


def _sets(t):
    """Per (b, h, row): (full column set, partial column set) of a Table."""
    out = {}
    TB, TH, R, _ = t.full.shape
    for b in range(TB):
        for h in range(TH):
            for r in range(R):
                nf, np_ = (int(x) for x in t.count[b, h, r])
                out[b, h, r] = (set(t.full[b, h, r, :nf].tolist()), set(t.part[b, h, r, :np_].tolist()))
    return out


LENS = torch.tensor([40, 17])
KEEP = torch.rand(67) > 0.5
IDS4 = doc_ids_from_lengths([10, 30, 7, 20])


def per_batch(b, h, q_idx, kv_idx):  # reads b and h: a table per batch and head
    return ((IDS4[q_idx] == IDS4[kv_idx]) & (kv_idx < LENS[b])) | ((h == 1) & KEEP[kv_idx] & (q_idx - kv_idx <= 9))


@pytest.mark.parametrize("mask", ["doc-causal", "doc-bidirectional", "per-batch-length"])
def test_bounded_tables_match_the_kernel(mask):
    from attndsl.patterns import document
    ids = doc_ids_from_lengths([10, 30, 7, 20])
    L = ids.numel()
    m = {"doc-causal": document(ids), "doc-bidirectional": document(ids, causal=False), "per-batch-length": per_batch}[mask]
    attn = attndsl.compile(mask_mod=m)
    assert attn.spec.data_dependent
    q = torch.randn(2, 2, L, D)
    r = attn.runner(q)
    for transposed, br, bc in ((False, 16, 16), (True, 16, 32), (False, 32, 16), (True, 64, 16)):
        want = dense_table(r, (2, 2, L, L), attn.tensors, transposed, br, bc, q.device)
        got = bounded_table(r, (2, 2, L, L), attn.tensors, transposed, br, bc, q.device)
        assert got.full.shape == want.full.shape and (got.uses_b, got.uses_h) == (want.uses_b, want.uses_h)
        assert _sets(got) == _sets(want), f"{mask} {transposed} {br}x{bc}"


def test_bounded_tables_end_to_end_without_a_table_kernel(kernel_launches):
    from attndsl.patterns import document
    ids = doc_ids_from_lengths([5, 21, 13, 11])
    q, k, v = (torch.randn(1, H, 50, D, requires_grad=True) for _ in range(3))
    out = attndsl.attention(q, k, v, mask_mod=document(ids))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=document(ids))
    gw = torch.autograd.grad(want.sum(), (q64, k64, v64))
    assert float((out.double() - want).abs().max()) < 1e-4
    assert all(float((a.double() - b).abs().max()) < 1e-3 for a, b in zip(g, gw))
    assert kernel_launches[0] == 0


def test_unbounded_masks_fall_back_to_the_kernel(kernel_launches):
    allowed = torch.rand(32, 32) > 0.3  # indexed by both q and kv: no per-tile bound

    def m(b, h, q_idx, kv_idx):
        return allowed[q_idx, kv_idx] | (q_idx == kv_idx)

    q, k, v = qkv()
    out = attndsl.attention(q, k, v, mask_mod=m)
    want, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=m)
    assert float((out.double() - want).abs().max()) < 1e-4
    assert kernel_launches[0] == 1


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["document-causal", "document-window", "per-head"])
def test_bounded_tables_match_the_kernel_on_gpu(mask):
    """64 packed documents at L=32768 on the GPU (forward and dK/dV tiles of the kernels): the
    tile-bounds kernels' tables equal the dense kernel's, lists in the same order."""
    from attndsl.patterns import document
    g = torch.Generator().manual_seed(0)
    L = 32768
    cuts = torch.sort(torch.randperm(L - 1, generator=g)[:63] + 1).values
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([L])])).tolist()
    ids = doc_ids_from_lengths(lengths, device="cuda")
    win = torch.tensor([256, 1024, 4096, 64], device="cuda")

    def windowed(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx <= 2048)

    def per_head(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx <= win[h])

    m = {"document-causal": document(ids), "document-window": windowed, "per-head": per_head}[mask]
    attn = attndsl.compile(mask_mod=m)
    H = 4 if mask == "per-head" else 2
    q = torch.randn(1, H, L, 64, device="cuda", dtype=torch.bfloat16)
    r = attn.runner(q)
    for transposed, br, bc in ((False, r.cfg.fwd.block_m, r.cfg.fwd.block_n),
                               (True, r.cfg.dkdv.block_n, r.cfg.dkdv.block_m)):
        want = dense_table(r, (1, H, L, L), attn.tensors, transposed, br, bc, q.device)
        got = bounded_table(r, (1, H, L, L), attn.tensors, transposed, br, bc, q.device)
        assert got is not None
        assert torch.equal(got.count, want.count), (mask, transposed)
        for name in ("full", "part"):  # entries past each row's count are never read
            n = want.count[..., 0 if name == "full" else 1]
            keep = torch.arange(want.full.shape[-1], device="cuda") < n[..., None]
            assert torch.equal(getattr(got, name)[keep], getattr(want, name)[keep]), (mask, transposed, name)
