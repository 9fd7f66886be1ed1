"""Runtime: the on-disk source cache, compile-once-for-all-lengths, visit plans and kernel results.

Runs on CPU tensors, so every kernel goes through Triton's interpreter; sizes are kept small.
"""
import os
import sys

import types

import pytest
import torch
import triton.language as tl

import attndsl
import attndsl.reference
from attndsl.runtime import cache

BLOCK = 16


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding(w):
    def sliding_window(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < w)
    return sliding_window


def window_abs(w):
    return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= w


def rand(*shape, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)
    return t.requires_grad_(grad)


def qkv(B=1, Hq=2, Hkv=2, Lq=40, Lkv=40, D=16, dtype=torch.float32, grad=False, seed=0):
    return (rand(B, Hq, Lq, D, dtype=dtype, seed=seed, grad=grad),
            rand(B, Hkv, Lkv, D, dtype=dtype, seed=seed + 1, grad=grad),
            rand(B, Hkv, Lkv, D, dtype=dtype, seed=seed + 2, grad=grad))


def reference(q, k, v, mask_mod=None, score_mod=None):
    q64, k64, v64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v))
    out, lse = attndsl.reference.attention(q64, k64, v64, mask_mod=mask_mod, score_mod=score_mod)
    return (q64, k64, v64), out, lse


def assert_close(got, want, tol, what):
    got, want = got.detach().double(), want.detach().double()
    both_inf = torch.isneginf(got) & torch.isneginf(want)
    err = torch.where(both_inf, torch.zeros_like(got), (got - want).abs())
    assert not torch.isnan(got).any(), f"{what}: NaN in result"
    scale = max(1.0, float(want[torch.isfinite(want)].abs().max()) if torch.isfinite(want).any() else 1.0)
    assert float(err.max()) <= tol * scale, f"{what}: max error {float(err.max()):.3e} > {tol * scale:.1e}"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and an empty in-memory module cache."""
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(tmp_path / "cache"))
    cache._MODULES.clear()
    yield cache.cache_dir()
    cache._MODULES.clear()


# --- on-disk cache ---------------------------------------------------------------------------------
def _run_and_check(mask_mod, q, k, v):
    comp = attndsl.compile(mask_mod=mask_mod, block_m=BLOCK, block_n=BLOCK)
    out = comp(q, k, v)
    _, ref, _ = reference(q, k, v, mask_mod)
    assert_close(out, ref, 1e-4, "forward")
    return comp


def test_cache_dir_follows_env(fresh_cache, tmp_path):
    assert fresh_cache == tmp_path / "cache" and fresh_cache.is_dir()


def test_compile_writes_source_file_once(fresh_cache):
    q, k, v = qkv()
    before = dict(cache.STATS)
    comp = _run_and_check(causal, q, k, v)
    path = cache.source_path(comp.spec)
    assert path.parent == fresh_cache and path.is_file()
    text = path.read_text()
    assert text == comp.source and "@triton.jit" in text and comp.spec.key in text
    assert cache.STATS["render"] == before["render"] + 1 and cache.STATS["write"] == before["write"] + 1
    assert cache.STATS["import"] == before["import"] + 1
    assert cache.STATS["rebuilt"] == before["rebuilt"]
    # a second compile of the same pattern in this process: nothing rendered or imported
    _run_and_check(causal, q, k, v)
    assert cache.STATS["render"] == before["render"] + 1 and cache.STATS["import"] == before["import"] + 1
    # a new process (simulated: empty module cache) renders the source to compare the file with,
    # and finds the file identical: nothing written
    cache._MODULES.clear()
    _run_and_check(causal, q, k, v)
    assert cache.STATS["write"] == before["write"] + 1 and cache.STATS["rebuilt"] == before["rebuilt"]
    assert cache.STATS["import"] == before["import"] + 2
    assert [p.name for p in fresh_cache.iterdir()] == [path.name]


def _corrupt_truncate(path):
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _corrupt_garbage(path):
    path.write_bytes(b"\x00\xffgarbage\x80" * 100)


def _corrupt_empty(path):
    path.write_text("")


def _corrupt_bad_python(path):
    path.write_text("this is not python (\n")


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_garbage, _corrupt_empty, _corrupt_bad_python])
def test_corrupt_cache_entry_is_rebuilt(fresh_cache, corrupt):
    q, k, v = qkv(Lq=33, Lkv=33)
    mask = sliding(9)
    comp = _run_and_check(mask, q, k, v)
    path = cache.source_path(comp.spec)
    good = path.read_text()
    corrupt(path)
    cache._MODULES.clear()
    rebuilt = cache.STATS["rebuilt"]
    _run_and_check(mask, q, k, v)
    assert cache.STATS["rebuilt"] == rebuilt + 1
    assert path.read_text() == good
    assert not list(fresh_cache.glob("*.tmp"))


def test_atomic_write_leaves_no_temp_files_on_failure(fresh_cache, monkeypatch):
    q, k, v = qkv(Lq=20, Lkv=20)

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(cache.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        attndsl.compile(mask_mod=window_abs(3), block_m=BLOCK, block_n=BLOCK)(q, k, v)
    assert list(fresh_cache.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("ATTNDSL_CACHE_DIR", str(fresh_cache))
    _run_and_check(window_abs(3), q, k, v)
    files = list(fresh_cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".py"


CONCURRENT_SCRIPT = """
import sys, torch, attndsl
from attndsl.runtime import cache
w = int(sys.argv[1])
comp = attndsl.compile(mask_mod=lambda b, h, q, kv: (q - kv).abs() <= w, block_m=16, block_n=16)
q = torch.randn(1, 1, 24, 16)
out = comp(q, q, q)
ref, _ = attndsl.reference.attention(q.double(), q.double(), q.double(), mask_mod=comp.mask_mod)
assert (out.double() - ref).abs().max() < 1e-4
print(cache.source_path(comp.spec).name)
"""


def test_concurrent_processes_share_one_entry(fresh_cache):
    """Two processes compiling the same new pattern at once: both work, one file, no temp files left."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ATTNDSL_CACHE_DIR=str(fresh_cache),
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_SCRIPT, "7"], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-2000:]
    names = {o.strip() for o, _ in outs}
    assert len(names) == 1
    assert sorted(x.name for x in fresh_cache.iterdir()) == sorted(names)
    assert (fresh_cache / names.pop()).read_text() == attndsl.compile(
        mask_mod=lambda b, h, q, kv: (q - kv).abs() <= 7, block_m=16, block_n=16).source


def test_one_compile_serves_every_length(fresh_cache):
    comp = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    before = dict(cache.STATS)
    for lq, lkv in [(1, 1), (5, 9), (16, 16), (17, 17), (31, 47), (48, 20), (33, 33)]:
        q, k, v = qkv(Lq=lq, Lkv=lkv, seed=lq)
        out = comp(q, k, v)
        _, ref, _ = reference(q, k, v, causal)
        assert_close(out, ref, 1e-4, f"Lq={lq} Lkv={lkv}")
    assert cache.STATS["render"] == before["render"] + 1
    assert cache.STATS["import"] == before["import"] + 1
    assert len(comp._runners) == 1


@pytest.mark.parametrize("n_tiles,n_bh,section", [(5, 7, 3), (4, 6, 2), (3, 2, 8), (6, 4, 1), (1, 5, 3)])
def test_programs_number_every_tile_once_section_by_section(n_tiles, n_bh, section):
    """The kernels' program numbering (``_program_tile``) is a bijection onto (tile, batch*head);
    within each section of heads, tile-major: every head's tile t starts before any head's t+1."""
    from triton.runtime.interpreter import InterpretedFunction
    from attndsl.runtime.interpreter import interpreting

    mod = attndsl.compile(mask_mod=causal).runner(qkv()[0]).mod

    def probe(Out, SECTION):
        tile, bh = _program_tile(SECTION)
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        tl.store(Out + 2 * pid, tile)
        tl.store(Out + 2 * pid + 1, bh)

    out = torch.full((n_tiles * n_bh, 2), -1, dtype=torch.int32)
    # the interpreter runs the kernel's source against its globals: the generated module's
    probe = types.FunctionType(probe.__code__, {**vars(mod), "tl": tl}, "probe")
    with interpreting():
        InterpretedFunction(probe)[(n_tiles, n_bh)](out, section)
    got = [tuple(r) for r in out.tolist()]
    assert sorted(got) == [(t, h) for t in range(n_tiles) for h in range(n_bh)]
    expect = [(t, h) for s in range(0, n_bh, section) for t in range(n_tiles)
              for h in range(s, min(s + section, n_bh))]
    assert got == expect


