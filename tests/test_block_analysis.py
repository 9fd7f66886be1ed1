"""Block analysis: closed-form visit ranges per tile, checked against brute force.

For a query tile ``[q_lo, q_hi]`` the *outer* key range must contain every key any row of the
tile may see (tiles outside it are skipped without looking), and every key in the *inner* range
must be allowed for every row (tiles inside it skip the mask). The same holds transposed (query
ranges per key tile, for dK/dV). Ranges are IR; they are evaluated here with ``evaluate``.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attndsl import ir
from attndsl.dsl import trace
from attndsl.ir.evaluate import evaluate
from attndsl.passes import is_data_dependent, simplify, tile_class, tile_range

q, kv, h, b = ir.var("q"), ir.var("kv"), ir.var("h"), ir.var("b")
N, C = ir.node, ir.const
B, H = 2, 3


# --- brute force -----------------------------------------------------------------------------
def dense(mask, lq, lkv):
    """``[B, H, lq, lkv]`` boolean mask by evaluating the IR on index grids."""
    env = {"b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
           "q": torch.arange(lq).view(1, 1, lq, 1), "kv": torch.arange(lkv).view(1, 1, 1, lkv)}
    (m,) = evaluate([mask], env, [])
    return torch.broadcast_to(m, (B, H, lq, lkv)).clone()


def tiles(length, block):
    lo = torch.arange(0, length, block)
    hi = torch.clamp(lo + block, max=length) - 1
    return lo, hi


def eval_range(tr, lo, hi, t_max):
    """Evaluate outer and inner ranges for all tiles at once: four ``[B, H, T]`` tensors."""
    other, target = tr.other, tr.target
    allowed = {"b", "h", f"{other}_lo", f"{other}_hi", f"{target}_max"}
    for e in tr.outer + tr.inner:
        assert ir.free_vars(e) <= allowed, (ir.expr_str(e), allowed)
    T = lo.numel()
    env = {"b": torch.arange(B).view(B, 1, 1), "h": torch.arange(H).view(1, H, 1),
           f"{other}_lo": lo.view(1, 1, T), f"{other}_hi": hi.view(1, 1, T),
           f"{target}_max": torch.tensor(t_max)}
    vals = evaluate(list(tr.outer + tr.inner), env, [])
    return [torch.broadcast_to(v, (B, H, T)) for v in vals]


def check_ranges(mask, target, lq, lkv, block):
    """Soundness of ``tile_range(mask, target)`` for tiles of the other index of size ``block``."""
    m = dense(mask, lq, lkv)
    if target == "q":
        m = m.transpose(2, 3)  # rows: kv, columns: q
    rows_len, cols_len = m.shape[2], m.shape[3]
    tr = tile_range(mask, target)
    lo, hi = tiles(rows_len, block)
    olo, ohi, ilo, ihi = eval_range(tr, lo, hi, cols_len - 1)
    col = torch.arange(cols_len)
    for t in range(lo.numel()):
        rows = m[:, :, int(lo[t]):int(hi[t]) + 1, :]
        any_row, all_row = rows.any(2), rows.all(2)                     # [B, H, cols]
        o_lo = olo[:, :, t].clamp(min=0)[..., None]
        o_hi = ohi[:, :, t].clamp(max=cols_len - 1)[..., None]
        outside = (col < o_lo) | (col > o_hi)
        bad = any_row & outside
        assert not bad.any(), (f"outer range misses allowed {target} indices: tile {t} [{int(lo[t])}, {int(hi[t])}] "
                               f"first (b, h, {target}) {bad.nonzero()[:3].tolist()} "
                               f"outer=[{ir.expr_str(tr.outer[0])}, {ir.expr_str(tr.outer[1])}]")
        i_lo = ilo[:, :, t].clamp(min=0)[..., None]
        i_hi = ihi[:, :, t].clamp(max=cols_len - 1)[..., None]
        inside = (col >= i_lo) & (col <= i_hi)
        bad = inside & ~all_row
        assert not bad.any(), (f"inner range holds disallowed {target} indices: tile {t} [{int(lo[t])}, {int(hi[t])}] "
                               f"first (b, h, {target}) {bad.nonzero()[:3].tolist()} "
                               f"inner=[{ir.expr_str(tr.inner[0])}, {ir.expr_str(tr.inner[1])}]")
    return tr


def kernel_plan(tr, lo, hi, t_max, block):
    """The tiles a kernel visits and the full ones, computed as codegen's plan does, per (b, h, tile)."""
    olo, ohi, ilo, ihi = eval_range(tr, lo, hi, t_max)
    lo_c, hi_c = olo.clamp(min=0), torch.minimum(ohi, torch.tensor(t_max))
    t_begin = torch.div(lo_c, block, rounding_mode="floor")
    t_end = torch.where(lo_c <= hi_c, torch.div(hi_c, block, rounding_mode="floor") + 1, t_begin)
    f_begin = torch.maximum(torch.div(ilo.clamp(min=0) + block - 1, block, rounding_mode="floor"), t_begin)
    f_end = torch.minimum(torch.div(torch.minimum(ihi, torch.tensor(t_max)) + 1, block, rounding_mode="floor"), t_end)
    return t_begin, t_end, f_begin, torch.maximum(f_end, f_begin)


