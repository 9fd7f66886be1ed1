"""The backward's atomic dQ mode (``Configs.dq_mode == "atomic"``, ``ATTNDSL_ATOMIC_DQ=1``): the dK/dV
kernel adds dQ = dS·K (and dU, and the learnable tensors' gradients) with atomic adds and the dQ
kernel does not run. Gradients against the float64 reference and against the two-kernel mode, in
the CPU interpreter (conftest.py poisons outputs: an element nobody writes is NaN); the mode's
selection (environment, process switch, configs, tuned entries, the autotuner, determinism).

``test_gpu_atomic_dq_matches_two_kernels`` checks the same on a GPU; ``benchmarks/atomic_dq.py``
times both modes there."""
from __future__ import annotations

import math

import pytest
import torch

import attndsl
from attndsl.runtime import config, tuned
from attndsl.runtime.config import Configs, TileConfig, atomic_dq


def causal(b, h, q, k):
    return q >= k


@pytest.fixture(autouse=True)
def _mode_follows_configs(monkeypatch):
    """Each test decides the dQ mode itself: no process switch or environment left over (after it,
    the environment as monkeypatch restores it is read again on first use)."""
    _set_env(monkeypatch, None)
    yield
    config.SWITCH.forget()


def _set_env(monkeypatch, value: str | None) -> None:
    """Set (None: unset) ``ATTNDSL_ATOMIC_DQ`` and have the runtime read it again (it reads it once)."""
    if value is None:
        monkeypatch.delenv(config.ATOMIC_DQ_ENV, raising=False)
    else:
        monkeypatch.setenv(config.ATOMIC_DQ_ENV, value)
    config.enable_atomic_dq(None)


def _grads(attn, inputs, learn, do, **kw):
    q, k, v = inputs
    o = attn(q, k, v, **kw)
    return torch.autograd.grad(o, [q, k, v, *learn], do)


def _both_modes(attn, inputs, learn, do, **kw):
    """(two-kernel gradients, atomic gradients) of one compiled pattern."""
    got = {}
    for atomic in (False, True):
        config.enable_atomic_dq(atomic)
        got[atomic] = _grads(attn, inputs, learn, do, **kw)
    config.enable_atomic_dq(None)
    return got[False], got[True]


def _close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.isfinite(a).all(), f"{what}: gradient {i} has NaN/inf (an element not written?)"
        err = float((a.double() - b.double()).abs().max())
        ref = max(float(b.double().abs().max()), 1e-6)
        assert err <= tol * ref, f"{what}: gradient {i} max error {err:.3g} (largest {ref:.3g})"


def _qkv(B, Hq, Hkv, Lq, Lkv, D, Dv=None, dtype=torch.float32):
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, Lkv, D, dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, Lkv, Dv or D, dtype=dtype, requires_grad=True)
    return q, k, v


def test_gqa_causal_learnable_score_mod_and_sinks():
    """The headline case: GQA (two query heads per K/V head: each adds into its own dQ rows), Lq !=
    Lkv, lengths that are no tile multiples, causal, a score mod over a learnable per-head tensor,
    and learnable sinks: against the float64 reference and the two-kernel mode."""
    torch.manual_seed(0)
    B, Hq, Hkv, Lq, Lkv, D = 2, 4, 2, 37, 53, 32
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lkv, D)
    slope = torch.rand(Hq, requires_grad=True)
    sinks = torch.randn(Hq, requires_grad=True)

    def mod(s, b, h, qi, ki):
        return s - slope[h] * (qi - ki).abs()
    # bottom-right aligned causal would leave no row empty; top-left leaves the later keys unseen
    attn = attndsl.compile(mask_mod=causal, score_mod=mod, block_m=16, block_n=16)
    do = torch.randn(B, Hq, Lq, D)
    two, one = _both_modes(attn, (q, k, v), [slope, sinks], do, sinks=sinks)
    _close(one, two, 1e-5, "atomic vs two kernels")
    ro, _ = attndsl.reference.attention(q, k, v, mask_mod=causal, score_mod=mod, sinks=sinks)
    want = torch.autograd.grad(ro, [q, k, v, slope, sinks], do.double())
    _close(one, want, 1e-4, "atomic vs float64 reference")


#: learnable tensors of each gradient scope (``GradLoad.scope``): how the dK/dV kernel adds them
SCOPES = ["row", "col", "exact", "t5"]


