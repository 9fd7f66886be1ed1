"""Semantics of the ready-made patterns in ``patterns/``.

Each pattern is evaluated on real index tensors (broadcast ``b, h, q_idx, kv_idx``) and
compared with an independent brute-force definition written as Python loops over index
pairs.  Then each pattern is run through PyTorch's own FlexAttention on the CPU
(``create_block_mask`` for masks, eager ``flex_attention`` for score mods) to check that it
is valid FlexAttention code and means the same thing there.

These tests use only torch; they do not need the attndsl compiler.
"""

import math
import warnings

import pytest
import torch

import attndsl.patterns as P

# (Lq, Lkv): square, Lq < Lkv, Lq > Lkv, sizes that are not multiples of any block size.
SIZES = [(1, 1), (7, 7), (33, 65), (64, 17), (96, 96), (70, 150)]
H = 3


# --------------------------------------------------------------------------------------
# helpers


def index_grid(lq, lkv, heads=H, dtype=torch.int64):
    """b, h, q, kv broadcasting to ``[1, heads, lq, lkv]``, like FlexAttention's indices."""
    b = torch.zeros(1, 1, 1, 1, dtype=dtype)
    h = torch.arange(heads, dtype=dtype)[None, :, None, None]
    q = torch.arange(lq, dtype=dtype)[None, None, :, None]
    kv = torch.arange(lkv, dtype=dtype)[None, None, None, :]
    return b, h, q, kv


def eval_mask(mask_mod, lq, lkv, dtype=torch.int64):
    b, h, q, kv = index_grid(lq, lkv, dtype=dtype)
    out = mask_mod(b, h, q, kv)
    assert out.dtype == torch.bool, f"{mask_mod.__name__} returned {out.dtype}, not bool"
    return out.expand(1, H, lq, lkv)


def eval_score(score_mod, lq, lkv, score=None, dtype=torch.int64):
    b, h, q, kv = index_grid(lq, lkv, dtype=dtype)
    if score is None:
        score = torch.zeros(1, H, lq, lkv, dtype=torch.float32)
    out = score_mod(score, b, h, q, kv)
    assert out.dtype == torch.float32, f"{score_mod.__name__} returned {out.dtype}"
    return out.expand(1, H, lq, lkv)


def brute_mask(fn, lq, lkv):
    """``fn(h, i, j) -> bool`` evaluated by plain Python loops."""
    return torch.tensor(
        [[[[bool(fn(h, i, j)) for j in range(lkv)] for i in range(lq)] for h in range(H)]],
        dtype=torch.bool,
    )


def brute_bias(fn, lq, lkv):
    """``fn(h, i, j) -> float`` evaluated by plain Python loops."""
    return torch.tensor(
        [[[[float(fn(h, i, j)) for j in range(lkv)] for i in range(lq)] for h in range(H)]],
        dtype=torch.float32,
    )


def assert_mask_equal(got, want, name):
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{name}: {bad.shape[0]} mismatches, first (b, h, q, kv) = {bad[:5].tolist()}"


# --------------------------------------------------------------------------------------
# brute-force definitions, written from the pattern descriptions, independent of patterns/


def mask_cases(lq, lkv):
    """(name, pattern mask, brute-force predicate on (h, i, j))."""
    lengths = _doc_lengths(max(lq, lkv))
    doc_of = []
    for d, n in enumerate(lengths):
        doc_of += [d] * n
    ids = torch.tensor(doc_of, dtype=torch.int32)
    return [
        ("causal", P.causal, lambda h, i, j: j <= i),
        ("causal_bottom_right", P.causal_bottom_right(lq, lkv), lambda h, i, j: j <= i + (lkv - lq)),
        ("sliding_window(4)", P.sliding_window(4), lambda h, i, j: i - 4 < j <= i),
        ("sliding_window(1)", P.sliding_window(1), lambda h, i, j: j == i),
        ("sliding_window(5, causal=False)", P.sliding_window(5, causal=False), lambda h, i, j: abs(i - j) <= 5),
        ("sliding_window(0, causal=False)", P.sliding_window(0, causal=False), lambda h, i, j: i == j),
        ("prefix_lm(10)", P.prefix_lm(10), lambda h, i, j: j < 10 or j <= i),
        ("prefix_lm(0)", P.prefix_lm(0), lambda h, i, j: j <= i),
        ("chunked(8)", P.chunked(8), lambda h, i, j: _same_chunk(i, j, 8) and j <= i),
        ("chunked(5, causal=False)", P.chunked(5, causal=False), lambda h, i, j: _same_chunk(i, j, 5)),
        ("document", P.document(ids), lambda h, i, j: doc_of[i] == doc_of[j] and j <= i),
        ("document(causal=False)", P.document(ids, causal=False), lambda h, i, j: doc_of[i] == doc_of[j]),
    ]


