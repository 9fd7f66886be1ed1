"""Neighborhood (NATTEN), sliding-tile (STA) and radial attention against brute force.

The references here are written from the papers'/libraries' definitions with Python loops over
grid coordinates (NATTEN's window placement per dilation group, STA's tile windows, the radial
reference's ``get_window_width`` / ``get_diagonal_split_mask`` / ``shrinkMaskStrict``): they
share no code with ``patterns/`` or the DSL. Each pattern is checked

* at the mask level, over many random grid shapes, kernel sizes, dilations, tile sizes and
  causal flags (cheap: the pattern evaluated on index tensors);
* end to end through ``attndsl.compile`` on the CPU interpreter: output, logsumexp and the
  gradients of q, k, v against a float64 softmax with the brute-force mask;
* on visits: the key tiles each query tile's forward program visits (``visit_counts``) are
  exactly the tiles the brute-force mask touches.
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import attndsl
from attndsl import Layout
from attndsl.spec import VisitBox
from attndsl.patterns.neighborhood import neighborhood
from attndsl.patterns.radial import radial, radial_block, radial_via_tables
from attndsl.patterns.sliding_tile import sliding_tile, sta_layout


# ---------------------------------------------------------------------------------------------
# brute-force references (loops over coordinates)

def layout_coords(shape, tile, prefix=0, suffix=0):
    """Per sequence position: its grid coordinates (tile-major enumeration), None for extras."""
    counts = [s // t for s, t in zip(shape, tile)]
    out = [None] * prefix
    for tc in itertools.product(*[range(n) for n in counts]):
        for ic in itertools.product(*[range(t) for t in tile]):
            out.append(tuple(tc[a] * tile[a] + ic[a] for a in range(len(shape))))
    return out + [None] * suffix


def natten_keys(i, n, k, d, causal):
    """NATTEN: the key coordinates query coordinate ``i`` sees on an axis of length ``n``."""
    members = list(range(i % d, n, d))  # the dilation group of i
    li = members.index(i)
    if causal:
        return set(members[max(0, li - k + 1): li + 1])
    start = max(li - k // 2, 0)
    start = min(start, len(members) - k)  # shift the window back inside at the far border
    return set(members[start: start + k])


def brute_neighborhood(shape, tile, ks, ds, cs, prefix=0, suffix=0):
    pos = layout_coords(shape, tile, prefix, suffix)
    L = len(pos)
    m = torch.zeros(L, L, dtype=torch.bool)
    for qi, qc in enumerate(pos):
        if qc is None:
            m[qi] = True
            continue
        allowed = [natten_keys(qc[a], shape[a], ks[a], ds[a], cs[a]) for a in range(len(shape))]
        for ki, kc in enumerate(pos):
            m[qi, ki] = kc is None or all(kc[a] in allowed[a] for a in range(len(shape)))
    return m


def brute_sta(shape, tile, window, text=0, text_first=False):
    prefix, suffix = (text, 0) if text_first else (0, text)
    pos = layout_coords(shape, tile, prefix, suffix)
    counts = [s // t for s, t in zip(shape, tile)]
    L = len(pos)
    m = torch.zeros(L, L, dtype=torch.bool)
    for qi, qc in enumerate(pos):
        if qc is None:
            m[qi] = True
            continue
        ok = []
        for a in range(len(shape)):
            t = qc[a] // tile[a]
            start = min(max(t - window[a] // 2, 0), counts[a] - window[a])
            ok.append(range(start, start + window[a]))
        for ki, kc in enumerate(pos):
            m[qi, ki] = kc is None or all(kc[a] // tile[a] in ok[a] for a in range(len(shape)))
    return m


def ref_window_width(i, j, N, decay, block, model):
    """The radial reference's get_window_width (floats as there)."""
    dist = abs(i - j)
    if model == "wan":
        if dist < 1:
            return N
        if dist == 1:
            return N // 2
    elif dist <= 1:
        return N
    group = dist.bit_length()
    decay_length = 2 ** N.bit_length() / 2 ** group * decay
    return decay_length if decay_length >= block else block