@pytest.mark.parametrize("kind", SCOPES)
def test_learnable_scopes(kind):
    """Each scope's gradient (row: per query, col: per key, exact: per pair, t5: a relative-position
    table summed per diagonal, with constant-run loops, beside a learnable low-rank bias) from the
    dK/dV kernel equals the dQ kernel's."""
    torch.manual_seed(1)
    B, Hq, Hkv, Lq, Lkv, D = 1, 2, 1, 45, 61, 16
    if kind == "row":
        t = torch.randn(Lq, requires_grad=True)

        def mod(s, b, h, qi, ki):
            return s * torch.sigmoid(t[qi])
    elif kind == "col":
        t = torch.randn(Hq, Lkv // 2 + 1, requires_grad=True)

        def mod(s, b, h, qi, ki):
            return s + t[h, ki // 2]
    elif kind == "exact":
        t = torch.randn(B, Hq, Lq, Lkv, requires_grad=True)

        def mod(s, b, h, qi, ki):
            return s + t[b, h, qi, ki]
    else:
        from attndsl.patterns.relative_bias import t5_bucket_bias
        t = torch.randn(Hq, 16, requires_grad=True)
        mod = t5_bucket_bias(t, 16, 24, bidirectional=False)
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lkv, D)
    learn, kw = [t], {}
    if kind == "t5":
        uw = (torch.randn(B, Hq, Lq, 2, requires_grad=True), torch.randn(B, Hkv, Lkv, 2, requires_grad=True))
        learn, kw = [t, *uw], {"bias_factors": uw}
    attn = attndsl.compile(mask_mod=causal, score_mod=mod, block_m=16, block_n=16)
    do = torch.randn(B, Hq, Lq, D)
    two, one = _both_modes(attn, (q, k, v), learn, do, **kw)
    _close(one, two, 1e-5, f"{kind}: atomic vs two kernels")


def test_sigmoid_low_rank_bias_and_split_head_dim():
    """Sigmoid attention, a learnable low-rank bias (dU added from the dK/dV kernel) and a head dim
    of 48 (tiles 32 + 16: dQ's second part) with a value head dim of 24, no mask."""
    torch.manual_seed(2)
    B, Hq, Hkv, Lq, Lkv, D, R = 1, 2, 2, 33, 50, 48, 4
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lkv, D, Dv=24)
    u = torch.randn(B, Hq, Lq, R, requires_grad=True)
    w = torch.randn(B, Hkv, Lkv, R, requires_grad=True)
    attn = attndsl.compile(normalizer="sigmoid", block_m=16, block_n=16)
    do = torch.randn(B, Hq, Lq, 24)
    two, one = _both_modes(attn, (q, k, v), [u, w], do, bias_factors=(u, w))
    _close(one, two, 1e-5, "atomic vs two kernels")
    ro, _ = attndsl.reference.attention(q, k, v, normalizer="sigmoid", bias_factors=(u, w))
    want = torch.autograd.grad(ro, [q, k, v, u, w], do.double())
    _close(one, want, 1e-4, "atomic vs float64 reference")


def test_document_mask_block_tables():
    """A data-dependent mask (documents): the dK/dV kernel's visit plan is its transposed block
    table; every pair it skips adds nothing to dQ."""
    from attndsl.patterns.document import doc_ids_from_lengths, document
    torch.manual_seed(3)
    Lq = 70
    ids = doc_ids_from_lengths(torch.tensor([9, 30, 31]))
    q, k, v = _qkv(1, 2, 1, Lq, Lq, 16)
    mask = document(ids)
    attn = attndsl.compile(mask_mod=mask, block_m=16, block_n=16)
    do = torch.randn(1, 2, Lq, 16)
    two, one = _both_modes(attn, (q, k, v), [], do)
    _close(one, two, 1e-5, "atomic vs two kernels")


