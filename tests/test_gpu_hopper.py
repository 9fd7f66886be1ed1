"""The Hopper (sm_90, Gluon) forward on an H100: against the portable Triton forward and the
float64 oracle, with hypothesis-drawn shapes (Lq != Lkv, lengths that are not multiples of the
tiles, GQA), and forward+backward through the runtime with the Hopper forward selected (the
portable backward reads its output and logsumexp).

Skipped without a compute capability 9.0 device or without Triton 3.6's Gluon.
Run: ``python -m pytest -q -m gpu tests/test_gpu_hopper.py``; the ping-pong and program-order
tests alone: ``-k "pingpong or program_order"``.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import attndsl
import attndsl.reference
from attndsl.patterns import alibi, alibi_slopes, causal, chunked, prefix_lm, sliding_window, softcap
from attndsl.runtime import hopper


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper.gluon_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Triton 3.6's Gluon")]

DEV = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _hopper_runs():
    """A child process runs small Hopper forwards first, with a time limit: a kernel that hangs or
    is wrong fails this file at once instead of stalling the GPU run."""
    err = hopper.smoke_test()
    if err is not None:
        pytest.fail(err, pytrace=False)
# max |got - want| / max |want| (output) and absolute error of the logsumexp, as tests/test_gpu.py
# (the logsumexp comes from float32 scores of the same inputs: only float32 rounding)
TOL = {torch.bfloat16: dict(out=1e-2, lse=1e-3), torch.float16: dict(out=2e-3, lse=1e-3)}


def alibi_like(score, b, h, q_idx, kv_idx):
    # ALiBi's linear distance penalty with per-head slopes computed from h (no captured tensor)
    return score + torch.exp2(-(h + 1.0)) * (kv_idx - q_idx)


def band_or_global(b, h, q_idx, kv_idx):
    # a disjunction: its visit range needs a per-tile classification
    return ((q_idx - kv_idx).abs() <= 100) | (kv_idx < 16)


PATTERNS = {
    "dense": (None, None),
    "causal": (causal, None),
    "sliding_window": (sliding_window(257), None),
    "softcap": (None, softcap(30.0)),
    "alibi_like_causal": (causal, alibi_like),
    # a captured tensor (slopes[h], read once per program); 8 slopes cover every drawn head count
    "alibi": (causal, alibi(alibi_slopes(8, device=DEV))) if torch.cuda.is_available() else (causal, None),
    "prefix_lm": (prefix_lm(150), None),
    "chunked": (chunked(256), None),
    "band_or_global": (band_or_global, None),
}
_COMPILED: dict = {}


def compiled(name, patterns=None):
    """The compiled pattern ``name`` of ``patterns`` (default: this file's; the backward's tests
    pass theirs, a superset with the same names), compiled once per process."""
    if name not in _COMPILED:
        mask, score = (PATTERNS if patterns is None else patterns)[name]
        _COMPILED[name] = attndsl.compile(mask_mod=mask, score_mod=score)
    return _COMPILED[name]


def rel(got, want):
    got, want = got.double(), want.double()
    return float((got - want).abs().max()) / max(float(want.abs().max()), 1e-6)


def lse_err(got, want):
    live = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), live), "rows with no key must give -inf, and only those"
    return float((got[live].double() - want[live]).abs().max()) if live.any() else 0.0


def inputs(B, Hq, Hkv, Lq, Lkv, D, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, Lkv, D, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Lkv, D, device=DEV, dtype=dtype, generator=g)
    return q, k, v


def check(name, B, Hq, Hkv, Lq, Lkv, D, dtype, seed=0, cfg=None, heavy_first=None):
    comp = compiled(name)
    mask, score = PATTERNS[name]
    q, k, v = inputs(B, Hq, Hkv, Lq, Lkv, D, dtype, seed)
    scale = 1.0 / math.sqrt(D)
    hf = hopper.HopperForward(comp.spec)
    assert hf.unsupported is None, hf.unsupported
    out, lse = hf.forward(q, k, v, scale, cfg, buffers=comp.tensors, heavy_first=heavy_first)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    ref, ref_lse = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=mask, score_mod=score,
                                               scale=scale)
    hopper.enable(False)  # the portable forward, whatever ATTNDSL_HOPPER says
    try:
        tri, tri_lse = comp(q, k, v, scale=scale, return_lse=True)
    finally:
        hopper.enable(None)
    ctx = f"{cfg} heavy_first={heavy_first} {name} B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lkv={Lkv} D={D} {dtype}"
    assert rel(out, ref) <= TOL[dtype]["out"], f"out vs float64: {rel(out, ref):.3g} ({ctx})"
    assert lse_err(lse, ref_lse) <= TOL[dtype]["lse"], f"lse vs float64 ({ctx})"
    # no worse than the portable forward, within rounding of the output dtype
    assert rel(out, tri.float()) <= 2 * TOL[dtype]["out"], f"out vs Triton: {rel(out, tri.float()):.3g} ({ctx})"
    assert lse_err(lse, tri_lse.double()) <= TOL[dtype]["lse"], f"lse vs Triton ({ctx})"


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("pipeline", [True, False])
def test_fixed_shapes(name, D, pipeline):
    cfg = hopper.HopperConfig(**{**vars(hopper.config_for(D)), "pipeline": pipeline})
    check(name, 2, 4, 2, 1000, 777, D, torch.bfloat16, cfg=cfg)


def test_strided_views():
    """q/k/v stored [B, L, H, D] (the usual projection output), read through 4-D descriptors; GQA."""
    B, L, Lkv = 2, 333, 517
    q = torch.randn(B, L, 8, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(B, Lkv, 2, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    comp = compiled("causal")
    out, lse = hopper.HopperForward(comp.spec).forward(q, k, v, 1 / math.sqrt(128))
    ref, ref_lse = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=causal)
    assert rel(out, ref) <= TOL[torch.bfloat16]["out"]
    assert lse_err(lse, ref_lse) <= TOL[torch.bfloat16]["lse"]


@pytest.mark.parametrize("consumers,stages,block_n,pipeline", [(1, 2, 128, True), (2, 1, 128, False), (2, 3, 64, True),
                                                               (1, 3, 64, False)])
def test_other_tiles(consumers, stages, block_n, pipeline):
    """Ring depths, one consumer group, narrower key tiles (the benchmark's sweep), causal, D=128."""
    cfg = hopper.HopperConfig(block_n=block_n, stages=stages, consumers=consumers, pipeline=pipeline)
    check("causal", 1, 2, 1, 900, 1100, 128, torch.float16, cfg=cfg)


@pytest.mark.parametrize("name", list(PATTERNS))
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(B=st.integers(1, 2), group=st.sampled_from([1, 2]), Hkv=st.integers(1, 3), Lq=st.integers(1, 700),
       Lkv=st.integers(1, 700), D=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**16))