def ref_split(i, j, N, threshold):
    """The radial reference's get_diagonal_split_mask (True: the frame pair is kept)."""
    dist = abs(i - j)
    group = dist.bit_length()
    decay_length = 2 ** N.bit_length() / 2 ** group
    if decay_length >= threshold:
        return True
    return dist % int(threshold / decay_length) == 0


def ref_local(i, j, N, decay, block, model, threshold):
    if j == 0:
        return torch.ones(N, N, dtype=torch.bool)
    w = ref_window_width(i, j, N, decay, block, model)
    c = torch.arange(N).view(1, -1)
    r = torch.arange(N).view(-1, 1)
    return ((c - r).abs() <= w) & ref_split(i, j, N, threshold)


def brute_radial(F, N, decay, block, model, threshold, text=0):
    L = F * N + text
    m = torch.ones(L, L, dtype=torch.bool)
    for i in range(F):
        for j in range(F):
            m[i * N:(i + 1) * N, j * N:(j + 1) * N] = ref_local(i, j, N, decay, block, model, threshold)
    return m


def shrink_strict(mask, B):
    """The radial reference's shrinkMaskStrict."""
    nb = mask.shape[0] // B
    mask = mask[:nb * B, :nb * B].view(nb, B, nb, B)
    col = mask.sum(dim=1) / B
    frac = (col > 1 / 3).sum(dim=-1) / ((col > 0).sum(dim=-1) + 1e-9)
    return frac > 0.6


def brute_radial_block(F, N, decay, B, model, threshold, text=0):
    """gen_log_mask_shrinked (tokens per frame a multiple of the block) expanded to elements."""
    nb = N // B
    blocks = torch.zeros(F * nb, F * nb, dtype=torch.bool)
    for i in range(F):
        for j in range(F):
            blocks[i * nb:(i + 1) * nb, j * nb:(j + 1) * nb] |= shrink_strict(ref_local(i, j, N, decay, B, model, threshold), B)
    L = F * N + text
    m = torch.ones(L, L, dtype=torch.bool)
    m[:F * N, :F * N] = blocks.repeat_interleave(B, 0).repeat_interleave(B, 1)
    return m


# ---------------------------------------------------------------------------------------------
# helpers

def eval_mask(mask_mod, L):
    q = torch.arange(L).view(-1, 1)
    kv = torch.arange(L).view(1, -1)
    return torch.broadcast_to(mask_mod(torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.int64), q, kv), (L, L))


def touched(mask, bm, bn):
    L = mask.shape[0]
    tq, tk = math.ceil(L / bm), math.ceil(L / bn)
    p = torch.zeros(tq * bm, tk * bn, dtype=torch.bool)
    p[:L, :L] = mask
    return p.view(tq, bm, tk, bn).any(3).any(1).sum(1).to(torch.int32)


def dense_attention(q, k, v, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None].masked_fill(torch.isneginf(lse)[..., None], 0))
    return p @ v.double(), lse


def check_compiled(mask_mod, want, block_m, block_n, *, heads=1, D=16, seed=0, expect_box=True):
    """attndsl forward + backward vs a float64 reference with the brute-force mask, and visits."""
    L = want.shape[0]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, L, D, generator=g, requires_grad=True) for _ in range(3))
    attn = attndsl.compile(mask_mod=mask_mod, block_m=block_m, block_n=block_n)
    if expect_box:
        assert isinstance(attn.spec.fwd_range, VisitBox), "expected a box visit plan"
    out, lse = attn(q, k, v, return_lse=True)
    do = torch.randn(out.shape, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    ref, ref_lse = dense_attention(q, k, v, want)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), do.double())
    tol = dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(lse.double(), ref_lse, **tol)
    for got, exp, name in ((dq, rq, "dq"), (dk, rk, "dk"), (dv, rv, "dv")):
        torch.testing.assert_close(got.double(), exp.double(), atol=1e-4, rtol=1e-4, msg=name)
    visits = attn.visit_counts(q.detach(), k.detach(), v.detach())
    exp = touched(want, block_m, block_n)
    assert torch.equal(visits[0], exp), f"visited {visits[0].tolist()}, the mask touches {exp.tolist()}"
    return attn


