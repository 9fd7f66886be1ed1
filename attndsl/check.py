"""Property-test one pattern against the float64 reference (``attndsl check``).

:func:`check_pattern` runs the testing kit (:mod:`attndsl.testing`) on a user's pattern:
hypothesis draws shapes (batch, GQA head counts, ``Lq != Lkv``, lengths next to tile
boundaries), input dtypes, tile sizes and seeds; each example compiles the pattern with the
drawn tiles, runs it forward and backward and compares output, logsumexp and ``dq, dk, dv``
(and the gradients of captured tensors that require grad) with :func:`attndsl.reference.attention`
through :func:`attndsl.testing.assert_matches_reference`. On a failure hypothesis shrinks the
example to a minimal one, which is returned.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

__all__ = ["CheckResult", "check_pattern"]


@dataclass
class CheckResult:
    """What :func:`check_pattern` found.

    Attributes:
        passed: no example failed.
        examples: how many examples ran (hypothesis may stop early when the space is small).
        example: the minimal failing example as hypothesis prints it (``None`` when passed).
        error: the failing example's error (``"Mismatch: output: ..."``; ``None`` when passed).
    """
    passed: bool
    examples: int
    example: Optional[str] = None
    error: Optional[str] = None


def check_pattern(mask_mod: Optional[Callable] = None, score_mod: Optional[Callable] = None, *,
                  max_examples: int = 20, max_len: int = 64, max_heads: int = 4,
                  dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16),
                  head_dims: Sequence[int] = (16, 32), tiles: Sequence[int] = (16, 32), grads: bool = True,
                  device: str = "cpu", seed: Optional[int] = None) -> CheckResult:
    """Property-test a pattern against the float64 reference.

    Args:
        mask_mod, score_mod: the pattern (FlexAttention signatures); at least one.
        max_examples: examples hypothesis tries (before shrinking a failure).
        max_len, max_heads: bounds of the drawn shapes (``Lq, Lkv <= max_len``; ``Hq <= max_heads``
            with ``Hkv`` a divisor). A mask on a :class:`~attndsl.Layout` is drawn at its own length.
        dtypes, head_dims, tiles: the input dtypes, head dims and (square) tile sizes drawn from.
        grads: compare gradients too (forward only when False).
        device: ``"cpu"`` (Triton's interpreter: keep ``max_len`` small) or ``"cuda"``.
        seed: makes the run repeatable (default: hypothesis's own randomness).

    Returns:
        A :class:`CheckResult`; on failure with hypothesis's minimal example and its error.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    import attndsl
    from .testing import assert_matches_reference, random_qkv
    from .testing import dtypes as dtype_strategy
    from .testing import shapes
    from .testing.strategies import Shape

    if mask_mod is None and score_mod is None:
        raise ValueError("check_pattern needs a mask_mod and/or a score_mod")
    if max_examples < 1 or max_len < 1 or max_heads < 1:
        raise ValueError(f"max_examples, max_len and max_heads must be >= 1, got {max_examples}, {max_len}, "
                         f"{max_heads}")
    attndsl.compile(mask_mod=mask_mod, score_mod=score_mod)  # a pattern the tracer rejects fails here, once
    layout = getattr(mask_mod, "layout", None)
    if layout is not None:
        n = len(layout)

        @st.composite
        def fixed(draw):
            Hq = draw(st.integers(1, max_heads))
            Hkv = draw(st.sampled_from([d for d in range(Hq, 0, -1) if Hq % d == 0]))
            return Shape(draw(st.integers(1, 2)), Hq, Hkv, n, n, draw(st.sampled_from(tuple(head_dims))))
        shape_strategy = fixed()
    else:
        shape_strategy = shapes(max_len=max_len, max_heads=max_heads, head_dims=tuple(head_dims))
    count = [0]

    # one bug, shrunk (not a group of distinct ones); no example database in the user's directory
    @settings(max_examples=max_examples, deadline=None, database=None, print_blob=False,
              report_multiple_bugs=False, suppress_health_check=list(HealthCheck))
    @given(shape=shape_strategy, dtype=dtype_strategy(tuple(dtypes)), tile=st.sampled_from(tuple(tiles)),
           seed=st.integers(0, 2**31 - 1))
    def matches_reference(shape, dtype, tile, seed):
        count[0] += 1
        q, k, v = random_qkv(shape, dtype, device=device, seed=seed)
        attn = attndsl.compile(mask_mod=mask_mod, score_mod=score_mod, block_m=tile, block_n=tile)
        assert_matches_reference(attn, q, k, v, grads=grads, seed=seed)

    test = hseed(seed)(matches_reference) if seed is not None else matches_reference
    try:
        with warnings.catch_warnings():  # NumPy's overflow warnings from the interpreter: the report says it
            warnings.simplefilter("ignore", RuntimeWarning)
            test()
    except Exception as e:  # noqa: BLE001 - any failure of an example is the report
        notes = [n for n in getattr(e, "__notes__", ()) if "matches_reference(" in n]
        example = notes[0] if notes else "(hypothesis gave no example)"
        return CheckResult(False, count[0], example, f"{type(e).__name__}: {e}")
    return CheckResult(True, count[0])