def test_drawn_shapes(name, B, group, Hkv, Lq, Lkv, D, dtype, seed):
    check(name, B, Hkv * group, Hkv, Lq, Lkv, D, dtype, seed)


def test_selected_by_runtime_and_backward_runs():
    """With the Hopper forward on, a call runs it (the runner says so) and forward+backward matches
    the oracle: the portable backward reads the Hopper forward's output and logsumexp."""
    comp = compiled("causal")
    q, k, v = (t.requires_grad_() for t in inputs(1, 4, 2, 600, 600, 128, torch.bfloat16, 1))
    hopper.enable(True)
    try:
        calls = []
        orig = hopper.HopperForward.forward

        def spy(self, *a, **kw):
            calls.append(1)
            return orig(self, *a, **kw)

        hopper.HopperForward.forward = spy
        try:
            out = comp(q, k, v)
        finally:
            hopper.HopperForward.forward = orig
        assert calls, "the runtime did not pick the Hopper forward on this sm_90 call"
        dout = torch.randn_like(out)
        out.backward(dout)
    finally:
        hopper.enable(None)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal)
    ref.backward(dout.double())
    assert rel(out.detach(), ref.detach()) <= 1e-2
    for got, want, n in ((q.grad, q64.grad, "dq"), (k.grad, k64.grad, "dk"), (v.grad, v64.grad, "dv")):
        assert rel(got, want) <= 2e-2, n