def check_visits(mask_mod, want, block_m, block_n):
    L = want.shape[0]
    q = torch.randn(1, 1, L, 16)
    attn = attndsl.compile(mask_mod=mask_mod, block_m=block_m, block_n=block_n)
    assert isinstance(attn.spec.fwd_range, VisitBox)
    visits = attn.visit_counts(q, q, q)[0]
    exp = touched(want, block_m, block_n)
    assert torch.equal(visits, exp), f"visited {visits.tolist()}, the mask touches {exp.tolist()}"


# ---------------------------------------------------------------------------------------------
# neighborhood attention

def na_configs(n, seed, max_tokens=128, min_tokens=32, sizes=(32, 16)):
    """Random NA problems whose layout admits one of ``sizes`` as kernel tile."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        nd = rng.choice([1, 2, 2, 3])
        tile = tuple(rng.choice([1, 2, 4]) for _ in range(nd))
        shape = tuple(t * rng.randint(1, 4) for t in tile)
        tokens = math.prod(shape)
        if not min_tokens <= tokens <= max_tokens:
            continue
        ds = tuple(rng.choice([1, 1, 1, 2, 3]) if s >= 4 else 1 for s in shape)
        ks = tuple(rng.randint(1, max(1, s // d)) for s, d in zip(shape, ds))
        cs = tuple(rng.random() < 0.25 for _ in shape)
        lay = Layout(shape, tile)
        bs = lay.kernel_tiles(sizes)
        if bs is None:
            continue
        out.append((shape, tile, ks, ds, cs, bs))
    return out


@pytest.mark.parametrize("shape,tile,ks,ds,cs,bs", na_configs(60, seed=11, sizes=(32, 16, 8, 4)))
def test_neighborhood_mask_matches_natten(shape, tile, ks, ds, cs, bs):
    lay = Layout(shape, tile)
    got = eval_mask(neighborhood(lay, ks, ds, cs), len(lay))
    assert torch.equal(got, brute_neighborhood(shape, tile, ks, ds, cs))


def natten_window_start(i, n, k, d):
    """NATTEN's closed-form window start (its CPU/CUDA kernels' rule, odd kernel sizes)."""
    ns = k // 2
    if d <= 1:
        return max(i - ns, 0) + (n - i - ns - 1 if i + ns >= n else 0)
    if i - ns * d < 0:
        return i % d
    if i + ns * d >= n:
        a = (n // d) * d
        b = n - a
        return n - b + i % d - 2 * ns * d if i % d < b else a + i % d - k * d
    return i - ns * d


def test_reference_agrees_with_natten_window_start():
    """The loop reference above = NATTEN's own window-start formula, for every odd kernel size,
    dilation and position with kernel_size * dilation <= length."""
    for n in range(1, 30):
        for k in range(1, n + 1, 2):
            for d in range(1, n // k + 1):
                for i in range(n):
                    s = natten_window_start(i, n, k, d)
                    assert natten_keys(i, n, k, d, False) == {s + j * d for j in range(k)}, (n, k, d, i)


def test_neighborhood_every_query_has_kernel_size_neighbours():
    """The NATTEN property the border shift exists for."""
    lay = Layout((7, 10), tile=None)
    for ks, ds in (((3, 5), (1, 1)), ((3, 3), (2, 3)), ((2, 4), (1, 2))):
        m = eval_mask(neighborhood(lay, ks, ds), len(lay))
        assert (m.sum(1) == math.prod(ks)).all()


NA_CASES = [  # (shape, tile, kernel, dilation, causal, (block_m, block_n)), L <= 128
    # the plain 2-D and 3-D cases are slow-marked: the dilated / causal ones below run the same
    # dimensionalities in CI (CI time)
    pytest.param((8, 8), (4, 4), (3, 5), (1, 1), (False, False), (16, 16), marks=pytest.mark.slow),
    ((8, 16), (4, 4), (5, 3), (1, 2), (False, False), (32, 16)),
    pytest.param((4, 4, 8), (2, 2, 4), (3, 3, 5), (1, 1, 1), (False, False, False), (32, 32), marks=pytest.mark.slow),
    ((4, 4, 4), (2, 2, 2), (3, 2, 3), (1, 2, 1), (True, False, False), (16, 16)),
    ((96,), (8,), (9,), (3,), (False,), (32, 32)),
    ((8, 16), (2, 4), (5, 5), (1, 1), (False, True), (16, 32)),
    ((8, 8), (1, 1), (3, 3), (2, 1), (False, False), (16, 16)),  # row-major
]


@pytest.mark.parametrize("shape,tile,ks,ds,cs,bs", NA_CASES)
def test_neighborhood_compiled(shape, tile, ks, ds, cs, bs):
    lay = Layout(shape, tile)
    check_compiled(neighborhood(lay, ks, ds, cs), brute_neighborhood(shape, tile, ks, ds, cs), *bs, seed=len(shape))


def test_neighborhood_with_extra_tokens_compiled():
    lay = Layout((6, 8), tile=(2, 8), prefix=16, suffix=16)
    want = brute_neighborhood((6, 8), (2, 8), (3, 3), (1, 1), (False, False), prefix=16, suffix=16)
    attn = check_compiled(neighborhood(lay, 3), want, 16, 16, heads=2)
    assert len(attn.spec.fwd_range.extras) == 2


_NA_VISITS = na_configs(25, seed=5)  # the first 12 in CI, the rest slow-marked (CI time)


@pytest.mark.parametrize("shape,tile,ks,ds,cs,bs", _NA_VISITS[:12] + [pytest.param(*c, marks=pytest.mark.slow)
                                                                      for c in _NA_VISITS[12:]])
def test_neighborhood_visits_exactly_the_touched_tiles(shape, tile, ks, ds, cs, bs):
    lay = Layout(shape, tile)
    check_visits(neighborhood(lay, ks, ds, cs), brute_neighborhood(shape, tile, ks, ds, cs), *bs)


@pytest.mark.slow
@pytest.mark.parametrize("shape,tile,ks,ds,cs,bs", na_configs(40, seed=23, max_tokens=256))
def test_neighborhood_compiled_random(shape, tile, ks, ds, cs, bs):
    lay = Layout(shape, tile)
    check_compiled(neighborhood(lay, ks, ds, cs), brute_neighborhood(shape, tile, ks, ds, cs), *bs)


def test_row_major_fallback_is_still_correct():
    """Tile sizes that are not boxes of the grid: the 1-D plan, same results."""
    lay = Layout((6, 6))
    m = neighborhood(lay, 3)
    check_compiled(m, brute_neighborhood((6, 6), (1, 1), (3, 3), (1, 1), (False, False)), 16, 16, expect_box=False)


# ---------------------------------------------------------------------------------------------
# sliding tile attention

def sta_configs(n, seed, max_tokens=256):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        nd = rng.choice([2, 3, 3])
        tile = tuple(rng.choice([1, 2, 4]) for _ in range(nd))
        counts = tuple(rng.randint(1, 4) for _ in range(nd))
        shape = tuple(t * c for t, c in zip(tile, counts))
        if math.prod(shape) > max_tokens or math.prod(shape) < 16:
            continue
        window = tuple(rng.randint(1, c) for c in counts)
        text = rng.choice([0, 0, 16])
        lay = sta_layout(shape, tile, text)
        bs = lay.kernel_tiles((16, 32, 8, 4))
        if bs is None:
            continue
        out.append((shape, tile, window, text, bs))
    return out


@pytest.mark.parametrize("shape,tile,window,text,bs", sta_configs(40, seed=3))
def test_sliding_tile_mask_matches_reference(shape, tile, window, text, bs):
    lay = sta_layout(shape, tile, text)
    assert torch.equal(eval_mask(sliding_tile(lay, window), len(lay)), brute_sta(shape, tile, window, text))


STA_CASES = [
    ((4, 8, 8), (2, 4, 4), (1, 2, 2), 0, (32, 32)),
    ((4, 4, 8), (2, 2, 4), (2, 1, 1), 16, (16, 16)),
    ((8, 8), (2, 4), (3, 1), 0, (16, 8 * 2)),
]


@pytest.mark.parametrize("shape,tile,window,text,bs", STA_CASES)
def test_sliding_tile_compiled(shape, tile, window, text, bs):
    lay = sta_layout(shape, tile, text)
    attn = check_compiled(sliding_tile(lay, window), brute_sta(shape, tile, window, text), *bs)
    assert not attn.spec.fwd_range.tile_check  # every visited tile is full or a plain box tile


def test_sliding_tile_text_first_compiled():
    lay = sta_layout((4, 4, 4), (2, 2, 4), text_tokens=32, text_first=True)
    check_compiled(sliding_tile(lay, (1, 2, 1)), brute_sta((4, 4, 4), (2, 2, 4), (1, 2, 1), 32, True), 16, 16)


def test_sliding_tile_tiles_are_all_full():
    """STA's kernel tiles inside an STA tile: visited tiles never evaluate the mask."""
    lay = sta_layout((4, 8, 8), (2, 4, 4))
    attn = attndsl.compile(mask_mod=sliding_tile(lay, (1, 2, 2)), block_m=32, block_n=32)
    box = attn.spec.fwd_range
    from attndsl.ir.evaluate import evaluate

    assert box.other_shape == (2, 4, 4)  # one STA tile per query tile
    lo, hi = (2, 4, 0), (3, 7, 3)
    env = {"q_lo": torch.tensor(0), "q_hi": torch.tensor(31)}
    for a in range(3):
        env.update({f"q_c{a}_lo": torch.tensor(lo[a]), f"q_c{a}_hi": torch.tensor(hi[a])})
    for (olo, ohi), (ilo, ihi) in zip(box.box_outer, box.box_inner):
        assert [int(evaluate([x], env, [])[0]) for x in (olo, ohi)] == [int(evaluate([x], env, [])[0]) for x in (ilo, ihi)]