def _same_chunk(i, j, chunk):
    start = i - i % chunk  # written without // on purpose
    return start <= j < start + chunk


def _doc_lengths(total):
    """Uneven document lengths covering ``total`` tokens (includes a 1-token document)."""
    lengths, rest, n = [], total, 1
    while rest > 0:
        step = min(rest, [5, 1, 17, 9, 30][n % 5])
        lengths.append(step)
        rest -= step
        n += 1
    return lengths


def paper_alibi_slopes(n):
    """Copied from the ALiBi paper's reference code (ofirpress/attention_with_linear_biases)."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (
        get_slopes_power_of_2(closest_power_of_2)
        + paper_alibi_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2]
    )


def t5_bucket_loop(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket for one relative position ``rel = kv - q``, scalar Python."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if rel > 0:
            bucket += num_buckets
        n = abs(rel)
    else:
        n = max(-rel, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return bucket + n
    large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def t5_bucket_hf(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """Hugging Face ``T5Attention._relative_position_bucket``, vectorised torch (verbatim logic)."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    relative_position_if_large = torch.min(
        relative_position_if_large, torch.full_like(relative_position_if_large, num_buckets - 1)
    )
    relative_buckets += torch.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


T5_CONFIGS = [(32, 128, True), (32, 128, False), (16, 40, True), (8, 20, False), (32, 24, True)]


def score_cases():
    """(name, pattern score mod, brute-force additive bias on (h, i, j) or None, brute-force full mod)."""
    torch.manual_seed(0)
    slopes = P.alibi_slopes(H)
    sl = slopes.tolist()
    rel_table = torch.randn(H, 2 * 6 + 1)
    rt = rel_table.tolist()
    cases = [
        ("alibi", P.alibi(slopes), lambda h, i, j: sl[h] * (j - i)),
        ("relative_position_bias(6)", P.relative_position_bias(rel_table, 6),
         lambda h, i, j: rt[h][min(max(i - j, -6), 6) + 6]),
    ]
    for nb, md, bi in T5_CONFIGS:
        table = torch.randn(H, nb)
        tl = table.tolist()
        cases.append((
            f"t5_bucket_bias({nb}, {md}, bidirectional={bi})",
            P.t5_bucket_bias(table, nb, md, bidirectional=bi),
            lambda h, i, j, tl=tl, nb=nb, md=md, bi=bi: tl[h][t5_bucket_loop(j - i, bi, nb, md)],
        ))
    return cases


# --------------------------------------------------------------------------------------
# direct evaluation vs brute force


@pytest.mark.parametrize("lq,lkv", SIZES)
def test_masks_match_brute_force(lq, lkv):
    for name, mask, fn in mask_cases(lq, lkv):
        assert_mask_equal(eval_mask(mask, lq, lkv), brute_mask(fn, lq, lkv), name)


@pytest.mark.parametrize("lq,lkv", [(33, 65), (64, 17)])
def test_masks_accept_int32_indices(lq, lkv):
    # FlexAttention passes int32 indices; the patterns must not depend on int64.
    for name, mask, fn in mask_cases(lq, lkv):
        got = eval_mask(mask, lq, lkv, dtype=torch.int32)
        assert_mask_equal(got, brute_mask(fn, lq, lkv), name)


@pytest.mark.parametrize("lq,lkv", SIZES)
def test_additive_score_mods_match_brute_force(lq, lkv):
    score = torch.randn(1, H, lq, lkv)
    for name, mod, fn in score_cases():
        for dtype in (torch.int64, torch.int32):
            got = eval_score(mod, lq, lkv, score=score, dtype=dtype)
            want = score + brute_bias(fn, lq, lkv)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_softcap_matches_definition():
    score = torch.linspace(-200.0, 200.0, 4001).reshape(1, 1, 1, -1)
    mod = P.softcap(30.0)
    got = mod(score, 0, 0, 0, 0)
    want = torch.tensor([30.0 * math.tanh(s / 30.0) for s in score.flatten().tolist()]).reshape(score.shape)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.abs().max() <= 30.0
    # near zero it is the identity
    small = torch.tensor([-1e-3, 0.0, 1e-3])
    torch.testing.assert_close(mod(small, 0, 0, 0, 0), small, rtol=1e-6, atol=1e-9)


