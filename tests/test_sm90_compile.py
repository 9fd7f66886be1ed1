"""Kernels that run in the CPU interpreter must also compile for an H100 (issue 31, part 6).

The interpreter does not enforce what the GPU compiler does: the key-padding mask
``kv_idx < lengths[b]`` (int64 lengths) passed every CPU test and failed on an H100 with
``Loop-carried variable tile has initial type int32 but is re-assigned to int64 in loop``. Here
the kernels a CPU call launches are recorded and compiled for sm_90 (no GPU needed); the test
session does the same for every CPU test (``tests/conftest.py``).
"""
import pytest
import torch

import attndsl
from attndsl import reference
from attndsl.testing import assert_matches_reference, random_qkv, sm90

needs_toolchain = pytest.mark.skipif(not sm90.available(), reason="this Triton cannot compile for sm_90 (no ptxas)")


def _key_padding(lengths):
    def key_padding(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b]
    return key_padding


def _compile_launched(run) -> list:
    with sm90.record() as rec:
        run()
    assert rec.records and not rec.skipped
    failures, _ = sm90.compile_all(rec.records)
    return failures


@needs_toolchain
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_key_padding_mask_compiles_for_sm90(dtype):
    lengths = torch.tensor([40, 17, 33], dtype=dtype)
    mask = _key_padding(lengths)

    def run():
        q, k, v = random_qkv((3, 2, 2, 40, 40, 16))
        assert_matches_reference(q, k, v, mask_mod=mask)

    failures = _compile_launched(run)
    assert not failures, sm90.describe(failures)


def _overflow_and_common_cases():
    from attndsl.patterns import alibi, alibi_slopes, causal, document, sliding_window, t5_bucket_bias
    ids = torch.arange(48) // 20
    big = (1 << 40) + torch.arange(48) * 1000
    return [
        dict(mask_mod=causal), dict(mask_mod=sliding_window(8)), dict(mask_mod=document(ids)),
        dict(score_mod=alibi(alibi_slopes(2))), dict(score_mod=t5_bucket_bias(torch.randn(2, 16), 16, 64)),
        dict(mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) * 100000007 >= 0),
        dict(mask_mod=lambda b, h, q_idx, kv_idx: (q_idx * 2654435761 + kv_idx) % 7 != 0),
        dict(mask_mod=lambda b, h, q_idx, kv_idx: big[kv_idx] - big[q_idx] <= 0),
        dict(score_mod=lambda s, b, h, q_idx, kv_idx: s - ((q_idx - kv_idx) * 2000) ** 2 * 1e-9),
        dict(mask_mod=lambda b, h, q_idx, kv_idx: q_idx % (kv_idx + 3) < 2),
    ]


@needs_toolchain
@pytest.mark.slow
def test_common_and_wide_integer_kernels_compile_for_sm90():
    def run():
        for kw in _overflow_and_common_cases():
            q, k, v = random_qkv((1, 2, 1, 48, 40, 16))
            assert_matches_reference(q, k, v, **kw)

    failures = _compile_launched(run)
    assert not failures, sm90.describe(failures)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,L,D", [(4, 256, 64), (8, 512, 128)])
def test_key_padding_mask_on_gpu(B, L, D, dtype):
    lengths = torch.randint(1, L + 1, (B,), device="cuda")
    lengths[0] = L
    q, k, v = random_qkv((B, 4, 4, L, L, D), dtype=dtype, device="cuda")
    assert_matches_reference(q, k, v, mask_mod=_key_padding(lengths))
    out = attndsl.attention(q, k, v, mask_mod=_key_padding(lengths))
    ref, _ = reference.attention(q, k, v, mask_mod=_key_padding(lengths))
    assert torch.isfinite(out).all() and (out.double() - ref).abs().max() < 0.05