@pytest.mark.parametrize("scale", [0.3, 20.0, -20.0, 0.0])
def test_any_scale_sign_matches_the_reference(scale):
    """The softmax forward folds a positive scale into its exponent (the running max over unscaled
    scores); a negative or zero scale scales the scores first. Output, lse and gradients of both,
    with sinks and a low-rank bias (divided by the scale when folded). A large scale of either sign
    overflows exp2 unless the running max is the largest scaled score."""
    q, k, v = qkv(Hq=2, Hkv=1, Lq=37, Lkv=45, grad=True, seed=3)  # GQA; two heads keep CI short
    u, w = rand(1, 2, 37, 3, seed=4, grad=True), rand(1, 1, 45, 3, seed=5, grad=True)
    sinks = rand(2, seed=6, grad=True)
    comp = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    out, lse = comp(q, k, v, scale=scale, return_lse=True, sinks=sinks, bias_factors=(u, w))
    leaves = [q, k, v, u, w, sinks]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    q64, k64, v64, u64, w64, s64 = ref_leaves
    ref_out, ref_lse = attndsl.reference.attention(q64, k64, v64, mask_mod=causal, scale=scale, sinks=s64,
                                                   bias_factors=(u64, w64))
    assert_close(out, ref_out, 1e-4, f"out, scale {scale}")
    assert_close(lse, ref_lse, 1e-4, f"lse, scale {scale}")
    do, dl = rand(*out.shape, seed=7), rand(*lse.shape, seed=8)
    got = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), leaves)
    want = torch.autograd.grad((ref_out * do.double()).sum() + (ref_lse * dl.double()).sum(), ref_leaves)
    for name, g, r in zip("q k v u w sinks".split(), got, want):
        assert_close(g, r, 1e-4, f"d{name}, scale {scale}")


def test_runtime_scalar_changes_without_recompiling(fresh_cache):
    w = torch.tensor(8)

    def win(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < w) & (q_idx >= kv_idx)

    comp = attndsl.compile(mask_mod=win, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(Lq=50, Lkv=50)
    before = dict(cache.STATS)
    for value in (8, 3, 20):
        w.fill_(value)
        out = comp(q, k, v)
        _, ref, _ = reference(q, k, v, lambda b, h, q_idx, kv_idx: (q_idx - kv_idx < value) & (q_idx >= kv_idx))
        assert_close(out, ref, 1e-4, f"window {value}")
    assert cache.STATS["render"] <= before["render"] + 1 and cache.STATS["import"] <= before["import"] + 1


def test_captured_tensor_mutated_in_place_is_seen(fresh_cache):
    ids = torch.tensor([0] * 10 + [1] * 15 + [2] * 15, dtype=torch.int32)

    def doc(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    comp = attndsl.compile(mask_mod=doc, block_m=BLOCK, block_n=BLOCK)
    assert comp.spec.data_dependent
    q, k, v = qkv(Lq=40, Lkv=40)
    _, ref1, _ = reference(q, k, v, doc)
    assert_close(comp(q, k, v), ref1, 1e-4, "packing 1")
    ids.copy_(torch.tensor([0] * 3 + [1] * 30 + [2] * 7, dtype=torch.int32))
    _, ref2, _ = reference(q, k, v, doc)
    assert not torch.allclose(ref1, ref2)
    assert_close(comp(q, k, v), ref2, 1e-4, "packing 2")


# --- visit plans: mask-free closed-form tiles -------------------------------------------------
def brute_visits(mask_mod, B, Hq, Lq, Lkv, bm, bn):
    """Tiles each (b*h, q tile) must visit: key tiles with at least one allowed pair."""
    q = torch.zeros(B, Hq, Lq, 16, dtype=torch.float64)
    k = torch.zeros(B, Hq, Lkv, 16, dtype=torch.float64)
    _, m = attndsl.reference.scores_and_mask(q, k, mask_mod)
    nq, nk = -(-Lq // bm), -(-Lkv // bn)
    pad = torch.zeros(B, Hq, nq * bm, nk * bn, dtype=torch.bool)
    pad[:, :, :Lq, :Lkv] = m
    tiles = pad.view(B, Hq, nq, bm, nk, bn).any(5).any(3)  # [B, H, nq, nk]
    return tiles.sum(-1).view(B * Hq, nq).to(torch.int32)


VISIT_CASES = [
    ("causal", causal, 1, 2, 2, 100, 100),
    ("causal_gqa_lq_lt_lkv", causal, 1, 4, 2, 40, 90),
    ("causal_lq_gt_lkv", causal, 2, 1, 1, 90, 40),
    ("sliding16", sliding(16), 1, 2, 1, 120, 120),
    ("sliding5", sliding(5), 1, 1, 1, 97, 97),
    ("sliding40_uneven", sliding(40), 1, 1, 1, 75, 110),
    ("window_abs20", window_abs(20), 1, 1, 1, 100, 100),
]


@pytest.mark.parametrize("name,mask,B,Hq,Hkv,Lq,Lkv", VISIT_CASES, ids=[c[0] for c in VISIT_CASES])
def test_closed_form_masks_visit_exactly_the_needed_tiles(name, mask, B, Hq, Hkv, Lq, Lkv):
    comp = attndsl.compile(mask_mod=mask, block_m=BLOCK, block_n=BLOCK)
    assert comp.spec.data_dependent is False
    assert not comp.spec.fwd_range.tile_check and not comp.spec.bwd_range.tile_check
    q, k, v = qkv(B, Hq, Hkv, Lq, Lkv)
    visits = comp.visit_counts(q, k, v)
    want = brute_visits(mask, B, Hq, Lq, Lkv, BLOCK, BLOCK)
    assert visits.shape == want.shape
    assert torch.equal(visits.cpu(), want), f"\nvisited {visits.tolist()}\nneeded  {want.tolist()}"
    # and fewer than all tiles, or the test says nothing
    assert int(want.sum()) < want.numel() * -(-Lkv // BLOCK)


def test_data_dependent_mask_visits_only_nonempty_tiles():
    ids = torch.tensor([0] * 20 + [1] * 5 + [2] * 40 + [3] * 15, dtype=torch.int32)
    doc = lambda b, h, q_idx, kv_idx: (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)  # noqa: E731
    comp = attndsl.compile(mask_mod=doc, block_m=BLOCK, block_n=BLOCK)
    assert comp.spec.data_dependent is True
    q, k, v = qkv(1, 2, 2, 80, 80)
    assert torch.equal(comp.visit_counts(q, k, v), brute_visits(doc, 1, 2, 80, 80, BLOCK, BLOCK))


def test_tile_checked_mask_visits_a_superset():
    dil = lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) % 3 == 0) & (q_idx >= kv_idx) | (kv_idx < 4)  # noqa: E731
    comp = attndsl.compile(mask_mod=dil, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(1, 1, 1, 70, 70)
    visits, want = comp.visit_counts(q, k, v), brute_visits(dil, 1, 1, 70, 70, BLOCK, BLOCK)
    assert (visits >= want).all()
    _, ref, _ = reference(q, k, v, dil)
    assert_close(comp(q, k, v), ref, 1e-4, "dilated forward")


# --- results: forward, lse and gradients against the float64 reference ---------------------------
IDS = torch.tensor([0] * 7 + [1] * 30 + [2] * 1 + [3] * 40, dtype=torch.int32)
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])


def doc_mask(b, h, q_idx, kv_idx):
    return (IDS[q_idx] == IDS[kv_idx]) & (q_idx >= kv_idx)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 12) | (q_idx >= kv_idx)


def dead_rows(b, h, q_idx, kv_idx):
    # rows 0..9 see nothing; the others are causal from key 5 on
    return (q_idx >= 10) & (kv_idx >= 5) & (kv_idx <= q_idx)