def test_alibi_slopes_match_paper():
    for n in list(range(1, 33)) + [40, 48, 64, 80, 96, 128]:
        got = P.alibi_slopes(n)
        assert got.dtype == torch.float32 and got.shape == (n,)
        torch.testing.assert_close(got, torch.tensor(paper_alibi_slopes(n), dtype=torch.float32))
    # known values: 8 heads -> 1/2 ... 1/256; 12 heads -> the 8-head slopes then odd powers of 2^-0.5
    assert P.alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    want12 = [2.0**-k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(0, 4)]
    torch.testing.assert_close(P.alibi_slopes(12), torch.tensor(want12))
    if torch.cuda.is_available():  # device argument
        assert P.alibi_slopes(4, device="cuda").is_cuda


def test_t5_buckets_match_reference_implementation():
    rel = torch.arange(-600, 601)
    q = torch.zeros_like(rel)
    for nb, md, bi in T5_CONFIGS + [(64, 512, True), (32, 256, False)]:
        got = P.t5_bucket(q, rel, nb, md, bidirectional=bi)  # kv - q == rel
        want = t5_bucket_hf(rel, bidirectional=bi, num_buckets=nb, max_distance=md)
        assert torch.equal(got.long(), want), (nb, md, bi)
        loop = torch.tensor([t5_bucket_loop(r, bi, nb, md) for r in rel.tolist()])
        assert torch.equal(got.long(), loop), (nb, md, bi)
        assert got.min() >= 0 and got.max() < nb