def needed_tiles(m, row_block, col_block):
    """Per (b, h, row tile): the set of column tiles with any allowed pair and the fully allowed ones."""
    rows_len, cols_len = m.shape[2], m.shape[3]
    out = {}
    for bi in range(B):
        for hi_ in range(H):
            for t, r0 in enumerate(range(0, rows_len, row_block)):
                rows = m[bi, hi_, r0:r0 + row_block]
                need, full = set(), set()
                for j, c0 in enumerate(range(0, cols_len, col_block)):
                    blk = rows[:, c0:c0 + col_block]
                    if blk.any():
                        need.add(j)
                    if blk.shape[1] == col_block and blk.all():
                        full.add(j)
                out[bi, hi_, t] = (need, full)
    return out


# --- named masks -----------------------------------------------------------------------------
def causal_ir():
    return trace(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx).mask


def sliding_ir(w):
    return trace(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx >= 0) & (q_idx - kv_idx < w)).mask


def window_abs_ir(w):
    return trace(lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= w).mask


NAMED = {
    "causal": causal_ir(),
    "sliding8": sliding_ir(8),
    "sliding37": sliding_ir(37),
    "window_abs5": window_abs_ir(5),
    "bottom_right": trace(lambda b, h, q_idx, kv_idx: q_idx + 9 >= kv_idx).mask,
    "chunked": trace(lambda b, h, q_idx, kv_idx: (q_idx // 8 == kv_idx // 8) & (q_idx >= kv_idx)).mask,
    "prefix_lm": trace(lambda b, h, q_idx, kv_idx: (kv_idx < 10) | (q_idx >= kv_idx)).mask,
    "per_head": trace(lambda b, h, q_idx, kv_idx: torch.where(h == 0, q_idx >= kv_idx, q_idx <= kv_idx)).mask,
    "dilated": trace(lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) % 3 == 0) & (q_idx >= kv_idx)).mask,
    "strided_2x": trace(lambda b, h, q_idx, kv_idx: 2 * kv_idx <= q_idx + 1).mask,
    "clamped": trace(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx.clamp(min=4, max=20)).mask,
    "anti_window": trace(lambda b, h, q_idx, kv_idx: ~((q_idx - kv_idx).abs() < 3)).mask,
}


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("target", ["kv", "q"])
@pytest.mark.parametrize("lq,lkv,block", [(50, 50, 16), (33, 70, 8), (70, 21, 16), (17, 17, 1), (40, 64, 5)])
def test_named_masks_ranges_are_sound(name, target, lq, lkv, block):
    check_ranges(NAMED[name], target, lq, lkv, block)


