"""The Hopper (sm_90, Gluon) backward on an H100: dQ/dK/dV against the portable Triton backward and
the float64 oracle, with hypothesis-drawn shapes (Lq != Lkv, lengths that are not multiples of the
tiles, GQA), dQ by atomic adds and deterministic (portable dQ kernel), through the runtime
(``Runner.backward`` picks it with ``hopper_bwd.enable_backward(True)`` or ``ATTNDSL_HOPPER_BWD=1``) and called directly.

Skipped without a compute capability 9.0 device or without Triton 3.6's Gluon.
Run: ``python -m pytest -q -m gpu tests/test_gpu_hopper_bwd.py``.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attndsl
import attndsl.reference
from attndsl.patterns import causal, document, softcap
from attndsl.runtime import hopper, hopper_bwd
# the forward's GPU tests (tests/ is on the path: no package) share their checks and patterns
import test_gpu_hopper
from test_gpu_hopper import DEV, _sm90, rel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Triton 3.6's Gluon")]


@pytest.fixture(scope="module", autouse=True)
def _hopper_bwd_runs():
    """A child process runs small Hopper backwards first, with a time limit: a kernel that hangs or
    is wrong fails this file at once instead of stalling the GPU run."""
    err = hopper_bwd.smoke_test()
    if err is not None:
        pytest.fail(err, pytrace=False)


# max |got - want| / max |want| of the gradients against float64, as tests/test_gpu.py's TOL
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}

_LENGTHS = torch.tensor([611, 403], dtype=torch.int32, device=DEV) if torch.cuda.is_available() else None
# packed documents of 1..300 tokens covering every drawn length (a data-dependent mask: block tables)
_DOC_IDS = (torch.repeat_interleave(torch.arange(12), torch.tensor([37, 300, 5, 130, 1, 64, 250, 90, 17, 128, 77, 30]))
            .to(torch.int32).to(DEV)) if torch.cuda.is_available() else None


def key_padding(b, h, q_idx, kv_idx):
    # a mask reading a captured tensor (per-batch key lengths), closed-form visit range
    return kv_idx < _LENGTHS[b]



# the forward's patterns, and a score modifier under a mask, captured tensors in the mask
PATTERNS = {
    **test_gpu_hopper.PATTERNS,
    "causal_softcap": (causal, softcap(20.0)),
    "key_padding": (key_padding, None),
    "document": (document(_DOC_IDS), None) if torch.cuda.is_available() else (causal, None),
}


def compiled(name):
    return test_gpu_hopper.compiled(name, PATTERNS)


def inputs(B, Hq, Hkv, Lq, Lkv, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Lkv, D, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Lkv, D, device=DEV, dtype=dtype, generator=g)
    do = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype, generator=g)
    return q, k, v, do


def stats(comp, q, k, v, do):
    """The forward's logsumexp (the portable forward's) and delta = rowsum(dO·O), as the Hopper
    backward takes them when called directly."""
    hopper.enable(False)
    try:
        o, lse = comp(q, k, v, return_lse=True)
    finally:
        hopper.enable(None)
    return lse, (o.float() * do.float()).sum(-1)


def grads(comp, q, k, v, do, hopper_bwd_on: bool, deterministic: bool = False, dq: str | None = None):
    """(dq, dk, dv, Hopper backward calls) through the runtime, the forward portable; ``dq``: the
    Hopper backward's dQ mode (None: the configuration the runtime picks)."""
    calls = []
    orig = hopper_bwd.HopperBackward.backward

    def spy(self, *a, **kw):
        calls.append(1)
        return orig(self, *a, **kw)

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    mp = pytest.MonkeyPatch()
    mp.setattr(hopper_bwd.HopperBackward, "backward", spy)
    if dq is not None:
        mp.setattr(hopper_bwd.HopperBackward, "config", lambda self, q, k: hopper_bwd.bwd_config_for(q.shape[-1], dq))
    hopper.enable(False)
    hopper_bwd.enable_backward(hopper_bwd_on)
    try:
        runner_comp = attndsl.compile(mask_mod=comp[0], score_mod=comp[1], deterministic=deterministic)
        out = runner_comp(q, k, v)
        out.backward(do)
        torch.cuda.synchronize()
    finally:
        hopper.enable(None)
        hopper_bwd.enable_backward(None)
        mp.undo()
    return q.grad, k.grad, v.grad, len(calls)


