"""The Hopper target without a GPU: which specs it renders, that the rendering is deterministic and
carries the pattern's code, that the runtime never picks it off sm_90, and (where Triton 3.6's
Gluon and its NVIDIA backend are installed) that two generated kernels compile for sm_90 with the
warp-specialised machinery in their PTX."""
import re

import pytest
import torch

import attndsl
from attndsl.codegen import hopper as gen
from attndsl.patterns import causal, sliding_window, softcap
from attndsl.runtime import hopper


window = sliding_window(300)
softcap = softcap(20.0)


def distance_bias(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * 0.01 * (q_idx - kv_idx).abs()


def either(b, h, q_idx, kv_idx):
    return ((q_idx - kv_idx).abs() <= 8) | (kv_idx < 4)


def test_supported_patterns_render():
    from attndsl.patterns import alibi, alibi_slopes
    for mask, score in [(None, None), (causal, None), (window, None), (None, softcap), (causal, distance_bias),
                        (either, None), (causal, alibi(alibi_slopes(4)))]:
        spec = attndsl.compile(mask_mod=mask, score_mod=score).spec
        assert gen.supports(spec) is None
        src = gen.render(hopper.hopper_spec(spec))
        assert src == gen.render(hopper.hopper_spec(spec))  # pure: the cache compares texts
        compile(src, "<hopper>", "exec")
        assert "gl.warp_specialize" in src and "warpgroup_mma" in src and "tma.async_copy_global_to_shared" in src
        if mask is not None:
            assert "if is_partial:" in src
        if score is not None and score.__name__ == "alibi_bias":  # a captured tensor: its pointer, sizes, strides
            assert "buf0, buf0_size0, buf0_stride0" in src
        if mask is either:  # per-tile classification
            assert "is_partial = is_partial & (" in src
        if score is softcap:
            assert "tl.sigmoid" in src or "_tanh" in src


def test_unsupported_patterns_are_refused_with_a_reason():
    ids = torch.zeros(64, dtype=torch.int32)

    def doc(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    cases = {"sigmoid": attndsl.compile(mask_mod=causal, normalizer="sigmoid").spec,
             "table": attndsl.compile(mask_mod=doc).spec}
    for what, spec in cases.items():
        why = gen.supports(spec)
        assert why, what
        with pytest.raises(ValueError, match="does not render"):
            gen.render(spec)
        assert hopper.HopperForward(spec).unsupported == why


def test_never_selected_off_sm90(monkeypatch):
    spec = attndsl.compile(mask_mod=causal).spec
    hf = hopper.HopperForward(spec)
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    try:
        monkeypatch.setenv("ATTNDSL_HOPPER", "1")
        hopper.enable(None)  # the environment is read on first use and by enable(None)
        assert hopper.enabled()
        assert not hf.applies(q, q, q)  # CPU tensors
        monkeypatch.setenv("ATTNDSL_HOPPER", "0")
        hopper.enable(None)
        assert hopper.enabled() is False
        monkeypatch.delenv("ATTNDSL_HOPPER")
        hopper.enable(None)
        assert hopper.enabled() is None  # unset: the measured wins decide
        hopper.enable(True)
        assert hopper.enabled()
    finally:
        monkeypatch.undo()  # the environment as it was, then the switch follows it
        hopper.enable(None)


def test_measured_wins_classes():
    """With neither switch set, the Hopper forward is taken only for the shape classes measured
    faster on an H100 through the one-shot call: no mask from B·Hq·Lq·Lkv = 16·2048², a mask whose
    range grows along the query tiles from 16·4096², another closed-form mask whose programs visit
    at least ``OTHER_MIN_VISITED`` keys from 16·16384²; no score mod, bf16, D=128. A narrow window,
    a data-dependent mask, a score mod, fp16, D=64 or a short call stay portable."""
    from attndsl.patterns import document, sliding_window

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    x = lambda B, H, L, D=128: torch.empty(B, H, L, D, dtype=torch.bfloat16)  # noqa: E731
    q = x(1, 16, 8192)

    def win(x=q, **kw):
        return hopper._measured_win(hopper.HopperForward(attndsl.compile(**kw).spec), x, x)

    assert win(x(1, 16, 2048), mask_mod=None)
    assert not win(x(1, 16, 1024), mask_mod=None)
    assert win(x(1, 16, 4096), mask_mod=causal)
    assert not win(x(1, 16, 2048), mask_mod=causal)
    assert win(x(1, 16, 16384), mask_mod=sliding_window(1024))  # 1150 keys per program of 128 queries
    assert not win(x(1, 16, 16384), mask_mod=sliding_window(512))
    assert not win(q, mask_mod=sliding_window(1024))  # shorter than measured
    assert not win(x(1, 16, 16384), mask_mod=document(torch.arange(16384) // 1024))  # data-dependent
    assert not win(mask_mod=causal, score_mod=softcap)
    assert not win(q.half(), mask_mod=causal)
    assert not win(q[..., :64], mask_mod=causal)


def _toolchain() -> bool:
    from attndsl.testing import sm90
    return hopper.gluon_available() and sm90.available()


@pytest.mark.skipif(not _toolchain(), reason="needs Triton 3.6's Gluon and its NVIDIA backend (ptxas)")
def test_compiles_for_sm90():
    """One kernel (mask and score_mod, the default tiles; about 6 s): the rest compile by hand
    (``attndsl.runtime.hopper.compile_sm90``)."""
    spec = attndsl.compile(mask_mod=causal, score_mod=distance_bias).spec
    k = hopper.compile_sm90(spec, "bf16", 128)
    ptx = k.asm["ptx"]
    for what in ("wgmma.mma_async", "setmaxnreg", "cp.async.bulk.tensor", "mbarrier.try_wait"):
        assert what in ptx, what


def test_config_refuses_a_deadlocking_ring():
    with pytest.raises(ValueError, match="stages"):
        hopper.HopperConfig(stages=1, pipeline=True)
    hopper.HopperConfig(stages=1, pipeline=False)
    with pytest.raises(ValueError, match="consumers"):
        hopper.HopperConfig(consumers=3)
    with pytest.raises(ValueError, match="stages=1, pipeline=False, pingpong=True"):
        hopper.HopperConfig(stages=1, pipeline=False, pingpong=True)
    with pytest.raises(ValueError, match="needs consumers=2, got 1"):
        hopper.HopperConfig(consumers=1, pingpong=True)
    for bad in (dict(unroll=3), dict(unroll=2, pipeline=False), dict(unroll=2, pingpong=True)):
        with pytest.raises(ValueError, match="unroll must be 1, or 2 with pipeline=True and pingpong=False"):
            hopper.HopperConfig(**bad)
    hopper.HopperConfig(unroll=2, thread_arrive=True)
    assert not hopper.HopperConfig().thread_arrive and hopper.HopperConfig().unroll == 1  # until an H100 A/B
    assert not hopper.HopperConfig().pingpong  # off by default until the H100 sweep says otherwise


def test_pingpong_turns_render():
    """Ping-pong is a constexpr switch over shared helpers: each consumer group gets its index as a
    constexpr, and both loop shapes take and pass turns (the counts are the helpers' and the
    loops', checked on the GPU by ``tests/test_gpu_hopper.py``)."""
    src = gen.render(hopper.hopper_spec(attndsl.compile(mask_mod=causal).spec))
    assert "def _mma_turn(my_turn, k, WG: gl.constexpr, PINGPONG: gl.constexpr):" in src
    # each group waits on its own barrier and passes to the other's (two allocations)
    assert "turn0, turn1, BLOCK_M" in src and "turn1, turn0, BLOCK_M" in src
    assert "PINGPONG, THREAD_ARRIVE, UNROLL, PERIOD, 0, HAS_SINKS))" in src
    assert "PINGPONG, THREAD_ARRIVE, UNROLL, PERIOD, 1, HAS_SINKS))" in src
    consumer = src[src.index("_consumer("):src.index("@gluon.jit(do_not_specialize")]
    # pipelined: one turn per loop step (it - 1; written in the one-tile loop and the three steps of
    # UNROLL 2's loops, which refuse ping-pong); plain: turn 0 before the loop, it + 1 before each P·V
    assert consumer.count("_mma_turn(my_turn, ") == 6 and consumer.count("_mma_pass(next_turn, ") == 6
    assert "_mma_turn(my_turn, it - 1, WG, PINGPONG)" in consumer and "_mma_turn(my_turn, it + 1, WG, PINGPONG)" in consumer


def test_heavy_first_is_decided_once_per_spec():
    """The Hopper forward takes ``visit_width.heavy_first``'s answer: programs start with the heaviest query tiles where the visit range grows along them (causal,
    prefix-LM), not where it does not (dense, a sliding window: only its first tiles are lighter)."""
    from attndsl.patterns import prefix_lm
    want = {None: False, causal: True, window: False, prefix_lm(100): True}
    for mask, heavy in want.items():
        spec = attndsl.compile(mask_mod=mask).spec
        assert hopper.HopperForward(spec).heavy_first is heavy, mask
    src = gen.render(hopper.hopper_spec(attndsl.compile().spec))
    assert "if HEAVY_FIRST:" in src and "pid_m = gl.num_programs(1) - 1 - gl.program_id(1)" in src


def test_sweep_configs_fit():
    cfgs = hopper.sweep_configs(128)
    assert len(set(cfgs)) == len(cfgs) == 16
    assert {(c.pingpong, c.pipeline) for c in cfgs} == {(a, b) for a in (False, True) for b in (False, True)}
    assert all(hopper.shared_bytes(c, 128) + 1024 <= hopper.SMEM_LIMIT for c in cfgs)
    assert hopper.shared_bytes(hopper.HopperConfig(stages=3), 128) == 2 * 128 * (2 * 64 + 2 * 3 * 128)


@pytest.mark.skipif(not _toolchain(), reason="needs Triton 3.6's Gluon and its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("cfg", hopper.sweep_configs(128), ids=lambda c: f"pp{int(c.pingpong)}-pipe{int(c.pipeline)}"
                         f"-s{c.stages}-bn{c.block_n}")
def test_sweep_configs_compiles_for_sm90(cfg):
    """Every configuration the benchmark sweeps compiles for sm_90 (causal, D=128, about 3 s each),
    within the H100's shared memory, with one more barrier arrive per group per ping-pong site."""
    k = hopper.compile_sm90(attndsl.compile(mask_mod=causal).spec, "bf16", 128, cfg)
    ptx = k.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert k.metadata.shared <= hopper.SMEM_LIMIT
    # kv_empty: twice per group pipelined (loop, last tile), once plain; ping-pong passes: once pipelined, twice plain
    arrives = 2 * ((2 if cfg.pipeline else 1) + (0 if not cfg.pingpong else 1 if cfg.pipeline else 2))
    assert ptx.count("mbarrier.arrive.shared::cta.b64") == arrives


_CTA_BARRIER = re.compile(r"^\s*(?:@%p\d+\s+)?(?:bar|barrier)\.(?:sync|arrive|red|cta\.\w+)\b")


def consumer_loops(ptx: str) -> list:
    """The innermost loops of ``ptx`` that issue wgmma (the consumer groups' main loops), each as
    its lines, in order of the loops. Loops are read from the loop comments LLVM writes at each
    basic block (``=>  This Inner Loop Header``, ``in Loop: Header=``)."""
    lines = ptx.splitlines()
    blocks, inner = [], set()  # (label, innermost loop header or None, body lines)
    for i, ln in enumerate(lines):
        m = re.match(r"^\$(L__BB\d+_\d+):", ln)
        if not m:
            if blocks:
                blocks[-1][2].append(ln)
            continue
        label, header, j = m.group(1), None, i
        while j < len(lines) and (j == i or lines[j].strip().startswith("//")):
            h = re.search(r"in Loop: Header=BB(\d+_\d+)", lines[j])
            header = "L__BB" + h.group(1) if h else header
            if "Inner Loop Header" in lines[j]:
                header = label
                inner.add(label)
            j += 1
        blocks.append((label, header, []))
    loops: dict = {}
    for _, header, body in blocks:
        if header in inner:
            loops.setdefault(header, []).extend(body)
    return [body for body in loops.values() if any("wgmma.mma_async" in ln for ln in body)]


def loop_barriers(ptx: str) -> list:
    """The CTA barriers (``bar.sync``, ``barrier.sync``, ``bar.arrive``...; not ``bar.warp.sync``)
    per iteration of each consumer loop of ``ptx`` (:func:`consumer_loops`)."""
    return [sum(bool(_CTA_BARRIER.match(ln)) for ln in body) for body in consumer_loops(ptx)]


def test_loop_barriers_reads_loops():
    ptx = """
$L__BB0_1:
	bar.sync 	0, 128;
$L__BB0_2:                              // =>This Inner Loop Header: Depth=1
	bar.sync 	0, 128;
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 x;
	bar.warp.sync 	-1;
$L__BB0_3:                              //   in Loop: Header=BB0_2 Depth=1
	@%p3 bar.sync 	2, 128;
	@%p1 bra 	$L__BB0_2;
$L__BB0_4:                              // =>This Inner Loop Header: Depth=1
	barrier.sync 	1;
	@%p1 bra 	$L__BB0_4;
"""
    assert loop_barriers(ptx) == [2]  # the loop without wgmma (a producer's) and code outside loops left out


@pytest.mark.skipif(not _toolchain(), reason="needs Triton 3.6's Gluon and its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("kw, per_step", [({}, 2), ({"thread_arrive": True}, 1), ({"pingpong": True}, 3),
                                          ({"pingpong": True, "thread_arrive": True}, 1),
                                          ({"pipeline": False, "pingpong": True, "thread_arrive": True}, 1),
                                          ({"thread_arrive": True, "unroll": 2}, 1)],
                         ids=["default", "thread_arrive", "pingpong", "pingpong-thread_arrive",
                              "plain-pingpong-thread_arrive", "thread_arrive-unroll2"])
def test_main_loop_barriers(kw, per_step):
    """CTA barriers per step of each consumer group's main loop (a key tile; two with ``unroll=2``)
    of the dense D=128 bf16 forward (docs/hopper.md, "Barriers in the main loop"): Triton puts a
    ``bar.sync`` of the group before its first ``mbarrier.wait`` of a step (two waits on one barrier
    allocation need a sync between them) and Gluon's ``mbarrier.arrive`` syncs the group before
    arriving (on ``kv_empty``, and on the other group's turn with ping-pong); ``thread_arrive``
    leaves the first one only, and ``unroll=2`` has it once per two tiles. About 7 s each."""
    import dataclasses
    cfg = dataclasses.replace(hopper.config_for(128), **kw)
    k = hopper.compile_sm90(attndsl.compile().spec, "bf16", 128, cfg)
    ptx = k.asm["ptx"]
    assert loop_barriers(ptx) == [per_step, per_step]  # both consumer groups
    # a step's Q·Kᵀ and P·V are 8 wgmma each (k of 16): one tile a step, or two
    tiles = [sum("wgmma.mma_async" in ln for ln in body) // 16 for body in consumer_loops(ptx)]
    assert tiles == [kw.get("unroll", 1)] * 2
    # thread_arrive: every thread of both groups arrives on kv_empty (which counts all 256 of
    # them) and on the turns (128), none through Gluon's arrive
    inits = {int(n) for n in re.findall(r"mbarrier\.init\.shared::cta\.b64 \[%r\d+\], (\d+);", ptx)}
    if kw.get("thread_arrive"):
        assert "cp.async.mbarrier.arrive.noinc" in ptx and "mbarrier.arrive.shared::cta.b64" not in ptx
        assert inits == {1, 128, 256}
    else:
        assert "cp.async.mbarrier.arrive" not in ptx and inits == {1, 2}


# -- the backward (codegen/hopper_bwd.py, attndsl/runtime/hopper_bwd.py) ------------------------

from attndsl.codegen import hopper_bwd as gen_bwd  # noqa: E402
from attndsl.runtime import hopper_bwd  # noqa: E402

_LENGTHS = torch.tensor([100, 77], dtype=torch.int32)


def key_padding(b, h, q_idx, kv_idx):
    # a mask reading a captured tensor (per-batch lengths) with a closed-form visit range
    return kv_idx < _LENGTHS[b]


def _bwd_cases():
    from attndsl.patterns import alibi, alibi_slopes, document
    ids = torch.tensor([0] * 40 + [1] * 50 + [2] * 38, dtype=torch.int32)
    return {"document": (document(ids), None), "dense": (None, None), "causal": (causal, None),
            "window": (window, None), "softcap": (None, softcap),
            "causal_distance_bias": (causal, distance_bias), "either": (either, None),
            "alibi": (causal, alibi(alibi_slopes(4))), "key_padding": (key_padding, None)}


def test_backward_supported_patterns_render():
    for name, (mask, score) in _bwd_cases().items():
        spec = attndsl.compile(mask_mod=mask, score_mod=score).spec
        assert gen_bwd.supports_backward(spec) is None, name
        hb = hopper_bwd.HopperBackward(spec)
        assert hb.unsupported is None and hb.spec.name != hopper.hopper_spec(spec).name  # a module of its own
        src = gen_bwd.render(hb.spec)
        assert src == gen_bwd.render(hb.spec), name  # pure: the cache compares texts
        compile(src, "<hopper-bwd>", "exec")
        for what in ("gl.warp_specialize", "warpgroup_mma", "tma.async_copy_global_to_shared", "async_atomic_add(dq_desc",
                     "mbarrier.arrive(qdo_empty"):
            assert what in src, (name, what)
        if mask is not None:
            assert "s = gl.where(" in src, name
        if score is not None:
            assert "dsT = dsT * dmod" in src, name  # the score modifier's derivative
        if name == "alibi":
            assert "buf0, buf0_size0, buf0_stride0" in src
        # a group skips the partial tiles its own keys do not see (not with a block table)
        assert ("visit = (it < n_full) | (" in src) == (spec.tile_nonempty is not None and not spec.data_dependent)
        if name == "document":  # a block table's plan; ids[kv] read once per program, before the loops
            assert spec.data_dependent and "TBL_PART + tbl_off" in src and "gl.load(TBL_CNT" in src
            assert src.index("buf0 + ") < src.index("for g in range(0, GROUP):", src.index("_consumer("))
        # per-tile classification
        if not spec.data_dependent and spec.bwd_range.tile_check and spec.tile_full is not None:
            assert "is_partial = is_partial & (" in src, name


def test_backward_unsupported_patterns_are_refused_with_a_reason():
    temperature = torch.ones(4, requires_grad=True)

    def learnable_bias(score, b, h, q_idx, kv_idx):
        return score * temperature[h]

    cases = {"sigmoid": attndsl.compile(mask_mod=causal, normalizer="sigmoid").spec,
             "learnable": attndsl.compile(mask_mod=causal, score_mod=learnable_bias).spec}
    for what, spec in cases.items():
        why = gen_bwd.supports_backward(spec)
        assert why, what
        if what == "learnable":
            assert "learnable" in why and gen.supports(spec) is None  # the forward still renders it
        with pytest.raises(ValueError, match="does not render"):
            gen_bwd.render(spec)
        assert hopper_bwd.HopperBackward(spec).unsupported == why


def test_backward_never_selected_off_sm90(monkeypatch):
    hb = hopper_bwd.HopperBackward(attndsl.compile(mask_mod=causal).spec)
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    try:
        monkeypatch.setenv("ATTNDSL_HOPPER_BWD", "1")
        hopper_bwd.enable_backward(None)  # the environment is read on first use and here
        assert hopper_bwd.backward_enabled()
        assert not hb.applies(q, q, q, q)  # CPU tensors
        monkeypatch.setenv("ATTNDSL_HOPPER_BWD", "0")
        assert hopper_bwd.backward_enabled()  # kept: calls do not read the environment
        hopper_bwd.enable_backward(None)
        assert hopper_bwd.backward_enabled() is False
        monkeypatch.delenv("ATTNDSL_HOPPER_BWD")
        monkeypatch.setenv("ATTNDSL_HOPPER", "1")
        hopper.enable(None)
        hopper_bwd.enable_backward(None)
        assert hopper_bwd.backward_enabled() is None  # the forward's switch is not the backward's
        hopper_bwd.enable_backward(True)
        monkeypatch.setenv("ATTNDSL_HOPPER_BWD", "0")
        hopper_bwd.enable_backward(True)
        assert hopper_bwd.backward_enabled()  # enable_backward wins over the environment
    finally:
        monkeypatch.undo()  # the environment as it was, then the switches follow it
        hopper.enable(None)
        hopper_bwd.enable_backward(None)


def test_measured_backward_wins_classes():
    """With neither switch set, the Hopper backward is taken for the shape classes measured faster on
    an H100, with the dQ mode measured best there: dense attention (D=128 from 16·4096², dQ by the
    portable kernel; D=64 from 8·12·2048², atomic), masks whose range grows along the query tiles
    (atomic from 16·8192², with GQA from 32·8192², with a score mod from 16·16384²), other masks whose
    closed-form range visits at least ``OTHER_MIN_QUERIES`` query rows per program (from 16·16384²,
    dQ by the portable kernel); narrower or data-dependent masks, short calls, score mods, fp16 and
    causal D=64 stay portable."""
    from attndsl.patterns import document, sliding_window

    def softcap(score, b, h, q_idx, kv_idx):
        return 30.0 * torch.tanh(score / 30.0)

    def take(q, k=None, **kw):
        hb = hopper_bwd.HopperBackward(attndsl.compile(**kw).spec)
        cfg = hopper_bwd._measured_win(hb, q, q if k is None else k)
        return None if cfg is None else cfg.dq

    x = lambda B, H, L, D=128: torch.empty(B, H, L, D, dtype=torch.bfloat16)  # noqa: E731
    assert take(x(1, 16, 4096)) == "kernel"
    assert take(x(1, 16, 2048)) is None
    assert take(x(1, 16, 8192), mask_mod=causal) == "atomic"
    assert take(x(1, 16, 4096), mask_mod=causal) is None
    assert take(x(1, 32, 8192), x(1, 8, 8192), mask_mod=causal) == "atomic"  # GQA: atomic since dq_early
    assert take(x(1, 16, 16384), mask_mod=sliding_window(1024)) == "kernel"  # 1151 query rows per program
    assert take(x(1, 16, 8192), mask_mod=sliding_window(1024)) is None  # shorter than measured
    assert take(x(1, 16, 16384), mask_mod=sliding_window(512)) is None  # 639 rows: too few
    docs = torch.arange(16384) // 1024
    assert take(x(1, 16, 16384), mask_mod=document(docs)) is None  # data-dependent: "other", work in its table
    assert take(x(8, 12, 2048, 64)) == "atomic"
    assert take(x(8, 12, 2048, 64), mask_mod=causal) is None
    assert take(x(1, 16, 16384), mask_mod=causal, score_mod=softcap) == "atomic"
    assert take(x(1, 16, 8192), mask_mod=causal, score_mod=softcap) is None  # shorter than measured
    assert take(x(1, 16, 16384), score_mod=softcap) is None  # a score mod without a mask: unmeasured
    assert take(x(1, 16, 16384).half(), mask_mod=causal) is None
    for (_, _, d, _, _), (_, cfg) in hopper_bwd.MEASURED_BWD_WINS.items():
        assert cfg.shared_bytes(d) <= hopper.SMEM_LIMIT


def test_hopper_selection_keeps_mean_visited_per_shape():
    """The runtime's ``visited`` is :func:`attndsl.passes.visit_width.mean_visited` of the runner's
    spec, kept per shape; a data-dependent mask is classed "other" whatever its closed-form bound
    says (the pass's own tests: ``tests/test_visit_width.py``)."""
    from attndsl.passes.visit_width import mean_visited
    from attndsl.patterns import document, sliding_window

    win = attndsl.compile(mask_mod=sliding_window(1024)).spec
    w = mean_visited(win, win.bwd_range, 16384, 16384, 128)
    docs = attndsl.compile(mask_mod=document(torch.zeros(256, dtype=torch.int64))).spec
    assert hopper_bwd.HopperBackward(docs).plan == "other" and hopper.HopperForward(docs).plan == "other"
    hb = hopper_bwd.HopperBackward(win)
    assert hopper.visited(hb, hb.spec.bwd_range, 16384, 16384, 128) == w
    assert ("q", 16384, 16384, 128) in hb._visited  # kept per shape
    for n in range(1, 300):  # lengths that vary call by call: the map stays bounded
        hopper.visited(hb, hb.spec.bwd_range, 128 * n, 128 * n, 128)
    assert len(hb._visited) <= hopper.MEMO_SIZE


def test_backward_config_checks():
    with pytest.raises(ValueError, match="consumers"):
        hopper_bwd.HopperBwdConfig(consumers=3)
    with pytest.raises(ValueError, match="block_m and block_n"):
        hopper_bwd.HopperBwdConfig(block_n=128)
    with pytest.raises(ValueError, match="head dims 64 and 128"):
        hopper_bwd.bwd_config_for(96)
    with pytest.raises(ValueError, match="dq must be 'atomic' or 'kernel', got 'tma'"):
        hopper_bwd.HopperBwdConfig(dq="tma")
    split = hopper_bwd.HopperBwdConfig(dq="kernel")
    assert split.shared_bytes(128) == split.shared_bytes(128, False) < split.shared_bytes(128, True)
    assert hopper_bwd.HopperBwdConfig(dq_early=True).early_dq(128, True)
    assert not hopper_bwd.HopperBwdConfig(dq_early=True).early_dq(128, False)  # no atomic dQ: nothing to order
    assert not hopper_bwd.HopperBwdConfig(dq_early=True).early_dq(64, True)  # two groups take turns at D=64
    assert hopper_bwd.HopperBwdConfig(dq_early=True, consumers=1).early_dq(64, True)
    assert hopper_bwd.HopperBwdConfig().early_dq(128, True)  # on by default (measured: causal 3% faster)
    assert not hopper_bwd.HopperBwdConfig(dq_early=False).early_dq(128, True)
    swept = hopper_bwd.sweep_configs(128)
    assert {c.dq for c in swept} == {"atomic", "kernel"} and len(set(swept)) == len(swept)
    assert {c.dq_early for c in swept if c.dq == "atomic"} == {True, False}  # both orders timed
    assert all(c.shared_bytes(128) <= hopper.SMEM_LIMIT for c in swept)


@pytest.mark.skipif(not _toolchain(), reason="needs Triton 3.6's Gluon and its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("name,head_dim,dq_atomic", [("dense", 128, True), ("causal", 64, True),
                                                      ("window", 128, False), ("causal_distance_bias", 128, True),
                                                      ("alibi", 64, True), ("key_padding", 128, True),
                                                      ("either", 64, False), ("document", 128, True)])
def test_backward_compiles_for_sm90(name, head_dim, dq_atomic):
    """The generated backward compiles for sm_90 (about 3-5 s each) with the warp-specialised
    machinery and, with DQ_ATOMIC, dQ's TMA reduce-add in its PTX (one per consumer group's code;
    Triton splits a tile wider than the swizzle into one message per warp), no per-element atomics."""
    mask, score = _bwd_cases()[name]
    spec = attndsl.compile(mask_mod=mask, score_mod=score).spec
    k = hopper_bwd.compile_sm90_bwd(spec, "bf16" if head_dim == 128 else "fp16", head_dim, dq_atomic=dq_atomic)
    ptx = k.asm["ptx"]
    for what in ("wgmma.mma_async", "setmaxnreg", "cp.async.bulk.tensor", "mbarrier.try_wait"):
        assert what in ptx, what
    reduces = ptx.count("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add")
    # one per consumer group's code, and one more in each where a group skips the tiles its keys do
    # not see (it still takes its share of the tile's dQ)
    paths = 2 if gen_bwd._own_tiles(hopper_bwd.HopperBackward(spec).spec) is not None else 1
    assert reduces == (2 * paths if dq_atomic else 0), reduces
    assert "red.global.add.f32" not in ptx and "atom.global.gpu.relaxed.add.f32" not in ptx
    if not spec.buffers and not spec.data_dependent:
        # global loads: only the producer's lse and delta (two rows per lane); the consumer groups read
        # them from shared memory (their own loads' latency stalled them: ncu, H100, 2026-12-07)
        assert ptx.count("ld.global") == 4, ptx.count("ld.global")


@pytest.mark.skipif(not _toolchain(), reason="needs Triton 3.6's Gluon and its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("name", ["dense", "causal", "document"])
def test_backward_early_dq_order_compiles_for_sm90(name):
    """``HopperBwdConfig(dq_early=True)`` at D=128 (two groups, each its 64 columns every tile): the
    same reduce-adds, and two of the consumer code's waits for all wgmmas become waits that leave
    one (dK's) in flight."""
    mask, score = _bwd_cases()[name]
    spec = attndsl.compile(mask_mod=mask, score_mod=score).spec
    ptx = {early: hopper_bwd.compile_sm90_bwd(spec, "bf16", 128, cfg=hopper_bwd.HopperBwdConfig(dq_early=early))
           .asm["ptx"] for early in (False, True)}
    red = "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add"
    assert ptx[True].count(red) == ptx[False].count(red) > 0
    keep_one = "wgmma.wait_group.sync.aligned 1;"
    assert ptx[True].count(keep_one) == ptx[False].count(keep_one) + 2


def test_backward_refuses_a_config_past_shared_memory():
    """Two groups with a 4-deep ring at D=128 need more than sm_90's 227 KiB with the shared dSᵀ and
    the groups' float32 dQ tiles: a clear error before any launch; the deterministic variant (neither)
    fits."""
    cfg = hopper_bwd.HopperBwdConfig(consumers=2, stages=4)
    assert cfg.shared_bytes(128, True) > hopper_bwd.SMEM_LIMIT >= cfg.shared_bytes(128, False)
    assert hopper_bwd.bwd_config_for(128).shared_bytes(128, True) <= hopper_bwd.SMEM_LIMIT
    assert hopper_bwd.bwd_config_for(64).shared_bytes(64, True) <= hopper_bwd.SMEM_LIMIT
    spec = attndsl.compile().spec
    q, k, v, do = (torch.randn(1, 1, 64, 128, dtype=torch.bfloat16) for _ in range(4))
    lse = delta = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match=r"stages=4.*consumers=2.*head dim 128 with atomic dQ, more than sm_90's"):
        hopper_bwd.HopperBackward(spec).backward(q, k, v, do, lse, delta, torch.empty_like(k), torch.empty_like(v),
                                                 0.1, cfg=cfg)


@pytest.mark.skipif(not _toolchain(), reason="needs Triton 3.6's Gluon and its NVIDIA backend (ptxas)")
@pytest.mark.parametrize("consumers,stages,head_dim,dq_atomic", [(2, 2, 128, True), (2, 3, 128, True),
                                                                 (1, 3, 128, True), (2, 4, 64, True),
                                                                 (1, 4, 64, True), (2, 3, 128, False)])
def test_backward_shared_memory_estimate(consumers, stages, head_dim, dq_atomic):
    """``HopperBwdConfig.shared_bytes`` never under the compiled kernel's shared memory, and within 1 KiB."""
    cfg = hopper_bwd.HopperBwdConfig(consumers=consumers, stages=stages)
    k = hopper_bwd.compile_sm90_bwd(attndsl.compile().spec, "bf16", head_dim, cfg=cfg, dq_atomic=dq_atomic)
    assert 0 <= cfg.shared_bytes(head_dim, dq_atomic) - k.metadata.shared <= 1024


class _StandIn:
    """A Hopper backward that applies to every call (CPU tensors): fills dK with 1 and dV with 2 and
    returns dQ of 3s (None when deterministic); as the real one, asks for the block table of its
    tiles where the mask is data-dependent."""

    def __init__(self, data_dependent: bool):
        self.data_dependent = data_dependent
        self.calls, self.tables = [], []

    def applies(self, q, k, v, dout, extras=None, tables=None, precise=False):
        return True

    def config(self, q, k):
        return hopper_bwd.HopperBwdConfig()

    def backward(self, q, k, v, dout, lse, delta, dk, dv, scale, buffers=(), deterministic=False, cfg=None,
                 table=None, key=None):
        self.calls.append(deterministic)
        if self.data_dependent:
            self.tables.append(table(128, 64))
        dk.fill_(1.0)
        dv.fill_(2.0)
        return None if deterministic else torch.full_like(q, 3.0)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_hook_in_runner(deterministic):
    """``Runner.backward`` with a Hopper backward that applies (a stand-in, on the CPU): the portable
    dK/dV kernel does not run (dK/dV are the stand-in's), dQ is the stand-in's, or with
    ``deterministic`` the portable dQ kernel's (matching the float64 reference); a document mask's
    stand-in gets the transposed block table of its tiles (rows of 128 keys)."""
    import attndsl.reference
    from attndsl.patterns import document
    ids = torch.tensor([0] * 40 + [1] * 50 + [2] * 38, dtype=torch.int32)
    for mask in (causal, document(ids)):
        comp = attndsl.compile(mask_mod=mask, deterministic=deterministic)
        q, k, v = (torch.randn(1, 2, 128, 64, requires_grad=True) for _ in range(3))
        dout = torch.randn(1, 2, 128, 64)
        runner = comp.runner(q)
        stand_in = _StandIn(comp.spec.data_dependent)
        runner.hopper_bwd = stand_in
        try:
            comp(q, k, v).backward(dout)
        finally:
            runner.hopper_bwd = None
        assert stand_in.calls == [deterministic]
        assert torch.equal(k.grad, torch.ones_like(k)) and torch.equal(v.grad, torch.full_like(v, 2.0))
        if deterministic:
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            out64, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=mask)
            (want,) = torch.autograd.grad(out64, q64, dout.double())
            assert float((q.grad.double() - want).abs().max()) <= 1e-3 * float(want.abs().max())
        else:
            assert torch.equal(q.grad, torch.full_like(q, 3.0))
        if comp.spec.data_dependent:
            (t,) = stand_in.tables
            assert t.full.shape[2] == 1  # one row of 128 keys (Lkv = 128)
        else:
            assert stand_in.tables == []
