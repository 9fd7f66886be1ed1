"""Integer semantics equal to torch's int64 (issue 31, parts 1 and 2).

* ``passes/int_width.py`` bounds every integer node over every legal call and marks the ones that
  can leave int32; kernels compute those in int64, everything else in int32 (common patterns
  stay 32-bit).
* A sweep of overflow-prone patterns at small lengths with large multipliers, squares, products
  of indices, hashed and strided masks, large constants and wide or narrow captured integer
  tensors, through ``attndsl.attention`` against the float64 reference (forward and gradients).
* Division and modulo by zero: a constant zero divisor is a trace-time ``PatternError`` naming
  the pattern's line; a divisor that is zero somewhere in the call is refused before launch.
"""
import pytest
import torch

import attndsl
from attndsl import ir, reference
from attndsl.dsl.errors import PatternError
from attndsl.passes import int_width
from attndsl.passes.int_width import MAX_EXTENT, check_extents, spec_roots, value_range, wide, wide_nodes
from attndsl.testing import assert_matches_reference, random_qkv

q, kv, b, h = (ir.var(v) for v in ("q", "kv", "b", "h"))
C = ir.const


# ---------------------------------------------------------------------------------------- pass


def test_positions_and_differences_stay_narrow():
    for n in (q, ir.node("sub", q, kv), ir.node("add", q, kv), ir.node("floordiv", q, C(64)),
              ir.node("mod", ir.node("sub", q, kv), C(7)), ir.node("add", ir.var("q_hi"), C(4096))):
        assert not wide(n), n
    assert value_range(ir.node("sub", q, kv)) == (1 - MAX_EXTENT, MAX_EXTENT - 1)
    assert value_range(ir.node("mod", ir.node("sub", q, kv), C(7))) == (0, 6)


def test_products_squares_and_large_constants_are_wide():
    d = ir.node("sub", q, kv)
    assert wide(ir.node("mul", d, C(100000007)))
    assert wide(ir.node("mul", d, d))
    assert wide(ir.node("mul", q, kv))
    assert wide(ir.node("add", q, C(3_000_000_000)))
    # a narrow result of a wide operand is narrow again (the kernel casts it back to int32)
    assert not wide(ir.node("mod", ir.node("mul", q, C(100000007)), C(1000)))
    # an exact bound: 2 * q fits (q < 2**30), 4 * q does not
    assert not wide(ir.node("mul", q, C(2))) and wide(ir.node("mul", q, C(4)))


def test_loads_range_over_their_dtype():
    def ld(dtype):
        return ir.load(ir.Buffer(0, ir.INT, 1, dtype), (q,))

    assert value_range(ld("int16")) == (-(1 << 15), (1 << 15) - 1)
    assert value_range(ld("uint8")) == (0, 255)
    assert wide(ld("int64")) and not wide(ld("int32"))
    assert wide(ir.node("add", ld("int32"), C(1)))  # int32 values + 1 can pass 2**31 - 1
    assert not wide(ir.node("add", ld("int16"), ld("int16")))
    assert not wide(ir.node("mod", ld("int64"), C(8)))


def test_division_bounds():
    d = ir.node("sub", kv, C(5))
    assert value_range(ir.node("mod", q, d)) == (-(MAX_EXTENT - 7), MAX_EXTENT - 7)
    assert value_range(ir.node("floordiv", q, ir.node("add", kv, C(1)))) == (0, MAX_EXTENT - 1)
    assert value_range(ir.node("floordiv", ir.node("sub", q, kv), C(-3)))[1] == (MAX_EXTENT - 1) // 3


def test_t5_bucket_where_is_narrowed():
    from attndsl.dsl import trace
    from attndsl.patterns import t5_bucket_bias
    table = torch.randn(2, 32)
    tr = trace(score_mod=t5_bucket_bias(table, 32, 128))
    assert not any(n.op != "load" for n in wide_nodes([tr.score])), wide_nodes([tr.score])


def _common_patterns():
    from attndsl.patterns import alibi, alibi_slopes, causal, chunked, document, prefix_lm, sliding_window, \
        t5_bucket_bias
    from attndsl.patterns.neighborhood import neighborhood_2d
    from attndsl.patterns.sliding_tile import sliding_tile_3d
    ids = torch.arange(64) // 20
    return {
        "causal": dict(mask_mod=causal), "sliding_window": dict(mask_mod=sliding_window(16)),
        "chunked": dict(mask_mod=chunked(16)), "prefix_lm": dict(mask_mod=prefix_lm(8)),
        "document": dict(mask_mod=document(ids)), "alibi": dict(score_mod=alibi(alibi_slopes(4))),
        "t5": dict(score_mod=t5_bucket_bias(torch.randn(4, 32), 32, 128)),
        "neighborhood_2d": dict(mask_mod=neighborhood_2d(16, 16, 5, tile=(4, 4))[1]),
        "neighborhood_2d_dilated": dict(mask_mod=neighborhood_2d(16, 16, 3, dilation=2, tile=None)[1]),
        "sliding_tile": dict(mask_mod=sliding_tile_3d((4, 8, 8), (2, 2, 2), (1, 3, 3), text_tokens=8)[1]),
    }