def check(name, B, Hq, Hkv, Lq, Lkv, D, dtype, seed=0, deterministic=False, dq=None):
    mask, score = PATTERNS[name]
    assert hopper_bwd.HopperBackward(compiled(name).spec).unsupported is None
    q, k, v, do = inputs(B, Hq, Hkv, Lq, Lkv, D, dtype, seed)
    got = grads((mask, score), q, k, v, do, True, deterministic, dq)
    assert got[3] == 1, "the runtime did not pick the Hopper backward on this sm_90 call"
    tri = grads((mask, score), q, k, v, do, False)
    assert tri[3] == 0
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=mask, score_mod=score, scale=1 / math.sqrt(D))
    ref.backward(do.double())
    ctx = f"{name} B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lkv={Lkv} D={D} {dtype} deterministic={deterministic} dq={dq}"
    for i, (n, want) in enumerate((("dq", q64.grad), ("dk", k64.grad), ("dv", v64.grad))):
        g = got[i]
        assert g.shape == want.shape and g.dtype == dtype, (n, ctx)
        assert not g.isnan().any(), f"{n} has NaN ({ctx})"
        if float(want.abs().max()) < 1e-3:
            # zero in exact arithmetic (every row sees one key: its softmax is constant): both the
            # portable and the Hopper backward give rounding noise (about 1e-7 per query row in
            # float16, measured on an H100), which a relative error would call 70%
            err, tri_err = ((t.double() - want).abs().max().item() for t in (g, tri[i]))
            assert err <= 2 * tri_err + 1e-6, f"{n} vs float64: {err:.3g}, portable {tri_err:.3g} ({ctx})"
            continue
        assert rel(g, want) <= TOL[dtype], f"{n} vs float64: {rel(g, want):.3g} ({ctx})"
        # no worse than the portable backward, within rounding of the output dtype
        assert rel(g, tri[i]) <= 2 * TOL[dtype], f"{n} vs Triton: {rel(g, tri[i]):.3g} ({ctx})"


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("D", [64, 128])
def test_fixed_shapes(name, D):
    check(name, 2, 4, 2, 1000, 777, D, torch.bfloat16)


@pytest.mark.parametrize("name", ["dense", "causal", "causal_softcap", "key_padding", "document"])
def test_deterministic(name):
    """dK/dV from the Hopper kernel, dQ from the portable dQ kernel: two runs give equal bits."""
    check(name, 1, 4, 1, 700, 900, 128, torch.float16, deterministic=True)
    mask, score = PATTERNS[name]
    q, k, v, do = inputs(1, 4, 1, 700, 900, 128, torch.float16, 5)
    a = grads((mask, score), q, k, v, do, True, True)
    b = grads((mask, score), q, k, v, do, True, True)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("portable_atomic", [False, True])
@pytest.mark.parametrize("name", ["dense", "causal", "causal_softcap", "document"])
def test_dq_by_the_portable_kernel(name, portable_atomic):
    """``HopperBwdConfig(dq="kernel")`` in a non-deterministic run (``MEASURED_BWD_WINS``' choice
    for dense attention): the Gluon kernel's dK/dV and the portable dQ kernel's dQ, also where the
    portable backward's own mode adds dQ atomically (its dK/dV kernel does not run)."""
    from attndsl.runtime.config import enable_atomic_dq
    enable_atomic_dq(portable_atomic)
    try:
        check(name, 2, 4, 2, 1000, 777, 128, torch.bfloat16, dq="kernel")
        check(name, 1, 2, 1, 300, 450, 64, torch.float16, seed=2, dq="kernel")
    finally:
        enable_atomic_dq(None)


