"""The lowering pass (attndsl/passes/lower.py): decisions recorded once in the KernelSpec."""
import torch

import attndsl
from attndsl import ir
from attndsl.passes import lower
from attndsl.patterns.alibi import alibi
from attndsl.patterns.causal import causal
from attndsl.patterns.document import document
from attndsl.patterns.relative_bias import t5_bucket_bias
from attndsl.patterns.softcap import softcap


def test_additive_bias_is_the_sum_of_the_terms_beside_the_score():
    slopes = torch.tensor([0.5, 0.25])
    low = attndsl.compile(mask_mod=causal, score_mod=alibi(slopes)).spec.lowering
    assert low.additive is not None and ir.SCORE not in ir.free_vars(low.additive)
    assert attndsl.compile(score_mod=softcap(20.0)).spec.lowering.additive is None  # not score + R
    assert attndsl.compile(mask_mod=causal).spec.lowering.additive is None


def test_runs_and_folds_for_a_t5_table():
    table = torch.zeros(2, 32)
    spec = attndsl.compile(mask_mod=causal, score_mod=t5_bucket_bias(table, 32, 128)).spec
    low = spec.lowering
    assert low.fwd_runs and low.dq_runs and low.run_folds
    assert low.dq_whole_range  # closed-form causal range: dQ visits all of [t_begin, t_end)


def test_block_tables_and_boxes_do_not_visit_the_whole_range():
    doc = torch.tensor([0] * 10 + [1] * 20, dtype=torch.int32)
    low = attndsl.compile(mask_mod=document(doc)).spec.lowering
    assert not low.dq_whole_range and not low.fwd_runs


def test_binned_dims_of_learnable_loads():
    table = torch.zeros(2, 33, requires_grad=True)
    pair = torch.zeros(2, 8, 8, requires_grad=True)

    def rel(s, b, h, q, k):
        return s + table[h, (q - k).clamp(-16, 16) + 16]

    def per_pair(s, b, h, q, k):
        return s + pair[h, q, k]
    assert attndsl.compile(score_mod=rel).spec.lowering.binned == (1,)
    assert attndsl.compile(score_mod=per_pair).spec.lowering.binned == (None,)
    assert (lower.MAX_BINS, lower.BIN_PIECE) == (256, 64)


def test_load_stages_of_the_mask():
    doc = torch.tensor([0] * 10 + [1] * 20, dtype=torch.int32)
    lengths = torch.tensor([30])
    stages = dict((ld.args[0].attr if ld.args[0].op == "var" else None, st) for ld, st in
                  attndsl.compile(mask_mod=lambda b, h, q, k: (doc[q] == doc[k]) & (k < lengths[b])).spec.lowering.load_stages)
    assert stages == {"q": "row", "kv": "col", "b": "program"}


def test_lower_is_pure():
    spec = attndsl.compile(mask_mod=causal).spec
    assert lower.lower(spec) == lower.lower(spec) == spec.lowering


def test_required_length_is_recorded_and_refused_before_launch(monkeypatch):
    """A layout's box plan covers its whole grid: ``lowering.required_length`` is the grid's end
    (prefix included), 0 for a 1-D plan; the runtime refuses shorter sequences from it, naming
    both lengths, before any launch."""
    import pytest
    from attndsl import Layout
    from attndsl.runtime import launch
    from attndsl.patterns.neighborhood import neighborhood
    layout = Layout((4, 8), tile=(2, 4), prefix=8)  # 8 global tokens before the grid
    attn = attndsl.compile(mask_mod=neighborhood(layout, 3), block_m=8, block_n=8)
    assert attn.spec.tiles is not None and attn.spec.lowering.required_length == 40
    assert attndsl.compile(mask_mod=causal).spec.lowering.required_length == 0
    monkeypatch.setattr(launch.Runner, "_run", lambda *a, **k: pytest.fail("a launch"))
    monkeypatch.setattr(launch.Runner, "_prepared", lambda *a, **k: pytest.fail("a launch"))
    q = torch.randn(1, 1, 20, 16)
    with pytest.raises(ValueError, match="40 tokens.*Lq=20, Lkv=20"):
        attn(q, q, q)