# --- tightness for causal and sliding windows ---------------------------------------------------
TIGHT = [("causal", causal_ir()), ("sliding16", sliding_ir(16)), ("sliding40", sliding_ir(40)),
         ("sliding1", sliding_ir(1)), ("window_abs7", window_abs_ir(7)), ("window_abs32", window_abs_ir(32))]


@pytest.mark.parametrize("name,mask", TIGHT, ids=[t[0] for t in TIGHT])
@pytest.mark.parametrize("lq,lkv,bm,bn", [(128, 128, 16, 16), (100, 100, 32, 16), (77, 130, 16, 32),
                                           (130, 77, 64, 16), (64, 64, 16, 64)])
def test_visit_plan_is_tight(name, mask, lq, lkv, bm, bn):
    m = dense(mask, lq, lkv)
    for target, mm, row_block, col_block in (("kv", m, bm, bn), ("q", m.transpose(2, 3), bn, bm)):
        tr = tile_range(mask, target)
        assert not tr.tile_check, f"{name}: {target} range needs per-tile checks"
        lo, hi = tiles(mm.shape[2], row_block)
        t_begin, t_end, f_begin, f_end = kernel_plan(tr, lo, hi, mm.shape[3] - 1, col_block)
        want = needed_tiles(mm, row_block, col_block)
        for (bi, hi_, t), (need, full) in want.items():
            visit = set(range(int(t_begin[bi, hi_, t]), int(t_end[bi, hi_, t])))
            got_full = set(range(int(f_begin[bi, hi_, t]), int(f_end[bi, hi_, t])))
            assert visit == need, f"{name} {target} tile {t}: visits {sorted(visit)}, needs {sorted(need)}"
            assert got_full == full, f"{name} {target} tile {t}: full {sorted(got_full)}, want {sorted(full)}"


def test_causal_ranges_closed_form():
    tr = tile_range(causal_ir(), "kv")
    assert tr.outer == (C(0), ir.var("q_hi")) and tr.inner == (C(0), ir.var("q_lo")) and not tr.tile_check
    tr = tile_range(causal_ir(), "q")
    assert tr.outer == (ir.var("kv_lo"), ir.var("q_max")) and tr.inner == (ir.var("kv_hi"), ir.var("q_max"))


def test_unsolvable_atoms_keep_outer_open_and_inner_empty():
    mask = trace(lambda b, h, q_idx, kv_idx: (q_idx * kv_idx) % 5 == 1).mask
    tr = tile_range(mask, "kv")
    assert tr.tile_check
    olo, ohi, ilo, ihi = (int(x[0, 0, 0]) for x in eval_range(tr, torch.tensor([0]), torch.tensor([15]), 99))
    assert olo <= 0 and ohi >= 99
    assert ilo > ihi


def test_data_dependence():
    doc = torch.tensor([0, 0, 1, 1])
    slopes = torch.tensor([1, 2, 3])
    w = torch.tensor(4)
    assert is_data_dependent(trace(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx]).mask)
    assert is_data_dependent(trace(lambda b, h, q_idx, kv_idx: doc[kv_idx] > 0).mask)
    assert not is_data_dependent(causal_ir())
    assert not is_data_dependent(trace(lambda b, h, q_idx, kv_idx: q_idx - kv_idx < slopes[h]).mask)
    assert not is_data_dependent(trace(lambda b, h, q_idx, kv_idx: q_idx - kv_idx < w).mask)