@pytest.mark.parametrize("shape,tile,window,text,bs", sta_configs(20, seed=8, max_tokens=128))
def test_sliding_tile_visits_exactly_the_touched_tiles(shape, tile, window, text, bs):
    lay = sta_layout(shape, tile, text)
    check_visits(sliding_tile(lay, window), brute_sta(shape, tile, window, text), *bs)


# ---------------------------------------------------------------------------------------------
# radial attention

def radial_configs(n, seed, max_tokens=1024, frame_sizes=(8, 16, 24, 32, 64)):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        F = rng.randint(2, 9)
        N = rng.choice(frame_sizes)
        if F * N > max_tokens:
            continue
        block = rng.choice([4, 8, 16])
        threshold = rng.choice([block, 2 * block, 128])
        decay = rng.choice([1.0, 0.5, 0.75, 2.0])
        model = rng.choice(["hunyuan", "wan"])
        text = rng.choice([0, 5])
        out.append((F, N, decay, block, model, threshold, text))
    return out


@pytest.mark.parametrize("F,N,decay,block,model,threshold,text", radial_configs(40, seed=2))
def test_radial_mask_matches_reference(F, N, decay, block, model, threshold, text):
    kw = dict(block=block, decay=decay, model=model, split_threshold=threshold, text_tokens=text)
    want = brute_radial(F, N, decay, block, model, threshold, text)
    assert torch.equal(eval_mask(radial(F, N, **kw), F * N + text), want)
    assert torch.equal(eval_mask(radial_via_tables(F, N, **kw), F * N + text), want)