def chunked(b, h, q_idx, kv_idx):
    return (q_idx // 24 == kv_idx // 24) & (q_idx >= kv_idx)


CASES = [
    # name, mask, score, B, Hq, Hkv, Lq, Lkv, D
    ("dense", None, None, 1, 2, 2, 45, 45, 32),
    ("causal", causal, None, 1, 2, 2, 70, 70, 32),
    ("sliding_gqa", sliding(20), None, 1, 4, 2, 66, 66, 32),
    ("document", doc_mask, None, 1, 2, 1, 78, 78, 32),
    ("alibi_causal", causal, alibi, 1, 4, 4, 50, 50, 32),
    ("softcap", None, softcap, 2, 1, 1, 40, 40, 32),
    ("prefix_lm", prefix_lm, None, 1, 2, 2, 64, 64, 32),
    ("dead_rows", dead_rows, None, 1, 1, 1, 40, 40, 32),
    ("lq_lt_lkv", causal, None, 1, 2, 2, 30, 75, 32),
    ("lq_gt_lkv", window_abs(10), None, 1, 2, 1, 75, 30, 32),
    ("chunked_softcap", chunked, softcap, 1, 1, 1, 60, 60, 48),
]


@pytest.mark.parametrize("name,mask,score,B,Hq,Hkv,Lq,Lkv,D", CASES, ids=[c[0] for c in CASES])
def test_forward_and_backward_match_reference(name, mask, score, B, Hq, Hkv, Lq, Lkv, D):
    q, k, v = qkv(B, Hq, Hkv, Lq, Lkv, D, grad=True, seed=7)
    comp = attndsl.compile(mask_mod=mask, score_mod=score, block_m=BLOCK, block_n=BLOCK)
    out, lse = comp(q, k, v, return_lse=True)
    (q64, k64, v64), ref, ref_lse = reference(q, k, v, mask, score)
    assert out.shape == q.shape and lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    assert_close(out, ref, 2e-4, "out")
    assert_close(lse, ref_lse, 2e-4, "lse")
    dout = rand(*out.shape, seed=99)
    out.backward(dout)
    ref.backward(dout.double())
    for name_, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.shape == want.shape
        assert_close(got, want, 5e-4, name_)


def integer_semantics(score, b, h, q_idx, kv_idx):
    """Floor division and modulo by negative constants and by variables, truncating casts."""
    return (score + ((kv_idx - q_idx) // 3) * 0.1 + ((q_idx - kv_idx) % -4) * 0.05
            + ((q_idx // (kv_idx + 1)) % 3) * 0.01 + ((kv_idx - q_idx).float() * 0.3).long() * 0.02
            + ((q_idx - 20) // (kv_idx - 60)).float() * 0.01 + ((q_idx - kv_idx) % (kv_idx - 60)) * 0.01)


def integer_mask(b, h, q_idx, kv_idx):
    return (((kv_idx - q_idx) // 4) % 3 != 1) & (((q_idx - kv_idx) % -5 > -4) | ((q_idx - 30) // -7 == 2))


def test_integer_semantics_in_kernels():
    q, k, v = qkv(1, 2, 2, 50, 50, 32, seed=21)
    comp = attndsl.compile(mask_mod=integer_mask, score_mod=integer_semantics, block_m=BLOCK, block_n=BLOCK)
    out = comp(q, k, v)
    _, ref, _ = reference(q, k, v, integer_mask, integer_semantics)
    assert_close(out, ref, 1e-4, "integer semantics")
    # the terms matter: without them the result differs
    _, plain, _ = reference(q, k, v, integer_mask)
    assert not torch.allclose(plain, ref, atol=1e-3)


@pytest.mark.parametrize("mask", [lambda b, h, q_idx, kv_idx: False,
                                  lambda b, h, q_idx, kv_idx: torch.tensor(False),
                                  lambda b, h, q_idx, kv_idx: h < 0], ids=["false", "tensor_false", "h_lt_0"])
def test_all_masked_patterns(mask):
    q, k, v = qkv(1, 2, 2, 20, 20, 16, grad=True)
    comp = attndsl.compile(mask_mod=mask, block_m=BLOCK, block_n=BLOCK)
    out, lse = comp(q, k, v, return_lse=True)
    assert torch.equal(out.detach(), torch.zeros_like(out)) and torch.isneginf(lse).all()
    out.sum().backward()
    for g in (q.grad, k.grad, v.grad):
        assert torch.equal(g, torch.zeros_like(g))
    assert int(comp.visit_counts(q, k, v).sum()) == 0


def test_always_true_mask_is_dropped():
    comp = attndsl.compile(mask_mod=lambda b, h, q_idx, kv_idx: torch.tensor(True), block_m=BLOCK, block_n=BLOCK)
    assert comp.spec.mask is None
    assert comp.spec.key == attndsl.compile().spec.key


def test_dead_rows_give_zero_output_and_neg_inf_lse():
    q, k, v = qkv(1, 1, 1, 40, 40, 32, grad=True)
    out, lse = attndsl.compile(mask_mod=dead_rows, block_m=BLOCK, block_n=BLOCK)(q, k, v, return_lse=True)
    assert torch.equal(out[:, :, :10].detach(), torch.zeros_like(out[:, :, :10]))
    assert torch.isneginf(lse[:, :, :10]).all() and torch.isfinite(lse[:, :, 10:]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[:, :, :10], torch.zeros_like(q.grad[:, :, :10]))
    assert torch.isfinite(k.grad).all() and torch.equal(k.grad[:, :, :5], torch.zeros_like(k.grad[:, :, :5]))


def test_gradient_through_lse():
    q, k, v = qkv(1, 2, 2, 40, 40, 32, grad=True, seed=3)
    out, lse = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)(q, k, v, return_lse=True)
    (q64, k64, v64), ref, ref_lse = reference(q, k, v, causal)
    w = rand(*lse.shape, seed=5)
    (out.sum() + (lse * w).sum()).backward()
    (ref.sum() + (ref_lse * w.double()).sum()).backward()
    for what, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(got, want, 5e-4, what)


@pytest.mark.parametrize("loss", ["out_only", "lse_only"])
def test_an_unused_output_gets_no_gradient_tensor(loss, monkeypatch):
    """The output the loss does not use reaches the backward as None (no zero tensor to allocate and
    subtract), and the gradients still match the reference's."""
    from attndsl.runtime import launch
    seen = []
    orig = launch.Runner.backward

    def spy(self, q, k, v, out, lse, dout, dlse, *a, **kw):
        seen.append((dout is None, dlse is None))
        return orig(self, q, k, v, out, lse, dout, dlse, *a, **kw)
    monkeypatch.setattr(launch.Runner, "backward", spy)
    q, k, v = qkv(1, 2, 1, 40, 37, 32, grad=True, seed=4)
    out, lse = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)(q, k, v, return_lse=True)
    (q64, k64, v64), ref, ref_lse = reference(q, k, v, causal)
    w = rand(*(out.shape if loss == "out_only" else lse.shape), seed=6)
    got, want = (out, ref) if loss == "out_only" else (lse, ref_lse)
    (got * w).sum().backward()
    (want * w.double()).sum().backward()
    # an lse-only loss: the Function makes dout zeros (the kernels need a tensor there)
    assert seen == [(False, loss == "out_only")]
    for what, g, g64 in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        # lse does not depend on v: the reference leaves v's gradient None, ours is zero
        assert_close(g, g64 if g64 is not None else torch.zeros_like(g, dtype=torch.float64), 5e-4, what)


def test_second_derivative_is_refused_not_silently_zero():
    """create_graph=True gives first derivatives that still match the reference; differentiating
    them again raises (attention's share of a gradient penalty would otherwise be silently lost)."""
    q, k, v = qkv(1, 2, 1, 40, 37, 32, grad=True, seed=7)
    slope = torch.tensor(0.3, requires_grad=True)
    attn = attndsl.compile(mask_mod=causal, score_mod=lambda s, b, h, qi, ki: s - slope * (qi - ki),
                           block_m=BLOCK, block_n=BLOCK)
    out = attn(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v, slope), create_graph=True)
    (q64, k64, v64), ref, _ = reference(q, k, v, causal, lambda s, b, h, qi, ki: s - slope.double() * (qi - ki))
    ref.sum().backward()
    for what, g, g64 in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        assert g.requires_grad
        assert_close(g.detach(), g64, 5e-4, what)
    for g in grads:
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(g.sum(), (q, k, v, slope), allow_unused=True)
    # without create_graph the gradients carry no history, as before
    out = attn(q, k, v)
    assert not any(g.requires_grad for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_index_checks_decide_loose_intervals_densely_and_reread_captured_values(monkeypatch):
    """A loose interval (``|q - kv| + min(q, kv)``, which is ``max(q, kv)``) is settled by evaluating the index, once per call shape; an
    index read from captured values is checked on every call, so fixing the values in place
    makes the next call run; ATTNDSL_CHECK_INDICES=0 turns the per-call check off."""
    from attndsl.runtime import checks
    dense = []
    orig = checks._check_densely
    monkeypatch.setattr(checks, "_check_densely", lambda b, *a: (dense.append(b.text), orig(b, *a))[1])
    Lq, Lkv = 20, 28
    table = rand(Lkv, seed=9)

    def loose(score, b, h, q_idx, kv_idx):
        return score + table[(q_idx - kv_idx).abs() + torch.minimum(q_idx, kv_idx)]

    q, k, v = qkv(1, 2, 1, Lq, Lkv, 16, grad=True, seed=8)
    attn = attndsl.compile(mask_mod=causal, score_mod=loose, block_m=BLOCK, block_n=BLOCK)
    out = attn(q, k, v)
    attn(q, k, v)
    assert dense == ["(abs((q - kv)) + minimum(q, kv))"]  # once for the shape
    (q64, k64, v64), ref, _ = reference(q, k, v, causal, loose)
    assert_close(out, ref, 5e-5, "out")

    bucket = torch.tensor([i % 5 for i in range(Lq)])
    bucket[3] = 6  # past the 5-entry table
    five = rand(5, seed=10)

    def bucketed(score, b, h, q_idx, kv_idx):
        return score + five[bucket[q_idx]]

    attn = attndsl.compile(mask_mod=causal, score_mod=bucketed, block_m=BLOCK, block_n=BLOCK)
    with pytest.raises(IndexError, match="is 6 at q_idx=3"):
        attn(q, k, v)
    bucket[3] = 4  # fixed in place: seen by the next call
    out = attn(q, k, v)
    (q64, k64, v64), ref, _ = reference(q, k, v, causal, bucketed)
    assert_close(out, ref, 5e-5, "out")
    bucket[3] = 6
    monkeypatch.setenv("ATTNDSL_CHECK_INDICES", "0")
    attn(q, k, v)  # unchecked: the kernel clamps, as documented


class _AlibiBlock(torch.nn.Module):
    """A model that owns a learnable per-head slope its compiled pattern captures."""

    def __init__(self, H=2, D=16):
        super().__init__()
        self.proj = torch.nn.Linear(H * D, 3 * H * D)
        self.H, self.D = H, D
        self.slopes = torch.nn.Parameter(torch.tensor([0.25, -0.5][:H]))
        slopes = self.slopes
        self.attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK,
                                    score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki))

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.proj(x).view(B, L, 3, self.H, self.D).permute(2, 0, 3, 1, 4)
        return self.attn(q, k, v).transpose(1, 2).reshape(B, L, -1)


def _alibi_block_reference(model, x):
    """The block in float64 with the reference attention: output and the parameters' gradients
    for ``loss = out.square().sum()``."""
    W, bias, slopes = (p.detach().double().requires_grad_() for p in (model.proj.weight, model.proj.bias, model.slopes))
    B, L, _ = x.shape
    q, k, v = (x.double() @ W.T + bias).view(B, L, 3, model.H, model.D).permute(2, 0, 3, 1, 4)
    out, _ = attndsl.reference.attention(q, k, v, mask_mod=causal,
                                         score_mod=lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki))
    out = out.transpose(1, 2).reshape(B, L, -1)
    grads = torch.autograd.grad(out.square().sum(), (W, bias, slopes))
    return out, dict(zip(("proj.weight", "proj.bias", "slopes"), grads))


def test_deepcopy_of_a_model_reads_its_own_learnable_tensors():
    import copy
    torch.manual_seed(0)
    model, x = _AlibiBlock(), rand(1, 37, 32, seed=11)
    first = model(x)  # the model holds loaded kernels when it is copied
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), first, rtol=0, atol=0)
    assert twin.attn.tensors[0] is twin.slopes and model.attn.tensors[0] is model.slopes
    twin(x).sum().backward()
    assert twin.slopes.grad is not None and model.slopes.grad is None
    before = model(x)
    with torch.no_grad():
        twin.slopes.mul_(3.0)
    assert not torch.equal(twin(x), before)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_torch_compile_runs_the_call_with_a_graph_break():
    """A model compiled with torch.compile calls the kernels eagerly inside the graph: output and
    gradients (the learnable slopes' too) match the float64 reference, as the eager model's do."""
    import torch._dynamo
    torch.manual_seed(0)
    model, x = _AlibiBlock(), rand(1, 37, 32, seed=12)
    want, want_grads = _alibi_block_reference(model, x)
    torch._dynamo.reset()
    for run in (model, torch.compile(model, backend="aot_eager")):
        model.zero_grad()
        got = run(x)
        got.square().sum().backward()
        assert_close(got, want, 5e-5, "out")
        for name, p in model.named_parameters():
            assert_close(p.grad, want_grads[name], 5e-5, f"d {name}")


def test_attention_one_shot_matches_compile():
    q, k, v = qkv(1, 2, 2, 33, 33, 32)
    a = attndsl.attention(q, k, v, mask_mod=causal, score_mod=alibi)
    _, ref, _ = reference(q, k, v, causal, alibi)
    assert_close(a, ref, 2e-4, "attention()")


def test_scale_argument():
    q, k, v = qkv(1, 1, 1, 20, 20, 32)
    out = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)(q, k, v, scale=0.05)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal, scale=0.05)
    assert_close(out, ref, 1e-4, "scale=0.05")


