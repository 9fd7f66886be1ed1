"""Symbolic d score_mod / d score, checked against torch.autograd of the score function itself."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attndsl import ir
from attndsl.dsl import trace
from attndsl.ir.evaluate import evaluate
from attndsl.passes import derivative

SCORE = ir.var(ir.SCORE, ir.FLOAT)
SLOPES = torch.tensor([0.5, -0.25, 2.0], dtype=torch.float64)
L, H = 9, 3


def grids():
    h = torch.arange(H).view(H, 1, 1)
    q = torch.arange(L).view(1, L, 1)
    kv = torch.arange(L).view(1, 1, L)
    return h, q, kv


def autograd_dscore(fn, s):
    s = s.clone().requires_grad_(True)
    h, q, kv = grids()
    out = fn(s, torch.zeros((), dtype=torch.int64), h, q, kv)
    out = torch.broadcast_to(out, s.shape)
    if not out.requires_grad:  # the function does not depend on the score at all
        return out.detach(), torch.zeros_like(s)
    (g,) = torch.autograd.grad(out.sum(), s, allow_unused=True)
    return out.detach(), (torch.zeros_like(s) if g is None else g)


def symbolic_dscore(fn, s):
    t = trace(score_mod=fn)
    d = derivative(t.score, SCORE)
    assert d.dtype == ir.FLOAT
    h, q, kv = grids()
    env = {"b": torch.zeros((), dtype=torch.int64), "h": h, "q": q, "kv": kv, "score": s}
    val, dval = evaluate([t.score, d], env, t.tensors)
    return torch.broadcast_to(val, s.shape), torch.broadcast_to(dval, s.shape), d


def scores(seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, L, L, generator=g, dtype=torch.float64) * scale


def check(fn, seed=0, scale=3.0):
    s = scores(seed, scale)
    want_v, want_d = autograd_dscore(fn, s)
    got_v, got_d, d = symbolic_dscore(fn, s)
    # .float() in a pattern computes in float32 on real tensors, in float64 in the IR evaluator
    torch.testing.assert_close(got_v, want_v.double(), rtol=1e-6, atol=1e-6, equal_nan=True)
    ok = torch.isfinite(want_d)
    torch.testing.assert_close(got_d[ok], want_d[ok].double(), rtol=1e-6, atol=1e-8,
                               msg=lambda m: f"{m}\nd/dscore = {ir.expr_str(d)}")
    return d


NAMED = {
    "identity": lambda s, b, h, q, kv: s,
    "scale": lambda s, b, h, q, kv: s * 2.5,
    "softcap": lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0),
    "softcap_small": lambda s, b, h, q, kv: 2.0 * torch.tanh(s / 2.0),
    "alibi": lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q),
    "sigmoid": lambda s, b, h, q, kv: torch.sigmoid(s) * 4.0,
    "exp": lambda s, b, h, q, kv: torch.exp(s * 0.3),
    "exp2": lambda s, b, h, q, kv: torch.exp2(s * 0.3) - s,
    "log": lambda s, b, h, q, kv: torch.log(s * s + 1.0),
    "log2": lambda s, b, h, q, kv: torch.log2(s.abs() + 0.5),
    "sqrt": lambda s, b, h, q, kv: torch.sqrt(s * s + 2.0),
    "div": lambda s, b, h, q, kv: s / (s * s + 1.0),
    "rdiv": lambda s, b, h, q, kv: 3.0 / (s.abs() + 1.0),
    "abs": lambda s, b, h, q, kv: s.abs() * 2,
    "where_index": lambda s, b, h, q, kv: torch.where(q >= kv, s * 2.0, s - 1.0),
    "where_score": lambda s, b, h, q, kv: torch.where(s > 0.5, s * s, -s),
    "clamp": lambda s, b, h, q, kv: s.clamp(-1.0, 2.0) * 3.0,
    "minimum": lambda s, b, h, q, kv: torch.minimum(s, s * s - 1.0),
    "maximum": lambda s, b, h, q, kv: torch.maximum(s * 0.5, s * -1.0),
    "floor": lambda s, b, h, q, kv: torch.floor(s) + s * 0.5,
    "int_cast": lambda s, b, h, q, kv: (s * 2).long() + s,
    "pow": lambda s, b, h, q, kv: s ** 3 - s ** 2,
    "relative_bias": lambda s, b, h, q, kv: s * (1.0 + (q - kv).abs().float() * 0.1),
    "neg": lambda s, b, h, q, kv: -s,
    "constant": lambda s, b, h, q, kv: (q - kv).float() * 0.5,
    "erf": lambda s, b, h, q, kv: torch.erf(s * 0.7) * 3.0,
    "gelu": lambda s, b, h, q, kv: torch.nn.functional.gelu(s),
    "gelu_tanh": lambda s, b, h, q, kv: torch.nn.functional.gelu(s, approximate="tanh"),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_score_mod_derivative(name):
    check(NAMED[name])


def test_derivative_of_score_free_terms_is_exactly_constant():
    assert ir.is_const(derivative(trace(score_mod=NAMED["alibi"]).score, SCORE), 1.0)
    assert ir.is_const(derivative(trace(score_mod=NAMED["identity"]).score, SCORE), 1.0)
    assert ir.is_const(derivative(trace(score_mod=NAMED["constant"]).score, SCORE), 0.0)


def test_derivative_of_linear_score_mod_is_constant():
    assert ir.is_const(derivative(trace(score_mod=NAMED["scale"]).score, SCORE), 2.5)


def test_softcap_derivative_formula():
    d = derivative(trace(score_mod=NAMED["softcap"]).score, SCORE)
    s = torch.linspace(-50, 50, 101, dtype=torch.float64)
    (got,) = evaluate([d], {"score": s}, [])
    torch.testing.assert_close(got, 1 - torch.tanh(s / 30) ** 2, rtol=1e-12, atol=1e-12)


def test_derivative_with_respect_to_a_subexpression():
    x = ir.node("mul", SCORE, ir.const(2.0))
    e = ir.node("exp", x)
    s = torch.linspace(-2, 2, 9, dtype=torch.float64)
    (got,) = evaluate([derivative(e, x)], {"score": s}, [])
    torch.testing.assert_close(got, torch.exp(2 * s))


# --- property: random score expression trees -----------------------------------------------------
UNARY = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": lambda x: torch.exp(torch.tanh(x) * 2.0),
    "exp2": lambda x: torch.exp2(torch.tanh(x)),
    "log": lambda x: torch.log(x * x + 0.5),
    "log2": lambda x: torch.log2(x.abs() + 1.0),
    "sqrt": lambda x: torch.sqrt(x * x + 1.0),
    "abs": torch.abs,
    "neg": lambda x: -x,
    "clamp": lambda x: x.clamp(-1.0, 1.5),
    "floor": lambda x: torch.floor(x) + x,
    "pow": lambda x: x ** 2,
}
BINARY = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "div": lambda x, y: x / (y * y + 1.0),
    "minimum": torch.minimum,
    "maximum": torch.maximum,
}


def run_tree(t, s, h, q, kv):
    """Interpret a tree on symbolic or real values (the same code path for tracing and autograd)."""
    kind = t[0]
    if kind == "score":
        return s
    if kind == "const":  # a tensor-valued constant, so torch functions accept it on real inputs too
        return (q - q).to(torch.float64) + t[1]
    if kind == "dist":
        return (q - kv).to(torch.float64) * 0.25
    if kind == "slope":
        return SLOPES[h]
    if kind in UNARY:
        return UNARY[kind](run_tree(t[1], s, h, q, kv))
    if kind in BINARY:
        return BINARY[kind](run_tree(t[1], s, h, q, kv), run_tree(t[2], s, h, q, kv))
    if kind == "where_causal":
        return torch.where(q >= kv, run_tree(t[1], s, h, q, kv), run_tree(t[2], s, h, q, kv))
    if kind == "where_value":
        return torch.where(run_tree(t[1], s, h, q, kv) > 0.3, run_tree(t[2], s, h, q, kv), run_tree(t[3], s, h, q, kv))
    raise AssertionError(kind)


def trees():
    leaves = st.one_of(
        st.just(("score",)), st.just(("score",)),
        st.floats(-3, 3, allow_nan=False, allow_infinity=False).map(lambda c: ("const", c)),
        st.just(("dist",)), st.just(("slope",)),
    )

    def extend(sub):
        return st.one_of(
            st.tuples(st.sampled_from(sorted(UNARY)), sub),
            st.tuples(st.sampled_from(sorted(BINARY)), sub, sub),
            st.tuples(st.just("where_causal"), sub, sub),
            st.tuples(st.just("where_value"), sub, sub, sub),
        )

    return st.recursive(leaves, extend, max_leaves=8)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(), seed=st.integers(0, 2**31 - 1))
def test_random_score_mod_derivative_matches_autograd(tree, seed):
    def fn(s, b, h, q, kv):
        return run_tree(tree, s, h, q, kv)

    s = scores(seed)
    want_v, want_d = autograd_dscore(fn, s)
    got_v, got_d, d = symbolic_dscore(fn, s)
    torch.testing.assert_close(got_v, want_v, rtol=1e-9, atol=1e-9, equal_nan=True)
    ok = torch.isfinite(want_d) & torch.isfinite(want_v)
    torch.testing.assert_close(got_d[ok], want_d[ok], rtol=1e-7, atol=1e-9,
                               msg=lambda m: f"{m}\nscore_mod = {ir.expr_str(trace(score_mod=fn).score)}"
                                             f"\nd/dscore = {ir.expr_str(d)}")
