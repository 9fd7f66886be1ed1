"""CUDA tests: the compiled kernels at realistic sizes in bf16/fp16 against the float64 oracle on the GPU.

Skipped without CUDA. Each case is one (pattern, dtype, head dim) so that the number of Triton
compilations stays small; the whole file is meant to run in about two minutes on an H100.
"""
import pytest
import torch

import attndsl
import attndsl.reference
from attndsl.dsl import trace
from attndsl.ir.evaluate import evaluate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
# max |got - want| / max(|want|) allowed, per dtype. Measured on an H100 (torch 2.11, triton 3.6):
# bf16 out <= 3.3e-3, grads <= 5.3e-3; fp16 out <= 4.3e-4, grads <= 6.3e-4; lse (fp32) <= 4e-7.
TOL = {torch.bfloat16: dict(out=1e-2, lse=1e-5, grad=2e-2), torch.float16: dict(out=2e-3, lse=1e-5, grad=4e-3),
       torch.float32: dict(out=1e-4, lse=1e-5, grad=1e-4)}


# --- patterns ------------------------------------------------------------------------------------
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding(w):
    def sliding_window(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < w)
    return sliding_window


def window_abs(w):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= w
    return window


def bottom_right(lq, lkv):
    off = lkv - lq

    def causal_br(b, h, q_idx, kv_idx):
        return q_idx + off >= kv_idx
    return causal_br


