"""Golden tests: the generated Triton source of a handful of patterns, stored under tests/golden/.

A change to code generation shows here as a unified diff of the kernels' source. When the change
is intended, regenerate the files and review the diff in version control::

    ATTNDSL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py

The stored files are the whole generated modules (header, shared helpers, every kernel), so a
reader can see what each pattern compiles to without running anything.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import Layout
from attndsl.patterns.alibi import alibi
from attndsl.patterns.causal import causal
from attndsl.patterns.document import document
from attndsl.patterns.relative_bias import t5_bucket_bias
from attndsl.patterns.sliding_window import sliding_window

GOLDEN = Path(__file__).parent / "golden"


def _window(b, h, q, k):
    return (q - k).abs() <= 4


_LAYOUT = Layout((4, 8), tile=(2, 4), suffix=21)


def _neighborhood_text(b, h, q, kv):
    (qy, qx), (ky, kx) = _LAYOUT.coords(q), _LAYOUT.coords(kv)
    win = ((qy - ky).abs() <= 1) & ((qx - kx).abs() <= 1)
    return (_LAYOUT.is_extra(kv) & ((kv < 40) | (kv > 45))) | (_LAYOUT.in_grid(kv) & win)


def _cases() -> dict:
    """name -> zero-argument function rendering the module's source."""
    from attndsl.codegen import render, render_gather, render_indexer
    from attndsl.selectors import LightningIndexer
    from attndsl.selectors.sparse import gather_spec

    doc = torch.tensor([0] * 40 + [1] * 88, dtype=torch.int32)
    table = torch.zeros(2, 32, requires_grad=True)

    def dense(**kw):
        return lambda: render(attndsl.compile(**kw).spec)

    return {
        "dense": dense(),
        "causal": dense(mask_mod=causal),
        "sliding_window": dense(mask_mod=sliding_window(64)),
        "document": dense(mask_mod=document(doc)),
        "alibi": dense(mask_mod=causal, score_mod=alibi(torch.tensor([0.5, 0.25]))),
        # a box plan over a 2-D layout, with text tokens after the grid whose rule has a gap (the
        # extra range's tiles are tested one by one, the box's are not: two loops)
        "neighborhood_2d_text": dense(mask_mod=_neighborhood_text, block_m=16, block_n=16),
        "t5_learnable": dense(mask_mod=causal, score_mod=t5_bucket_bias(table, 32, 128)),
        "gather_window": lambda: render_gather(gather_spec(attndsl.compile(mask_mod=_window).spec)),
        "gather_t5_learnable": lambda: render_gather(gather_spec(attndsl.compile(
            mask_mod=causal, score_mod=t5_bucket_bias(table, 32, 128), normalizer="sigmoid").spec)),
        "indexer": lambda: render_indexer(LightningIndexer().spec),
    }


CASES = _cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_generated_source_matches_golden(name):
    """The rendered module equals tests/golden/<name>.py (ATTNDSL_UPDATE_GOLDEN=1 rewrites it)."""
    src = CASES[name]()
    path = GOLDEN / f"{name}.py"
    if os.environ.get("ATTNDSL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(src)
        return
    assert path.exists(), f"no golden file {path}; run with ATTNDSL_UPDATE_GOLDEN=1 to create it"
    want = path.read_text()
    if src != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), src.splitlines(True),
                                            f"golden/{name}.py", f"rendered {name}", n=2))
        pytest.fail(f"generated source of {name!r} changed (ATTNDSL_UPDATE_GOLDEN=1 to accept):\n{diff[:20000]}")


def test_golden_sources_compile_as_python():
    """Every stored module is valid Python (a bad edit of a golden file would hide behind the diff)."""
    for path in GOLDEN.glob("*.py"):
        compile(path.read_text(), str(path), "exec")
