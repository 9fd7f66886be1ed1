"""Tile-uniform loads (passes/uniform.py): which loads qualify, that the per-tile bounds are sound
(a tile declared uniform reads one entry everywhere), that real tile grids take both paths, and
that kernels with both paths match the float64 reference, table gradients included."""
import pytest
import torch

import attndsl
from attndsl import ir
from attndsl.ir.evaluate import evaluate
from attndsl.passes.uniform import uniform_loads
from attndsl.patterns.relative_bias import relative_position_bias, t5_bucket, t5_bucket_bias
from test_learnable import TOL, _case, causal, compare, randn

H = 2


def _spec(score_mod, mask_mod=None):
    return attndsl.compile(mask_mod=mask_mod, score_mod=score_mod).spec


def _t5(bidirectional):
    return t5_bucket_bias(torch.randn(H, 16), 16, 40, bidirectional=bidirectional)


LOADS = [
    (_t5(True), 1),
    (_t5(False), 1),
    (relative_position_bias(torch.randn(H, 2 * 8 + 1), 8), 1),
    (lambda s, b, h, q, kv, t=torch.randn(H, 64, 64): s + t[h, q, kv], 0),           # plain indices
    (lambda s, b, h, q, kv, t=torch.randn(H, 127): s + t[h, q - kv + 63], 0),         # affine: never one entry
    (lambda s, b, h, q, kv, t=torch.randn(H): s + t[h] * (kv - q), 0),                # no q/kv index
    (lambda s, b, h, q, kv, t=torch.randn(64): s + t[kv // 2], 0),                    # one index only
]
RUN_LOOP = ("for it in range(0, n_run):", "for it in range(n_run, n_tiles):")


@pytest.mark.parametrize("mod, n", LOADS)
def test_which_loads_get_constant_runs(mod, n):
    """Closed-form plans: forward, dK/dV and dQ each get a constant-run loop beside the general one,
    and neither tests tiles one by one."""
    spec = _spec(mod)
    assert len(spec.uniform_loads) == n
    src = attndsl.compile(score_mod=mod).source
    for loop in RUN_LOOP:
        assert src.count(loop) == (3 if n else 0)
    assert "if uni0:" not in src


def _doc_ids(L):
    return (torch.arange(L) * 3) // L


@pytest.mark.parametrize("mod, n", LOADS)
def test_block_tables_keep_the_per_tile_test(mod, n):
    """A block table orders tiles by the table, not by position: no runs, one test per tile."""
    ids = _doc_ids(64)
    src = attndsl.compile(mask_mod=lambda b, h, q, kv: ids[q] == ids[kv], score_mod=mod).source
    for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
        body = src[src.index(f"def {kernel}("):]
        body = body[:body.find("\n@triton.jit")]
        # every loop of the kernel (the backward's: full tiles, then partial ones) tests its tiles
        loops = body.count("for it in range(")
        assert body.count("if uni0:") == (loops if n else 0), kernel
    assert "n_run" not in src


def test_learnable_uniform_table_adds_one_atomic_per_run():
    table = torch.randn(H, 16, requires_grad=True)
    src = attndsl.compile(score_mod=t5_bucket_bias(table, 16, 40)).source
    dq = src[src.index("def attn_bwd_dq"):]
    assert dq.count("tl.atomic_add(gdst0 + uo0_pre, tl.sum(gpre0, 0))") == 1
    assert dq.count("tl.atomic_add(gdst0 + uo0_suf, tl.sum(gsuf0, 0))") == 1
    ids = _doc_ids(64)
    src = attndsl.compile(mask_mod=lambda b, h, q, kv: ids[q] == ids[kv], score_mod=t5_bucket_bias(table, 16, 40)).source
    dq = src[src.index("def attn_bwd_dq"):]
    # in each loop (full tiles, then partial ones): the score, and the table's gradient
    assert dq.count("if uni0:") == 2 * dq.count("for it in range(")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("bm, bn", [(16, 16), (32, 16), (16, 64)])
def test_tile_bounds_are_sound_and_both_paths_occur(bidirectional, bm, bn):
    """Brute force over every tile of a 200 x 170 grid: the bounds contain every element's bucket,
    and where they meet, every element reads that one bucket."""
    ul = _spec(_t5(bidirectional)).uniform_loads[0]
    Lq, Lkv = 200, 170
    q = torch.arange(Lq)[:, None]
    kv = torch.arange(Lkv)[None, :]
    bucket = t5_bucket(q, kv, 16, 40, bidirectional)
    d = [i for i, v in enumerate(ul.varying) if v][0]
    kinds = set()
    for q_lo in range(0, Lq, bm):
        for kv_lo in range(0, Lkv, bn):
            q_hi, kv_hi = min(q_lo + bm, Lq) - 1, kv_lo + bn - 1  # the kernels' own tile bounds
            env = {k: torch.tensor(x) for k, x in
                   dict(q_lo=q_lo, q_hi=q_hi, kv_lo=kv_lo, kv_hi=kv_hi, h=0, b=0).items()}
            lo, hi = (int(x) for x in evaluate([ul.lo[d], ul.hi[d]], env, {}))
            tile = bucket[q_lo:q_hi + 1, kv_lo:kv_hi + 1]
            assert lo <= tile.min() and tile.max() <= hi, (q_lo, kv_lo, lo, hi)
            if lo == hi:
                assert (tile == lo).all()
            kinds.add(lo == hi)
    assert kinds == {True, False}


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_table_both_paths_gqa(bidirectional):
    """Lq != Lkv, GQA, 16x16 tiles: most tiles are uniform (distance past 40), the diagonal band is not."""
    gen, (q, k, v) = _case(Hq=4, Hkv=2, Lq=120, Lkv=90, seed=21)
    table = randn(4, 16, gen=gen)
    mask = causal if not bidirectional else None
    compare(q, k, v, mask_mod=mask, score_mod=t5_bucket_bias(table, 16, 40, bidirectional=bidirectional),
            learn=[table], block=16, name=f"t5 uniform tiles, bidirectional={bidirectional}")


def test_clipped_table_bf16_both_paths():
    gen, (q, k, v) = _case(dtype=torch.bfloat16, Lq=100, Lkv=100, seed=22)
    table = randn(4, 2 * 10 + 1, gen=gen, dtype=torch.bfloat16)
    compare(q, k, v, mask_mod=causal, score_mod=relative_position_bias(table, 10), learn=[table], block=16,
            name="clipped table bf16, uniform tiles")


def test_uniform_load_feeding_a_nonlinear_score_mod():
    """The loaded value is used twice and nonlinearly (its derivative reads it): both branches must
    bind the same name for the later uses."""
    gen, (q, k, v) = _case(Lq=70, Lkv=70, seed=23)
    table = randn(4, 2 * 6 + 1, gen=gen, scale=0.5)

    def mod(s, b, h, q_, kv):
        t = table[h, (q_ - kv).clamp(-6, 6) + 6]
        return s * torch.sigmoid(t) + t * t

    compare(q, k, v, mask_mod=causal, score_mod=mod, learn=[table], block=16, name="nonlinear uniform load")


def test_variables_of_the_bounds_are_the_tile_ranges():
    ul = _spec(_t5(False)).uniform_loads[0]
    fv = set().union(*(ir.free_vars(x) for x in ul.lo + ul.hi))
    assert fv <= {"q_lo", "q_hi", "kv_lo", "kv_hi", "b", "h"}


def _runs_by_brute_force(bucket, Lq, Lkv, bm, bn, full):
    """Per query tile: full key tiles in the longest constant prefix plus the longest constant
    suffix of the rest (the runs a kernel with exact bounds finds)."""
    out = []
    for q_lo in range(0, Lq, bm):
        rows = bucket[q_lo:min(q_lo + bm, Lq)]
        tiles = [t for t in range(Lkv // bn) if full(q_lo, min(q_lo + bm, Lq) - 1, t * bn, t * bn + bn - 1)]
        assert tiles == list(range(tiles[0], tiles[-1] + 1)) if tiles else True

        def one(ts):
            return not ts or rows[:, ts[0] * bn:(ts[-1] + 1) * bn].unique().numel() == 1
        pre = max(n for n in range(len(tiles) + 1) if one(tiles[:n]))
        rest = tiles[pre:]
        suf = max(n for n in range(len(rest) + 1) if one(rest[len(rest) - n:]))
        out.append(pre + suf)
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("Lq, Lkv", [(200, 170), (96, 160)])
def test_constant_runs_are_the_longest(bidirectional, Lq, Lkv):
    """The binary search finds each query tile's longest runs: T5's bounds are exact over any range
    of the distance, so the kernel's run lengths equal a brute force over the bucket matrix."""
    bm = bn = 16
    mask = causal if not bidirectional else None
    full = ((lambda q_lo, q_hi, kv_lo, kv_hi: kv_hi <= q_lo) if mask else (lambda *a: True))
    comp = attndsl.compile(mask_mod=mask, score_mod=_t5(bidirectional), block_m=bm, block_n=bn)
    q = torch.randn(1, H, Lq, 32)
    k = torch.randn(1, H, Lkv, 32)
    visits, runs = comp.visit_counts(q, k, k, runs=True)
    bucket = t5_bucket(torch.arange(Lq)[:, None], torch.arange(Lkv)[None, :], 16, 40, bidirectional)
    expect = _runs_by_brute_force(bucket, Lq, Lkv, bm, bn, full)
    assert torch.equal(runs[0], expect), (runs[0], expect)
    assert (runs <= visits).all() and runs.sum() > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_range_bounds_are_sound(bidirectional):
    """Brute force over ranges of key tiles (as the run search asks): where the bounds meet, every
    pair of the range reads that one bucket."""
    ul = _spec(_t5(bidirectional)).uniform_loads[0]
    Lq, Lkv, bm, bn = 160, 200, 16, 16
    bucket = t5_bucket(torch.arange(Lq)[:, None], torch.arange(Lkv)[None, :], 16, 40, bidirectional)
    d = [i for i, v in enumerate(ul.varying) if v][0]
    met = 0
    for q_lo in range(0, Lq, bm):
        for t0 in range(Lkv // bn):
            for t1 in range(t0, Lkv // bn):
                env = {k: torch.tensor(x) for k, x in dict(q_lo=q_lo, q_hi=q_lo + bm - 1, kv_lo=t0 * bn,
                                                            kv_hi=t1 * bn + bn - 1, h=0, b=0).items()}
                lo, hi = (int(x) for x in evaluate([ul.lo[d], ul.hi[d]], env, {}))
                block = bucket[q_lo:q_lo + bm, t0 * bn:(t1 + 1) * bn]
                assert lo <= block.min() and block.max() <= hi
                if lo == hi:
                    met += 1
                    assert (block == lo).all()
    assert met > 0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_t5_runs_at_both_ends_and_per_tile_test_under_block_tables(bidirectional):
    """Non-causal bidirectional T5 has runs at both ends of every row; a document mask (block
    table) takes the per-tile test instead. Both against the float64 reference, table gradient included."""
    gen, (q, k, v) = _case(Hq=2, Hkv=1, Lq=100, Lkv=120, seed=24)
    table = randn(4, 16, gen=gen)
    compare(q, k, v, score_mod=t5_bucket_bias(table, 16, 40, bidirectional=bidirectional),
            learn=[table], block=16, name=f"t5 no mask, bidirectional={bidirectional}")
    ids_q, ids_k = (torch.arange(100) * 2) // 100, (torch.arange(120) * 2) // 120
    compare(q, k, v, mask_mod=lambda b, h, qi, kv: ids_q[qi] == ids_k[kv],
            score_mod=t5_bucket_bias(table, 16, 40, bidirectional=bidirectional),
            learn=[table], block=16, name=f"t5 documents, bidirectional={bidirectional}")


def test_run_loop_folds_a_scalar_bias_into_the_exponent():
    """The softmax forward's run loop takes a bias of the run's entries (and b, h) out of the
    exponent's shift (``spec.lowering.run_folds``; the prelude's ``_softmax_update`` with SCALED and
    RUN_ADD); a bias with a per-element part keeps the scaled scores."""
    def fwd_run_loop(mod):
        src = attndsl.compile(mask_mod=causal, score_mod=mod).source
        fwd = src[src.index("def attn_fwd("):src.index("def attn_bwd_delta(")]
        return fwd[fwd.index("for it in range(0, n_run):"):fwd.index("for it in range(n_run, n_tiles):")]
    table, slopes = torch.randn(H, 16), torch.randn(H)
    t5 = t5_bucket_bias(table, 16, 40, bidirectional=False)
    for mod in (t5, lambda s, b, h, q, kv: t5(s, b, h, q, kv) + slopes[h]):
        assert "_softmax_update(m_i, l_i, acc, s, v, qk_scale, s_add, DOT_PRECISION, True, True)" in fwd_run_loop(mod)
    loop = fwd_run_loop(lambda s, b, h, q, kv: t5(s, b, h, q, kv) + slopes[h] * (kv - q))
    assert "s_add" not in loop and "_softmax_update(m_i, l_i, acc, s, v, 1.0, 0.0, DOT_PRECISION, False, False)" in loop


@pytest.mark.parametrize("scale", [0.3, 20.0, -20.0, 0.0])
def test_t5_table_any_scale_sign_with_sinks(scale):
    """The run loop's fold holds for a positive scale only; other scales scale the scores first.
    A table's own scalar added too (``+ slopes[h]``), sinks, GQA: output, lse and all gradients.
    A scale of 20 multiplies the float32 rounding of every score by 20 before the exponential (its
    dV came to 3.3e-5 of the float64 reference with numpy 2.3's float32 ``exp`` in the interpreter):
    the tolerance grows with the scale."""
    gen, (q, k, v) = _case(Hq=2, Hkv=1, Lq=120, Lkv=100, seed=31)
    table, slopes, sinks = randn(4, 16, gen=gen), randn(4, gen=gen), randn(2, gen=gen)
    t5 = t5_bucket_bias(table, 16, 40, bidirectional=False)
    compare(q, k, v, mask_mod=causal, score_mod=lambda s, b, h, q_, kv: t5(s, b, h, q_, kv) + slopes[h],
            learn=[table, slopes], extras=dict(sinks=sinks, scale=scale), lse_loss=True, block=16,
            tol=TOL[torch.float32] * max(1.0, abs(scale) / 5), name=f"t5 runs, scale {scale}")