def test_non_contiguous_inputs():
    base = rand(1, 40, 2, 32, seed=11)  # [B, L, H, D] viewed as [B, H, L, D]
    q = base.transpose(1, 2)
    k = rand(1, 40, 2, 32, seed=12).transpose(1, 2)
    v = rand(1, 40, 2, 32, seed=13).transpose(1, 2)
    assert not q.is_contiguous()
    out = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)(q, k, v)
    _, ref, _ = reference(q, k, v, causal)
    assert_close(out, ref, 1e-4, "strided")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 4e-2)])
def test_half_precision_forward_on_cpu(dtype, tol):
    q, k, v = qkv(1, 2, 2, 40, 40, 32, dtype=dtype)
    out = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)(q, k, v)
    assert out.dtype == dtype
    _, ref, _ = reference(q, k, v, causal)
    assert_close(out, ref, tol, str(dtype))


def test_block_tables_reused_across_calls():
    comp = attndsl.compile(mask_mod=doc_mask, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(1, 2, 2, 78, 78, 32)
    tables = comp.build_block_tables(q, k)
    assert tables is not None and tables.shape == (1, 2, 78, 78)
    _, ref, _ = reference(q, k, v, doc_mask)
    assert_close(comp(q, k, v, block_tables=tables), ref, 1e-4, "with tables")
    assert attndsl.compile(mask_mod=causal).build_block_tables(q, k) is None
    with pytest.raises(ValueError, match="block_tables"):
        comp(q[:, :, :40], k, v, block_tables=tables)


def test_block_tables_built_for_the_tiles_of_a_value_head_dim_of_its_own():
    """With ``value``, the table is built for the runner of the call's (D, Dv), whose tiles may differ
    from the runner of (D, D): the call then builds no forward table of its own."""
    from attndsl.runtime.config import Configs, TileConfig
    comp = attndsl.compile(mask_mod=doc_mask)
    q, k = qkv(1, 2, 2, 78, 78, 32)[:2]
    v = rand(1, 2, 78, 16, seed=5)
    small = TileConfig(16, 16, 4, 1)
    comp.runner(q, 16).cfg = Configs(small, small, small)  # as a GPU would pick other tiles for Dv=16
    tables = comp.build_block_tables(q, k, v)
    assert set(tables.tables) == {(False, 16, 16)}
    out = comp(q, k, v, block_tables=tables)
    assert set(tables.tables) == {(False, 16, 16)}
    _, ref, _ = reference(q, k, v, doc_mask)
    assert_close(out, ref, 1e-4, "Dv=16 with tables")


def test_sections_fit_the_l2_share_and_are_balanced():
    """Heads per grid section: as many as fit the L2 share, then evened out over the sections
    (never a short last section), and at least one."""
    from attndsl.runtime.config import SECTION_L2_SHARE, section
    mb = 2**20
    l2 = round(16 * mb / SECTION_L2_SHARE)  # an L2 whose share is 16 MiB
    assert section(2 * mb, l2, 16) == 8
    assert section(8 * mb, l2, 16) == 2
    assert section(3 * mb, l2, 16) == 4   # 5 fit: 4 sections of 4, not 5+5+5+1
    assert section(2 * mb, l2, 12) == 6   # 8 fit: 6+6, not 8+4
    assert section(64 * mb, l2, 16) == 1
    assert section(mb, l2, 5) == 5


def test_forward_tiles_follow_the_grid_size():
    """Small grids (few programs per multiprocessor) take the small forward tiles, the others the
    wide ones where the pattern allows them; caller tiles and block tables pin the forward's tiles
    for every call."""
    from dataclasses import replace
    from attndsl.runtime.config import SMALL_GRID_PER_SM, choose, for_pattern, forward_tiles
    cfg = choose(128, interpret=False)
    assert cfg.fwd_small is not None and cfg.fwd_small.block_m < cfg.fwd.block_m
    assert forward_tiles(cfg, SMALL_GRID_PER_SM * 132, 132) == ("fwd_small", cfg.fwd_small)
    assert forward_tiles(replace(cfg, fwd_wide=None), SMALL_GRID_PER_SM * 132 + 1, 132) == ("fwd", cfg.fwd)
    assert choose(128, interpret=False, block_m=128).fwd_small is None
    assert choose(128, interpret=True).fwd_small is None
    # wide tiles for the rest of the grids, where the configuration has them
    assert cfg.fwd_wide is not None and cfg.fwd_wide.block_m > cfg.fwd.block_m
    assert forward_tiles(cfg, SMALL_GRID_PER_SM * 132 + 1, 132) == ("fwd_wide", cfg.fwd_wide)
    assert choose(128, interpret=False, block_m=128).fwd_wide is None
    assert choose(128, interpret=True).fwd_wide is None
    assert choose(256, interpret=False).fwd_wide is None
    # head dims over 128: 128x64 forward tiles for 16-bit inputs; float32 starts from tiles that fit
    wide_d = choose(256, interpret=False)
    assert (wide_d.fwd.block_m, wide_d.fwd.block_n, wide_d.fwd.tma) == (128, 64, True)
    assert (wide_d.dkdv.block_m, wide_d.dkdv.block_n, wide_d.dq.block_m, wide_d.dq.block_n) == (64, 64, 128, 64)
    f32 = choose(256, interpret=False, element_size=4)
    assert (f32.fwd.block_m, f32.fwd.block_n, f32.dkdv.block_n, f32.dq.block_m) == (64, 32, 32, 32)
    assert choose(128, interpret=False, element_size=4) == choose(128, interpret=False)
    assert choose(64, interpret=False).fwd_wide is None
    # MLA-style heads (192/128): a third forward stage and dK/dV over 128 keys x 32 queries; a wide
    # value head takes the wide tiles whatever the query/key head dim; float32 keeps the small ones
    mla = choose(192, interpret=False, head_dim_v=128)
    assert (mla.fwd.block_m, mla.fwd.block_n, mla.fwd.num_stages, mla.fwd.tma) == (128, 64, 3, True)
    assert (mla.dkdv.block_m, mla.dkdv.block_n, mla.dq.block_m, mla.dq.block_n) == (32, 128, 128, 64)
    assert choose(128, interpret=False, head_dim_v=256) == choose(256, interpret=False)
    assert choose(64, interpret=False, head_dim_v=128) == choose(128, interpret=False)
    assert choose(192, interpret=False, head_dim_v=128, element_size=4) == f32
    # ... and for patterns with neither mask nor score modifier only; block tables keep one configuration
    assert for_pattern(cfg, False, False, False) == cfg
    assert for_pattern(cfg, True, False, False).fwd_wide is None
    assert for_pattern(cfg, False, True, False).fwd_wide is None
    assert for_pattern(cfg, True, False, True) == replace(cfg, fwd_small=None, fwd_wide=None)
    table = torch.rand(64, 64) > 0.5
    data = attndsl.compile(mask_mod=lambda b, h, q, kv: table[q, kv])
    q = torch.randn(1, 1, 64, 16)
    assert data.runner(q).cfg.fwd_small is None


def test_head_dims_split_where_padding_multiplies_zeros():
    """192 runs as 128 + 64 (padding to 256 would multiply a quarter zeros); a second part is 16
    wide at least, so 24 stays one 32-wide part; powers of two stay whole."""
    from attndsl.runtime.config import split_head_dim
    got = {d: split_head_dim(d) for d in (16, 24, 32, 48, 64, 80, 96, 100, 128, 144, 160, 192, 200, 256)}
    assert got == {16: (16, 0), 24: (32, 0), 32: (32, 0), 48: (32, 16), 64: (64, 0), 80: (64, 16), 96: (64, 32),
                   100: (128, 0), 128: (128, 0), 144: (128, 16), 160: (128, 32), 192: (128, 64), 200: (256, 0),
                   256: (256, 0)}
    src = attndsl.compile(mask_mod=causal).source
    for line in ("qk = tl.dot(q2, kT2, qk", "qkT = tl.dot(k2, tl.trans(q2), qkT", "dk2 += tl.dot(dsT.to(q2.dtype), q2",
                 "dq2 += tl.dot(ds.to(kT2.dtype), tl.trans(kT2)", "kT2 = k2_desc.load([kv_lo.to(tl.int32), BLOCK_D]).T"):
        assert line in src, line
    q, k, v = (rand(1, 2, 40, 48, seed=s, grad=True) for s in range(3))
    r = attndsl.compile(mask_mod=causal, block_m=16, block_n=16).runner(q)
    assert (r.bd, r.bd2, r._consts(q.dtype)["HAS_D2"]) == (32, 16, True)


class _TooBigFirst:
    """A kernel whose 32-wide launches overflow shared memory (``OutOfResources``)."""

    def __init__(self, kernel):
        self.kernel, self.widths = kernel, []

    def __getitem__(self, grid):
        from triton.runtime.errors import OutOfResources

        def launch(*args, **kw):
            self.widths.append(kw["BLOCK_N"])
            if kw["BLOCK_N"] == 32:
                raise OutOfResources(300000, 232448, "shared memory")
            return self.kernel[grid](*args, **kw)
        return launch


def _overflowing(r, names=("fwd", "bwd_dkdv", "bwd_dq")):
    """Give runner ``r`` kernels whose 32-wide launches overflow; returns them by name."""
    flaky = {n: _TooBigFirst(getattr(r.mod, f"attn_{n}")) for n in names}
    mod = type("Module", (), {f"attn_{n}": f for n, f in flaky.items()})
    for name in dir(r.mod):
        if not hasattr(mod, name) and not name.startswith("__"):
            setattr(mod, name, getattr(r.mod, name))
    r.mod = mod
    return flaky


def test_shared_memory_retry_rebuilds_block_tables():
    """A launch that overflows shared memory is retried with narrower tiles: the block tables (and
    the visit counts) must follow the tiles actually launched, in the forward, dK/dV and dQ."""
    comp = attndsl.compile(mask_mod=doc_mask, block_m=32, block_n=32)
    q, k, v = qkv(1, 2, 2, 78, 78, 32, grad=True)
    flaky = _overflowing(comp.runner(q))
    out = comp(q, k, v)
    (q64, k64, v64), ref, _ = reference(q, k, v, doc_mask)
    assert_close(out, ref, 1e-4, "forward after a retry")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(ref, (q64, k64, v64), do.double())
    for g, w, name in zip(got, want, "qkv"):
        assert_close(g, w, 1e-4, f"d{name} after a retry")
    assert all(f.widths[:2] == [32, 16] for f in flaky.values()), {n: f.widths for n, f in flaky.items()}
    visits = comp.visit_counts(q.detach(), k.detach(), v.detach())
    assert torch.equal(visits.cpu(), brute_visits(doc_mask, 1, 2, 78, 78, 32, 16).to(visits.dtype).reshape(visits.shape))



def test_shared_memory_fallback_holds_for_one_element_size():
    """Float32 inputs need twice the shared memory of 16-bit ones: the narrower tiles a float32
    call fell back to stay with float32 calls, and a later bf16 call launches the full tiles."""
    comp = attndsl.compile(block_m=32, block_n=32)
    q, k, v = qkv(1, 2, 2, 40, 40, 32)
    qb, kb, vb = (t.to(torch.bfloat16) for t in (q, k, v))
    r32, r16 = comp.runner(q), comp.runner(qb)
    assert r32 is not r16 and comp.runner(q.half()) is r16
    flaky = _overflowing(r32, ("fwd",))
    out = comp(q, k, v)
    assert flaky["fwd"].widths == [32, 16] and r32.cfg.fwd.block_n == 16
    assert_close(out, reference(q, k, v)[1], 1e-4, "float32 after a retry")
    out_b = comp(qb, kb, vb)
    assert r16.cfg.fwd.block_n == 32
    assert_close(out_b, reference(qb, kb, vb)[1], 2e-2, "bf16")


# --- the forward's K/V tiles through tensor descriptors (TMA) or pointer loads -----------------------------
def test_tma_ready_follows_the_descriptor_rules():
    """Last stride 1, base and other strides (of dimensions longer than 1) in multiples of 16 bytes."""
    from attndsl.runtime.launch import tma_ready
    t = torch.randn(2, 3, 40, 16)
    assert tma_ready(True, t, t)
    assert not tma_ready(True, t.transpose(-1, -2))  # last stride 40
    assert not tma_ready(True, torch.randn(2, 3, 40, 17)[..., :16])  # rows 68 bytes apart
    assert not tma_ready(True, torch.randn(2, 3, 40, 20)[..., 1:17])  # base 4 bytes off
    assert tma_ready(True, torch.randn(1, 3, 40, 20)[..., :16])  # rows 80 bytes apart
    assert tma_ready(True, torch.randn(2, 40, 3, 16).transpose(1, 2))  # [B, L, H, D] storage
    assert not tma_ready(False, t)  # CPU tensors outside the interpreter
    # one row: its stride is still the descriptor's, and must be aligned (w of rank 1, Lkv = 1)
    assert not tma_ready(True, torch.randn(1, 1, 1, 1))
    assert not tma_ready(True, torch.randn(2, 3, 1, 18))
    assert tma_ready(True, torch.randn(2, 3, 1, 16))


@pytest.mark.parametrize("D,R", [(18, 1), (16, 3), (16, 4)])
def test_one_key_rows_not_16_bytes_apart_read_through_pointers(D, R, monkeypatch):
    """Lkv = 1 with K/V rows (D=18, float32) or low-rank w rows (R=1, 3) not 16 bytes apart: the
    forward reads them through pointers (a descriptor over them failed to build, found by the slow
    property run); D=16, R=4 keeps descriptors. Output and every gradient match the float64
    reference."""
    kv_seen, w_seen = _launched_tma(monkeypatch), _launched_tma(monkeypatch, "W_TMA")
    q, k, v = (rand(1, 2, L, D, dtype=torch.float32, seed=s, grad=True) for s, L in ((0, 5), (1, 1), (2, 1)))
    u = rand(1, 2, 5, R, dtype=torch.float32, seed=3, grad=True)
    w = rand(1, 1, 1, R, dtype=torch.float32, seed=4, grad=True)
    for normalizer in ("softmax", "sigmoid"):
        out = attndsl.attention(q, k, v, bias_factors=(u, w), normalizer=normalizer)
        do = torch.randn_like(out)
        got = torch.autograd.grad(out, (q, k, v, u, w), do)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v, u, w)]
        want, _ = attndsl.reference.attention(*leaves[:3], bias_factors=tuple(leaves[3:]), normalizer=normalizer)
        assert_close(out, want, 1e-5, f"{normalizer} output")
        for g, wg, name in zip(got, torch.autograd.grad(want, leaves, do.double()), "q k v u w".split()):
            assert_close(g, wg, 1e-5, f"{normalizer} d{name}")
    assert kv_seen and {tma for _, tma in kv_seen} == {D * 4 % 16 == 0}
    assert w_seen and {tma for _, tma in w_seen} == {R * 4 % 16 == 0}


