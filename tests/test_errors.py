"""Input validation: every mistake is reported before any kernel is launched, with a clear message."""
import os

import pytest
import torch

import attndsl
from attndsl.runtime import cache, launch

THIS_FILE = os.path.basename(__file__)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Any kernel build or launch during these tests is a failure: validation must come first."""
    def fail(*a, **k):
        raise AssertionError("a kernel was built or launched before the inputs were validated")

    monkeypatch.setattr(launch.Runner, "forward", fail)
    monkeypatch.setattr(launch.Runner, "backward", fail)
    monkeypatch.setattr(launch.Runner, "table", fail)
    monkeypatch.setattr(cache, "load", fail)


def both_entry_points(q, k, v, mask_mod=causal, score_mod=None, **kw):
    """Run the check through attndsl.attention and through a compiled pattern; return both errors."""
    errs = []
    for call in (lambda: attndsl.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, **kw),
                 lambda: attndsl.compile(mask_mod=mask_mod, score_mod=score_mod)(q, k, v, **kw)):
        with pytest.raises((ValueError, TypeError, NotImplementedError, attndsl.PatternError)) as ei:
            call()
        errs.append(ei.value)
    assert type(errs[0]) is type(errs[1]) and str(errs[0]) == str(errs[1])
    return errs[0]


GOOD = (t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 32))


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 8, 32), (1, 1, 2, 8, 32), (32,)])
def test_wrong_rank(which, shape):
    args = list(GOOD)
    args[which] = t(*shape)
    e = both_entry_points(*args)
    name = ("query", "key", "value")[which]
    assert isinstance(e, ValueError)
    assert name in str(e) and "[B, H, L, D]" in str(e) and f"rank {len(shape)}" in str(e)


def test_mismatched_batch():
    e = both_entry_points(t(2, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 32))
    assert isinstance(e, ValueError) and "batch" in str(e) and "2" in str(e) and "1" in str(e)


def test_key_value_disagree():
    e = both_entry_points(t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 9, 32))
    assert isinstance(e, ValueError) and "key" in str(e) and "value" in str(e)
    e = both_entry_points(t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 1, 8, 32))
    assert isinstance(e, ValueError) and "heads" in str(e)


def test_mismatched_head_dim():
    e = both_entry_points(t(1, 2, 8, 32), t(1, 2, 8, 64), t(1, 2, 8, 64))
    assert isinstance(e, ValueError) and "head dim" in str(e) and "32" in str(e) and "64" in str(e)


@pytest.mark.parametrize("dv", [8, 512])
def test_unsupported_value_head_dim(dv):
    """The value head dim may differ from the query/key one (MLA), within the same range."""
    e = both_entry_points(t(1, 2, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, dv))
    assert isinstance(e, ValueError) and "value head dim" in str(e) and str(dv) in str(e) and "16..256" in str(e)


@pytest.mark.parametrize("hq,hkv", [(3, 2), (2, 4), (5, 3)])
def test_heads_not_a_multiple(hq, hkv):
    e = both_entry_points(t(1, hq, 8, 32), t(1, hkv, 8, 32), t(1, hkv, 8, 32))
    assert isinstance(e, ValueError) and "multiple" in str(e) and f"({hq})" in str(e) and f"({hkv})" in str(e)


def test_zero_kv_heads():
    e = both_entry_points(t(1, 2, 8, 32), t(1, 0, 8, 32), t(1, 0, 8, 32))
    assert isinstance(e, ValueError)


def test_mixed_devices():
    e = both_entry_points(t(1, 2, 8, 32), t(1, 2, 8, 32, device="meta"), t(1, 2, 8, 32))
    assert isinstance(e, ValueError) and "device" in str(e) and "cpu" in str(e) and "meta" in str(e)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16, torch.float32),
                                    (torch.bfloat16, torch.bfloat16, torch.float16)])
def test_mixed_dtypes(dtypes):
    q, k, v = (t(1, 2, 8, 32, dtype=d) for d in dtypes)
    e = both_entry_points(q, k, v)
    assert isinstance(e, TypeError) and "dtype" in str(e)
    for d in dtypes:
        assert str(d) in str(e)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_floating_inputs(dtype):
    e = both_entry_points(t(1, 2, 8, 32, dtype=dtype), t(1, 2, 8, 32, dtype=dtype), t(1, 2, 8, 32, dtype=dtype))
    assert isinstance(e, TypeError) and "floating" in str(e) and str(dtype) in str(e)


def test_unsupported_float_dtype():
    e = both_entry_points(*(t(1, 2, 8, 32, dtype=torch.float8_e4m3fn) for _ in range(3)))
    assert isinstance(e, TypeError) and "float8_e4m3fn" in str(e) and "float16" in str(e)


def test_float64_only_on_cpu():
    """float64 runs through the interpreter (CPU tensors); elsewhere it is refused, naming the device."""
    e = both_entry_points(*(t(1, 2, 8, 32, dtype=torch.float64, device="meta") for _ in range(3)))
    assert isinstance(e, TypeError) and "float64" in str(e) and "meta" in str(e) and "CPU" in str(e)


@pytest.mark.parametrize("d", [8, 4, 512, 300])
def test_unsupported_head_dim(d):
    e = both_entry_points(t(1, 2, 8, d), t(1, 2, 8, d), t(1, 2, 8, d))
    assert isinstance(e, ValueError) and "head dim" in str(e) and str(d) in str(e) and "16..256" in str(e)


def test_visit_counts_of_an_empty_call():
    """Empty calls are answered without a launch (tests/test_runtime.py); counting visits is an error."""
    with pytest.raises(ValueError, match="empty call"):
        attndsl.compile().visit_counts(t(1, 2, 0, 32), t(1, 2, 8, 32), t(1, 2, 8, 32))


def test_not_a_tensor():
    e = both_entry_points([[1.0]], *GOOD[1:])
    assert isinstance(e, TypeError) and "query" in str(e) and "list" in str(e)


def test_bad_scale_type():
    e = both_entry_points(*GOOD, scale=torch.tensor(0.1))
    assert isinstance(e, TypeError) and "scale" in str(e)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale(scale):
    e = both_entry_points(*GOOD, scale=scale)
    assert isinstance(e, ValueError) and "scale must be finite" in str(e)


def unsupported_in_mask(b, h, q_idx, kv_idx):
    return torch.sin(q_idx.float()) > 0  # BAD


def test_unsupported_construct_in_mask():
    import inspect

    lines, start = inspect.getsourcelines(unsupported_in_mask)
    line = start + next(i for i, x in enumerate(lines) if "# BAD" in x)
    e = both_entry_points(*GOOD, mask_mod=unsupported_in_mask)
    assert isinstance(e, attndsl.PatternError)
    assert f"{THIS_FILE}:{line}" in str(e) and "torch.sin" in str(e) and "not supported" in str(e)


def test_captured_tensor_on_another_device():
    ids = torch.zeros(8, dtype=torch.int32, device="meta")

    def doc(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    e = both_entry_points(*GOOD, mask_mod=doc)
    assert isinstance(e, ValueError)
    assert "captures a tensor" in str(e) and "meta" in str(e) and "cpu" in str(e) and ".to(" in str(e)


def float_mask(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).float()


def int_mask(b, h, q_idx, kv_idx):
    return q_idx - kv_idx


def bool_score(score, b, h, q_idx, kv_idx):
    return score > 0


def test_mask_returning_float():
    e = both_entry_points(*GOOD, mask_mod=float_mask)
    assert isinstance(e, attndsl.PatternError)
    assert "mask_mod returned a float" in str(e) and "boolean" in str(e) and THIS_FILE in str(e)


def test_mask_returning_int():
    e = both_entry_points(*GOOD, mask_mod=int_mask)
    assert isinstance(e, attndsl.PatternError)
    assert "mask_mod returned an int" in str(e) and "boolean" in str(e) and THIS_FILE in str(e)


def test_score_mod_returning_bool():
    e = both_entry_points(*GOOD, mask_mod=None, score_mod=bool_score)
    assert isinstance(e, attndsl.PatternError)
    assert "score_mod returned a boolean" in str(e) and "mask_mod" in str(e) and THIS_FILE in str(e)


def test_pattern_not_callable():
    e = both_entry_points(*GOOD, mask_mod=3)
    assert isinstance(e, attndsl.PatternError) and "callable" in str(e)


def test_visit_counts_validates_too():
    with pytest.raises(ValueError, match="multiple"):
        attndsl.compile(mask_mod=causal).visit_counts(t(1, 3, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 32))


# -------------------------------------------------------------------------------------------
# captured-tensor indices out of range (the kernels would clamp them: silently wrong values)
def _index_error(q, k, v, **kw):
    errs = []
    for call in (lambda: attndsl.attention(q, k, v, **kw), lambda: attndsl.compile(**kw)(q, k, v)):
        with pytest.raises(IndexError) as ei:
            call()
        errs.append(str(ei.value))
    assert errs[0] == errs[1]
    return errs[0]


def test_table_too_short_for_the_relative_distance():
    L = 8
    table = torch.zeros(2, L)  # a relative table needs 2L - 1 entries

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[h, q_idx - kv_idx + L - 1]

    e = _index_error(t(1, 2, L, 32), t(1, 2, L, 32), t(1, 2, L, 32), score_mod=rel)
    assert "captured tensor #0 (shape (2, 8))" in e and "dimension 1" in e and "`((q - kv) + 7)`" in e
    assert "is 8 at q_idx=1, kv_idx=0" in e and "valid: 0..7" in e and "Lq=8, Lkv=8" in e and "clamp" in e


def test_document_ids_shorter_than_the_keys():
    ids = torch.zeros(8, dtype=torch.int32)

    def doc(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    e = _index_error(t(1, 2, 8, 32), t(1, 2, 12, 32), t(1, 2, 12, 32), mask_mod=doc)
    assert "`kv`" in e and "is 8 at kv_idx=8" in e and "valid: 0..7" in e


def test_per_head_table_with_fewer_heads_than_the_query():
    slopes = torch.ones(2)

    def per_head(score, b, h, q_idx, kv_idx):
        return score * slopes[h]

    e = _index_error(t(1, 4, 8, 32), t(1, 2, 8, 32), t(1, 2, 8, 32), score_mod=per_head)
    assert "`h`" in e and "is 2 at h=2" in e and "Hq=4" in e


def test_index_read_from_captured_values_out_of_range():
    bucket = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])  # 9: past the 8-entry table
    table = torch.zeros(8)

    def bucketed(score, b, h, q_idx, kv_idx):
        return score + table[bucket[q_idx]]

    e = _index_error(*GOOD, score_mod=bucketed)
    assert "`buf0[q]`" in e and "is 9 at q_idx=7" in e and "valid: 0..7" in e


def test_index_checks_follow_the_call_shape():
    """Decided per call shape: the same compiled pattern fits one length and not a longer one."""
    L = 8
    table = torch.zeros(2 * L - 1)

    def rel(score, b, h, q_idx, kv_idx):
        return score + table[q_idx - kv_idx + L - 1]

    attn = attndsl.compile(score_mod=rel)
    assert attndsl.compile(score_mod=rel).index_check is attn.index_check  # one per pattern (IR)
    attn.index_check(attn.tensors, (1, 2, L, L), torch.device("cpu"))  # fits
    attn.index_check(attn.tensors, (1, 2, 3, L), torch.device("cpu"))  # fits
    with pytest.raises(IndexError, match="is 15 at q_idx=8, kv_idx=0"):
        attn(t(1, 2, L + 1, 32), t(1, 2, L, 32), t(1, 2, L, 32))


def test_shipped_relative_patterns_are_proven_in_range_by_intervals(monkeypatch):
    """T5 buckets (``where(dist < max_exact, dist, log bucket)``), clipped distances and per-head
    slopes are decided from their intervals at L=16384, with no dense evaluation."""
    from attndsl.runtime import checks
    from attndsl.patterns import alibi, relative_position_bias, t5_bucket_bias

    def no_dense(*a):
        raise AssertionError("evaluated densely")

    monkeypatch.setattr(checks, "_check_densely", no_dense)
    for score_mod in (t5_bucket_bias(t(16, 32), 32, 128), t5_bucket_bias(t(16, 32), 32, 128, bidirectional=False),
                      relative_position_bias(t(16, 129), 64), alibi(t(16))):
        attn = attndsl.compile(score_mod=score_mod)
        attn.index_check(attn.tensors, (2, 16, 16384, 12000), torch.device("cpu"))


def test_diagonal_index_is_evaluated_over_distances():
    """An index of q - kv alone whose interval is loose (a square) is evaluated over the
    Lq + Lkv - 1 distances, not the Lq * Lkv pairs, and its first failing pair is reported."""
    import time
    L = 16384
    table = torch.zeros(L * L // 4)

    def squared(score, b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return score + table[d * d]

    attn = attndsl.compile(score_mod=squared)
    assert attn.index_check.bounds[0].on_dist is not None
    start = time.perf_counter()
    with pytest.raises(IndexError, match=f"is {(L - 1) ** 2} at q_idx=0, kv_idx={L - 1}"):
        attn.index_check(attn.tensors, (1, 2, L, L), torch.device("cpu"))
    assert time.perf_counter() - start < 5.0