def test_falls_back_where_unsupported():
    """Inputs TMA cannot read and head dims other than 64/128 run the portable forward, enabled or not."""
    comp = compiled("causal")
    hf = hopper.HopperForward(comp.spec)
    hopper.enable(True)
    try:
        q, k, v = inputs(1, 2, 2, 256, 256, 128, torch.bfloat16, 2)
        assert hf.applies(q, k, v)
        assert hf.applies(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)  # [B, L, H, D] storage
        wide = torch.zeros(1, 2, 256, 129, device=DEV, dtype=torch.bfloat16)[..., 1:]  # rows of 258 bytes
        assert not hf.applies(wide, k, v)
        q96, k96, v96 = inputs(1, 2, 2, 256, 256, 96, torch.bfloat16, 2)
        assert not hf.applies(q96, k96, v96)
        assert not hf.applies(q.float(), k.float(), v.float())
        out = comp(q96, k96, v96)  # runs (portable)
        assert out.shape == q96.shape
    finally:
        hopper.enable(None)


@pytest.mark.parametrize("pipeline", [True, False])
def test_sinks(pipeline):
    """Per-head sink logits join the denominator (forward) and get their gradient from the Hopper
    forward's logsumexp (portable backward)."""
    comp = compiled("sliding_window")
    mask, _ = PATTERNS["sliding_window"]
    q, k, v = inputs(1, 4, 4, 700, 650, 128, torch.bfloat16, 3)
    sinks = torch.randn(4, device=DEV, dtype=torch.float32) * 2
    hf = hopper.HopperForward(comp.spec)
    cfg = hopper.HopperConfig(**{**vars(hopper.config_for(128)), "pipeline": pipeline})
    out, lse = hf.forward(q, k, v, 1 / math.sqrt(128), cfg, sinks=sinks)
    ref, ref_lse = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=mask, sinks=sinks.double())
    assert rel(out, ref) <= TOL[torch.bfloat16]["out"]
    assert lse_err(lse, ref_lse) <= TOL[torch.bfloat16]["lse"]
    # through the runtime, with the backward
    s = sinks.clone().requires_grad_()
    hopper.enable(True)
    try:
        o = comp(q, k, v, sinks=s)
        o.float().square().sum().backward()
    finally:
        hopper.enable(None)
    s64 = sinks.double().requires_grad_()
    r, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=mask, sinks=s64)
    r.square().sum().backward()
    assert rel(s.grad, s64.grad) <= 2e-2


# -- ping-pong of the two consumer groups and the program order ----------------------------------

#: the swept configurations with ping-pong on (pipelined and plain, 2 or 3 stages, key tiles 64/128)
PINGPONG = [c for c in hopper.sweep_configs(128) if c.pingpong]
#: GQA with Lq != Lkv; short queries; long queries over one key tile (a sliding window: programs
#: past the window's reach visit no tile at all, the first visits one)
PINGPONG_SHAPES = ((2, 4, 2, 1000, 777), (1, 3, 3, 77, 300), (1, 2, 1, 1000, 100))


def _cfg_id(c):
    return f"pp{int(c.pingpong)}-pipe{int(c.pipeline)}-s{c.stages}-bn{c.block_n}"


@pytest.fixture(scope="module")
def pingpong_compiled():
    """The ping-pong kernels of the patterns below, compiled at once in threads before the tests
    (the tests launch the same kernels: lengths are not specialised)."""
    q, k, v = inputs(1, 2, 1, 300, 300, 128, torch.bfloat16, 0)
    hopper.compile_ahead([(hopper.HopperForward(compiled(name).spec), (q, k, v, 0.1, c), {})
                          for name in ("dense", "causal", "sliding_window") for c in PINGPONG])