def test_runtime_scalar_window_ranges_are_sound():
    w = torch.tensor(6)
    slopes = torch.tensor([2, 5, 9])
    for fn in (lambda b, h, q_idx, kv_idx: (q_idx - kv_idx < w) & (q_idx >= kv_idx),
               lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= slopes[h]):
        t = trace(fn)
        tr = tile_range(t.mask, "kv")
        lo, hi = tiles(40, 8)
        env = {"b": torch.arange(B).view(B, 1, 1), "h": torch.arange(H).view(1, H, 1),
               "q_lo": lo.view(1, 1, -1), "q_hi": hi.view(1, 1, -1), "kv_max": torch.tensor(39)}
        olo, ohi, ilo, ihi = (torch.broadcast_to(v, (B, H, lo.numel()))
                              for v in evaluate(list(tr.outer + tr.inner), env, t.tensors))
        envd = {"b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
                "q": torch.arange(40).view(1, 1, 40, 1), "kv": torch.arange(40).view(1, 1, 1, 40)}
        (m,) = evaluate([t.mask], envd, t.tensors)
        m = torch.broadcast_to(m, (B, H, 40, 40))
        col = torch.arange(40)
        for i in range(lo.numel()):
            rows = m[:, :, int(lo[i]):int(hi[i]) + 1]
            assert not (rows.any(2) & ((col < olo[..., i, None]) | (col > ohi[..., i, None]))).any()
            assert not (~rows.all(2) & (col >= ilo[..., i, None]) & (col <= ihi[..., i, None])).any()


# --- property: random masks ---------------------------------------------------------------------
SIGNS = st.sampled_from(["lt", "le", "gt", "ge", "eq", "ne"])
coef = st.integers(-2, 2)
off = st.integers(-30, 30)


def affine(a, c, d, e=0):
    x = N("add", N("add", N("mul", C(a), q), N("mul", C(c), kv)), C(d))
    return N("add", x, N("mul", C(e), h)) if e else x


def atoms():
    return st.one_of(
        # a*q + c*kv + d (+ e*h)  op  0
        st.builds(lambda op, a, c, d, e: N(op, affine(a, c, d, e), C(0)), SIGNS, coef, coef, off, st.integers(-3, 3)),
        # q - kv op d : the common case, drawn more often
        st.builds(lambda op, d: N(op, N("sub", q, kv), C(d)), SIGNS, off),
        # |q - kv + c| op w
        st.builds(lambda op, c, w: N(op, N("abs", N("add", N("sub", q, kv), C(c))), C(w)),
                  st.sampled_from(["lt", "le", "gt", "ge"]), st.integers(-10, 10), st.integers(0, 20)),
        # chunking: (q + c1) // d1 op (kv + c2) // d2
        st.builds(lambda op, c1, d1, c2, d2: N(op, N("floordiv", N("add", q, C(c1)), C(d1)),
                                                N("floordiv", N("add", kv, C(c2)), C(d2))),
                  SIGNS, st.integers(0, 9), st.sampled_from([1, 2, 3, 5, 8, 16, -4]), st.integers(0, 9),
                  st.sampled_from([1, 2, 3, 5, 8, 16, -3])),
        # modular strides
        st.builds(lambda op, x, m, r: N(op, N("mod", x, C(m)), C(r)), st.sampled_from(["eq", "ne", "lt"]),
                  st.sampled_from([N("sub", q, kv), kv, q, N("add", q, kv)]), st.sampled_from([2, 3, 4, 7]),
                  st.integers(0, 3)),
        # head / batch conditions
        st.builds(lambda c: N("lt", h, C(c)), st.integers(0, 3)),
        st.builds(lambda c: N("eq", b, C(c)), st.integers(0, 1)),
        # min / max / clamp / where
        st.builds(lambda op, c1, c2: N(op, N("minimum", q, C(c1)), N("add", kv, C(c2))), SIGNS, st.integers(0, 40), off),
        st.builds(lambda op, c1, c2: N(op, kv, N("maximum", N("sub", q, C(c1)), C(c2))), SIGNS, st.integers(0, 20),
                  st.integers(0, 20)),
        st.builds(lambda op, c: N(op, N("where", N("lt", h, C(1)), N("sub", q, kv), N("sub", kv, q)), C(c)), SIGNS, off),
        st.builds(lambda op, c: N(op, N("where", N("lt", q, C(c)), q, kv), N("add", kv, C(3))), SIGNS, st.integers(0, 40)),
    )