def document(lengths):
    ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths)).to(DEV)

    def doc(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
    return doc


def alibi(n_heads):
    slopes = torch.tensor([2.0 ** (-8.0 * (i + 1) / n_heads) for i in range(n_heads)], device=DEV)

    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi_bias


def softcap(cap):
    def capped(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)
    return capped


def prefix_lm(n):
    def plm(b, h, q_idx, kv_idx):
        return (kv_idx < n) | (q_idx >= kv_idx)
    return plm


def dead_rows(first_live):
    def m(b, h, q_idx, kv_idx):
        return (q_idx >= first_live) & (kv_idx <= q_idx)
    return m


def chunked(c):
    def m(b, h, q_idx, kv_idx):
        return (q_idx // c == kv_idx // c) & (q_idx >= kv_idx)
    return m


# --- helpers -------------------------------------------------------------------------------------
def inputs(B, Hq, Hkv, Lq, Lkv, D, dtype, seed=0):
    """``D``: one head dim, or (query/key, value) head dims."""
    D, Dv = D if isinstance(D, tuple) else (D, D)
    g = torch.Generator(device=DEV).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=DEV, dtype=torch.float32).to(dtype).requires_grad_()  # noqa
    return mk(B, Hq, Lq, D), mk(B, Hkv, Lkv, D), mk(B, Hkv, Lkv, Dv)


def rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    both_inf = torch.isneginf(got) & torch.isneginf(want)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf pattern differs"
    assert not torch.isnan(got).any(), "NaN in result"
    diff = torch.where(both_inf, torch.zeros_like(got), got - want).abs().max()
    finite = want[torch.isfinite(want)]
    return float(diff) / max(float(finite.abs().max()) if finite.numel() else 1.0, 1e-6)


def check_against_reference(mask, score, B, Hq, Hkv, Lq, Lkv, D, dtype, lse_grad=False, kv_layout=None, **tiles):
    """``kv_layout(t)``: K and V as a view of other storage (leaves that receive the gradients);
    ``tiles``: caller tile sizes for ``attndsl.compile``."""
    q, k, v = inputs(B, Hq, Hkv, Lq, Lkv, D, dtype)
    if kv_layout is not None:
        k, v = (kv_layout(t.detach()).requires_grad_() for t in (k, v))
    comp = attndsl.compile(mask_mod=mask, score_mod=score, **tiles)
    out, lse = comp(q, k, v, return_lse=True)
    assert out.dtype == dtype and out.shape == (*q.shape[:3], v.shape[3]) and lse.shape == (B, Hq, Lq)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attndsl.reference.attention(q64, k64, v64, mask_mod=mask, score_mod=score)
    tol = TOL[dtype]
    errs = {"out": rel_err(out, ref), "lse": rel_err(lse, ref_lse)}
    g = torch.Generator(device=DEV).manual_seed(1)
    dout = torch.randn(out.shape, generator=g, device=DEV, dtype=torch.float32)
    loss, ref_loss = (out.float() * dout).sum(), (ref * dout.double()).sum()
    if lse_grad:
        w = torch.randn(lse.shape, generator=g, device=DEV)
        loss, ref_loss = loss + (lse * w).sum(), ref_loss + (ref_lse * w.double()).sum()
    loss.backward()
    ref_loss.backward()
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.dtype == dtype and got.shape == want.shape
        errs[name] = rel_err(got, want)
    limits = {"out": tol["out"], "lse": tol["lse"], "dq": tol["grad"], "dk": tol["grad"], "dv": tol["grad"]}
    print(f"\n[attndsl-gpu] {dtype} B={B} Hq={Hq} Hkv={Hkv} Lq={Lq} Lkv={Lkv} D={D} errors "
          + " ".join(f"{k_}={e:.2e}" for k_, e in errs.items()))
    bad = {k_: e for k_, e in errs.items() if not e <= limits[k_]}
    assert not bad, f"errors {errs} over limits {limits}"
    return out, lse, q.grad, k.grad


# (name, mask, score, B, Hq, Hkv, Lq, Lkv, D, dtype); patterns that capture CUDA tensors are built lazily
CASES = [
    ("dense_d128_bf16", None, None, 1, 4, 4, 1024, 1024, 128, torch.bfloat16),
    ("causal_d64_fp16", causal, None, 2, 4, 4, 1024, 1024, 64, torch.float16),
    ("causal_gqa_d128_bf16", causal, None, 1, 8, 2, 777, 777, 128, torch.bfloat16),
    ("sliding256_gqa_d64_bf16", sliding(256), None, 1, 4, 2, 1024, 1024, 64, torch.bfloat16),
    ("document_d64_fp16", lambda: document([100, 1, 300, 57, 400, 166]), None, 1, 4, 4, 1024, 1024, 64, torch.float16),
    ("alibi_causal_d64_bf16", causal, lambda: alibi(8), 1, 8, 8, 512, 512, 64, torch.bfloat16),
    ("softcap_causal_d128_fp16", causal, softcap(20.0), 1, 4, 4, 600, 600, 128, torch.float16),
    ("prefix_lm_d64_bf16", prefix_lm(100), None, 1, 4, 4, 1000, 1000, 64, torch.bfloat16),
    ("lq_lt_lkv_bottom_right_d64_bf16", bottom_right(300, 1024), None, 1, 4, 4, 300, 1024, 64, torch.bfloat16),
    ("lq_gt_lkv_window_d128_fp16", window_abs(100), None, 1, 4, 2, 1024, 333, 128, torch.float16),
    ("chunked_softcap_d128_bf16", chunked(200), softcap(30.0), 1, 2, 2, 900, 900, 128, torch.bfloat16),
    # head dims over 128: 256-wide tiles (D=192 as 128 + 64), float32 through the shared-memory fallback
    ("causal_gqa_d256_bf16", causal, None, 1, 8, 2, 777, 777, 256, torch.bfloat16),
    ("window_d192_fp16", window_abs(150), None, 1, 4, 4, 700, 900, 192, torch.float16),
    # a head dim of two parts (96 = 64 + 32; 192 above is 128 + 64)
    ("causal_gqa_d96_bf16", causal, None, 1, 8, 2, 1000, 1000, 96, torch.bfloat16),
    ("lq_gt_lkv_dense_d256_fp32", None, None, 1, 2, 1, 600, 450, 256, torch.float32),
    # value head dims apart from the query/key ones (MLA: DeepSeek V3's 192 and 128); tiles by the wider
    ("mla_causal_gqa_d192_v128_bf16", causal, None, 1, 8, 2, 777, 777, (192, 128), torch.bfloat16),
    ("window_d128_v64_fp16", window_abs(150), None, 1, 4, 4, 700, 900, (128, 64), torch.float16),
    ("dense_gqa_d64_v128_bf16", None, None, 1, 4, 2, 1000, 1000, (64, 128), torch.bfloat16),
]


def _build(factory_or_fn, arity):
    """Patterns are plain functions of ``arity`` arguments, or factories of none (to defer CUDA work)."""
    if factory_or_fn is None or factory_or_fn.__code__.co_argcount == arity:
        return factory_or_fn
    return factory_or_fn()


@pytest.mark.parametrize("name,mask,score,B,Hq,Hkv,Lq,Lkv,D,dtype", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_on_gpu(name, mask, score, B, Hq, Hkv, Lq, Lkv, D, dtype):
    check_against_reference(_build(mask, 4), _build(score, 5), B, Hq, Hkv, Lq, Lkv, D, dtype)


def test_lse_gradient_on_gpu():
    check_against_reference(causal, None, 1, 4, 4, 512, 512, 64, torch.float16, lse_grad=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dead_rows_on_gpu(dtype):
    live = 200
    out, lse, dq, dk = check_against_reference(dead_rows(live), None, 1, 2, 2, 512, 512, 64, dtype)
    assert torch.equal(out[:, :, :live].float(), torch.zeros_like(out[:, :, :live].float()))
    assert torch.isneginf(lse[:, :, :live]).all() and torch.isfinite(lse[:, :, live:]).all()
    assert torch.equal(dq[:, :, :live].float(), torch.zeros_like(dq[:, :, :live].float()))
    assert torch.isfinite(dk).all()


# --- the forward's K/V tiles through tensor descriptors (TMA) or pointer loads -------------------------
def _blhd(t):
    """The same values stored as [B, L, H, D] (rows of one head 2*H*D bytes apart)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _unaligned_rows(t):
    """The same values in rows 2*(D+4) bytes apart: not a multiple of 16, so no descriptors."""
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 4, device=t.device, dtype=t.dtype)
    wide[..., :t.shape[-1]] = t
    return wide[..., :t.shape[-1]]


@pytest.mark.parametrize("name,mask,D,dtype,layout,tma", [
    ("causal_gqa_d128_bf16", causal, 128, torch.bfloat16, None, True),
    ("causal_d128_bf16_blhd", causal, 128, torch.bfloat16, _blhd, True),
    ("window_d96_fp16", window_abs(150), 96, torch.float16, None, True),  # descriptor columns past D read zeros
    ("causal_d64_bf16_unaligned", causal, 64, torch.bfloat16, _unaligned_rows, False),
])
def test_kv_tiles_through_descriptors_on_gpu(name, mask, D, dtype, layout, tma):
    """The forward's large tiles (caller tiles 128x64, as at L=16384) read K/V through tensor
    descriptors where the strides allow it and through pointers where they do not."""
    from attndsl.runtime.launch import tma_ready
    q, k, v = inputs(1, 8, 2, 777, 777, D, dtype)
    if layout is not None:
        k = layout(k.detach())
    assert tma_ready(False, k, k) == tma
    check_against_reference(mask, None, 1, 8, 2, 777, 777, D, dtype, kv_layout=layout, block_m=128, block_n=64)


# --- visit counts at L = 4096 ----------------------------------------------------------------------
def brute_visits(mask_mod, B, Hq, Lq, Lkv, bm, bn):
    t = trace(mask_mod)
    env = {"b": torch.arange(B, device=DEV).view(B, 1, 1, 1), "h": torch.arange(Hq, device=DEV).view(1, Hq, 1, 1),
           "q": torch.arange(Lq, device=DEV).view(1, 1, Lq, 1), "kv": torch.arange(Lkv, device=DEV).view(1, 1, 1, Lkv)}
    (m,) = evaluate([t.mask], env, t.tensors, device=DEV)
    m = torch.broadcast_to(m, (B, Hq, Lq, Lkv))
    nq, nk = -(-Lq // bm), -(-Lkv // bn)
    pad = torch.zeros(B, Hq, nq * bm, nk * bn, dtype=torch.bool, device=DEV)
    pad[:, :, :Lq, :Lkv] = m
    return pad.view(B, Hq, nq, bm, nk, bn).any(5).any(3).sum(-1).view(B * Hq, nq).to(torch.int32)


VISITS = [("causal", causal, 4096, 4096), ("sliding1024", sliding(1024), 4096, 4096),
          ("sliding300", sliding(300), 4096, 4096), ("window_abs500", window_abs(500), 4096, 4096),
          ("causal_uneven", causal, 4000, 4096)]


@pytest.mark.parametrize("name,mask,Lq,Lkv", VISITS, ids=[v[0] for v in VISITS])
def test_visit_counts_are_tight_at_4096(name, mask, Lq, Lkv):
    B, H, D = 1, 2, 64
    q = torch.randn(B, H, Lq, D, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, H, Lkv, D, device=DEV, dtype=torch.bfloat16)
    comp = attndsl.compile(mask_mod=mask)
    assert comp.spec.data_dependent is False
    visits = comp.visit_counts(q, k, k)
    cfg = comp.runner(q).forward_tiles(q)[1]  # the tiles actually used (grid size, shared-memory fallback)
    want = brute_visits(mask, B, H, Lq, Lkv, cfg.block_m, cfg.block_n)
    assert visits.shape == want.shape
    assert torch.equal(visits, want), f"visited {int(visits.sum())} tiles, needed {int(want.sum())}"
    assert int(want.sum()) < want.numel() * -(-Lkv // cfg.block_n)


# --- tensors on a GPU other than the current one -----------------------------------------------------
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_follow_the_tensors_device(monkeypatch):
    """Inputs on cuda:1 while cuda:0 is current: every kernel (forward, backward, block tables,
    index selectors, low-rank factors, sinks) launches on cuda:1, the results and gradients match
    the float64 reference, and the current device is left as it was."""
    import triton
    from attndsl.runtime import fastlaunch
    from attndsl.selectors import dense_selection_mask, random_causal_indices
    launched = []

    def spy(cls, name):  # Triton's own launches (first ones, tables, selectors) and our direct ones
        orig = getattr(cls, name)

        def wrapped(self, *args, **kwargs):
            launched.append(torch.cuda.current_device())
            return orig(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, wrapped)
    spy(triton.runtime.jit.JITFunction, "run")
    spy(fastlaunch.Launcher, "__call__")
    torch.cuda.set_device(0)
    dev, B, H, Hkv, L, D = "cuda:1", 1, 4, 2, 700, 64
    g = torch.Generator(device=dev).manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device=dev).requires_grad_()  # noqa: E731
    q, k, v = mk(B, H, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D)
    u, w, sinks = mk(B, H, L, 8), mk(B, Hkv, L, 8), mk(H)
    ids = torch.repeat_interleave(torch.arange(3, device=dev), torch.tensor([300, 100, 300], device=dev))
    doc = lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)  # noqa: E731
    idx = random_causal_indices(L, 64, device=dev, seed=1)
    sel = dense_selection_mask(idx, L)
    selected = lambda b, h, q_idx, kv_idx: sel[0, 0, q_idx, kv_idx]  # noqa: E731
    leaves = (q, k, v, u, w, sinks)
    outs = [attndsl.attention(q, k, v, mask_mod=causal, sinks=sinks, bias_factors=(u, w)),
            attndsl.compile(mask_mod=doc)(q, k, v),
            attndsl.compile(mask_mod=causal, normalizer="sigmoid")(q, k, v),
            attndsl.compile()(q, k, v, indices=idx, check_indices=False)]
    grads = torch.autograd.grad(sum((o * o).sum() for o in outs), leaves)
    assert launched and set(launched) == {1}, launched
    assert torch.cuda.current_device() == 0
    q64, k64, v64, u64, w64, s64 = (t.detach().double().requires_grad_() for t in leaves)
    refs = [attndsl.reference.attention(q64, k64, v64, mask_mod=causal, sinks=s64, bias_factors=(u64, w64))[0],
            attndsl.reference.attention(q64, k64, v64, mask_mod=doc)[0],
            attndsl.reference.attention(q64, k64, v64, mask_mod=causal, normalizer="sigmoid")[0],
            attndsl.reference.attention(q64, k64, v64, mask_mod=selected)[0]]
    ref_grads = torch.autograd.grad(sum((o * o).sum() for o in refs), (q64, k64, v64, u64, w64, s64))
    for i, (got, want) in enumerate(zip(outs + list(grads), refs + list(ref_grads))):
        assert got.device == torch.device(dev)
        assert rel_err(got, want) <= 1e-4, (i, rel_err(got, want))


# --- launches after the first skip Triton's binding, keyed by the arguments' specialisation -----------
def test_direct_launches_follow_argument_alignment():
    """Aligned inputs, then K/V whose base is one element off (another specialisation: Triton's path
    again, a second compiled kernel), then aligned inputs again (the first kernel, called directly):
    each call matches the reference."""
    from attndsl.runtime.fastlaunch import launcher
    comp = attndsl.CompiledAttention(causal, name="direct_launch")  # kernels of its own, apart from other tests
    for offset in (0, 1, 0):
        q, k, v = inputs(1, 4, 2, 300, 300, 64, torch.bfloat16, seed=offset + 3)
        if offset:
            k, v = (torch.cat([t.detach().new_zeros(1), t.detach().flatten()])[1:].view(t.shape).requires_grad_()
                    for t in (k, v))
            assert k.data_ptr() % 16 and k.is_contiguous()
        for _ in range(2):  # the second call takes the direct launch
            out = comp(q, k, v)
        ref, _ = attndsl.reference.attention(*(t.detach().double() for t in (q, k, v)), mask_mod=causal)
        assert rel_err(out, ref) <= TOL[torch.bfloat16]["out"]
    fwd = launcher(comp.runner(q).mod.direct_launch_fwd)
    assert fwd.enabled and len(fwd.compiled) == 2, fwd.compiled.keys()


# --- the launch memo on a GPU: Direct launches through the C launcher --------------------------------
@pytest.mark.parametrize("verify", [True, False])
def test_memoised_direct_launches(verify, monkeypatch):
    """Repeated calls of one key launch every kernel directly (``fastlaunch.Direct``; the forward's
    K/V descriptors get their global scratch there), give the first call's bits and match the
    float64 reference, output and gradients; with the suite's verification each memoised launch is
    also checked against a fresh one."""
    from attndsl.runtime import launch
    from attndsl.runtime.fastlaunch import Direct
    monkeypatch.setattr(launch, "VERIFY_MEMO", verify)
    comp = attndsl.CompiledAttention(causal, name=f"memo_direct_{int(verify)}")
    # a grid large enough for the default forward tiles, which read K/V through descriptors
    q, k, v = inputs(2, 16, 4, 3000, 3000, 128, torch.bfloat16, seed=11)
    sinks = torch.randn(16, device="cuda", requires_grad=True)
    runs = []
    for _ in range(3):
        out = comp(q, k, v, sinks=sinks)
        runs.append((out, *torch.autograd.grad((out.float() ** 2).sum(), (q, k, v, sinks))))
    r = comp.runner(q)
    launches = [m.launch for m in r._memo.values()]
    # forward, dQ (which computes delta), dK/dV
    assert len(launches) == 3 and all(isinstance(x, Direct) for x in launches), launches
    assert any(x.scratch for x in launches), "the forward's descriptors need scratch"
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = attndsl.reference.attention(*leaves64[:3], mask_mod=causal, sinks=leaves64[3])
    assert rel_err(runs[-1][0], ref) <= TOL[torch.bfloat16]["out"]
    for got, want in zip(runs[-1][1:], torch.autograd.grad((ref ** 2).sum(), leaves64)):
        assert rel_err(got, want) <= TOL[torch.bfloat16]["grad"]


# --- inside torch.compile ------------------------------------------------------------------------------
def test_torch_compiled_model_on_gpu():
    """torch.compile (inductor) of a model that calls attndsl: the attention call is a graph break and
    runs our kernels; output and gradients (the learnable slopes' too) match the float64 reference, eager and
    compiled."""
    import torch._dynamo

    class Block(torch.nn.Module):
        def __init__(self, H=4, D=64):
            super().__init__()
            self.proj = torch.nn.Linear(H * D, 3 * H * D)
            self.H, self.D = H, D
            self.slopes = torch.nn.Parameter(torch.linspace(0.01, 0.1, H))
            slopes = self.slopes
            self.attn = attndsl.compile(mask_mod=causal, score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki))

        def forward(self, x):
            B, L, _ = x.shape
            q, k, v = self.proj(x).view(B, L, 3, self.H, self.D).permute(2, 0, 3, 1, 4)
            return self.attn(q, k, v).transpose(1, 2).reshape(B, L, -1)

    torch.manual_seed(0)
    model = Block().to(DEV, torch.bfloat16)
    x = torch.randn(2, 700, 256, device=DEV, dtype=torch.bfloat16)
    # the float64 reference of the same block and loss
    W, bias, slopes = (p.detach().double().requires_grad_() for p in (model.proj.weight, model.proj.bias, model.slopes))
    q, k, v = (x.double() @ W.T + bias).view(2, 700, 3, 4, 64).permute(2, 0, 3, 1, 4)
    ref, _ = attndsl.reference.attention(q, k, v, mask_mod=causal,
                                         score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki))
    ref = ref.transpose(1, 2).reshape(2, 700, -1)
    ref_grads = torch.autograd.grad(ref.square().sum(), (W, bias, slopes))
    torch._dynamo.reset()
    for run in (model, torch.compile(model)):
        model.zero_grad()
        got = run(x)
        got.float().square().sum().backward()
        assert rel_err(got, ref) <= 1e-2
        for g, w in zip((model.proj.weight.grad, model.proj.bias.grad, model.slopes.grad), ref_grads):
            assert rel_err(g, w) <= 3e-2