@pytest.mark.parametrize("dq", ["atomic", "kernel"])
def test_prepared_launches_with_fresh_inputs(dq):
    """Later backwards of a call key take the prepared launch (``gluonlaunch``): fresh inputs per
    call (the tensor maps follow the addresses), each against the float64 oracle."""
    from attndsl.runtime import gluonlaunch
    assert gluonlaunch.PREPARED
    comp = attndsl.compile(mask_mod=causal)
    hb = hopper_bwd.HopperBackward(comp.spec)
    cfg = hopper_bwd.bwd_config_for(128, dq)
    for seed in range(3):
        q, k, v, do = inputs(1, 4, 2, 700, 650, 128, torch.bfloat16, 10 + seed)
        lse, delta = stats(comp, q, k, v, do)
        dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
        got_dq = hb.backward(q, k, v, do, lse, delta, dk, dv, 1 / math.sqrt(128), cfg=cfg)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal)
        ref.backward(do.double())
        for n, g, want in (("dk", dk, k64.grad), ("dv", dv, v64.grad)) + ((("dq", got_dq, q64.grad),) if dq == "atomic"
                                                                           else ()):
            assert rel(g, want) <= TOL[torch.bfloat16], (seed, n, rel(g, want))
        if dq == "kernel":
            assert got_dq is None
    assert len(hb._prepared) == 1 and next(iter(hb._prepared.values())) is not None


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("name", ["dense", "causal", "causal_softcap", "key_padding", "document"])
def test_early_dq_order(name, early, monkeypatch):
    """Both orders of atomic dQ (``HopperBwdConfig.dq_early``, on by default: dQ's products issued
    before dK's, FlashAttention-3's order; off: after) at D=128, against the float64 oracle and the
    portable backward, GQA and ragged lengths."""
    monkeypatch.setattr(hopper_bwd.HopperBackward, "config",
                        lambda self, q, k: hopper_bwd.HopperBwdConfig(stages=2, dq_early=early))
    check(name, 2, 4, 2, 1000, 777, 128, torch.bfloat16)
    check(name, 1, 6, 2, 333, 517, 128, torch.float16, seed=4)


def check_sinks_and_lse(comp, mask, q, k, v, do, sinks, ctx=None):
    """``comp``'s gradients of q, k, v and the sink logits, with a random lse gradient, against the
    float64 oracle's (within 2e-2 of the largest)."""
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    s = sinks.clone().requires_grad_()
    o, lse = comp(qq, kk, vv, sinks=s, return_lse=True)
    dlse = torch.randn_like(lse)
    torch.autograd.backward((o, lse), (do, dlse))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s64 = sinks.double().requires_grad_()
    r, rl = attndsl.reference.attention(q64, k64, v64, mask_mod=mask, sinks=s64)
    torch.autograd.backward((r, rl), (do.double(), dlse.double()))
    for n, got, want in (("dq", qq.grad, q64.grad), ("dk", kk.grad, k64.grad), ("dv", vv.grad, v64.grad),
                         ("dsinks", s.grad, s64.grad)):
        assert rel(got, want) <= 2e-2, (ctx, n, rel(got, want))


@pytest.mark.parametrize("dq", ["atomic", "kernel"])
def test_repeated_calls_take_the_prepared_backward(dq, monkeypatch):
    """One compiled pattern called again and again (fresh inputs, sinks and an lse gradient each
    call): after the first, the backward goes through ``HopperFastBackward`` (the memoised delta
    and dQ launches around the Hopper kernel's prepared launch); every call against the float64
    oracle. ``ATTNDSL_VERIFY_MEMO`` off here: the prepared path itself runs."""
    from attndsl.runtime import launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", False)
    monkeypatch.setattr(hopper_bwd.HopperBackward, "config", lambda self, q, k: hopper_bwd.bwd_config_for(128, dq))
    comp = attndsl.compile(mask_mod=causal)
    hopper.enable(False)
    hopper_bwd.enable_backward(True)
    try:
        for seed in range(3):
            q, k, v, do = inputs(1, 4, 2, 700, 650, 128, torch.bfloat16, 20 + seed)
            check_sinks_and_lse(comp, causal, q, k, v, do, torch.randn(4, device=DEV, dtype=torch.float32), seed)
        fast = [b for b in comp.runner(q, 128, k)._fast_bwd.values() if b is not None]
        assert [type(b) for b in fast] == [launch.HopperFastBackward]
    finally:
        hopper.enable(None)
        hopper_bwd.enable_backward(None)