def test_layout_box_plan_and_block_selection():
    """Visit plans of other shapes: a layout's box plan (2-D neighbourhood on an 8x8 grid in 4x4
    tiles) and a block selection (MoBA/NSA blocks, GQA, its own transposed tables), each against
    the two-kernel mode; the block selection against the float64 reference too."""
    from attndsl import Layout
    from attndsl.selectors import BlockSelection
    torch.manual_seed(8)
    lay = Layout((8, 8), tile=(4, 4))

    def na(b, h, qi, ki):
        (qy, qx), (ky, kx) = lay.coords(qi), lay.coords(ki)
        return ((qy - ky).abs() <= 1) & ((qx - kx).abs() <= 1)
    q, k, v = _qkv(1, 2, 1, 64, 64, 16)
    do = torch.randn(1, 2, 64, 16)
    attn = attndsl.compile(mask_mod=na, block_m=16, block_n=16)
    two, one = _both_modes(attn, (q, k, v), [], do)
    _close(one, two, 1e-5, "box plan: atomic vs two kernels")

    Lq, Lkv = 50, 70
    q, k, v = _qkv(1, 4, 2, Lq, Lkv, 16)
    idx = torch.randint(-1, 5, (1, 2, 4, 2), generator=torch.Generator().manual_seed(9))  # 16-row blocks
    sel = BlockSelection(idx.to(torch.int32), 16, 16)
    attn = attndsl.compile(mask_mod=causal)
    do = torch.randn(1, 4, Lq, 16)
    two, one = _both_modes(attn, (q, k, v), [], do, blocks=sel)
    _close(one, two, 1e-5, "blocks: atomic vs two kernels")
    ro, _ = attndsl.reference.block_sparse_attention(q, k, v, sel, mask_mod=causal)
    _close(one, torch.autograd.grad(ro, [q, k, v], do.double()), 1e-4, "blocks: atomic vs reference")


def _launched(monkeypatch) -> list:
    """The kernels (signature names) ``Runner._launch`` launches from now on, in order (conftest's
    ATTNDSL_VERIFY_MEMO sends memoised launches through it too)."""
    from attndsl.runtime import launch
    launched, real = [], launch.Runner._launch

    def spy(self, kernel, *a, **kw):
        launched.append(self._signature_of[kernel])
        return real(self, kernel, *a, **kw)
    monkeypatch.setattr(launch.Runner, "_launch", spy)
    return launched


def test_deterministic_keeps_the_dq_kernel(monkeypatch):
    """deterministic=True ignores the atomic mode, however it is asked for: gradients bitwise
    repeatable, and the dQ kernel launched."""
    _set_env(monkeypatch, "1")
    assert not atomic_dq(Configs(*[TileConfig(16, 16)] * 3, dq_mode="atomic"), deterministic=True)
    torch.manual_seed(4)
    t = torch.rand(2, requires_grad=True)

    def mod(s, b, h, qi, ki):
        return s - t[h] * (qi - ki)
    q, k, v = _qkv(1, 2, 1, 40, 40, 16)
    attn = attndsl.compile(mask_mod=causal, score_mod=mod, block_m=16, block_n=16, deterministic=True)
    do = torch.randn(1, 2, 40, 16)
    launched = _launched(monkeypatch)
    g1 = _grads(attn, (q, k, v), [t], do)
    g2 = _grads(attn, (q, k, v), [t], do)
    assert "bwd_dq" in launched
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_the_mode_is_decided_in_one_place(monkeypatch):
    """``config.atomic_dq``: the process switch over the environment over the configs; a runner
    follows a change between calls (its prepared backward too) and launches no dQ kernel in the
    atomic mode."""
    tiles = [TileConfig(16, 16)] * 3
    kernel, atomic = Configs(*tiles), Configs(*tiles, dq_mode="atomic")
    assert not atomic_dq(kernel, False) and atomic_dq(atomic, False)
    monkeypatch.setenv(config.ATOMIC_DQ_ENV, "1")
    assert not atomic_dq(kernel, False)  # read once: calls do not look at the environment
    config.enable_atomic_dq(None)  # ... until it is read again
    assert atomic_dq(kernel, False)
    _set_env(monkeypatch, "0")
    assert not atomic_dq(atomic, False)
    config.enable_atomic_dq(True)
    assert atomic_dq(kernel, False) and config.forced_dq_mode() == "atomic"
    _set_env(monkeypatch, None)
    with pytest.raises(ValueError, match="dq_mode"):
        Configs(*tiles, dq_mode="atomics")

    from attndsl.runtime import launch
    launched = _launched(monkeypatch)
    torch.manual_seed(5)
    q, k, v = _qkv(1, 2, 2, 24, 24, 16)
    attn = attndsl.compile(mask_mod=causal, block_m=16, block_n=16)
    do = torch.randn(1, 2, 24, 16)
    results = []
    for mode in ("0", "1", "1", "0"):  # the repeated call takes the prepared (memoised) launches
        _set_env(monkeypatch, mode)
        launched.clear()
        results.append(_grads(attn, (q, k, v), [], do))
        if mode == "1":
            assert "bwd_dq" not in launched
    # the prepared launches themselves (conftest's ATTNDSL_VERIFY_MEMO checks them, then launches
    # the ordinary way): a zeroed float32 dQ for the memoised dK/dV launch, no dQ launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", False)
    fast = []
    real_fast = launch.FastBackward._launch

    def fast_spy(self, *a):
        fast.append(self.atomic)
        return real_fast(self, *a)
    monkeypatch.setattr(launch.FastBackward, "_launch", fast_spy)
    for mode in ("1", "1", "0", "0", "1", "1"):  # a changed mode takes the ordinary path once
        _set_env(monkeypatch, mode)
        results.append(_grads(attn, (q, k, v), [], do))
    assert fast == [True, False, True]
    for g in results[1:]:
        _close(g, results[0], 1e-5, "modes and prepared calls")


