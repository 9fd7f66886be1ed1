"""Block tables of data-dependent masks kept across calls and layers (issue 30 part 4), and
index checks of captured values once per tensor version (part 2)."""
import pytest
import torch

import attndsl
import attndsl.reference
from attndsl.patterns import doc_ids_from_lengths
from attndsl.runtime import launch
from attndsl.runtime.tables import TABLES

H, D = 2, 16


@pytest.fixture(autouse=True)
def fresh():
    attndsl.clear_cache()
    yield
    attndsl.clear_cache()


@pytest.fixture
def table_launches(monkeypatch):
    """Counts launches of table kernels (``<name>_table`` / ``<name>_table_t``)."""
    count = [0]
    real = launch.Runner._run

    def counting(self, kernel, *a, **k):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", "")
        if name.endswith("_table") or name.endswith("_table_t"):
            count[0] += 1
        return real(self, kernel, *a, **k)

    monkeypatch.setattr(launch.Runner, "_run", counting)
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
    tables = attn.build_block_tables(q, k)
    for _ in range(2):
        check(attn(q, k, v, block_tables=tables), q, k, v)
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