@pytest.mark.parametrize("cfg", PINGPONG, ids=_cfg_id)
@pytest.mark.parametrize("name", ["dense", "causal", "sliding_window"])
def test_pingpong(name, cfg, pingpong_compiled):
    """Strict turns between the two consumer groups give the portable forward's and the float64
    oracle's results, on programs of many, one and no visited key tiles (no deadlock: both groups
    take and pass the same number of turns)."""
    for B, Hq, Hkv, Lq, Lkv in PINGPONG_SHAPES:
        check(name, B, Hq, Hkv, Lq, Lkv, 128, torch.bfloat16, cfg=cfg)


@pytest.mark.parametrize("pipeline", [True, False])
def test_pingpong_head_dim_64(pipeline):
    cfg = hopper.HopperConfig(**{**vars(hopper.config_for(64)), "pipeline": pipeline, "pingpong": True})
    check("causal", 1, 4, 2, 999, 1234, 64, torch.float16, cfg=cfg)
    check("softcap", 2, 2, 1, 300, 129, 64, torch.float16, cfg=cfg)


@pytest.mark.parametrize("heavy_first", [True, False])
@pytest.mark.parametrize("name", ["causal", "dense", "prefix_lm"])
def test_program_order(name, heavy_first):
    """Either program order (heaviest query tiles first over all heads, or the plain grid) gives the
    same results; the spec decides the default once (causal and prefix-LM heavy first)."""
    assert hopper.HopperForward(compiled(name).spec).heavy_first == (name != "dense")
    check(name, 2, 4, 2, 1100, 900, 128, torch.bfloat16, cfg=hopper.config_for(128), heavy_first=heavy_first)
    check(name, 1, 3, 1, 129, 1500, 128, torch.bfloat16, seed=1, cfg=hopper.config_for(128), heavy_first=heavy_first)


# -- the prepared launch (runtime/gluonlaunch.py) --------------------------------------------------

@pytest.fixture
def launches(monkeypatch):
    """Counts of the Hopper forward's launches: ``made`` (prepared launches made: one per first
    call of a key, after Gluon's ``kernel.run``) and ``prepared`` (what each prepared launch returned:
    True when it launched)."""
    from attndsl.runtime import gluonlaunch
    monkeypatch.setattr(gluonlaunch, "PREPARED", True)  # whatever ATTNDSL_GLUON_PREPARED says
    got = {"made": [], "prepared": []}
    make, call = gluonlaunch.Prepared.make, gluonlaunch.Prepared.__call__

    def spy_make(*a, **kw):
        p = make(*a, **kw)
        got["made"].append(p)
        return p

    def spy_call(self, tensors, rest):
        r = call(self, tensors, rest)
        got["prepared"].append(r)
        return r

    monkeypatch.setattr(gluonlaunch.Prepared, "make", staticmethod(spy_make))
    monkeypatch.setattr(gluonlaunch.Prepared, "__call__", spy_call)
    return got


def test_prepared_launch_through_attention(launches):
    """``attndsl.attention`` with the Hopper forward on, three calls of one shape with fresh inputs:
    each matches the float64 oracle; the first launches through Gluon's ``kernel.run`` and makes
    the prepared launch, the next two take it. Then the same shape stored [B, L, H, D] (other
    strides: another key) launches the ordinary way first, and is right."""
    B, Hq, Hkv, L, D = 1, 6, 2, 611, 128  # a shape no other test uses: its first call is a new key
    hopper.enable(True)
    try:
        for seed in range(3):
            q, k, v = inputs(B, Hq, Hkv, L, L, D, torch.bfloat16, 100 + seed)
            out = attndsl.attention(q, k, v, mask_mod=causal)
            torch.cuda.synchronize()
            ref, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=causal)
            assert rel(out, ref) <= TOL[torch.bfloat16]["out"], f"call {seed}: {rel(out, ref):.3g}"
        assert len(launches["made"]) == 1 and launches["made"][0] is not None, \
            "the first call did not make a prepared launch (Triton's launcher not as gluonlaunch expects?)"
        assert launches["prepared"] == [True, True], launches["prepared"]
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
                   for t in inputs(B, Hq, Hkv, L, L, D, torch.bfloat16, 200))
        out = attndsl.attention(q, k, v, mask_mod=causal)
        ref, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=causal)
        assert rel(out, ref) <= TOL[torch.bfloat16]["out"]
        assert len(launches["made"]) == 2 and launches["prepared"] == [True, True]
    finally:
        hopper.enable(None)