def _launched_tma(monkeypatch, const="KV_TMA"):
    """Record the ``const`` constant (KV_TMA, W_TMA) of every launch that has one (the forward's)."""
    from attndsl.runtime import launch
    seen = []
    orig = launch.Runner._launch

    def spy(self, kernel, grid, args, cfg, which, table_args=None, **consts):
        if const in consts:
            seen.append((which, consts[const](cfg)))
        return orig(self, kernel, grid, args, cfg, which, table_args=table_args, **consts)
    monkeypatch.setattr(launch.Runner, "_launch", spy)
    return seen


@pytest.mark.parametrize("how", ["descriptors", "unaligned_rows", "config_without_tma"])
def test_kv_tiles_through_descriptors_or_pointers(how, monkeypatch):
    """The forward's two ways of reading K/V tiles give the reference's values and gradients, with
    lengths that are not multiples of the tile and a head dim below the padded one (zero fill by
    either)."""
    import attndsl.api
    from attndsl.runtime.config import Configs, TileConfig
    seen = _launched_tma(monkeypatch)
    if how == "config_without_tma":
        c = TileConfig(BLOCK, BLOCK, 4, 1, tma=False)
        monkeypatch.setattr(attndsl.api, "choose", lambda *a, **kw: Configs(c, c, c))
    B, Hq, Hkv, Lq, Lkv, D = 1, 4, 2, 37, 45, 24
    q = rand(B, Hq, Lq, D, seed=3, grad=True)
    if how == "unaligned_rows":  # rows 100 bytes apart
        k = rand(B, Hkv, Lkv, D + 1, seed=4)[..., :D].requires_grad_()
        v = rand(B, Hkv, Lkv, D + 1, seed=5)[..., :D].requires_grad_()
    else:
        k, v = rand(B, Hkv, Lkv, D, seed=4, grad=True), rand(B, Hkv, Lkv, D, seed=5, grad=True)
    comp = attndsl.compile(mask_mod=sliding(20), block_m=BLOCK, block_n=BLOCK)
    out = comp(q, k, v)
    (q64, k64, v64), ref, _ = reference(q, k, v, sliding(20))
    assert_close(out, ref, 2e-4, "out")
    dout = rand(*out.shape, seed=6)
    out.backward(dout)
    ref.backward(dout.double())
    for name_, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close(got, want, 5e-4, name_)
    assert {w for w, _ in seen} == {"fwd"}
    assert all(t == (how == "descriptors") for _, t in seen), seen