def test_tuned_entry_records_the_mode(tmp_path, monkeypatch):
    """A tuned entry's "dq_mode" round-trips through its JSON and is installed with its tiles; the
    autotuner times both modes (whole backwards) and keeps the faster."""
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuned, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.delenv("ATTNDSL_TUNING", raising=False)
    from attndsl import tuning
    tuning.reset()
    try:
        c = TileConfig(16, 16, 4, 1, tma=True)
        entry = tuned.Tuned("k", Configs(c, c, c, dq_mode="atomic"))
        back = tuned.Tuned.from_json("k", entry.to_json())
        assert back.configs.dq_mode == "atomic" and back == entry
        with pytest.raises(ValueError, match="dq_mode"):  # a damaged entry (``tuned._read`` skips it)
            tuned.Tuned.from_json("k", {**entry.to_json(), "dq_mode": "bogus"})
        old = entry.to_json()
        del old["dq_mode"]  # entries written before the mode existed
        assert tuned.Tuned.from_json("k", old).configs.dq_mode == "kernel"

        torch.manual_seed(6)
        q, k, v = (x.detach() for x in _qkv(1, 2, 1, 40, 40, 16))
        fast = {"kernel": 2.0, "atomic": 1.0}
        res = tuning.autotune(causal, q, k, v, candidates={"fwd": [c], "dkdv": [c], "dq": [c]},
                              timer=lambda fn, kn, cfg: fast.get(cfg, 1.0) if kn == "dq_mode" else 1.0,
                              progress=False)
        modes = {t.config: t for t in res.trials if t.kernel == "dq_mode"}
        assert set(modes) == {"kernel", "atomic"} and not res.skipped
        assert res.tuned.configs.dq_mode == "atomic"
        assert "dq_mode: atomic" in str(res)
        tuning.reset()
        attn = attndsl.compile(mask_mod=causal)
        assert attn.runner(q, 16, k).cfg.dq_mode == "atomic"
        _set_env(monkeypatch, "0")  # a forced mode is not tuned
        res = tuning.autotune(causal, q, k, v, candidates={"fwd": [c], "dkdv": [c], "dq": [c]},
                              timer=lambda *a: 1.0, progress=False, save=False)
        assert all("forces the dQ mode" in t.error for t in res.trials if t.kernel == "dq_mode")
        assert res.tuned.configs.dq_mode == "kernel"
    finally:
        tuning.reset()


def _dkdv_consts(monkeypatch) -> list:
    """The ``DQ_TMA`` constant of each dK/dV launch from now on (memoised launches included: conftest's
    ATTNDSL_VERIFY_MEMO sends them through ``Runner._launch``)."""
    from attndsl.runtime import launch
    seen, real = [], launch.Runner._launch

    def spy(self, kernel, *a, **kw):
        if self._signature_of[kernel] == "bwd_dkdv":
            seen.append(kw.get("DQ_TMA"))
        return real(self, kernel, *a, **kw)
    monkeypatch.setattr(launch.Runner, "_launch", spy)
    return seen


