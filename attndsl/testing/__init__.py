"""Property-testing tools for attention patterns (public API).

Use them to test your own pattern files against attndsl's float64 oracle
(:func:`attndsl.reference.attention`)::

    from hypothesis import given, settings, strategies as st
    import attndsl
    from attndsl.testing import shapes, dtypes, random_qkv, assert_matches_reference

    @settings(max_examples=20, deadline=None)
    @given(shape=shapes(max_len=80), dtype=dtypes(), window=st.integers(1, 80))
    def test_my_window(shape, dtype, window):
        q, k, v = random_qkv(shape, dtype)
        assert_matches_reference(attndsl.compile(mask_mod=my_window(window)), q, k, v)

See docs/testing.md. Strategies live in :mod:`attndsl.testing.strategies`, the comparison in
:mod:`attndsl.testing.assertions`. :mod:`attndsl.testing.fuzz` is an independent fuzzer (random
patterns from every DSL construct and random calls, checked against the reference and
FlexAttention's eager forward); :mod:`attndsl.testing.sm90` compiles the kernels a CPU run
launched for an H100, so a kernel the GPU compiler rejects fails without a GPU.
"""
from .assertions import LSE_TOLERANCE, TOLERANCES, Mismatch, assert_matches_reference, default_tolerance, random_qkv
from .strategies import (LAYOUT_PATTERNS, MASK_PATTERNS, SCORE_PATTERNS, PatternCase, Shape, dtypes, lengths, masks, patterns,
                         score_mods, shapes)

__all__ = [
    "Shape", "shapes", "lengths", "dtypes", "masks", "score_mods", "patterns", "PatternCase",
    "MASK_PATTERNS", "SCORE_PATTERNS", "LAYOUT_PATTERNS",
    "assert_matches_reference", "random_qkv", "default_tolerance", "TOLERANCES", "LSE_TOLERANCE", "Mismatch",
]