def test_prepared_launch_sinks_and_captured_tensor(launches):
    """A score mod over a captured tensor (ALiBi slopes) and sink logits, fresh inputs and sinks per
    call, through ``HopperForward.forward``: prepared from the second call, outputs and logsumexp
    match the oracle; fp16 and D=64 are other keys."""
    comp = compiled("alibi")
    mask, score = PATTERNS["alibi"]
    hf = hopper.HopperForward(comp.spec)
    for seed, (D, dtype) in enumerate([(128, torch.bfloat16)] * 3 + [(64, torch.float16)] * 2):
        q, k, v = inputs(2, 4, 2, 300, 333, D, dtype, 300 + seed)
        sinks = torch.randn(4, device=DEV, dtype=torch.float32)
        out, lse = hf.forward(q, k, v, 1 / math.sqrt(D), sinks=sinks, buffers=comp.tensors)
        torch.cuda.synchronize()
        ref, ref_lse = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=mask,
                                                   score_mod=score, sinks=sinks.double(), scale=1 / math.sqrt(D))
        assert rel(out, ref) <= TOL[dtype]["out"], f"call {seed}: {rel(out, ref):.3g}"
        assert lse_err(lse, ref_lse) <= TOL[dtype]["lse"], f"call {seed}"
    assert len(launches["made"]) == 2 and None not in launches["made"]
    assert launches["prepared"] == [True, True, True]


#: the main loop's barrier variants (docs/hopper.md, "Barriers in the main loop"): per-thread arrives,
#: with ping-pong and plain, and two tiles per step (odd and even tile counts, one tile, none)
BARRIERS = [hopper.HopperConfig(stages=3, thread_arrive=True),
            hopper.HopperConfig(stages=3, thread_arrive=True, pingpong=True),
            hopper.HopperConfig(stages=2, thread_arrive=True, pingpong=True, pipeline=False),
            hopper.HopperConfig(stages=3, thread_arrive=True, unroll=2),
            hopper.HopperConfig(stages=2, block_n=64, unroll=2)]


@pytest.fixture(scope="module")
def barriers_compiled():
    """The barrier variants' kernels compiled at once in threads before the tests."""
    q, k, v = inputs(1, 2, 1, 300, 300, 128, torch.bfloat16, 0)
    hopper.compile_ahead([(hopper.HopperForward(compiled(name).spec), (q, k, v, 0.1, c), {})
                          for name in ("dense", "causal", "sliding_window") for c in BARRIERS])


@pytest.mark.parametrize("cfg", BARRIERS, ids=lambda c: f"ta{int(c.thread_arrive)}-pp{int(c.pingpong)}-"
                         f"pipe{int(c.pipeline)}-u{c.unroll}-s{c.stages}-bn{c.block_n}")
@pytest.mark.parametrize("name", ["dense", "causal", "sliding_window"])
def test_barrier_variants(name, cfg, barriers_compiled):
    """Each barrier variant gives the portable forward's and the float64 oracle's results on
    programs of many, one and no visited key tiles (no deadlock: every arrive is counted)."""
    for B, Hq, Hkv, Lq, Lkv in PINGPONG_SHAPES + ((1, 2, 2, 129, 1111),):
        check(name, B, Hq, Hkv, Lq, Lkv, 128, torch.bfloat16, cfg=cfg)