def masks():
    def extend(sub):
        return st.one_of(
            st.tuples(sub, sub).map(lambda t: N("and", *t)),
            st.tuples(sub, sub).map(lambda t: N("or", *t)),
            sub.map(lambda x: N("not", x)),
        )
    return st.recursive(atoms(), extend, max_leaves=5)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=masks(), lq=st.integers(1, 70), lkv=st.integers(1, 70), block=st.sampled_from([1, 3, 8, 16, 32]),
       target=st.sampled_from(["kv", "q"]))
def test_random_mask_ranges_are_sound(mask, lq, lkv, block, target):
    check_ranges(mask, target, lq, lkv, block)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=masks(), bm=st.sampled_from([1, 4, 8, 16]), bn=st.sampled_from([1, 5, 8, 16]))
def test_random_mask_tile_class_is_sound(mask, bm, bn):
    """``full`` true ⇒ every pair of the tile allowed; ``nonempty`` false ⇒ none allowed."""
    L = 64
    full, nonempty = tile_class(mask)
    allowed = {"b", "h", "q_lo", "q_hi", "kv_lo", "kv_hi"}
    assert (ir.free_vars(full) | ir.free_vars(nonempty)) <= allowed
    m = dense(mask, L, L)
    qlo, qhi = tiles(L, bm)
    klo, khi = tiles(L, bn)
    env = {"b": torch.arange(B).view(B, 1, 1, 1), "h": torch.arange(H).view(1, H, 1, 1),
           "q_lo": qlo.view(1, 1, -1, 1), "q_hi": qhi.view(1, 1, -1, 1),
           "kv_lo": klo.view(1, 1, 1, -1), "kv_hi": khi.view(1, 1, 1, -1)}
    f, ne = (torch.broadcast_to(x, (B, H, qlo.numel(), klo.numel())) for x in evaluate([full, nonempty], env, []))
    for i in range(qlo.numel()):
        for j in range(klo.numel()):
            blk = m[:, :, int(qlo[i]):int(qhi[i]) + 1, int(klo[j]):int(khi[j]) + 1]
            assert not (f[:, :, i, j] & ~blk.flatten(2).all(2)).any(), \
                f"'full' but not all allowed, tile ({i}, {j}): {ir.expr_str(full)}"
            assert not (~ne[:, :, i, j] & blk.flatten(2).any(2)).any(), \
                f"'empty' but some allowed, tile ({i}, {j}): {ir.expr_str(nonempty)}"


def test_tile_class_causal_is_exact():
    full, nonempty = tile_class(causal_ir())
    m = dense(causal_ir(), 64, 64)
    qlo, qhi = tiles(64, 16)
    for i in range(4):
        for j in range(4):
            env = {"q_lo": qlo[i], "q_hi": qhi[i], "kv_lo": qlo[j], "kv_hi": qhi[j]}
            f, ne = evaluate([full, nonempty], env, [])
            blk = m[0, 0, 16 * i:16 * i + 16, 16 * j:16 * j + 16]
            assert bool(f) == bool(blk.all()) and bool(ne) == bool(blk.any())


def test_ranges_of_simplified_and_raw_mask_agree():
    raw = trace(lambda b, h, q_idx, kv_idx: (q_idx + 1 - kv_idx > 0) & (q_idx - kv_idx < 9)).mask
    a, c = tile_range(raw, "kv"), tile_range(simplify(raw), "kv")
    assert a.outer == c.outer and a.inner == c.inner


def test_where_with_branches_bounded_on_one_side_only():
    """``where(c, |load|, |load|)``: both branches are bounded below (0) and not above. The
    interval of the where keeps each side on its own; building both as one crashed the compile
    (an upper bound of None inside the IR). The kernels then match the reference."""
    from attndsl.testing import assert_matches_reference
    ids = torch.tensor([i * 7 % 5 for i in range(20)])

    def abs_gap(b, h, q_idx, kv_idx):
        return torch.where(q_idx > kv_idx, (ids[q_idx] - ids[kv_idx]).abs(), (ids[kv_idx] - 3).abs()) < 2

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 20, 16, generator=g) for _ in range(3))
    assert max(assert_matches_reference(q, k, v, mask_mod=abs_gap, seed=1).values()) < 1e-5