@pytest.mark.parametrize("how", ["descriptor", "unaligned_rows", "config_without_tma"])
def test_low_rank_w_tiles_through_a_descriptor_or_pointers(how, monkeypatch):
    """The forward's two ways of reading the low-rank factor's Wᵀ tiles (a tensor descriptor when its
    rows are 16-byte aligned, pointer loads otherwise) give the reference's values and gradients, with
    w broadcast over the batch and shared by the query heads of a K/V head (GQA), R below the padded
    rank and lengths that are not multiples of the tile."""
    import attndsl.api
    from attndsl.runtime.config import Configs, TileConfig
    seen = _launched_tma(monkeypatch, "W_TMA")
    if how == "config_without_tma":
        c = TileConfig(BLOCK, BLOCK, 4, 1, tma=False)
        monkeypatch.setattr(attndsl.api, "choose", lambda *a, **kw: Configs(c, c, c))
    B, Hq, Hkv, Lq, Lkv, D, R = 2, 2, 1, 37, 45, 16, 4  # GQA with two query heads: short in CI
    q, k, v = qkv(B, Hq, Hkv, Lq, Lkv, D, grad=True, seed=12)
    u = rand(B, Hq, Lq, R, seed=13, grad=True)
    if how == "unaligned_rows":  # rows 20 bytes apart
        w = rand(1, Hkv, Lkv, R + 1, seed=14)[..., :R].requires_grad_()
    else:  # rows 16 bytes apart
        w = rand(1, Hkv, Lkv, R, seed=14, grad=True)
    comp = attndsl.compile(mask_mod=sliding(20), block_m=BLOCK, block_n=BLOCK)
    out = comp(q, k, v, bias_factors=(u, w))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, u, w)]
    ref, _ = attndsl.reference.attention(*leaves[:3], mask_mod=sliding(20), bias_factors=tuple(leaves[3:]))
    assert_close(out, ref, 2e-4, "out")
    dout = rand(*out.shape, seed=15)
    grads = torch.autograd.grad(out, (q, k, v, u, w), dout)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    for name_, got, want in zip(("dq", "dk", "dv", "du", "dw"), grads, ref_grads):
        assert_close(got, want, 5e-4, name_)
    assert seen and all(t == (how == "descriptor") for _, t in seen), seen