def test_sinks_and_lse_gradient():
    """Sink logits (their gradient from lse and delta on the host) and an lse gradient (delta
    shifted) with the Hopper backward."""
    mask, _ = PATTERNS["sliding_window"]
    q, k, v, do = inputs(1, 4, 4, 700, 650, 128, torch.bfloat16, 3)
    sinks = torch.randn(4, device=DEV, dtype=torch.float32) * 2
    hopper_bwd.enable_backward(True)
    try:
        check_sinks_and_lse(attndsl.compile(mask_mod=mask), mask, q, k, v, do, sinks)
    finally:
        hopper_bwd.enable_backward(None)


def test_strided_views():
    """q/k/v and dO stored [B, L, H, D], read through 4-D descriptors; GQA 4:1."""
    B, L, Lkv = 2, 333, 517
    q = torch.randn(B, L, 8, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(B, Lkv, 2, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    do = torch.randn(B, L, 8, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    got = grads((causal, None), q, k, v, do, True)
    assert got[3] == 1
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal)
    ref.backward(do.double())
    for g, want in zip(got[:3], (q64.grad, k64.grad, v64.grad)):
        assert rel(g, want) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("consumers,stages,D", [(1, 1, 128), (1, 3, 128), (2, 1, 128), (2, 3, 128), (2, 3, 64),
                                                (1, 2, 64)])
def test_other_tiles(consumers, stages, D):
    """One or two consumer groups, ring depths, called directly (dense and causal inputs): dQ's
    columns split over two groups (D=128), taken in turns by two (D=64), or all one group's."""
    for name in ("dense", "causal"):
        comp = compiled(name)
        mask, _ = PATTERNS[name]
        q, k, v, do = inputs(1, 2, 1, 900, 1100, D, torch.float16, 7)
        lse, delta = stats(comp, q, k, v, do)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        cfg = hopper_bwd.HopperBwdConfig(consumers=consumers, stages=stages)
        dq = hopper_bwd.HopperBackward(comp.spec).backward(q, k, v, do, lse, delta, dk, dv, 1 / math.sqrt(D), cfg=cfg)
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=mask)
        ref.backward(do.double())
        for n, g, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
            assert rel(g, want) <= TOL[torch.float16], (name, n, rel(g, want))


def test_falls_back_where_unsupported():
    """Head dims other than 64/128, float32 and TMA-unreadable inputs run the portable backward."""
    hb = hopper_bwd.HopperBackward(compiled("causal").spec)
    hopper_bwd.enable_backward(True)
    try:
        q, k, v, do = inputs(1, 2, 2, 256, 256, 128, torch.bfloat16, 2)
        assert hb.applies(q, k, v, do)
        q96, k96, v96, do96 = inputs(1, 2, 2, 256, 256, 96, torch.bfloat16, 2)
        assert not hb.applies(q96, k96, v96, do96)
        assert not hb.applies(q.float(), k.float(), v.float(), do.float())
        wide = torch.zeros(1, 2, 256, 129, device=DEV, dtype=torch.bfloat16)[..., 1:]
        assert not hb.applies(wide, k, v, do)
        got = grads((causal, None), q96, k96, v96, do96, True)
        assert got[3] == 0 and got[0].shape == q96.shape
    finally:
        hopper_bwd.enable_backward(None)


@pytest.mark.parametrize("name", list(PATTERNS))
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 2), group=st.sampled_from([1, 2, 4]), Hkv=st.integers(1, 2), Lq=st.integers(1, 700),
       Lkv=st.integers(1, 700), D=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_drawn_shapes(name, B, group, Hkv, Lq, Lkv, D, dtype, seed):
    check(name, B, Hkv * group, Hkv, Lq, Lkv, D, dtype, seed)