@pytest.mark.parametrize("F,N,decay,block,model,threshold,text", radial_configs(30, seed=4))
def test_radial_block_mask_matches_reference(F, N, decay, block, model, threshold, text):
    if N % block:
        pytest.skip("the block variant needs whole blocks per frame")
    kw = dict(block=block, decay=decay, model=model, split_threshold=threshold, text_tokens=text)
    want = brute_radial_block(F, N, decay, block, model, threshold, text)
    assert torch.equal(eval_mask(radial_block(F, N, **kw), F * N + text), want)


RADIAL_CASES = [  # F, N, decay, block, model, threshold, text, (block_m, block_n)
    (8, 16, 1.0, 2, "hunyuan", 4, 0, (16, 16)),
    (6, 16, 0.5, 2, "wan", 2, 16, (16, 16)),
    (4, 32, 1.0, 4, "hunyuan", 8, 0, (32, 16)),
]


@pytest.mark.parametrize("F,N,decay,block,model,threshold,text,bs", RADIAL_CASES)
def test_radial_compiled(F, N, decay, block, model, threshold, text, bs):
    m = radial(F, N, block=block, decay=decay, model=model, split_threshold=threshold, text_tokens=text)
    want = brute_radial(F, N, decay, block, model, threshold, text)
    assert not want.all()
    check_compiled(m, want, *bs)


