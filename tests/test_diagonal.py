"""Diagonal indices (passes/diagonal.py): which captured-tensor reads depend on q and kv only
through q - kv, and that their index over ``dist`` gives the same entry as the original index
for every pair. Kernels that sum such gradients per diagonal are checked against the float64
reference in test_learnable.py (``test_diagonal_table_gradient``)."""
import pytest
import torch

import attndsl
from attndsl import ir
from attndsl.ir.evaluate import evaluate
from attndsl.passes.diagonal import DIST, diagonal_index, shift_invariant
from attndsl.patterns.relative_bias import relative_position_bias, t5_bucket_bias

H, L = 2, 70


def _load(score_mod):
    spec = attndsl.compile(score_mod=score_mod).spec
    (ld,) = ir.loads([spec.score])
    return ld


DIAGONAL = [
    t5_bucket_bias(torch.randn(H, 16), 16, 40, bidirectional=True),
    t5_bucket_bias(torch.randn(H, 16), 16, 40, bidirectional=False),
    relative_position_bias(torch.randn(H, 2 * 8 + 1), 8),
    lambda s, b, h, q, kv, t=torch.randn(H, 2 * L): s + t[h, q - kv + L - 1],           # affine
    lambda s, b, h, q, kv, t=torch.randn(H, L): s + t[h, (q - kv).abs() // 2],          # opaque in q - kv
    lambda s, b, h, q, kv, t=torch.randn(2 * L): s + t[torch.where(q > kv, q - kv, L + kv - q)],
]
NOT_DIAGONAL = [
    lambda s, b, h, q, kv, t=torch.randn(H, L, L): s + t[h, q, kv],                  # plain indices
    lambda s, b, h, q, kv, t=torch.randn(3 * L): s + t[q + kv],                      # anti-diagonal
    lambda s, b, h, q, kv, t=torch.randn(3 * L): s + t[2 * q - kv + L],              # coefficients do not cancel
    lambda s, b, h, q, kv, t=torch.randn(L): s + t[q // 2 - kv // 2 + L // 2],      # opaque leaves in q, kv alone
    lambda s, b, h, q, kv, t=torch.randn(L): s + t[(q % 8) - (kv % 8) + 8],          # grid distance
    lambda s, b, h, q, kv, t=torch.randn(H, L): s + t[h, q],                         # one index only
]


@pytest.mark.parametrize("mod", DIAGONAL)
def test_diagonal_index_gives_the_same_entry_for_every_pair(mod):
    ld = _load(mod)
    diag = diagonal_index(ld)
    assert diag is not None and all("kv" not in ir.free_vars(a) and "q" not in ir.free_vars(a) for a in diag)
    qi = torch.arange(L).view(L, 1)
    kv = torch.arange(L).view(1, L)
    for h in range(H):
        env = {"b": torch.tensor(0), "h": torch.tensor(h), "q": qi, "kv": kv}
        want = evaluate(list(ld.args), env, {})
        got = evaluate(list(diag), {**env, DIST: qi - kv}, {})
        for w, g in zip(want, got):
            assert torch.equal(torch.as_tensor(w).expand(L, L), torch.as_tensor(g).expand(L, L))


@pytest.mark.parametrize("mod", NOT_DIAGONAL)
def test_other_indices_are_not_diagonal(mod):
    assert diagonal_index(_load(mod)) is None


def test_shift_invariance_of_comparisons_and_sums():
    q, kv, h = ir.var("q"), ir.var("kv"), ir.var("h")
    assert shift_invariant(ir.node("gt", q, kv))
    assert shift_invariant(ir.node("add", ir.node("sub", q, kv), h))
    assert not shift_invariant(ir.node("gt", q, ir.const(3)))
    assert not shift_invariant(ir.node("mul", ir.node("sub", q, kv), q))


def test_explain_names_the_diagonal_index():
    table = torch.randn(H, 2 * 8 + 1, requires_grad=True)
    text = attndsl.compile(score_mod=relative_position_bias(table, 8)).explain()
    assert "only through dist = q - kv: h, (minimum(maximum(dist, -8), 8) + 8)" in text