@pytest.mark.parametrize("D", [32, 24])
def test_dq_tile_reduce_adds(monkeypatch, D):
    """``DQ_TMA`` (``config.dq_tma``): the atomic mode adds each dQ tile with one tensor-descriptor
    reduce-add (a TMA reduce on a GPU; conftest's interpreter emulates it) instead of one atomic per
    element: the same gradients, with query tiles past Lq (rows outside the descriptor) and, at
    D=24, a head narrower than its tile (columns outside); GQA, so heads add into their own rows.
    ``enable_dq_tma(False)`` (or ``ATTNDSL_DQ_TMA=0``) takes the element adds, and re-keys the
    prepared backward."""
    torch.manual_seed(11)
    B, Hq, Hkv, Lq, Lkv = 2, 4, 2, 37, 45
    q, k, v = _qkv(B, Hq, Hkv, Lq, Lkv, D)
    attn = attndsl.compile(mask_mod=causal, block_m=16, block_n=16)
    do = torch.randn(B, Hq, Lq, D)
    seen = _dkdv_consts(monkeypatch)
    config.enable_atomic_dq(True)
    try:
        got = {}
        for tma in (True, False, True):
            config.enable_dq_tma(tma)
            seen.clear()
            got[tma] = _grads(attn, (q, k, v), [], do)
            assert seen == [tma], seen
    finally:
        config.enable_atomic_dq(None)
        config.TMA_SWITCH.forget()
    _close(got[True], got[False], 1e-5, "tile reduce-adds vs element adds")
    ro, _ = attndsl.reference.attention(q, k, v, mask_mod=causal)
    want = torch.autograd.grad(ro, [q, k, v], do.double())
    _close(got[True], want, 1e-4, "tile reduce-adds vs float64 reference")
    monkeypatch.setenv(config.TMA_DQ_ENV, "0")
    config.enable_dq_tma(None)
    assert not config.dq_tma()
    monkeypatch.delenv(config.TMA_DQ_ENV)
    config.enable_dq_tma(None)
    assert config.dq_tma()


def test_prepared_backward_follows_the_dq_tma_switch(monkeypatch):
    """Without ATTNDSL_VERIFY_MEMO a repeated call takes the prepared backward (no ``_launch``); a change
    of ``enable_dq_tma`` between calls makes it step aside, so the dK/dV kernel is launched afresh with
    the new ``DQ_TMA`` instead of replaying the memoised one."""
    from attndsl.runtime import launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", False)
    torch.manual_seed(12)
    q, k, v = _qkv(1, 2, 1, 24, 24, 16)
    attn = attndsl.compile(mask_mod=causal, block_m=16, block_n=16)
    do = torch.randn(1, 2, 24, 16)
    seen = _dkdv_consts(monkeypatch)
    config.enable_atomic_dq(True)
    try:
        runs = []
        for tma in (True, True, False, False):
            config.enable_dq_tma(tma)
            seen.clear()
            runs.append(_grads(attn, (q, k, v), [], do))
            assert seen == ([] if len(runs) in (2, 4) else [tma]), (len(runs), seen)
    finally:
        config.enable_atomic_dq(None)
        config.TMA_SWITCH.forget()
    for g in runs[1:]:
        _close(g, runs[0], 1e-5, "prepared vs ordinary")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tma", [True, False])
@pytest.mark.parametrize("case", ["gpt2", "gqa_learnable_sinks"])
def test_gpu_atomic_dq_matches_two_kernels(case, tma):
    """On the GPU (bf16): the atomic mode's gradients match the two-kernel mode's and float32 SDPA's
    (GPT-2-like causal heads of 64; GQA 4:1 with heads of 128, a learnable per-head slope and
    learnable sinks against the float64 reference), with dQ tiles added by TMA reduce-adds (``tma``)
    or one atomic per element."""
    config.enable_dq_tma(tma)
    try:
        _gpu_atomic_case(case)
    finally:
        config.TMA_SWITCH.forget()


def _gpu_atomic_case(case):
    torch.manual_seed(7)
    dev, dt = "cuda", torch.bfloat16
    if case == "gpt2":
        B, Hq, Hkv, L, D = 2, 12, 12, 1000, 64
    else:
        B, Hq, Hkv, L, D = 1, 8, 2, 700, 128
    q = torch.randn(B, Hq, L, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(B, Hq, L, D, device=dev, dtype=dt)
    learn, kw, mod = [], {}, None
    if case != "gpt2":
        slope = torch.rand(Hq, device=dev, requires_grad=True)
        sinks = torch.randn(Hq, device=dev, requires_grad=True)
        learn, kw = [slope, sinks], {"sinks": sinks}

        def mod(s, b, h, qi, ki):
            return s - slope[h] * (qi - ki).abs() / 64
    attn = attndsl.compile(mask_mod=causal, score_mod=mod)
    two, one = _both_modes(attn, (q, k, v), learn, do, **kw)
    _close(one, two, 2e-2, "atomic vs two kernels")
    if case == "gpt2":
        ref = [x.detach().float().requires_grad_() for x in (q, k, v)]
        o = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True)
        want = torch.autograd.grad(o, ref, do.float())
    else:
        ro, _ = attndsl.reference.attention(q, k, v, mask_mod=causal, score_mod=mod, sinks=sinks)
        want = torch.autograd.grad(ro, [q, k, v, *learn], do.double())
    _close(one, want, 3e-2, "atomic vs reference")
    assert math.isfinite(float(one[0].float().sum()))