@pytest.mark.parametrize("case", ["dense", "sinks_lse", "sigmoid", "low_rank", "score_mod", "mask"])
def test_wide_forward_tiles_only_without_mask_or_score_mod(case, monkeypatch):
    """A pattern with neither mask nor score modifier runs the configuration's wide forward tiles
    (on the GPU 256 rows) and gives the reference's values and gradients with lengths that are not
    multiples of either tile, GQA, sinks (and the lse's gradient), sigmoid and a low-rank bias; a
    mask or a score modifier keeps the default forward tiles."""
    import attndsl.api
    from attndsl.runtime import launch
    from attndsl.runtime.config import Configs, TileConfig
    tiles, wide = TileConfig(BLOCK, BLOCK, 4, 1, tma=True), TileConfig(2 * BLOCK, BLOCK, 4, 1, tma=True)
    monkeypatch.setattr(attndsl.api, "choose", lambda *a, **kw: Configs(tiles, tiles, tiles, None, wide))
    seen = []
    orig = launch.Runner._launch

    def spy(self, kernel, grid, args, cfg, which, table_args=None, **consts):
        seen.append((which, cfg.block_m))
        return orig(self, kernel, grid, args, cfg, which, table_args=table_args, **consts)
    monkeypatch.setattr(launch.Runner, "_launch", spy)
    B, Hq, Hkv, Lq, Lkv, D = 2, 2, 1, 45, 37, 16  # GQA with two query heads: short in CI
    q, k, v = qkv(B, Hq, Hkv, Lq, Lkv, D, grad=True, seed=21)
    pattern, call, ref_call, extra = {}, {}, {}, []
    if case == "sinks_lse":
        extra = [rand(Hq, seed=22, grad=True)]
        call = dict(sinks=extra[0], return_lse=True)
    elif case == "sigmoid":
        pattern = dict(normalizer="sigmoid")
    elif case == "low_rank":
        extra = [rand(B, Hq, Lq, 4, seed=23, grad=True), rand(1, Hkv, Lkv, 4, seed=24, grad=True)]
        call = dict(bias_factors=tuple(extra))
    elif case == "score_mod":
        pattern = dict(score_mod=lambda s, b, h, qi, kv: s * 0.75)
    elif case == "mask":
        pattern = dict(mask_mod=sliding(20))
    res = attndsl.compile(**pattern)(q, k, v, **call)
    outs = res if isinstance(res, tuple) else (res,)
    leaves = [q, k, v, *extra]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    if case == "sinks_lse":
        ref_call = dict(sinks=leaves64[3])
    elif case == "low_rank":
        ref_call = dict(bias_factors=tuple(leaves64[3:]))
    ref_out, ref_lse = attndsl.reference.attention(*leaves64[:3], **pattern, **ref_call)
    refs = (ref_out, ref_lse)[:len(outs)]
    for name_, got, want in zip(("out", "lse"), outs, refs):
        assert_close(got, want, 2e-4, name_)
    douts = [rand(*o.shape, seed=25 + i) for i, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, leaves, douts)
    ref_grads = torch.autograd.grad(refs, leaves64, [d.double() for d in douts])
    for name_, got, want in zip(("dq", "dk", "dv", "d3", "d4"), grads, ref_grads):
        assert_close(got, want, 5e-4, name_)
    fwd = [(which, bm) for which, bm in seen if which.startswith("fwd")]
    plain = case in ("dense", "sinks_lse", "sigmoid", "low_rank")
    assert fwd == [("fwd_wide", 2 * BLOCK)] if plain else fwd == [("fwd", BLOCK)], fwd


# --- launch memo: repeated calls of one key skip the launch decisions ------------------------------
def _fwd_bwd(comp, q, k, v, **kw):
    out = comp(q, k, v, **kw)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    return out, grads


def test_repeated_calls_take_the_memoised_launches(monkeypatch):
    """The second forward+backward of one shape builds no new launch (every kernel comes from the
    runner's memo, checked against a fresh computation: conftest's ATTNDSL_VERIFY_MEMO), gives the
    same bits as the first and matches the float64 reference."""
    from attndsl.runtime import launch
    assert launch.VERIFY_MEMO
    made = []
    orig = launch.Runner._prepared
    monkeypatch.setattr(launch.Runner, "_prepared", lambda self, kernel, *a: made.append(kernel) or orig(self, kernel, *a))
    comp = attndsl.CompiledAttention(causal, name="memo_repeat")
    q, k, v = qkv(1, 4, 2, 37, 45, 16, grad=True, seed=3)
    first = _fwd_bwd(comp, q, k, v)
    assert len(made) == 3, made  # forward, dQ (which computes delta), dK/dV
    second = _fwd_bwd(comp, q, k, v)
    assert len(made) == 3, made
    for a, b in zip((first[0], *first[1]), (second[0], *second[1])):
        assert torch.equal(a, b)
    (q64, k64, v64), ref, _ = reference(q, k, v, causal)
    assert_close(second[0], ref, 1e-4, "out")
    for g, r in zip(second[1], torch.autograd.grad((ref * ref).sum(), (q64, k64, v64))):
        assert_close(g, r, 1e-4, "grad")


def _offset(t):
    """The same values one element past an aligned base (another alignment class)."""
    flat = torch.cat([t.detach().new_zeros(1), t.detach().flatten()])[1:]
    return flat.view(t.shape).requires_grad_(t.requires_grad)


def test_the_call_key_follows_what_fixes_the_launch():
    """One compiled pattern, calls whose keys differ in one thing each (alignment, strides, scale
    sign, the gradient's strides, sinks, low-rank factors), interleaved with the first key again:
    every call matches the reference, forward and gradients, and no memoised launch disagrees with
    a fresh one (ATTNDSL_VERIFY_MEMO raises otherwise)."""
    comp = attndsl.CompiledAttention(sliding(9), name="memo_keys")
    q0, k0, v0 = qkv(1, 2, 1, 33, 33, 16, grad=True, seed=5)
    variants = {
        "plain": (q0, k0, v0, {}, "square"),
        "k misaligned": (q0, _offset(k0), v0, {}, "square"),
        "q transposed layout": (q0.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(), k0, v0, {},
                                "square"),
        "negative scale": (q0, k0, v0, {"scale": -0.3}, "square"),
        "broadcast gradient": (q0, k0, v0, {}, "sum"),
        "sinks": (q0, k0, v0, {"sinks": rand(2, seed=9, grad=True)}, "square"),
        "bias factors": (q0, k0, v0, {"bias_factors": (rand(1, 2, 33, 3, seed=10, grad=True),
                                                       rand(1, 1, 33, 3, seed=11, grad=True))}, "square"),
    }
    for name in [n for v_ in variants for n in ("plain", v_)]:
        q, k, v, kw, loss = variants[name]
        leaves = [q, k, v, *(t for t in (kw.get("sinks"), *(kw.get("bias_factors") or ())) if t is not None)]
        out = comp(q, k, v, **kw)
        grads = torch.autograd.grad(out.sum() if loss == "sum" else (out * out).sum(), leaves)
        l64 = [t.detach().double().requires_grad_() for t in leaves]
        kw64 = dict(kw)
        if "sinks" in kw:
            kw64["sinks"] = l64[3]
        if "bias_factors" in kw:
            kw64["bias_factors"] = (l64[3], l64[4])
        ref, _ = attndsl.reference.attention(*l64[:3], mask_mod=sliding(9), **kw64)
        ref_grads = torch.autograd.grad(ref.sum() if loss == "sum" else (ref * ref).sum(), l64)
        assert_close(out, ref, 1e-4, name)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert_close(g, r, 1e-4, f"{name}: gradient {i}")


def test_memo_verification_catches_an_incomplete_key(monkeypatch):
    """A call key that leaves out the lengths would replay the first call's grid for the second:
    the verification the test suite runs with fails that call instead."""
    from attndsl.runtime import launch
    comp = attndsl.CompiledAttention(causal, name="memo_bad_key")
    monkeypatch.setattr(launch.Runner, "call_key", lambda self, *a: ("one key for every call",))
    comp(*qkv(1, 2, 2, 40, 40, 16))
    with pytest.raises(AssertionError, match="launch memo"):
        comp(*qkv(1, 2, 2, 70, 70, 16))


def test_memoised_launches_as_users_get_them(monkeypatch):
    """Without the suite's verification (as users run): the first call of a key decides its three
    launches (forward, dQ with delta, dK/dV), the second and third take the key's prepared launches alone (``FastForward``,
    ``FastBackward``: no launch decided again) and give the first call's bits; a new length
    still matches the reference."""
    from attndsl.runtime import launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", False)
    taken = []
    orig = launch.Runner._memoised
    monkeypatch.setattr(launch.Runner, "_memoised", lambda self, *a: taken.append(orig(self, *a)) or taken[-1])
    fast = []
    for cls in (launch.FastForward, launch.FastBackward):
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _f=cls.__call__: fast.append(type(self)) or _f(self, *a))
    comp = attndsl.CompiledAttention(causal, name="memo_users")
    q, k, v = qkv(1, 2, 1, 41, 41, 16, grad=True, seed=7)
    runs = [_fwd_bwd(comp, q, k, v) for _ in range(3)]
    assert taken == [False] * 3, taken
    assert fast == [launch.FastForward, launch.FastBackward] * 2, fast
    for later in runs[1:]:
        for a, b in zip((runs[0][0], *runs[0][1]), (later[0], *later[1])):
            assert torch.equal(a, b)
    q2, k2, v2 = qkv(1, 2, 1, 23, 50, 16, grad=True, seed=8)
    out, grads = _fwd_bwd(comp, q2, k2, v2)
    (q64, k64, v64), ref, _ = reference(q2, k2, v2, causal)
    ref_grads = torch.autograd.grad((ref * ref).sum(), (q64, k64, v64))
    assert_close(out, ref, 1e-4, "out")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, 1e-4, "grad")


# -------------------------------------------------------------------------------------------
# empty calls: B, Hq, Lq or Lkv of 0 (variable-length batching), answered without a launch
# -------------------------------------------------------------------------------------------
EMPTY_SHAPES = {"B": (0, 2, 1, 5, 7), "Hq": (1, 0, 1, 5, 7), "Lq": (1, 2, 1, 0, 7), "Lkv": (1, 2, 1, 5, 0)}