def test_doc_ids_from_lengths():
    ids = P.doc_ids_from_lengths([3, 0, 2, 1])
    assert ids.dtype == torch.int32
    assert ids.tolist() == [0, 0, 0, 2, 2, 3]
    assert P.doc_ids_from_lengths(torch.tensor([2, 2])).tolist() == [0, 0, 1, 1]
    assert P.doc_ids_from_lengths([]).numel() == 0
    with pytest.raises(ValueError):
        P.doc_ids_from_lengths([2, -1])


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        P.sliding_window(0)
    with pytest.raises(ValueError):
        P.chunked(0)
    with pytest.raises(ValueError):
        P.relative_position_bias(torch.zeros(2, 5), 4)
    with pytest.raises(ValueError):
        P.t5_bucket_bias(torch.zeros(2, 16), 32, 128)
    with pytest.raises(ValueError):
        P.alibi(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        P.softcap(0.0)


def test_mods_are_plain_functions_with_flex_signatures():
    import inspect

    for _, mask, _ in mask_cases(8, 8):
        assert list(inspect.signature(mask).parameters) == ["b", "h", "q_idx", "kv_idx"]
    for _, mod, _ in score_cases():
        assert list(inspect.signature(mod).parameters) == ["score", "b", "h", "q_idx", "kv_idx"]
    assert list(inspect.signature(P.softcap(1.0)).parameters) == ["score", "b", "h", "q_idx", "kv_idx"]


# --------------------------------------------------------------------------------------
# the same patterns through PyTorch's FlexAttention (CPU)

try:
    import torch.nn.attention.flex_attention as flex
except ImportError:  # pragma: no cover - torch < 2.5
    flex = None

needs_flex = pytest.mark.skipif(flex is None, reason="this torch has no torch.nn.attention.flex_attention")


def _flex_attention(*args, **kwargs):
    # eager flex_attention warns that it is unfused; that is what we want here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return flex.flex_attention(*args, **kwargs)
        except (NotImplementedError, RuntimeError) as e:  # pragma: no cover - torch-version dependent
            if "cpu" in str(e).lower() or "not supported" in str(e).lower():
                pytest.skip(f"eager flex_attention is not available on CPU in this torch: {e}")
            raise


def dense_attention(q, k, v, bias=None, mask=None, score_fn=None):
    """Plain float64 softmax attention; fully masked rows give 0 (as FlexAttention does)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if score_fn is not None:
        s = score_fn(s)
    if bias is not None:
        s = s + bias.double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return p @ v


def qkv(lq, lkv, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, H, lq, d, generator=g), torch.randn(1, H, lkv, d, generator=g),
            torch.randn(1, H, lkv, d, generator=g))


@needs_flex
@pytest.mark.parametrize("lq,lkv", [(7, 7), (33, 65), (64, 17), (70, 150)])
def test_masks_in_flex_create_block_mask(lq, lkv):
    q, k, v = qkv(lq, lkv)
    for name, mask, fn in mask_cases(lq, lkv):
        want_mask = brute_mask(fn, lq, lkv)
        bm = flex.create_block_mask(mask, None, H, lq, lkv, device="cpu", BLOCK_SIZE=16)
        # block-level: a block is listed iff some pair in it is allowed
        nq, nk = -(-lq // 16), -(-lkv // 16)
        padded = torch.zeros(1, H, nq * 16, nk * 16, dtype=torch.bool)
        padded[..., :lq, :lkv] = want_mask
        want_blocks = padded.reshape(1, H, nq, 16, nk, 16).any(dim=(3, 5))
        got_blocks = bm.to_dense().bool()[..., :nq, :nk]
        assert torch.equal(got_blocks, want_blocks), f"{name}: block mask differs"
        # element-level, through flex's own masking
        out = _flex_attention(q, k, v, block_mask=bm)
        want = dense_attention(q, k, v, mask=want_mask)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@needs_flex
@pytest.mark.parametrize("lq,lkv", [(7, 7), (33, 65), (64, 17)])
def test_score_mods_in_flex_attention_eager(lq, lkv):
    q, k, v = qkv(lq, lkv, seed=1)
    for name, mod, fn in score_cases():
        out = _flex_attention(q, k, v, score_mod=mod)
        want = dense_attention(q, k, v, bias=brute_bias(fn, lq, lkv))
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    cap = 2.0
    out = _flex_attention(q, k, v, score_mod=P.softcap(cap))
    want = dense_attention(q, k, v, score_fn=lambda s: cap * torch.tanh(s / cap))
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


@needs_flex
def test_mask_and_score_mod_together_in_flex():
    lq = lkv = 48
    q, k, v = qkv(lq, lkv, seed=2)
    slopes = P.alibi_slopes(H)
    bm = flex.create_block_mask(P.sliding_window(9), None, None, lq, lkv, device="cpu", BLOCK_SIZE=16)
    out = _flex_attention(q, k, v, score_mod=P.alibi(slopes), block_mask=bm)
    sl = slopes.tolist()
    want = dense_attention(
        q, k, v,
        bias=brute_bias(lambda h, i, j: sl[h] * (j - i), lq, lkv),
        mask=brute_mask(lambda h, i, j: 0 <= i - j < 9, lq, lkv),
    )
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# the pattern files stay inside the traceable subset


def test_pattern_files_use_no_python_control_flow_on_indices():
    """Mod functions must not branch or loop in Python on index values, nor pull values to the host.

    Loops and conditionals over Python constants (grid axes, flags) are fine: they run once at
    trace time. What is forbidden is control flow that depends on the arguments, tracked through
    assignments (a simple taint analysis)."""
    import ast
    from pathlib import Path

    mod_args = (["b", "h", "q_idx", "kv_idx"], ["score", "b", "h", "q_idx", "kv_idx"])
    files = sorted(Path(P.__file__).parent.glob("*.py"))
    assert len(files) >= 9
    n_mods = 0

    def names(node):
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()

    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef) or [a.arg for a in fn.args.args] not in mod_args:
                continue
            n_mods += 1
            tainted = {a.arg for a in fn.args.args}
            for _ in range(4):  # propagate through assignments and loop targets
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and names(node.value) & tainted:
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        for t in targets:
                            tainted |= names(t)
                    if isinstance(node, (ast.For, ast.comprehension)) and names(node.iter) & tainted:
                        tainted |= names(node.target)
            for node in ast.walk(fn):
                where = f"{path.name}:{getattr(node, 'lineno', '?')} in {fn.name}"
                if isinstance(node, (ast.If, ast.IfExp, ast.While)):
                    assert not names(node.test) & tainted, where
                if isinstance(node, (ast.For, ast.comprehension)):
                    assert not names(node.iter) & tainted, where
                if isinstance(node, ast.Call):
                    f = node.func
                    assert not (isinstance(f, ast.Attribute) and f.attr in ("item", "tolist", "numpy", "cpu")), where
                    if isinstance(f, ast.Name) and f.id in ("int", "float", "bool", "range", "len"):
                        assert not set().union(*(names(a) for a in node.args)) & tainted, where
    assert n_mods >= 13
