"""The tracer: every supported construct traces to IR that means what the Python function means.

Each pattern is (1) traced to IR and evaluated with ``attndsl.ir.evaluate.evaluate`` and (2) run
directly on real broadcast index tensors; the two must agree element by element. Unsupported
constructs must raise ``attndsl.PatternError`` naming this file and the offending line.
"""
import inspect
import os

import pytest
import torch

import attndsl
from attndsl import ir
from attndsl.dsl import trace
from attndsl.ir.evaluate import evaluate

THIS_FILE = os.path.basename(__file__)
B, H, LQ, LKV = 2, 3, 13, 17


def grid(dtype=torch.int64):
    b = torch.arange(B, dtype=dtype).view(B, 1, 1, 1)
    h = torch.arange(H, dtype=dtype).view(1, H, 1, 1)
    q = torch.arange(LQ, dtype=dtype).view(1, 1, LQ, 1)
    kv = torch.arange(LKV, dtype=dtype).view(1, 1, 1, LKV)
    return b, h, q, kv


def score_tensor(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, LQ, LKV, generator=g, dtype=torch.float64) * 3


def ops_of(*roots):
    return {n.op for n in ir.topo_order([r for r in roots if r is not None])}


def eval_traced_mask(fn):
    t = trace(mask_mod=fn)
    b, h, q, kv = grid()
    (m,) = evaluate([t.mask], {"b": b, "h": h, "q": q, "kv": kv}, t.tensors)
    return t, torch.broadcast_to(m, (B, H, LQ, LKV))


def eval_traced_score(fn, s):
    t = trace(score_mod=fn)
    b, h, q, kv = grid()
    (r,) = evaluate([t.score], {"b": b, "h": h, "q": q, "kv": kv, "score": s}, t.tensors)
    return t, torch.broadcast_to(r, (B, H, LQ, LKV))


def eval_real_mask(fn):
    b, h, q, kv = grid()
    r = fn(b, h, q, kv)
    assert r.dtype == torch.bool
    return torch.broadcast_to(r, (B, H, LQ, LKV))


def eval_real_score(fn, s):
    b, h, q, kv = grid()
    return torch.broadcast_to(fn(s, b, h, q, kv), (B, H, LQ, LKV)).to(torch.float64)


def assert_mask_same(fn):
    t, got = eval_traced_mask(fn)
    want = eval_real_mask(fn)
    assert got.dtype == torch.bool
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} mismatches, first {bad[:5].tolist()}"
    # the mask must be non-trivial on the grid, or the comparison proves little
    assert want.any() and not want.all(), "test pattern is constant on the grid"
    return t


def assert_score_same(fn, rtol=1e-5, atol=1e-5):
    s = score_tensor()
    t, got = eval_traced_score(fn, s)
    want = eval_real_score(fn, s)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
    return t


# captured tensors used by the patterns below
DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5], dtype=torch.int32)
TABLE2D = torch.arange(H * 40, dtype=torch.int64).view(H, 40) % 7
BOOLT = torch.tensor([bool(i % 3) for i in range(LKV)])
SLOPES = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float32)
BIAS2D = torch.randn(H, 2 * max(LQ, LKV) + 1, generator=torch.Generator().manual_seed(3))
W0 = torch.tensor(5)             # 0-d int: a runtime scalar
T0 = torch.tensor(0.75)          # 0-d float: a runtime scalar