@pytest.mark.parametrize("which", sorted(EMPTY_SHAPES))
def test_empty_calls_answer_like_fully_masked_rows(which, monkeypatch):
    """Every row of an empty call sees no key: zeros and lse = -inf (the sink with sinks), as SDPA
    and our fully masked rows give; gradients are zeros of each input's shape, the sinks' the sum of
    the lse gradient; no kernel is launched."""
    from attndsl.runtime import launch
    monkeypatch.setattr(launch.Runner, "_run", lambda *a, **k: pytest.fail("an empty call launched a kernel"))
    B, Hq, Hkv, Lq, Lkv = EMPTY_SHAPES[which]
    Hkv = Hkv if Hq else 1
    q, k = rand(B, Hq, Lq, 32, grad=True), rand(B, Hkv, Lkv, 32, seed=1, grad=True)
    v = rand(B, Hkv, Lkv, 16, seed=2, grad=True)
    table = torch.randn(16, requires_grad=True)

    def bias(s, b, h, q_idx, kv_idx):
        return s + table[(q_idx - kv_idx).clamp(-7, 8) + 7]

    comp = attndsl.compile(mask_mod=causal, score_mod=bias)
    out, lse = comp(q, k, v, return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(Hq // max(Hkv, 1), 1),
                                                            v.repeat_interleave(Hq // max(Hkv, 1), 1))
    assert out.shape == sdpa.shape == (B, Hq, Lq, 16) and lse.shape == (B, Hq, Lq) and lse.dtype == torch.float32
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    (out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum()).backward()
    for x in (q, k, v, table):
        assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    sinks = torch.linspace(-1.0, 1.0, Hq).requires_grad_()
    u, w = rand(B, Hq, Lq, 4, seed=3, grad=True), rand(B, Hkv, Lkv, 4, seed=4, grad=True)
    out, lse = comp(q, k, v, sinks=sinks, bias_factors=(u, w), return_lse=True)
    assert torch.equal(lse, sinks.detach()[None, :, None].expand(B, Hq, Lq)) and not out.any()
    dl = rand(B, Hq, Lq, seed=5)
    torch.autograd.backward([out, lse], [torch.ones_like(out), dl])
    torch.testing.assert_close(sinks.grad, dl.sum((0, 2)))
    assert not u.grad.any() and u.grad.shape == u.shape and w.grad.shape == w.shape
    sig = attndsl.compile(mask_mod=causal, normalizer="sigmoid")(q, k, v)
    assert sig.shape == (B, Hq, Lq, 16) and not sig.any()
    assert attndsl.compile(mask_mod=lambda b, h, qi, ki: table[qi] > 0).build_block_tables(q, k) is None


def test_empty_calls_treat_captured_tensors_as_calls_with_keys_do():
    """A tensor read only by the mask gets no gradient (None), as in a call with keys, on the dense
    path and the token selector's; a learnable one gets zeros."""
    keep = torch.rand(8, requires_grad=True)
    slopes = torch.tensor([0.1, 0.2], requires_grad=True)

    def alibi(s, b, h, q_idx, kv_idx):
        return s - slopes[h] * (q_idx - kv_idx)

    comp = attndsl.compile(mask_mod=lambda b, h, q_idx, kv_idx: keep[kv_idx] > 0.5, score_mod=alibi)
    for lq in (0, 6):
        keep.grad = slopes.grad = None
        q, k, v = rand(1, 2, lq, 16, grad=True), rand(1, 2, 8, 16, seed=1), rand(1, 2, 8, 16, seed=2)
        comp(q, k, v).sum().backward()
        assert keep.grad is None and slopes.grad is not None and slopes.grad.shape == (2,)
    for lq in (0, 6):  # the token selector the same way
        keep.grad = slopes.grad = None
        q, k, v = rand(1, 2, lq, 16, grad=True), rand(1, 2, 8, 16, seed=1), rand(1, 2, 8, 16, seed=2)
        comp(q, k, v, indices=torch.randint(0, 8, (1, 1, lq, 4), dtype=torch.int32)).sum().backward()
        assert keep.grad is None and slopes.grad is not None and slopes.grad.shape == (2,)
        assert lq or not slopes.grad.any()


def test_empty_calls_through_the_selectors():
    """Token and block selections of an empty call: the same answer; with no keys, an index >= 0
    is out of range (checked mode)."""
    from attndsl.selectors import BlockSelection
    q, k, v = rand(1, 2, 0, 16, grad=True), rand(1, 1, 9, 16, seed=1, grad=True), rand(1, 1, 9, 24, seed=2, grad=True)
    out, lse = attndsl.attention(q, k, v, indices=torch.zeros(1, 1, 0, 4, dtype=torch.int32), return_lse=True)
    assert out.shape == (1, 2, 0, 24) and lse.shape == (1, 2, 0)
    out.sum().backward()
    assert not k.grad.any() and not v.grad.any()
    q, k, v = rand(1, 2, 6, 16, grad=True), rand(1, 1, 0, 16, seed=1), rand(1, 1, 0, 24, seed=2)
    out, lse = attndsl.attention(q, k, v, indices=torch.full((1, 1, 6, 4), -1, dtype=torch.int32),
                                 sinks=torch.tensor([0.5, -0.5]), return_lse=True)
    assert not out.any() and torch.equal(lse, torch.tensor([0.5, -0.5])[None, :, None].expand(1, 2, 6))
    with pytest.raises(IndexError):
        attndsl.attention(q, k, v, indices=torch.zeros(1, 1, 6, 4, dtype=torch.int32))
    sel = BlockSelection(torch.zeros(1, 1, 1, 1, dtype=torch.int32), 16, 16)
    out = attndsl.attention(q, k, v, blocks=sel)
    assert out.shape == (1, 2, 6, 24) and not out.any()


@pytest.mark.parametrize("lse_grad", [False, True])
def test_dq_kernel_computes_delta_unless_an_lse_gradient_needs_the_delta_kernel(monkeypatch, lse_grad):
    """The backward's launches in order, first call and prepared ones alike: without an lse gradient
    the dQ kernel computes delta = rowsum(dO * O) itself and runs before the dK/dV kernel that
    reads it (no delta kernel); with one, the delta kernel runs first and the lse gradient is
    subtracted. Output, gradients and the sinks' gradient (which reads delta) match the float64
    reference, GQA and lengths off the tiles."""
    from attndsl.runtime import fastlaunch, launch
    names = {}
    order = []
    real = fastlaunch.run

    def spy(kernel, *a, **kw):
        order.append(names.get(kernel, "?"))
        return real(kernel, *a, **kw)
    monkeypatch.setattr(fastlaunch, "run", spy)
    real_prepared = fastlaunch.prepared

    def spy_prepared(kernel, *a, **kw):
        got = real_prepared(kernel, *a, **kw)
        return lambda args: (order.append(names.get(kernel, "?")), got(args))[1]
    monkeypatch.setattr(fastlaunch, "prepared", spy_prepared)
    comp = attndsl.CompiledAttention(causal, name=f"delta_here_{int(lse_grad)}")
    q, k, v = qkv(1, 4, 2, 37, 45, 16, grad=True, seed=5)
    sinks = torch.randn(4, requires_grad=True)
    r = comp.runner(q)
    for n in ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq"):
        names[r._kernel(n)] = n
    (q64, k64, v64), _, _ = reference(q, k, v, causal)
    s64 = sinks.detach().double().requires_grad_()
    ref, ref_lse = attndsl.reference.attention(q64, k64, v64, mask_mod=causal, sinks=s64)
    ref_loss = (ref * ref).sum() + ((ref_lse * ref_lse).sum() if lse_grad else 0)
    ref_grads = torch.autograd.grad(ref_loss, (q64, k64, v64, s64))
    want = ["bwd_delta", "bwd_dkdv", "bwd_dq"] if lse_grad else ["bwd_dq", "bwd_dkdv"]
    for _ in range(2):  # the first call decides the launches, the second takes the prepared ones
        order.clear()
        out, lse = comp(q, k, v, sinks=sinks, return_lse=True)
        loss = (out * out).sum() + ((lse * lse).sum() if lse_grad else 0)
        grads = torch.autograd.grad(loss, (q, k, v, sinks))
        assert order == ["fwd", *want], order
        assert_close(out, ref, 1e-4, "out")
        for name, g, w in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
            assert_close(g, w, 1e-4, name)
    (plan,) = comp._plans.values()  # the second call's backward was the key's prepared one
    assert isinstance(plan.memo.bwd, launch.FastBackward)