def test_radial_block_compiled():
    F, N, B = 8, 16, 4
    m = radial_block(F, N, block=B, decay=1.0, split_threshold=8, text_tokens=16)
    want = brute_radial_block(F, N, 1.0, B, "hunyuan", 8, 16)
    check_compiled(m, want, 16, 16)


@pytest.mark.parametrize("F,N,decay,block,model,threshold,text",
                         radial_configs(10, seed=9, max_tokens=192, frame_sizes=(16, 32, 48)))
def test_radial_visits_exactly_the_touched_tiles(F, N, decay, block, model, threshold, text):
    m = radial(F, N, block=block, decay=decay, model=model, split_threshold=threshold, text_tokens=text)
    check_visits(m, brute_radial(F, N, decay, block, model, threshold, text), 16, 16)


def test_radial_traces_integer_arithmetic():
    """bit_length and shifts stay integer IR (no float log2), and the block analysis uses them."""
    m = radial(16, 1024)
    attn = attndsl.compile(mask_mod=m)
    ops = {n.op for n in attndsl.ir.topo_order([attn.spec.mask])}
    assert {"bit_length", "shr", "shl", "coord"} <= ops and "log2" not in ops
    assert isinstance(attn.spec.fwd_range, VisitBox) and attn.spec.fwd_range.tile_shape[0] == 1


@pytest.mark.slow
@pytest.mark.parametrize("script,args", [("vision_block.py", []), ("video_block.py", ["sta"]), ("video_block.py", ["radial"])])
def test_examples_run(script, args):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / script
    spec = importlib.util.spec_from_file_location(f"_example_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(*args)  # each example asserts its own agreement with SDPA


def test_neighborhood_with_learnable_2d_relative_bias():
    """A score_mod on layout coordinates (a learnable 2-D relative position bias table, as in NAT)
    composes with the box plan: output and gradients, the table's included, match the oracle."""
    lay = Layout((8, 8), tile=(4, 4))
    k = 5
    table = torch.randn(2, 2 * k - 1, 2 * k - 1, requires_grad=True)

    def rpb(score, b, h, q_idx, kv_idx):
        (qy, qx), (ky, kx) = lay.coords(q_idx), lay.coords(kv_idx)
        dy = (ky - qy).clamp(-(k - 1), k - 1) + (k - 1)
        dx = (kx - qx).clamp(-(k - 1), k - 1) + (k - 1)
        return score + table[h, dy, dx]

    m = neighborhood(lay, k)
    attn = attndsl.compile(mask_mod=m, score_mod=rpb, block_m=16, block_n=16)
    assert isinstance(attn.spec.fwd_range, VisitBox)
    q, kk, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    out = attn(q, kk, v)
    ref, _ = attndsl.reference.attention(q, kk, v, mask_mod=m, score_mod=rpb)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    got = torch.autograd.grad(out.sum(), (q, kk, v, table))
    want = torch.autograd.grad(ref.sum(), (q, kk, v, table))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=1e-4, rtol=1e-4)