@pytest.mark.parametrize("name", list(_common_patterns()))
def test_common_patterns_keep_32_bit_integers(name):
    """Every integer node of the spec (mask, score, tile classes, visit plans) is int32, except
    reads of int64 tensors (document ids), which stay what they are."""
    kw = _common_patterns()[name]
    spec = attndsl.compile(**kw).spec
    extra = [n for n in spec.wide_ints if n.op != "load"]
    assert not extra, extra
    assert spec.wide_ints == wide_nodes(spec_roots(spec))


def test_extents_are_capped():
    check_extents((1, 1, MAX_EXTENT - 1, 7))
    with pytest.raises(ValueError, match="query length 1073741824 is too large"):
        check_extents((1, 1, MAX_EXTENT, 7))


# ----------------------------------------------------------------------- kernels vs reference

def _patterns(device="cpu"):
    big = ((1 << 40) + torch.arange(512) * 1000).to(device)  # int64 values far past int32, small differences
    i16 = (30000 + torch.arange(512) * 7).to(torch.int16).to(device)  # int16 sums overflow int16
    u8 = (torch.arange(512) % 3).to(torch.uint8).to(device)
    masks = {
        "scaled_difference": lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) * 100000007 >= 0,
        "squared_distance": lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) ** 2 * 1000003 <= 100 * 1000003,
        "hashed": lambda b, h, q_idx, kv_idx: (q_idx * 2654435761 + kv_idx * 40503) % 7 != 0,
        "index_product": lambda b, h, q_idx, kv_idx: (q_idx * kv_idx * 1000003) % 5 != 1,
        "strided_hash": lambda b, h, q_idx, kv_idx: (q_idx * 1000000007) % 64 >= (kv_idx * 1000000009) % 64,
        "large_constant": lambda b, h, q_idx, kv_idx: (q_idx + 3000000000) // 2 >= (kv_idx + 3000000001) // 2,
        "wide_divisor": lambda b, h, q_idx, kv_idx: (q_idx * 100000007) // (kv_idx + 100) % 3 == 0,
        "wide_floor_mod": lambda b, h, q_idx, kv_idx: ((kv_idx - q_idx) * 1000000007) % (q_idx + 5) < 3,
        "int64_capture": lambda b, h, q_idx, kv_idx: big[kv_idx] - big[q_idx] <= 0,
        "int16_capture": lambda b, h, q_idx, kv_idx: i16[q_idx] + i16[kv_idx] > 60200,
        "uint8_capture": lambda b, h, q_idx, kv_idx: u8[kv_idx] - 1 >= 0,
        "head_batch_product": lambda b, h, q_idx, kv_idx: ((h + 1) * 1500000000 + kv_idx) % 4 != 3,
    }
    scores = {
        "squared_bias": lambda s, b, h, q_idx, kv_idx: s - ((q_idx - kv_idx) * 2000) ** 2 * 1e-9,
        "hashed_bias": lambda s, b, h, q_idx, kv_idx: s + ((q_idx * 2654435761 + kv_idx) % 1000) * 1e-3,
        "int64_capture_bias": lambda s, b, h, q_idx, kv_idx: s + ((big[q_idx] - big[kv_idx]) // 1000) * 0.05,
        "large_constant_bias": lambda s, b, h, q_idx, kv_idx: s + ((kv_idx - 3000000000) % 17) * 0.1,
    }
    return masks, scores


MASKS, SCORES = _patterns()


@pytest.mark.parametrize("name", list(MASKS))
def test_overflow_prone_masks_match_reference(name):
    torch.manual_seed(0)
    qkv = random_qkv((1, 2, 2, 48, 56, 16))
    assert_matches_reference(*qkv, mask_mod=MASKS[name], msg=name)


@pytest.mark.parametrize("name", list(SCORES))
def test_overflow_prone_score_mods_match_reference(name):
    torch.manual_seed(0)
    qkv = random_qkv((1, 2, 1, 40, 48, 16))
    assert_matches_reference(*qkv, score_mod=SCORES[name], msg=name)


def test_issue_example_at_length_48():
    """The issue's reproduction: both were 1.15 to 2.7 off at L = 48 with no warning."""
    qq, kk, vv = (torch.randn(1, 1, 48, 16) for _ in range(3))
    for kw in (dict(mask_mod=MASKS["scaled_difference"]), dict(score_mod=SCORES["squared_bias"])):
        out = attndsl.attention(qq, kk, vv, **kw)
        ref, _ = reference.attention(qq, kk, vv, **kw)
        assert (out.double() - ref).abs().max() < 1e-4


# ------------------------------------------------------------------------ division by zero


def test_constant_zero_divisor_is_a_pattern_error_at_its_line():
    import inspect
    line = inspect.currentframe().f_lineno
    floor = lambda b, h, q_idx, kv_idx: q_idx // 0 >= 1  # noqa: E731  (line + 1)
    mod = lambda b, h, q_idx, kv_idx: q_idx % 0 == 1  # noqa: E731  (line + 2)
    for f, at, sym in ((floor, line + 1, "//"), (mod, line + 2, "%")):
        with pytest.raises(PatternError, match=rf"test_integer_semantics.py:{at}: integer division by zero: `q {sym} 0`"):
            attndsl.compile(mask_mod=f)


def test_divisor_that_simplifies_to_zero_is_a_pattern_error():
    with pytest.raises(PatternError, match="integer division by zero"):
        attndsl.compile(mask_mod=lambda b, h, q_idx, kv_idx: q_idx % (kv_idx - kv_idx) == 1)


def test_divisor_zero_in_the_call_is_refused_before_launch():
    mask = lambda b, h, q_idx, kv_idx: q_idx % (kv_idx - 5) == 1  # noqa: E731
    qkv = random_qkv((1, 1, 1, 16, 16, 16), requires_grad=False)
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        reference.attention(*qkv, mask_mod=mask)  # torch itself raises
    with pytest.raises(ZeroDivisionError, match=r"`\(kv - 5\)`, which is 0 at kv_idx=5 .*Lkv=16"):
        attndsl.attention(*qkv, mask_mod=mask)
    # a key length that never reaches 5: nothing divides by zero, and the result is torch's
    short = random_qkv((1, 1, 1, 16, 5, 16))
    assert_matches_reference(*short, mask_mod=mask)


def test_divisor_over_heads_and_captured_values():
    qkv = random_qkv((1, 2, 1, 16, 16, 16), requires_grad=False)
    with pytest.raises(ZeroDivisionError, match=r"`\(h - 1\)`, which is 0 at h=1"):
        attndsl.attention(*qkv, mask_mod=lambda b, h, q_idx, kv_idx: (q_idx - kv_idx) // (h - 1) >= 0)
    steps = torch.tensor([3, 1, 2, 4] * 4)
    mask = lambda b, h, q_idx, kv_idx: q_idx % steps[kv_idx] == 0  # noqa: E731
    assert_matches_reference(*random_qkv((1, 2, 1, 16, 16, 16)), mask_mod=mask)
    steps[6] = 0  # the same pattern, new values: checked again on this call
    with pytest.raises(ZeroDivisionError, match="which is 0 at kv_idx=6"):
        attndsl.attention(*qkv, mask_mod=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MASKS) + list(SCORES))
def test_overflow_prone_patterns_on_gpu(name):
    """The same sweep compiled for the GPU (bf16 and fp32, L = 300: several tiles)."""
    masks, scores = _patterns("cuda")
    kw = dict(mask_mod=masks[name]) if name in masks else dict(score_mod=scores[name])
    for dtype in (torch.float32, torch.bfloat16):
        qkv = random_qkv((2, 4, 2, 300, 280, 64), dtype=dtype, device="cuda")
        assert_matches_reference(*qkv, msg=name, **kw)


def test_bitwise_and_erf_have_interval_rules():
    """The tracer lowers integer ``& | ^`` (attn-gym's morton NATTEN mask) and ``erf``; the width pass
    bounds them: non-negative operands of ``&`` stay under the smaller high, and ``|``/``^`` under
    the next power of two; ``erf`` lies in [-1, 1]. (Found on the merged tree: the pass raised for them.)"""
    from attndsl import ir
    from attndsl.passes import int_width
    q, kv = ir.var("q", ir.INT), ir.var("kv", ir.INT)
    lo, hi = int_width.value_range(ir.node("bitand", q, ir.const(255, ir.INT)))
    assert lo == 0 and hi == 255
    lo, hi = int_width.value_range(ir.node("bitor", q, kv))
    assert lo == 0 and hi >= 2**30 - 1
    lo, hi = int_width.value_range(ir.node("bitxor", ir.node("sub", q, kv), ir.const(7, ir.INT)))
    assert lo < 0 < hi