MASKS = {
    # name: (fn, ops that must appear in the traced IR)
    "and_or_not": (lambda b, h, q, kv: ((q >= kv) & ~(kv < 3)) | (h == 1), {"and", "or", "not", "ge", "lt", "eq"}),
    "compare_all": (lambda b, h, q, kv: (q > kv) | (q == kv + 5) | ((q != kv) & (q <= 2)), {"gt", "eq", "ne", "le"}),
    "add_sub_mul": (lambda b, h, q, kv: q * 2 - kv + 1 > h * 3, {"mul", "sub", "add"}),
    "truediv": (lambda b, h, q, kv: (q / 3) > (kv / 2), {"truediv"}),
    "floordiv": (lambda b, h, q, kv: (q // 4) == (kv // 4), {"floordiv"}),
    "floordiv_neg": (lambda b, h, q, kv: (kv - q) // 5 >= -1, {"floordiv"}),
    "floordiv_negdivisor": (lambda b, h, q, kv: (q - kv) // -3 == 1, {"floordiv"}),
    "mod": (lambda b, h, q, kv: (q - kv) % 3 == 0, {"mod"}),
    "mod_negdivisor": (lambda b, h, q, kv: (q - kv) % -4 == -1, {"mod"}),
    "where_bool": (lambda b, h, q, kv: torch.where(h == 0, q >= kv, q <= kv), {"where"}),
    "where_int": (lambda b, h, q, kv: torch.where(b == 0, q - kv, kv - q) >= 2, {"where"}),
    "clamp": (lambda b, h, q, kv: (q - kv).clamp(min=-2, max=5) == (q - kv), {"maximum", "minimum"}),
    "clamp_min_only": (lambda b, h, q, kv: (q - kv).clamp(min=0) == 0, {"maximum"}),
    "abs": (lambda b, h, q, kv: (q - kv).abs() <= 3, {"abs"}),
    "torch_abs": (lambda b, h, q, kv: torch.abs(q - kv) > 6, {"abs"}),
    "minimum": (lambda b, h, q, kv: torch.minimum(q, kv) >= 4, {"minimum"}),
    "maximum": (lambda b, h, q, kv: torch.maximum(q, kv + 1) <= 9, {"maximum"}),
    "index_1d": (lambda b, h, q, kv: DOC[q] == DOC[kv], {"load"}),
    "index_1d_bool": (lambda b, h, q, kv: BOOLT[kv] & (q > 2), {"load"}),
    "index_2d": (lambda b, h, q, kv: TABLE2D[h, q - kv + 20] > 3, {"load"}),
    "python_scalar": (lambda b, h, q, kv: q - kv < 4, {"lt"}),
    "runtime_scalar_0d": (lambda b, h, q, kv: (q - kv < W0) & (kv <= q), {"load"}),
    "rev_ops": (lambda b, h, q, kv: (10 - q) * 2 > 30 // (kv + 1), {"sub", "floordiv"}),
    "logical_fns": (lambda b, h, q, kv: torch.logical_or(torch.logical_and(q > 3, kv > 3), torch.logical_not(q > kv)),
                    {"or", "and", "not"}),
    "to_bool": (lambda b, h, q, kv: ((q - kv) % 3).bool() & (q - kv).to(torch.bool), {"ne"}),
    "torch_fn_spellings": (lambda b, h, q, kv: torch.ge(torch.remainder(torch.add(q, kv, alpha=2), 5),
                                                          torch.floor_divide(torch.sub(q, kv), 4)), {"mod", "floordiv"}),
    "div_floor": (lambda b, h, q, kv: torch.div(q - kv, 3, rounding_mode="floor") == -1, {"floordiv"}),
    "min_max_two_arg": (lambda b, h, q, kv: torch.min(q, kv + 2) > torch.max(kv - 3, q // 2), {"minimum", "maximum"}),
    "clip_where_method": (lambda b, h, q, kv: torch.clip(q - kv, -3, 3).where(h == 1, kv - q) >= 1,
                          {"minimum", "maximum", "where"}),
    "long_int_cast": (lambda b, h, q, kv: ((q.float() * 0.7).long() + (kv.float() / 3).int()) % 2 == 0, {"to_int"}),
    # FlexAttention accepts these, so attndsl does too (torch's make_fx tracer)
    "bitwise_int": (lambda b, h, q, kv: ((q & kv) == 0) | ((q | 3) ^ kv == 7), {"bitand", "bitor", "bitxor"}),
    "bitwise_not_int": (lambda b, h, q, kv: (~q & 7) > kv % 5, {"bitand"}),
    "div_trunc": (lambda b, h, q, kv: torch.div(kv - q, 3, rounding_mode="trunc") == -2, {"floordiv"}),
    "fmod": (lambda b, h, q, kv: torch.fmod(q - kv, 4) == -1, {"floordiv"}),
    "new_ones_and": (lambda b, h, q, kv: b.new_ones((), dtype=torch.bool) & (q >= kv), {"ge"}),
    "torch_and_or_masks": (lambda b, h, q, kv: __import__("torch.nn.attention.flex_attention").nn.attention
                           .flex_attention.or_masks(lambda b, h, q, kv: q - kv > 9,
                                                    lambda b, h, q, kv: (q >= kv) & (q - kv < 3))(b, h, q, kv),
                           {"or", "and"}),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_construct_traces_and_matches(name):
    fn, ops = MASKS[name]
    t = assert_mask_same(fn)
    assert t.mask.dtype == ir.BOOL
    missing = ops - ops_of(t.mask)
    assert not missing, f"{name}: traced IR lacks {missing}: {ir.expr_str(t.mask)}"


# Constructs that only mean something per element (FlexAttention runs them under vmap): compared
# with FlexAttention's own create_mask.
TABLE3D = torch.arange(H * 4 * 6, dtype=torch.int64).view(H, 4, 6) % 5
VMAP_MASKS = {
    "chained_index": (lambda b, h, q, kv: TABLE2D[h][q - kv + 20] > 3, {"load"}),
    "chained_index_const": (lambda b, h, q, kv: TABLE3D[h][q % 4][1] > kv % 5, {"load"}),
    "slice_then_reduce": (lambda b, h, q, kv: TABLE2D[:, q - kv + 20].sum() > 9, {"load", "add"}),
    "row_any": (lambda b, h, q, kv: (TABLE3D[h, q % 4] == kv % 7).any(), {"or"}),
    "row_dot": (lambda b, h, q, kv: torch.dot(TABLE3D[h, q % 4].float(), TABLE3D[h, kv % 4].float()) > 20,
                {"mul", "add"}),
    "negative_index": (lambda b, h, q, kv: TABLE3D[h, -1, q % 6] > TABLE3D[-2][h][kv % 6], {"load"}),
    "max_over_row": (lambda b, h, q, kv: TABLE3D[h, q % 4].max(dim=0).values + TABLE2D[h].amin() > kv % 7,
                     {"maximum", "minimum"}),
    "built_table_indexed": (lambda b, h, q, kv: (q - kv) % 5 < torch.tensor([1, 3, 2])[h], {"where"}),
    "mean_two_tensors_max": (lambda b, h, q, kv: torch.max(TABLE3D[h, q % 4].float().mean(), kv.float() / 4) > 2.5,
                             {"maximum", "truediv"}),
}


def test_trace_says_which_tensor_shapes_the_ir_bakes_in():
    t = trace(mask_mod=VMAP_MASKS["row_dot"][0])  # unrolls TABLE3D's last dimension
    assert t.sized == frozenset({0})
    t = trace(mask_mod=lambda b, h, q, kv: (DOC[q] == DOC[kv]) & (TABLE2D[h, -1] > 2))
    assert t.tensors[1] is TABLE2D and t.sized == frozenset({1})  # t[-1] reads TABLE2D's size
    assert trace(mask_mod=MASKS["index_2d"][0]).sized == frozenset()  # runtime shapes only


@pytest.mark.parametrize("name", sorted(VMAP_MASKS))
def test_vmap_construct_matches_flex_create_mask(name):
    from torch.nn.attention.flex_attention import create_mask

    fn, ops = VMAP_MASKS[name]
    t, got = eval_traced_mask(fn)
    want = create_mask(fn, B, H, LQ, LKV, device="cpu")
    assert torch.equal(got, want)
    assert want.any() and not want.all()
    missing = ops - ops_of(t.mask)
    assert not missing, f"{name}: traced IR lacks {missing}: {ir.expr_str(t.mask)}"


SCORES = {
    "exp": (lambda s, b, h, q, kv: torch.exp(s * 0.1), {"exp"}),
    "exp_method": (lambda s, b, h, q, kv: (s * 0.1).exp(), {"exp"}),
    "exp2": (lambda s, b, h, q, kv: torch.exp2(s * 0.1) + s, {"exp2"}),
    "log": (lambda s, b, h, q, kv: torch.log(s.abs() + 1) * s, {"log", "abs"}),
    "log2": (lambda s, b, h, q, kv: s.abs().log2() + 1.0, {"log2"}),
    "sqrt": (lambda s, b, h, q, kv: torch.sqrt(s * s + 1.0), {"sqrt"}),
    "sqrt_nan": (lambda s, b, h, q, kv: torch.sqrt(s), {"sqrt"}),
    "tanh": (lambda s, b, h, q, kv: 30.0 * torch.tanh(s / 30.0), {"tanh", "truediv"}),
    "sigmoid": (lambda s, b, h, q, kv: torch.sigmoid(s) * 2 - 1, {"sigmoid"}),
    "floor": (lambda s, b, h, q, kv: torch.floor(s * 2) / 2, {"floor"}),
    "floor_method": (lambda s, b, h, q, kv: s.floor() + s, {"floor"}),
    "float_cast": (lambda s, b, h, q, kv: s + (kv - q).float() * 0.1, {"to_float"}),
    "to_float32": (lambda s, b, h, q, kv: s - (q - kv).to(torch.float32), {"to_float"}),
    "to_int_of_float": (lambda s, b, h, q, kv: s + (s * 3).to(torch.int64), {"to_int"}),
    "long_of_float": (lambda s, b, h, q, kv: s - (s * 2).long(), {"to_int"}),
    "int_of_float": (lambda s, b, h, q, kv: (s * 4).int() * 0.25, {"to_int"}),
    "where_score": (lambda s, b, h, q, kv: torch.where(q >= kv, s, s - 100.0), {"where"}),
    "clamp_score": (lambda s, b, h, q, kv: s.clamp(-1.5, 2.5), {"minimum", "maximum"}),
    "min_max_score": (lambda s, b, h, q, kv: torch.maximum(torch.minimum(s, s * 0.5 + 1), s - 3), {"minimum", "maximum"}),
    "alibi_1d_float": (lambda s, b, h, q, kv: s + SLOPES[h] * (kv - q), {"load"}),
    "bias_2d_float": (lambda s, b, h, q, kv: s + BIAS2D[h, q - kv + max(LQ, LKV)], {"load"}),
    "runtime_scalar_float": (lambda s, b, h, q, kv: s * T0 + T0, {"load"}),
    "int_division_in_score": (lambda s, b, h, q, kv: s + ((q - kv) // 3) * 0.5 + ((q - kv) % 5), {"floordiv", "mod"}),
    "neg_pow": (lambda s, b, h, q, kv: -(s ** 2) + s * s * s, {"neg", "mul"}),
    "rsqrt_square_expit": (lambda s, b, h, q, kv: torch.rsqrt(torch.square(s) + 1.0) + torch.special.expit(s),
                           {"sqrt", "sigmoid", "mul"}),
    "clamp_min_max_fns": (lambda s, b, h, q, kv: torch.clamp_min(s, -1.0) + torch.clamp_max(s, 1.0), {"minimum", "maximum"}),
    "pow_fn": (lambda s, b, h, q, kv: torch.pow(s, 3) - s, {"mul"}),
    "rsub_rdiv": (lambda s, b, h, q, kv: 1.0 - 2.0 / (s * s + 1.0), {"truediv", "sub"}),
    "erf": (lambda s, b, h, q, kv: torch.erf(s * 0.3) + s, {"erf"}),
    "gelu": (lambda s, b, h, q, kv: torch.nn.functional.gelu(s), {"erf"}),
    "gelu_tanh": (lambda s, b, h, q, kv: torch.nn.functional.gelu(s, approximate="tanh"), {"tanh"}),
    "relu_silu_log1p": (lambda s, b, h, q, kv: torch.relu(s) + torch.nn.functional.silu(s) + torch.log1p(s.abs()),
                        {"maximum", "sigmoid", "log"}),
    "trunc_div_score": (lambda s, b, h, q, kv: s + torch.div(q - kv, 2, rounding_mode="trunc"), {"floordiv"}),
    "pow_half_scalar_base": (lambda s, b, h, q, kv: (s * s + 1.0) ** 0.5 + 2.0 ** (s * 0.1), {"sqrt", "exp2"}),
    # through torch's decompositions
    "masked_fill": (lambda s, b, h, q, kv: s.masked_fill(q < kv, -1e4), {"where"}),
    "softplus_logsigmoid": (lambda s, b, h, q, kv: torch.nn.functional.softplus(s) + torch.nn.functional.logsigmoid(s),
                            {"log", "exp"}),
    "hardtanh_leaky_elu": (lambda s, b, h, q, kv: torch.nn.functional.hardtanh(s) + torch.nn.functional.leaky_relu(s, 0.1)
                           + torch.nn.functional.elu(s), {"where", "minimum", "exp"}),
    "sign_full_like": (lambda s, b, h, q, kv: torch.where(q >= kv, s * torch.sign(q - kv - 2), torch.full_like(s, -3.0)),
                       {"where"}),
}


@pytest.mark.parametrize("name", sorted(SCORES))
def test_score_construct_traces_and_matches(name):
    fn, ops = SCORES[name]
    t = assert_score_same(fn)
    assert t.score.dtype == ir.FLOAT
    missing = ops - ops_of(t.score)
    assert not missing, f"{name}: traced IR lacks {missing}: {ir.expr_str(t.score)}"


def test_python_scalars_are_constants():
    w = 7
    t = trace(mask_mod=lambda b, h, q, kv: q - kv < w)
    assert not t.tensors
    consts = [n for n in ir.topo_order([t.mask]) if n.op == "const"]
    assert [ir.const_value(c) for c in consts] == [7]
    # a different constant is a different IR (it is baked into the kernel)
    t2 = trace(mask_mod=lambda b, h, q, kv: q - kv < 8)
    assert t2.mask is not t.mask


def test_zero_dim_tensor_is_runtime_scalar():
    w = torch.tensor(3)
    fn = lambda b, h, q, kv: (q - kv < w) & (q >= kv)  # noqa: E731
    t = trace(mask_mod=fn)
    assert len(t.tensors) == 1 and t.tensors[0] is w
    assert len(t.buffers) == 1 and t.buffers[0].ndim == 0 and t.buffers[0].kind == ir.INT
    loads = ir.loads([t.mask])
    assert len(loads) == 1 and loads[0].args == ()
    b, h, q, kv = grid()
    env = {"b": b, "h": h, "q": q, "kv": kv}
    (m3,) = evaluate([t.mask], env, t.tensors)
    assert torch.equal(torch.broadcast_to(m3, (B, H, LQ, LKV)), eval_real_mask(fn))
    # same traced IR, new value: the IR reads the tensor, so no re-trace is needed
    w.fill_(6)
    (m6,) = evaluate([t.mask], env, t.tensors)
    assert torch.equal(torch.broadcast_to(m6, (B, H, LQ, LKV)), eval_real_mask(fn))
    assert m6.sum() > m3.sum()
    # and the re-traced IR is the same node (the value is not part of the IR)
    assert trace(mask_mod=fn).mask is t.mask


@pytest.mark.parametrize("op", ["add", "sub", "mul", "truediv", "floordiv", "mod", "gt", "le", "eq", "ne"])
def test_zero_dim_tensor_on_the_left(op):
    """``w * score``, ``w + kv_idx``, ``w > q_idx`` with a captured 0-d tensor ``w`` on the left."""
    import operator
    f = getattr(operator, op)
    fn = lambda s, b, h, q, kv: s + f(W0, kv + 1).float() + T0 * s  # noqa: E731
    t = assert_score_same(fn)
    assert len(t.tensors) == 2


def test_same_tensor_captured_twice_is_one_buffer():
    t = trace(mask_mod=lambda b, h, q, kv: (DOC[q] == DOC[kv]) & (DOC[q] >= 1))
    assert len(t.tensors) == 1 and t.tensors[0] is DOC
    assert len({n.attr for n in ir.loads([t.mask])}) == 1


def test_two_tensors_two_buffers_in_order():
    a = torch.tensor([1, 2, 3])
    c = torch.tensor([[0.5]])
    t = trace(score_mod=lambda s, b, h, q, kv: s + a[h] + c[b, b])
    assert [x is y for x, y in zip(t.tensors, [a, c])] == [True, True]
    assert [(bf.slot, bf.kind, bf.ndim) for bf in t.buffers] == [(0, ir.INT, 1), (1, ir.FLOAT, 2)]


def test_score_identity_and_constant_results():
    t = trace(score_mod=lambda s, b, h, q, kv: s)
    assert t.score is ir.var(ir.SCORE, ir.FLOAT)
    # an integer-valued score_mod is promoted to float
    t = trace(score_mod=lambda s, b, h, q, kv: q - kv)
    assert t.score.dtype == ir.FLOAT
    assert_score_same(lambda s, b, h, q, kv: (q - kv) * 1.0)


def test_default_arguments_bind_captured_values():
    """``def mod(s, b, h, q, kv, bias=bias)`` (binding a loop variable) traces with its default."""
    fn = lambda s, b, h, q, kv, table=SLOPES, k=2.0: s * k + table[h]  # noqa: E731
    t = assert_score_same(fn)
    assert len(t.tensors) == 1 and t.tensors[0] is SLOPES


@pytest.mark.parametrize("mode", ["real", "fake"])
def test_trace_inside_an_outer_make_fx_leaves_its_graph_alone(mode):
    from torch.fx.experimental.proxy_tensor import make_fx

    def outer(x):
        t = trace(mask_mod=lambda b, h, q, kv: (DOC[q] == DOC[kv]) & (q >= kv))
        assert t.tensors[0] is DOC and ir.expr_str(t.mask) == "((buf0[q] == buf0[kv]) & (q >= kv))"
        return x + 1

    gm = make_fx(outer, tracing_mode=mode)(torch.randn(3))
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] == ["aten.add.Tensor"]


def test_mask_returning_python_bool():
    t = trace(mask_mod=lambda b, h, q, kv: True)
    assert ir.is_const(t.mask, True)


# --- unsupported constructs ----------------------------------------------------------------
def _line_of(fn, marker="# BAD"):
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, text in enumerate(lines) if marker in text]
    assert len(hits) == 1, hits
    return hits[0]


def bad_if(b, h, q_idx, kv_idx):
    if q_idx > 3:  # BAD
        return q_idx >= kv_idx
    return q_idx < kv_idx


def bad_python_and(b, h, q_idx, kv_idx):
    ok = q_idx >= 0
    return ok and kv_idx >= 0  # BAD


def bad_sin(score, b, h, q_idx, kv_idx):
    x = score * 2
    return torch.sin(x)  # BAD


def bad_item(b, h, q_idx, kv_idx):
    return q_idx.item() > 3  # BAD


def bad_slice_1d(b, h, q_idx, kv_idx):
    return DOC[q_idx:] == 0  # BAD


def bad_rank(b, h, q_idx, kv_idx):
    return TABLE2D[q_idx] > 0  # BAD


def bad_rank_too_many(b, h, q_idx, kv_idx):
    return DOC[q_idx, kv_idx] > 0  # BAD


def bad_float_index(b, h, q_idx, kv_idx):
    return DOC[q_idx / 2] == DOC[kv_idx]  # BAD


def bad_int(b, h, q_idx, kv_idx):
    return int(q_idx) > kv_idx  # BAD


def bad_float(b, h, q_idx, kv_idx):
    return float(q_idx) > kv_idx  # BAD


def bad_range(b, h, q_idx, kv_idx):
    return q_idx in range(kv_idx)  # BAD


def bad_method(b, h, q_idx, kv_idx):
    return q_idx.cumsum(0).sin() > kv_idx  # BAD


def bad_nested_helper_inner(x):
    return torch.cos(x)  # BAD


def bad_nested_helper(score, b, h, q_idx, kv_idx):
    return bad_nested_helper_inner(score) + 1


def bad_full_tensor(b, h, q_idx, kv_idx):
    return DOC > q_idx  # BAD


def bad_argmax(b, h, q_idx, kv_idx):
    return TABLE2D[h].max(dim=0).indices > kv_idx  # BAD


def bad_big_unroll(b, h, q_idx, kv_idx):
    return BIG[q_idx].sum() > kv_idx  # BAD


BIG = torch.zeros(4, 5000, dtype=torch.int32)


BAD = [
    ("mask", bad_if, "control flow"),
    ("mask", bad_python_and, "control flow"),
    ("score", bad_sin, "torch.sin"),
    ("mask", bad_item, ".item()"),
    ("mask", bad_slice_1d, None),
    ("mask", bad_rank, "shape (40,)"),
    ("mask", bad_rank_too_many, "too many indices"),
    ("mask", bad_float_index, "floating"),
    ("mask", bad_int, "int()"),
    ("mask", bad_float, "float()"),
    ("mask", bad_range, None),
    ("mask", bad_method, "torch.cumsum"),
    ("score", bad_nested_helper, "torch.cos"),
    ("mask", bad_full_tensor, "shape (20,)"),
    ("mask", bad_big_unroll, "5000 elements"),
    ("mask", bad_argmax, "indices of torch.max"),
]


@pytest.mark.parametrize("kind,fn,needle", BAD, ids=[f.__name__ for _, f, _ in BAD])
def test_unsupported_construct_names_file_and_line(kind, fn, needle):
    line = _line_of(bad_nested_helper_inner if fn is bad_nested_helper else fn)
    with pytest.raises(attndsl.PatternError) as ei:
        trace(mask_mod=fn) if kind == "mask" else trace(score_mod=fn)
    msg = str(ei.value)
    assert f"{THIS_FILE}:{line}" in msg, msg
    if needle is not None:
        assert needle in msg, msg


def bad_inner_sin(b, h, q_idx, kv_idx):
    return torch.sin(q_idx.float()) > 0  # BAD


def test_error_names_the_mask_line_inside_torch_and_masks():
    """torch's own and_masks calls the mask from torch's file: the error names the mask's line."""
    from torch.nn.attention.flex_attention import and_masks

    line = _line_of(bad_inner_sin)
    combined = and_masks(lambda b, h, q, kv: q >= kv, bad_inner_sin)
    with pytest.raises(attndsl.PatternError) as ei:
        trace(mask_mod=combined)
    msg = str(ei.value)
    assert f"{THIS_FILE}:{line}" in msg and "torch.sin" in msg, msg
    with pytest.raises(attndsl.PatternError, match=f"{THIS_FILE}:{line}"):  # and through the public call
        attndsl.attention(torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16), torch.randn(1, 1, 16, 16),
                          mask_mod=combined)


# a custom op with a CUDA kernel only (like a compiled extension's): nothing to trace through
torch.library.define("attndsl_test::opaque", "(Tensor x) -> Tensor")
torch.library.impl("attndsl_test::opaque", "CUDA", lambda x: x.clone())
torch.library.register_fake("attndsl_test::opaque", lambda x: torch.empty_like(x))


def bad_custom_op(score, b, h, q_idx, kv_idx):
    return torch.ops.attndsl_test.opaque(score)  # BAD


def test_custom_op_without_python_kernel_names_op_and_line():
    with pytest.raises(attndsl.PatternError) as ei:
        trace(score_mod=bad_custom_op)
    msg = str(ei.value)
    assert f"{THIS_FILE}:{_line_of(bad_custom_op)}" in msg and "attndsl_test.opaque" in msg, msg


@torch.library.custom_op("attndsl_test::softsign", mutates_args=())
def _softsign(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + x.abs())


@_softsign.register_fake
def _(x):
    return torch.empty_like(x)


def test_custom_op_with_python_kernel_traces_through_it():
    assert_score_same(lambda s, b, h, q, kv: _softsign(s) * 3.0)


def test_captured_learnable_tensor_keeps_requires_grad():
    w = torch.randn(H, requires_grad=True)
    t = trace(score_mod=lambda s, b, h, q, kv: s + w[h] * (q - kv))
    assert t.tensors == [w] and t.tensors[0] is w and t.tensors[0].requires_grad


def test_tensor_created_inside_the_pattern_is_a_constant():
    t = trace(score_mod=lambda s, b, h, q, kv: s * torch.tensor(0.5) + torch.tensor([1.0, 2.0])[1])
    assert not t.tensors
    assert_score_same(lambda s, b, h, q, kv: s * torch.tensor(0.5) + torch.tensor([1.0, 2.0])[1])


def test_slice_1d_message_says_slicing():
    with pytest.raises(attndsl.PatternError, match="slic"):
        trace(mask_mod=bad_slice_1d)


def test_unsupported_construct_through_compile_and_attention():
    q = torch.randn(1, 1, 16, 16)
    line = _line_of(bad_sin)
    with pytest.raises(attndsl.PatternError, match=f"{THIS_FILE}:{line}"):
        attndsl.compile(score_mod=bad_sin)
    with pytest.raises(attndsl.PatternError, match=f"{THIS_FILE}:{line}"):
        attndsl.attention(q, q, q, score_mod=bad_sin)


def test_wrong_signature_names_the_function():
    def two_args(q_idx, kv_idx):
        return q_idx >= kv_idx

    with pytest.raises(attndsl.PatternError) as ei:
        trace(mask_mod=two_args)
    assert "two_args" in str(ei.value) and THIS_FILE in str(ei.value)


def test_trace_leaves_no_context_behind():
    from attndsl.dsl.capture import tracing

    with pytest.raises(attndsl.PatternError):
        trace(mask_mod=bad_if)
    assert not tracing()
    # so layout coordinates are plain arithmetic again outside a trace
    lay = attndsl.Layout((4, 4))
    assert lay.coord(torch.tensor(6), 1).item() == 2


# --- composition ---------------------------------------------------------------------------
@attndsl.mask
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@attndsl.mask
def window4(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < 4


@attndsl.mask
def even_head(b, h, q_idx, kv_idx):
    return h % 2 == 0


@attndsl.mask
def same_doc(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


COMPOSED = [
    ("and", causal & window4, lambda b, h, q, kv: (q >= kv) & (q - kv < 4)),
    ("or", causal | even_head, lambda b, h, q, kv: (q >= kv) | (h % 2 == 0)),
    ("not", ~causal, lambda b, h, q, kv: ~(q >= kv)),
    ("mixed", (causal & ~window4) | (even_head & same_doc),
     lambda b, h, q, kv: ((q >= kv) & ~(q - kv < 4)) | ((h % 2 == 0) & (DOC[q] == DOC[kv]))),
    ("and_masks", attndsl.and_masks(causal, window4, same_doc),
     lambda b, h, q, kv: (q >= kv) & (q - kv < 4) & (DOC[q] == DOC[kv])),
    ("or_masks", attndsl.or_masks(window4, even_head),
     lambda b, h, q, kv: (q - kv < 4) | (h % 2 == 0)),
    ("not_mask", attndsl.not_mask(same_doc), lambda b, h, q, kv: ~(DOC[q] == DOC[kv])),
    ("plain_fns", attndsl.and_masks(lambda b, h, q, kv: q >= kv, attndsl.not_mask(lambda b, h, q, kv: kv < 2)),
     lambda b, h, q, kv: (q >= kv) & ~(kv < 2)),
]


@pytest.mark.parametrize("name,composed,hand", COMPOSED, ids=[c[0] for c in COMPOSED])
def test_mask_composition_equals_hand_combined(name, composed, hand):
    assert isinstance(composed, attndsl.Mask)
    t1, got = eval_traced_mask(composed)
    want = eval_real_mask(hand)
    assert torch.equal(got, want)
    # composed masks stay plain callables on tensors
    assert torch.equal(eval_real_mask(composed), want)
    # and the composition is one pattern: same IR as writing it by hand
    t2 = trace(mask_mod=hand)
    assert t1.mask is t2.mask
    assert attndsl.compile(mask_mod=composed).spec.key == attndsl.compile(mask_mod=hand).spec.key


@attndsl.score_mod
def double(score, b, h, q_idx, kv_idx):
    return score * 2.0


@attndsl.score_mod
def plus_dist(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 0.5


@attndsl.score_mod
def capped(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


CHAINS = [
    ("rshift", double >> plus_dist, lambda s, b, h, q, kv: s * 2.0 + (kv - q) * 0.5),
    ("rshift_order", plus_dist >> double, lambda s, b, h, q, kv: (s + (kv - q) * 0.5) * 2.0),
    ("three", double >> plus_dist >> capped, lambda s, b, h, q, kv: 5.0 * torch.tanh((s * 2.0 + (kv - q) * 0.5) / 5.0)),
    ("chain", attndsl.chain(capped, double, plus_dist),
     lambda s, b, h, q, kv: 5.0 * torch.tanh(s / 5.0) * 2.0 + (kv - q) * 0.5),
    ("chain_plain", attndsl.chain(lambda s, b, h, q, kv: s + SLOPES[h], double),
     lambda s, b, h, q, kv: (s + SLOPES[h]) * 2.0),
]


@pytest.mark.parametrize("name,chained,hand", CHAINS, ids=[c[0] for c in CHAINS])
def test_score_chain_equals_hand_combined(name, chained, hand):
    assert isinstance(chained, attndsl.ScoreMod)
    s = score_tensor(1)
    t1, got = eval_traced_score(chained, s)
    want = eval_real_score(hand, s)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eval_real_score(chained, s), want, rtol=1e-6, atol=1e-6)
    assert t1.score is trace(score_mod=hand).score


def test_chain_is_not_commutative():
    s = score_tensor(2)
    _, a = eval_traced_score(double >> plus_dist, s)
    _, b = eval_traced_score(plus_dist >> double, s)
    assert not torch.allclose(a, b)


def test_composition_argument_errors():
    with pytest.raises(ValueError):
        attndsl.and_masks()
    with pytest.raises(ValueError):
        attndsl.or_masks()
    with pytest.raises(ValueError):
        attndsl.chain()


def test_indices_live_on_the_captured_tensors_device():
    # VSA's mask (attn-gym) compares a row of a CUDA tensor with kv_tile.unsqueeze(-1): the traced
    # indices must sit on the tensors' device (meta stands in for CUDA on a CPU-only machine)
    topk = torch.zeros(2, 2, 4, 2, dtype=torch.int32, device="meta")

    def vsa(b, h, q_idx, kv_idx):
        return (topk[b, h, q_idx // 16] == (kv_idx // 16).unsqueeze(-1)).any(dim=-1)

    t = trace(mask_mod=vsa)
    assert str(t.mask) == "<bool ((buf0[b, h, (q // 16), 0] == (kv // 16)) | (buf0[b, h, (q // 16), 1] == (kv // 16)))>"
