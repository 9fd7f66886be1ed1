"""The short host path (issue 30 part 2): call plans that skip the checks a call key vouches for,
and inference calls without the autograd Function. Every cache here must leave the errors and
results exactly as the full path gives them.

CPU tensors (Triton's interpreter); small shapes."""
import copy
from unittest import mock

import pytest
import torch

import attndsl
import attndsl.reference
from attndsl.runtime import checks

BLOCK = 16


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def qkv(L=32, H=2, D=16, Lkv=None, grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(torch.seed())
    shapes = [(1, H, L, D), (1, H, Lkv or L, D), (1, H, Lkv or L, D)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def check(out, q, k, v, tol=1e-4, **kw):
    want, _ = attndsl.reference.attention(q.detach().double(), k.detach().double(), v.detach().double(), **kw)
    err = float((out.detach().double() - want).abs().max())
    assert err < tol, f"max error {err:.3e} against the float64 reference"


@pytest.fixture
def input_checks(monkeypatch):
    """A mock wrapping ``check_inputs`` as the API calls it (``.call_count``: the full checks run)."""
    import attndsl.api
    spy = mock.Mock(wraps=attndsl.api.check_inputs)
    monkeypatch.setattr(attndsl.api, "check_inputs", spy)
    return spy


def test_a_plan_skips_the_checks_of_its_key_and_no_other(input_checks):
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    check(attn(q, k, v), q, k, v, mask_mod=causal)
    assert input_checks.call_count == 1
    q2, k2, v2 = qkv()  # other tensors, same key
    check(attn(q2, k2, v2), q2, k2, v2, mask_mod=causal)
    assert input_checks.call_count == 1
    q3, k3, v3 = qkv(L=48)  # another shape: checked, then planned too
    check(attn(q3, k3, v3), q3, k3, v3, mask_mod=causal)
    attn(q3, k3, v3)
    assert input_checks.call_count == 2
    # a transposed layout (other strides) and another scale sign are other keys
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    check(attn(qt, k, v), qt, k, v, mask_mod=causal)
    check(attn(q, k, v, scale=-0.2), q, k, v, mask_mod=causal, scale=-0.2)
    assert input_checks.call_count == 4


def test_bad_input_after_good_calls_of_another_key_still_raises():
    """Each mistake differs from a planned call in something the key holds: the full checks see it."""
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    attn(q, k, v)
    attn(q, k, v)
    with pytest.raises(ValueError, match="head dims differ"):
        attn(q, torch.randn(1, 2, 32, 32), v)
    with pytest.raises(ValueError, match="must be a multiple of key/value heads"):
        attn(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1))
    with pytest.raises(TypeError, match="share a dtype"):
        attn(q, k.double(), v)
    with pytest.raises(ValueError, match="rank 3"):
        attn(q[0], k, v)
    with pytest.raises(ValueError, match="outside the supported range"):
        attn(*(t[..., :8] for t in (q, k, v)))
    with pytest.raises(ValueError, match="scale must be finite"):
        attn(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a real number"):
        attn(q, k, v, scale=True)
    with pytest.raises(ValueError, match="must agree in batch, heads and length"):
        attn(q, k, v[:, :, :16])
    with pytest.raises(ValueError, match="sinks must have shape"):
        attn(q, k, v, sinks=torch.zeros(3))
    check(attn(q, k, v), q, k, v, mask_mod=causal)  # the good key still runs


def test_a_captured_tensor_on_another_device_is_refused_after_a_planned_call():
    ids = torch.zeros(32, dtype=torch.int64)

    def doc(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]
    attn = attndsl.compile(mask_mod=doc, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    attn(q, k, v)
    attn(q, k, v)
    attn.tensors[0] = ids.to("meta")
    with pytest.raises(ValueError, match="captures a tensor .* on meta"):
        attn(q, k, v)


def test_in_place_changes_of_captured_tensors_are_honoured_after_planning():
    """A plan keeps no captured values: block tables follow the tensors' versions, index checks
    of captured values run on every call."""
    L = 32
    ids = torch.tensor([0] * 10 + [1] * 22)

    def doc(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
    attn = attndsl.compile(mask_mod=doc, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(L)
    for _ in range(2):
        check(attn(q, k, v), q, k, v, mask_mod=doc)
    ids[:20] = 0  # other documents, in place
    check(attn(q, k, v), q, k, v, mask_mod=doc)

    bucket = torch.tensor([i % 5 for i in range(L)])
    five = torch.randn(5)

    def bucketed(score, b, h, q_idx, kv_idx):
        return score + five[bucket[q_idx]]
    attn = attndsl.compile(mask_mod=causal, score_mod=bucketed, block_m=BLOCK, block_n=BLOCK)
    for _ in range(2):
        check(attn(q, k, v), q, k, v, mask_mod=causal, score_mod=bucketed)
    bucket[3] = 6  # past the 5-entry table, in place
    with pytest.raises(IndexError, match="is 6 at q_idx=3"):
        attn(q, k, v)
    bucket[3] = 1
    check(attn(q, k, v), q, k, v, mask_mod=causal, score_mod=bucketed)


def test_one_shot_calls_plan_per_pattern_and_rebind_captured_tensors():
    """``attndsl.attention`` reaches the same plans through the pattern cache; a global rebound to
    another tensor of the same shape (the same plan key) is what the kernels read."""
    attndsl.clear_cache()
    global _BIAS
    q, k, v = qkv()
    for _ in range(3):
        _BIAS = torch.randn(2, 32)
        out = attndsl.attention(q, k, v, mask_mod=causal, score_mod=_global_bias)
        check(out, q, k, v, mask_mod=causal, score_mod=_global_bias)


_BIAS = torch.randn(2, 32)


def _global_bias(score, b, h, q_idx, kv_idx):
    return score + _BIAS[h, kv_idx]


def test_inference_calls_make_no_graph_and_training_calls_get_gradients():
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(grad=False)
    out = attn(q, k, v)
    assert out.grad_fn is None and not out.requires_grad
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        out = attn(qg, kg, vg)  # the same plan key (requires_grad is not in it)
    assert out.grad_fn is None
    for _ in range(2):  # first call: planned; second: the plan
        out, lse = attn(qg, kg, vg, return_lse=True)
        assert out.grad_fn is not None
        grads = torch.autograd.grad((out * out).sum() + lse.sum(), (qg, kg, vg))
        l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, ref_lse = attndsl.reference.attention(*l64, mask_mod=causal)
        want = torch.autograd.grad((ref * ref).sum() + ref_lse.sum(), l64)
        for g, w in zip(grads, want):
            assert float((g.double() - w).abs().max()) < 1e-4
    # a learnable captured tensor alone makes it a training call
    slope = torch.tensor([0.5, -0.25], requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slope[h] * (kv_idx - q_idx)
    attn = attndsl.compile(mask_mod=causal, score_mod=alibi, block_m=BLOCK, block_n=BLOCK)
    for _ in range(2):
        out = attn(q, k, v)
        (g,) = torch.autograd.grad(out.sum(), slope)
    s64 = slope.detach().double().requires_grad_()

    def alibi64(score, b, h, q_idx, kv_idx):
        return score + s64[h] * (kv_idx - q_idx)
    ref, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=causal, score_mod=alibi64)
    (want,) = torch.autograd.grad(ref.sum(), s64)
    # the slope's gradient sums a whole row block (|g| ~ 100): float32 summation order, relative bound
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-4)


def test_return_lse_and_sigmoid_lengths_are_part_of_the_plan():
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    assert isinstance(attn(q, k, v), torch.Tensor)
    assert isinstance(attn(q, k, v, return_lse=True), tuple)
    assert isinstance(attn(q, k, v), torch.Tensor)
    sig = attndsl.compile(mask_mod=causal, normalizer="sigmoid", block_m=BLOCK, block_n=BLOCK)
    for L in (32, 48, 32):  # the default bias -log(Lkv) follows the length
        q, k, v = qkv(L=L)
        check(sig(q, k, v), q, k, v, mask_mod=causal, normalizer="sigmoid")
    with pytest.raises(ValueError, match="return_lse=True is not available"):
        sig(q, k, v, return_lse=True)


def test_copies_keep_plans_of_their_own():
    """A deep copy has runners of its own, so plans of its own (never the original's runners)."""
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    attn(q, k, v)
    twin = copy.deepcopy(attn)
    check(twin(q, k, v), q, k, v, mask_mod=causal)
    (plan,) = twin._plans.values()
    assert plan.runner in twin._runners.values() and plan.runner not in attn._runners.values()
    shallow = copy.copy(attn)
    shallow._runners = {}  # as the block variants make theirs
    check(shallow(q, k, v), q, k, v, mask_mod=causal)
    assert shallow._plans is not attn._plans


def test_value_checks_are_flagged_per_pattern():
    """Patterns whose index checks read captured values re-check on every call (``reads_values``)."""
    ids = torch.zeros(32, dtype=torch.int64)
    table = torch.randn(4)

    def by_doc(score, b, h, q_idx, kv_idx):
        return score + table[ids[q_idx]]

    def by_pos(score, b, h, q_idx, kv_idx):
        return score + table[q_idx % 4]
    assert attndsl.compile(score_mod=by_doc).index_check.reads_values()
    assert not attndsl.compile(score_mod=by_pos).index_check.reads_values()
    assert isinstance(attndsl.compile(score_mod=by_pos).index_check, checks.IndexRangeCheck)


def test_sinks_and_low_rank_factors_are_planned_and_sink_values_checked_per_version(input_checks):
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    sinks = torch.tensor([0.3, -0.2])
    u, w = torch.randn(1, 2, 32, 3), torch.randn(1, 1, 32, 3)
    for _ in range(2):
        check(attn(q, k, v, sinks=sinks), q, k, v, mask_mod=causal, sinks=sinks)
        check(attn(q, k, v, bias_factors=(u, w)), q, k, v, mask_mod=causal, bias_factors=(u, w))
    assert input_checks.call_count == 2  # one plan each
    s2 = torch.tensor([-1.0, 0.5])  # another tensor of the key: bound per call
    check(attn(q, k, v, sinks=s2), q, k, v, mask_mod=causal, sinks=s2)
    sinks[1] = float("nan")  # in place: a new version, checked again
    with pytest.raises(ValueError, match=r"sinks\[1\] is nan"):
        attn(q, k, v, sinks=sinks)
    with pytest.raises(ValueError, match=r"sinks must have shape \[Hq\]"):
        attn(q, k, v, sinks=torch.zeros(3))
    with pytest.raises(ValueError, match="bias_factors u length"):
        attn(q, k, v, bias_factors=(u[:, :, :16], w))
    with pytest.raises(TypeError, match="must be a pair"):
        attn(q, k, v, bias_factors=(u, w, w))


# --- prepared launches: a call key's forward and backward without launch decisions ---------------
@pytest.fixture
def as_users_run(monkeypatch):
    """The launch memo without the suite's verification (ATTNDSL_VERIFY_MEMO): the prepared
    launches (``FastForward``/``FastBackward``) launch themselves, as they do for users. Returns
    the list of prepared launches taken, by class."""
    from attndsl.runtime import launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", False)
    taken = []
    for cls in (launch.FastForward, launch.FastBackward):
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _f=cls.__call__: taken.append(type(self).__name__)
                            or _f(self, *a))
    return taken


def _grads(out, inputs, loss="square", lse=None):
    total = (out * out).sum() if loss == "square" else out.sum()
    if lse is not None:
        total = total + (lse * lse).sum()
    return torch.autograd.grad(total, inputs)


def _reference_grads(inputs, loss="square", with_lse=False, **kw):
    l64 = [t.detach().double().requires_grad_() for t in inputs]
    ref, ref_lse = attndsl.reference.attention(*l64[:3], **kw)
    return ref, _grads(ref, l64, loss, ref_lse if with_lse else None)


def test_prepared_calls_give_the_first_calls_bits_and_a_fresh_runners_gradients(as_users_run):
    """Repeated forward+backward calls of one key take the prepared launches and give exactly the
    bits of the first call (the ordinary path), and of a fresh compiled pattern's first call."""
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(L=40, grad=True)
    runs = []
    for _ in range(3):
        out = attn(q, k, v)
        runs.append((out, *_grads(out, (q, k, v))))
    assert as_users_run == ["FastForward", "FastBackward"] * 2, as_users_run
    fresh = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    out = fresh(q, k, v)
    first = (out, *_grads(out, (q, k, v)))
    for later in (*runs[1:], first):
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    ref, ref_grads = _reference_grads((q, k, v), mask_mod=causal)
    check(runs[2][0], q, k, v, mask_mod=causal)
    for g, r in zip(runs[2][1:], ref_grads):
        assert float((g.double() - r).abs().max()) < 1e-4


def test_prepared_launches_rekey_on_strides_dtype_lengths_and_gradient_layout(as_users_run):
    """Calls that differ from a prepared one in strides, dtype, lengths, the output gradient's
    layout or an lse gradient, interleaved with the first call again: each matches the float64
    reference, forward and gradients (a stale prepared launch would not)."""
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(L=32, grad=True)
    variants = {
        "plain": ((q, k, v), "square", False),
        "transposed q": ((q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(), k, v), "square",
                         False),
        "float64": (tuple(t.detach().double().requires_grad_() for t in (q, k, v)), "square", False),
        "longer": (qkv(L=48, grad=True), "square", False),
        "longer keys": (qkv(L=32, Lkv=48, grad=True), "square", False),
        "broadcast gradient": ((q, k, v), "sum", False),
        "lse gradient": ((q, k, v), "square", True),
    }
    for name in [n for v_ in variants for n in ("plain", v_, v_)]:
        inputs, loss, with_lse = variants[name]
        if with_lse:
            out, lse = attn(*inputs, return_lse=True)
        else:
            out, lse = attn(*inputs), None
        grads = _grads(out, inputs, loss, lse)
        ref, ref_grads = _reference_grads(inputs, loss, with_lse, mask_mod=causal)
        assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4, name
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            assert float((g.double() - r).abs().max()) < 1e-4, f"{name}: gradient {i}"
    assert "FastForward" in as_users_run and "FastBackward" in as_users_run


def test_prepared_launches_of_sinks_sigmoid_and_inference(as_users_run):
    """Sinks (their gradient from the prepared backward), the sigmoid normaliser (no row
    statistics) and inference calls (no autograd) through the prepared launches."""
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(grad=True)
    sinks = torch.tensor([0.3, -0.2], requires_grad=True)
    for _ in range(3):
        out = attn(q, k, v, sinks=sinks)
        grads = _grads(out, (q, k, v, sinks))
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref, _ = attndsl.reference.attention(*l64[:3], mask_mod=causal, sinks=l64[3])
    for g, r in zip((out, *grads), (ref, *_grads(ref, l64))):
        assert float((g.double() - r.detach()).abs().max()) < 1e-4
    sig = attndsl.compile(mask_mod=causal, normalizer="sigmoid", block_m=BLOCK, block_n=BLOCK)
    for _ in range(3):
        out = sig(q, k, v)
        grads = _grads(out, (q, k, v))
    ref, ref_grads = _reference_grads((q, k, v), mask_mod=causal, normalizer="sigmoid")
    for g, r in zip((out, *grads), (ref, *ref_grads)):
        assert float((g.double() - r.detach()).abs().max()) < 1e-4
    with torch.no_grad():
        for _ in range(3):
            check(attn(q, k, v), q, k, v, mask_mod=causal)
    assert as_users_run.count("FastBackward") == 4 and as_users_run.count("FastForward") >= 6, as_users_run


def test_prepared_launch_arguments_are_verified_under_the_suite():
    """Under ATTNDSL_VERIFY_MEMO (the suite's setting) a prepared call checks its arguments against
    the ordinary path's: a wrong output template fails the call instead of launching."""
    from attndsl.runtime import launch
    assert launch.VERIFY_MEMO
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    attn(q, k, v)
    (plan,) = attn._plans.values()
    assert isinstance(plan.memo.fwd, launch.FastForward)
    check(attn(q, k, v), q, k, v, mask_mod=causal)  # the prepared forward, verified
    plan.memo.fwd.out = (torch.Size([1, 2, 31, 16]), torch.float32, q.device)  # a wrong output template
    with pytest.raises(AssertionError, match="prepared forward"):
        attn(q, k, v)


def _leaf_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _late_global_bias(score, b, h, q_idx, kv_idx):
    return score + _LATE[h]  # noqa: F821 (set by the test below)


def test_the_leaf_shortcut_of_the_pattern_walk_keys_as_the_full_walk():
    """``patterns.walk`` skips the walk for plain functions with no closure, defaults or set
    globals; its key is the full walk's, and a global that appears later (a tensor) is walked."""
    from attndsl.runtime import patterns

    def noop(score, b, h, q_idx, kv_idx):
        return score
    for m, s in ((_leaf_causal, None), (None, noop), (_leaf_causal, noop), (_leaf_causal, _late_global_bias)):
        w = patterns._walk(m, s)
        assert patterns.walk(m, s) == (tuple(w.parts), w.tensors)
    assert patterns._leaves(_leaf_causal, _late_global_bias) is not None
    global _LATE
    _LATE = torch.randn(2)
    try:
        assert patterns._leaves(_leaf_causal, _late_global_bias) is None
        key, tensors = patterns.walk(_leaf_causal, _late_global_bias)
        assert len(tensors) == 1 and tensors[0] is _LATE
        q, k, v = qkv()
        check(attndsl.attention(q, k, v, mask_mod=_leaf_causal, score_mod=_late_global_bias), q, k, v,
              mask_mod=_leaf_causal, score_mod=_late_global_bias)
    finally:
        del _LATE


_FLAT_SCALE = 2.0


def _flat_alibi(slopes, w=4):
    """A factory as models write them: a fresh closure per call over a tensor and a constant."""
    def alibi(score, b, h, q_idx, kv_idx, s=slopes):
        return torch.where(q_idx - kv_idx < w, score + s[h] * (kv_idx - q_idx) * _FLAT_SCALE, score)
    return alibi


def _flat_sized(t):
    def sized(score, b, h, q_idx, kv_idx):
        return score + t[kv_idx % t.shape[0]]
    return sized


def test_flat_pattern_walks_are_kept_by_what_they_read_and_rekey_on_every_change(monkeypatch):
    """``patterns.FlatWalks``: a fresh closure reading the same objects (cells, globals, defaults)
    is not walked again, and its key and tensors are the full walk's; another tensor, constant or
    global, a tensor's requires_grad, dtype, device type or (code that reads one) shape changed in
    place, each walk again. A pattern holding a container is walked on every call. The memo keeps
    no tensor alive."""
    import gc
    import weakref
    from attndsl.runtime import patterns
    walks = [0]
    real = patterns._walk
    monkeypatch.setattr(patterns, "_walk", lambda *a, **k: walks.__setitem__(0, walks[0] + 1) or real(*a, **k))
    flat = patterns.FlatWalks()

    def kept(m, s=None, walked=None):
        before = walks[0]
        key, tensors = patterns._walk_kept(flat, m, s)
        w = real(m, s)
        assert key == tuple(w.parts) and len(tensors) == len(w.tensors)
        assert all(a is b for a, b in zip(tensors, w.tensors))
        if walked is not None:
            assert walks[0] - before == walked
        return key, tensors

    slopes = torch.rand(2)
    first, _ = kept(causal, _flat_alibi(slopes), walked=1)
    for _ in range(2):  # fresh closures over the same objects: no walk
        assert kept(causal, _flat_alibi(slopes), walked=0)[0] == first
    assert kept(causal, _flat_alibi(slopes, 5), walked=1)[0] != first  # another constant
    assert kept(causal, _flat_alibi(slopes, 4.0), walked=1)[0] != first  # equal, but a float
    other = torch.rand(2)
    key, tensors = kept(causal, _flat_alibi(other), walked=1)  # another tensor: bound, same key
    assert key == first and tensors[0] is other
    global _FLAT_SCALE
    old = _FLAT_SCALE
    try:
        _FLAT_SCALE = 3.0  # a global rebound
        assert kept(causal, _flat_alibi(slopes), walked=1)[0] != first
    finally:
        _FLAT_SCALE = old
    assert kept(causal, _flat_alibi(slopes), walked=0)[0] == first
    slopes.requires_grad_()  # in place: learnable now
    assert kept(causal, _flat_alibi(slopes), walked=1)[0] != first
    slopes.requires_grad_(False)
    slopes.data = torch.rand(2, dtype=torch.float64)  # another dtype, same object
    assert kept(causal, _flat_alibi(slopes), walked=1)[0] != first
    slopes.data = torch.rand(2, 1)  # another rank
    kept(causal, _flat_alibi(slopes), walked=1)
    t = torch.rand(4)
    sized, _ = kept(None, _flat_sized(t), walked=1)
    assert kept(None, _flat_sized(t), walked=0)[0] == sized
    t.data = torch.rand(6)  # the code reads the shape: the key has it
    assert kept(None, _flat_sized(t), walked=1)[0] != sized
    box = [torch.rand(2)]  # not flat: a container is walked on every call (it may change in place)

    def boxed(score, b, h, q_idx, kv_idx):
        return score + box[0][h]
    kept(None, boxed, walked=1)
    box[0] = torch.rand(2)
    assert kept(None, boxed, walked=1)[1][0] is box[0]
    gone = torch.rand(2)
    ref = weakref.ref(gone)
    kept(causal, _flat_alibi(gone))
    del gone
    gc.collect()
    assert ref() is None


def test_block_table_calls_memoise_their_launches_and_take_each_calls_table(monkeypatch):
    """A data-dependent mask (documents): the second call of a key decides no launch again (the
    table of the memoised tiles joins the call's own values), an in-place change of the document
    ids (a new table) and a new length are still right, forward and gradients; as users run
    (no verification) and under the suite's verification alike."""
    from attndsl.runtime import blocktables, launch
    made = []  # the attention kernels' launches decided and memoised (not the table builders')
    orig = launch.Runner._prepared
    monkeypatch.setattr(launch.Runner, "_prepared", lambda self, kernel, *a: (
        kernel in self._signature_of and made.append(kernel)) or orig(self, kernel, *a))
    for verify in (False, True):
        monkeypatch.setattr(launch, "VERIFY_MEMO", verify)
        made.clear()
        ids = torch.tensor([0] * 13 + [1] * 19)

        def doc(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
        attn = attndsl.compile(mask_mod=doc, block_m=BLOCK, block_n=BLOCK)
        q, k, v = qkv(L=32, grad=True)
        for step in range(4):
            if step == 2:
                ids[:24] = 0  # other documents, in place: a new table, the same launches
            out = attn(q, k, v)
            grads = _grads(out, (q, k, v))
            ref, ref_grads = _reference_grads((q, k, v), mask_mod=doc)
            assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4, (verify, step)
            for g, r in zip(grads, ref_grads):
                assert float((g.double() - r).abs().max()) < 1e-4, (verify, step)
            if step == 0:
                first = len(made)
        assert first == 3 and len(made) == 3, (verify, made)  # forward, dQ (with delta), dK/dV: once
        (plan,) = attn._plans.values()  # the prepared launches take each call's tables
        assert isinstance(plan.memo.fwd, launch.FastForward) and plan.memo.fwd.table is not None
        assert isinstance(plan.memo.bwd, launch.FastBackward) and None not in plan.memo.bwd.tables
        # a table whose arguments specialise otherwise than the memoised one's: the ordinary path
        with mock.patch.object(blocktables.Table, "classes", lambda self: ()):
            out = attn(q, k, v)
            grads = _grads(out, (q, k, v))
        assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4, verify
        for g, r in zip(grads, ref_grads):
            assert float((g.double() - r).abs().max()) < 1e-4, verify
        q2, k2, v2 = qkv(L=32, H=1, grad=True)  # another key: decided afresh
        out = attn(q2, k2, v2)
        assert len(made) == 4, (verify, made)
        ref, _ = _reference_grads((q2, k2, v2), mask_mod=doc)
        assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4


def test_the_ops_take_the_prepared_launches_of_their_call_key(as_users_run):
    """``attndsl::attention_fwd``/``attention_bwd`` (what ``torch.compile`` calls): from the second
    call of a key the forward and the backward take the key's prepared launches, as eager calls
    do (the ops looked the runner up and decided the launches anew each call: 76 → 47 µs forward,
    106 → 71 µs backward per op call, CPU, launches stubbed); another length or a captured tensor of
    another dtype is another key; the results equal the eager call's."""
    from attndsl.runtime import op
    slopes = torch.rand(2)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)
    comp = attndsl.compile(mask_mod=causal, score_mod=alibi, block_m=BLOCK, block_n=BLOCK)
    key = op.register(comp)
    for L in (32, 32, 48, 48):
        q, k, v = qkv(L=L, grad=True)
        out, lse = op.attention_fwd(q, k, v, [slopes], None, None, None, None, None, key, 0.2, 0.0, 0, 0)
        do = torch.randn_like(out)
        dq, dk, dv = op.attention_bwd(q, k, v, out, lse, do, None, [slopes], None, None, None, None, None, key, 0.2,
                                      0.0, 0, 0)
        # the float64 reference, and the eager call's bits
        q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=causal, score_mod=alibi, scale=0.2)
        ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())
        assert float((out.double() - ref.detach()).abs().max()) < 1e-4
        for g, r in zip((dq, dk, dv), ref_grads):
            assert float((g.double() - r).abs().max()) < 1e-4
        want = attndsl.compile(mask_mod=causal, score_mod=alibi, block_m=BLOCK, block_n=BLOCK)(q, k, v, scale=0.2)
        assert torch.equal(out, want.detach())
    assert as_users_run.count("FastForward") == 2 and as_users_run.count("FastBackward") == 2, as_users_run
    slopes = slopes.double()  # another dtype of the captured tensor: another key
    q, k, v = qkv(L=32)
    op.attention_fwd(q, k, v, [slopes], None, None, None, None, None, key, 0.2, 0.0, 0, 0)
    assert as_users_run.count("FastForward") == 2
    assert len(op.REGISTRY[key]._op_plans) == 3


def test_explicit_block_tables_take_the_plan_and_are_still_checked(input_checks):
    """A compiled data-dependent pattern called with tables built once (``build_block_tables``):
    the second call of a key skips the full checks as a call without them does (the H100 model
    table, 2026-12-07, measured such calls at 123 µs of host time against the one-shot's 38: every
    call ran every check); each call's own tables are used, and tables of another shape are refused."""
    ids = torch.tensor([0] * 13 + [1] * 19)

    def doc(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
    attn = attndsl.compile(mask_mod=doc, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv(L=32, grad=True)
    tables = attn.build_block_tables(q, k)
    for _ in range(3):
        out = attn(q, k, v, block_tables=tables)
        grads = _grads(out, (q, k, v))
        ref, ref_grads = _reference_grads((q, k, v), mask_mod=doc)
        assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4
        for g, r in zip(grads, ref_grads):
            assert float((g.double() - r).abs().max()) < 1e-4
    assert input_checks.call_count == 1
    ids[:24] = 0  # other documents: the tables built before are the caller's to rebuild
    fresh = attn.build_block_tables(q, k)
    out = attn(q, k, v, block_tables=fresh)
    ref, _ = _reference_grads((q, k, v), mask_mod=doc)
    assert float((out.detach().double() - ref.detach()).abs().max()) < 1e-4
    assert input_checks.call_count == 1
    q2, k2, v2 = qkv(L=16)
    with pytest.raises(ValueError, match="block_tables were built for shape"):
        attn(q2, k2, v2, block_tables=tables)  # no plan yet: the full checks refuse them
    attn(q2, k2, v2)  # a plan for the smaller key, then the wrong tables on the planned path
    with pytest.raises(ValueError, match="block_tables were built for shape"):
        attn(q2, k2, v2, block_tables=tables)


@pytest.mark.gpu
def test_prepared_launches_on_a_gpu_and_in_a_cuda_graph(monkeypatch):
    """On CUDA, as users run (no verification): repeated calls of a key take the prepared launches
    (``Direct`` underneath: the stream of the runner's device, descriptor scratch per launch), give
    the first call's bits and match the reference, forward and gradients; a prepared forward
    captured in a CUDA graph replays on new contents of its inputs."""
    from attndsl.runtime import launch
    monkeypatch.setattr(launch, "VERIFY_MEMO", False)
    attn = attndsl.compile(mask_mod=causal)
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    runs = []
    for _ in range(3):
        out = attn(q, k, v)
        runs.append((out, *torch.autograd.grad((out.float() ** 2).sum(), (q, k, v))))
    (plan,) = attn._plans.values()
    assert isinstance(plan.memo.fwd, launch.FastForward) and isinstance(plan.memo.bwd, launch.FastBackward)
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)
    l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = attndsl.reference.attention(*l64, mask_mod=causal)
    assert float((runs[-1][0].double() - ref).abs().max()) < 2e-2
    for got, want in zip(runs[-1][1:], torch.autograd.grad((ref ** 2).sum(), l64)):
        assert float((got.double() - want).abs().max()) / float(want.abs().max()) < 2e-2
    qs, ks, vs = (t.detach().clone() for t in (q, k, v))
    with torch.no_grad():
        attn(qs, ks, vs)  # the inference plan's prepared forward, before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = attn(qs, ks, vs)
        for t in (qs, ks, vs):
            t.copy_(torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=g))
        graph.replay()
        torch.cuda.synchronize()
        want = attn(qs, ks, vs)
    assert torch.equal(out, want)


@pytest.mark.parametrize("kind", ["causal", "document"])
def test_no_tensor_of_a_call_outlives_it(kind):
    """Memos and prepared launches keep no tensor of the calls that made them (inputs, outputs,
    gradients, block tables): one made during a CUDA-graph warm-up or capture would hold memory of
    the graph's pool (torch.compile's reduce-overhead mode refuses that), and a kept input keeps a
    user's tensor alive."""
    import gc
    import weakref
    ids = torch.tensor([0] * 20 + [1] * 12)

    def document(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
    attn = attndsl.compile(mask_mod=causal if kind == "causal" else document, block_m=BLOCK, block_n=BLOCK)
    refs = []
    for _ in range(3):  # planned, memoised, prepared
        q, k, v = qkv(grad=True)
        out, lse = attn(q, k, v, return_lse=True)
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        refs += [weakref.ref(t) for t in (q, k, v, out, lse, *grads)]
        del q, k, v, out, lse, grads
    gc.collect()
    assert [r for r in refs if r() is not None] == []


# --- token selectors (indices=): call plans per key, as the dense path's ---------------------------
def _sel(L=24, B=1, G=1, K=6, seed=0, dtype=torch.int32):
    from attndsl.selectors import random_causal_indices
    return random_causal_indices(L, K, B=B, G=G, seed=seed).to(dtype)


@pytest.fixture
def sparse_checks(monkeypatch):
    """A mock wrapping the token-selector path's ``check_inputs`` (``.call_count``: full checks run)."""
    from attndsl.selectors import sparse
    spy = mock.Mock(wraps=sparse.check_inputs)
    monkeypatch.setattr(sparse, "check_inputs", spy)
    return spy


def _sel_ref(q, k, v, idx, **kw):
    return attndsl.reference.sparse_attention(q.detach().double(), k.detach().double(), v.detach().double(), idx,
                                              **kw)


def test_selector_plans_skip_shape_checks_and_rekey_on_every_layout_change(sparse_checks):
    """The second call of a key runs no full check; each change of the inputs', the indices' or the
    captured tensors' layout (dtype, shape, strides, batch-1 selection, scale sign, return_lse,
    sinks) is a key of its own, checked in full once, and every call matches the oracle."""
    attn = attndsl.compile(mask_mod=causal)
    L = 24
    q, k, v = qkv(L=L)
    idx = _sel(L)
    calls = [dict(indices=idx), dict(indices=idx),  # the second: planned
             dict(indices=idx.long()), dict(indices=idx.transpose(2, 3).contiguous().transpose(2, 3)),
             dict(indices=_sel(L, K=9)), dict(indices=_sel(L, G=2)), dict(indices=idx, scale=-0.3),
             dict(indices=idx, return_lse=True), dict(indices=idx, sinks=torch.randn(2))]
    full = [1, 1, 2, 3, 4, 5, 6, 7, 8]
    for kw, n in zip(calls, full):
        got = attn(q, k, v, **kw)
        assert sparse_checks.call_count == n, kw.keys()
        out = got[0] if isinstance(got, tuple) else got
        ref_kw = {x: kw[x] for x in ("scale", "sinks") if x in kw}
        want, want_lse = _sel_ref(q, k, v, kw["indices"], mask_mod=causal, **ref_kw)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
        if isinstance(got, tuple):
            torch.testing.assert_close(got[1].double(), want_lse, rtol=1e-4, atol=1e-5)
    for kw in calls:  # all planned now
        attn(q, k, v, **kw)
    assert sparse_checks.call_count == full[-1]
    q2, k2, v2 = qkv(L=L, H=4)  # another shape
    attn(q2, k2, v2, indices=idx)
    assert sparse_checks.call_count == full[-1] + 1
    qb, kb, vb = (torch.cat([t, t]) for t in (q, k, v))  # batch 2, a batch-1 selection: expanded per call
    for _ in range(2):
        out = attn(qb, kb, vb, indices=idx)
        torch.testing.assert_close(out.double(), _sel_ref(qb, kb, vb, idx.expand(2, -1, -1, -1),
                                                          mask_mod=causal)[0], rtol=1e-4, atol=1e-5)
    assert sparse_checks.call_count == full[-1] + 2


def test_planned_selector_calls_still_check_values_and_refuse_bad_layouts():
    """What the values decide is checked on every planned call: out-of-range indices (unless
    ``check_indices=False``), sink logits per version, captured values a pattern indexes with;
    indices of another dtype or shape get a key of their own and its full checks."""
    attn = attndsl.compile(mask_mod=causal)
    L = 16
    q, k, v = qkv(L=L)
    idx = _sel(L)
    attn(q, k, v, indices=idx)
    attn(q, k, v, indices=idx)  # planned
    bad = idx.clone()
    bad[0, 0, 5, 0] = L + 3
    with pytest.raises(IndexError, match=r"indices\[0, 0, 5, 0\] = 19 is out of range for Lkv=16"):
        attn(q, k, v, indices=bad)
    fast = attn(q, k, v, indices=bad, check_indices=False)
    torch.testing.assert_close(fast, attn(q, k, v, indices=torch.where(bad >= L, -1, bad)), rtol=0, atol=0)
    with pytest.raises(TypeError, match="int32"):
        attn(q, k, v, indices=idx.float())
    with pytest.raises(ValueError, match=r"Lq=16"):
        attn(q, k, v, indices=idx[:, :, :8])
    sinks = torch.randn(2)
    attn(q, k, v, indices=idx, sinks=sinks)
    attn(q, k, v, indices=idx, sinks=sinks)
    sinks[1] = float("nan")  # an in-place change: a new version, checked again
    with pytest.raises(ValueError, match="sink"):
        attn(q, k, v, indices=idx, sinks=sinks)
    # a pattern indexing a captured table with captured values: checked every call
    ids = torch.zeros(L, dtype=torch.int64)
    table = torch.randn(3)

    def by_doc(score, b, h, q_idx, kv_idx):
        return score + table[ids[kv_idx]]
    doc = attndsl.compile(score_mod=by_doc)
    for _ in range(2):
        doc(q, k, v, indices=idx)
    ids[4] = 7
    with pytest.raises(IndexError):
        doc(q, k, v, indices=idx)


def test_planned_selector_calls_equal_fresh_ones_with_gradients_and_no_graph_for_inference():
    """A planned call (inference without the autograd Function, training through it, with a scale
    of its own) gives the bits of a fresh compile's first call, outputs and gradients."""
    L = 24
    q, k, v = qkv(L=L)
    idx = _sel(L, seed=3)
    planned = attndsl.compile(mask_mod=causal, score_mod=softcap)
    for _ in range(2):
        out = planned(q, k, v, indices=idx)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, attndsl.compile(mask_mod=causal, score_mod=softcap)(q, k, v, indices=idx),
                               rtol=0, atol=0)

    def fwd_bwd(attn, scale=None):
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        o, lse = attn(qg, kg, vg, indices=idx, scale=scale, return_lse=True)
        g = torch.Generator().manual_seed(1)
        torch.autograd.backward([o, lse], [torch.randn(o.shape, generator=g),
                                           torch.where(torch.isinf(lse), 0.0, torch.randn(lse.shape, generator=g))])
        return o.detach(), lse.detach(), qg.grad, kg.grad, vg.grad
    for scale in (None, 0.2):
        fwd_bwd(planned, scale)
        got = fwd_bwd(planned, scale)
        want = fwd_bwd(attndsl.compile(mask_mod=causal, score_mod=softcap), scale)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            assert torch.equal(a, b), (name, scale)


def softcap(score, b, h, q_idx, kv_idx):
    return 8.0 * torch.tanh(score / 8.0)


def test_selector_plans_of_learnable_tensors_and_rebound_globals():
    """A learnable captured tensor gets its gradient through a planned call; a global rebound to
    another tensor of the same layout (the same plan) is the one read."""
    attndsl.clear_cache()
    global _BIAS
    L = 32
    q, k, v = qkv(L=L)
    idx = _sel(L, seed=5)
    for _ in range(3):
        _BIAS = torch.randn(2, 32)
        out = attndsl.attention(q, k, v, mask_mod=causal, score_mod=_global_bias, indices=idx)
        want, _ = _sel_ref(q, k, v, idx, mask_mod=causal, score_mod=_global_bias)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    slopes = torch.rand(2, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    attn = attndsl.compile(score_mod=alibi)
    grads = []
    for _ in range(2):
        slopes.grad = None
        attn(q, k, v, indices=idx).sum().backward()
        grads.append(slopes.grad.clone())
    s64 = slopes.detach().double().requires_grad_()

    def alibi64(score, b, h, q_idx, kv_idx):
        return score + s64[h] * (kv_idx - q_idx)
    _sel_ref(q, k, v, idx, score_mod=alibi64)[0].sum().backward()
    for g in grads:
        torch.testing.assert_close(g.double(), s64.grad, rtol=1e-4, atol=1e-4)


def test_prepared_gather_forwards_are_verified_under_the_suite_and_used_without_it(monkeypatch):
    """The gather runner's prepared forward (``FastGather``): under ATTNDSL_VERIFY_MEMO its
    arguments are checked against the verified launch's (a wrong position fails the call); as users
    run, it launches (no ordinary fill) and gives a fresh runner's bits."""
    from attndsl.runtime import launch
    from attndsl.selectors import sparse
    assert launch.VERIFY_MEMO
    attn = attndsl.compile(mask_mod=causal)
    L = 16
    q, k, v = qkv(L=L)
    idx = _sel(L, seed=2)
    want = attn(q, k, v, indices=idx)
    (fast,) = sparse.gather_runner(attn, q)._fast_fwd.values()
    assert isinstance(fast, sparse.FastGather)
    torch.testing.assert_close(attn(q, k, v, indices=idx), want, rtol=0, atol=0)  # verified
    good = fast.pos
    fast.pos = (good[1], good[0], *good[2:])  # q and k swapped
    with pytest.raises(AssertionError, match="gather forward: argument 0"):
        attn(q, k, v, indices=idx)
    fast.pos = good
    monkeypatch.setattr(sparse, "VERIFY_MEMO", False)
    filled = []
    orig = sparse.fill
    monkeypatch.setattr(sparse, "fill", lambda *a: filled.append(a) or orig(*a))
    for seed in (3, 4):
        q, k, v = qkv(L=L)
        idx = _sel(L, seed=seed)
        got = attn(q, k, v, indices=idx)
        assert not filled  # the prepared launch
        torch.testing.assert_close(got, attndsl.compile(mask_mod=causal)(q, k, v, indices=idx), rtol=0, atol=0)
        filled.clear()


_SAME_BIAS = torch.randn(2, 32)


def _same_global(score, b, h, q_idx, kv_idx):
    return score + _SAME_BIAS[h, kv_idx]


def _holding(t):
    def holds(score, b, h, q_idx, kv_idx):
        return score + t[h, kv_idx]
    return holds


def _window_of(size):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= size
    return window


@pytest.fixture
def counted_find(monkeypatch):
    """``find(mask_mod, score_mod, walked=n)``: the one-shot call's pattern lookup (``api._compiled``),
    asserting it took ``n`` full walks (``patterns._walk_kept``); the cache cleared before."""
    from attndsl.api import _compiled
    from attndsl.runtime import patterns
    attndsl.clear_cache()
    walks = [0]
    real = patterns._walk_kept
    monkeypatch.setattr(patterns, "_walk_kept", lambda *a: walks.__setitem__(0, walks[0] + 1) or real(*a))

    def find(m, s=None, walked=None):
        before = walks[0]
        got = _compiled(m, s, "softmax", False, None)
        if walked is not None:
            assert walks[0] - before == walked, (m, s)
        return got
    return find


def test_patterns_met_again_by_identity_bind_the_tensors_they_hold_now(counted_find):
    """``PatternCache.found``: functions of the codes of earlier calls are found without a walk once
    met in two walks (no mask at all, a plain mask, closures and globals holding tensors, closures a
    factory makes afresh per call); every rebinding (a closure cell, a global, a default, the code)
    and every change of a held tensor in place (requires_grad, dtype, shape) walks once and is
    recorded beside the earlier record, and the tensors bound are always the ones held now; the
    records keep no tensor alive."""
    import gc
    import weakref
    from attndsl.runtime import patterns
    find = counted_find
    table = torch.randn(2, 32)

    def bias(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx]

    def rebind(t):
        nonlocal table
        table = t

    global _SAME_BIAS
    old = _SAME_BIAS
    try:
        for m, s in ((None, None), (causal, None), (causal, bias), (None, _same_global)):
            first = find(m, s, walked=1)
            assert find(m, s, walked=1)[0] is first[0]  # met in a second walk: recorded
            for _ in range(2):
                c, tensors = find(m, s, walked=0)
                assert c is first[0] and all(a is b for a, b in zip(tensors, first[1]))
        c, _ = find(causal, bias, walked=0)
        rebind(torch.randn(2, 32))  # a closure cell rebound: walked, the new tensor bound, recorded
        assert find(causal, bias, walked=1) == (c, [table])
        assert find(causal, bias, walked=0)[1][0] is table
        _SAME_BIAS = torch.randn(2, 32)  # a global rebound
        assert find(None, _same_global, walked=1)[1][0] is _SAME_BIAS
        assert find(None, _same_global, walked=0)[1][0] is _SAME_BIAS
        table.requires_grad_()  # in place: learnable now, another pattern
        learn, tensors = find(causal, bias, walked=1)
        assert learn is not c and tensors[0] is table
        assert find(causal, bias, walked=0)[0] is learn
        table.requires_grad_(False)  # back as it was: that record again
        assert find(causal, bias, walked=0)[0] is c
        table.data = torch.randn(2, 32, dtype=torch.float64)  # another dtype, same object
        assert find(causal, bias, walked=1)[0].tensors[0].dtype == torch.float64
        table.data = torch.randn(2, 48)  # another shape, same object: walked (bound, same pattern)
        assert find(causal, bias, walked=1)[1][0] is table
        assert find(causal, bias, walked=0)[1][0] is table
        bias.__defaults__ = (1.0,)  # a default appears
        find(causal, bias, walked=1)
        bias.__defaults__ = None
        find(causal, bias, walked=0)  # the record of no default is still kept
        causal_code = causal.__code__
        other = _leaf_causal.__code__
        try:
            causal.__code__ = other  # another code, same function object
            find(causal, None, walked=1)
        finally:
            causal.__code__ = causal_code
        made = []
        w = torch.randn(2, 32)
        for n in (1, 1, 0, 0):  # a fresh closure per call (one code) of one tensor: recorded once met twice
            c, tensors = find(None, _holding(w), walked=n)
            assert tensors[0] is w
            made.append(c)
        w = torch.randn(2, 32)  # another tensor in the cell: walked, bound, then found without a walk
        for n in (1, 0):
            c, tensors = find(None, _holding(w), walked=n)
            assert tensors[0] is w and all(m is made[0] for m in made + [c])
        # one factory's closures holding other constants (a window of 8 beside one of 16): one
        # record each, both found without a walk
        for n, size in ((1, 8), (1, 8), (1, 16), (0, 8), (0, 16), (0, 8)):
            find(_window_of(size), None, walked=n)
        assert len(patterns.PATTERNS.same[(id(_window_of(8).__code__), None, ("softmax", False, False,
                                                                          (None, None, None, None)))]) == 2
        assert all(r.flat is not None for recs in patterns.PATTERNS.same.values() for r in recs)
        # (the compiled pattern holds the first tensor it was traced with, not this one)
        gone = torch.randn(2, 32)
        holds = _holding(gone)
        for n in (1, 0, 0):  # its code recorded already: recorded at its first walk
            find(None, holds, walked=n)
        ref = weakref.ref(gone)
        del holds, gone
        gc.collect()
        assert ref() is None
        # end to end: a recorded pattern computes with the tensor held now
        q, k, v = qkv()
        for _ in range(3):
            rebind(torch.randn(2, 32))
            check(attndsl.attention(q, k, v, mask_mod=causal, score_mod=bias), q, k, v, mask_mod=causal,
                  score_mod=bias)
            check(attndsl.attention(q, k, v, mask_mod=causal, score_mod=bias), q, k, v, mask_mod=causal,
                  score_mod=bias)
    finally:
        _SAME_BIAS = old
        attndsl.clear_cache()


def _nested_bias(t, sizes=(2, 3)):
    """A factory whose pattern holds a nested function (over a tensor) and a tuple, as the locality
    patterns hold their coordinate helpers and window sizes."""
    def term(h, kv_idx):
        return t[h, kv_idx] * sizes[0]

    def rebind(u):
        nonlocal t
        t = u

    def mod(score, b, h, q_idx, kv_idx):
        return score + term(h, kv_idx) + sizes[1]
    return mod, rebind


def test_patterns_holding_nested_functions_and_tuples_are_found_by_identity(counted_find):
    """Nested functions and tuples are followed by the identity memo (``patterns._read``): a
    pattern holding them is found without a walk from its third call (the locality patterns: NA-2D
    on a ``Layout``), and its key and tensors are the full walk's; a nested function's cell rebound,
    a tuple of other constants, each walk again and bind what is held now."""
    from attndsl import Layout
    from attndsl.patterns.neighborhood import neighborhood
    from attndsl.runtime import patterns
    find = counted_find
    na = neighborhood(Layout((8, 8), tile=(4, 4)), 3)
    for n in (1, 1, 0, 0):
        find(na, walked=n)
    t = torch.randn(2, 32)
    mod, rebind = _nested_bias(t)
    key, tensors = patterns.walk(None, mod)
    flat = patterns.FlatWalks()
    assert patterns._walk_kept(flat, None, mod) == (key, tensors)  # a full walk, kept
    assert flat.get(None, mod) is not None and flat.get(None, mod)[0] == key
    c0 = None
    for n in (1, 1, 0, 0):
        c0, got = find(None, mod, walked=n)
        assert got[0] is t
    u = torch.randn(2, 32)
    rebind(u)  # the nested function's cell: walked again, the new tensor bound
    assert find(None, mod, walked=1)[1][0] is u
    assert find(None, mod, walked=0)[1][0] is u
    other, _ = _nested_bias(t, (2, 4))  # another constant in the tuple: another pattern
    assert find(None, other, walked=1)[0] is not c0
    q, k, v = qkv()
    for _ in range(3):  # end to end, with the tensor held now
        rebind(torch.randn(2, 32))
        out = attndsl.attention(q, k, v, score_mod=mod)
        check(out, q, k, v, score_mod=mod)
    assert patterns.PATTERNS.uncacheable == 0
    attndsl.clear_cache()


def _shipped_patterns():
    """(name, mask_mod, score_mod) of every factory in ``patterns/`` at small sizes."""
    from attndsl import Layout
    from attndsl import patterns as P
    from attndsl.patterns.radial import radial, radial_block, radial_via_tables
    from attndsl.patterns.neighborhood import neighborhood, neighborhood_1d, neighborhood_2d, neighborhood_3d
    from attndsl.patterns.sliding_tile import sliding_tile, sliding_tile_3d, sta_layout
    ids = torch.zeros(64, dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 1])
    return [
        ("causal_bottom_right", P.causal_bottom_right(32, 64), None),
        ("chunked", P.chunked(16), None),
        ("document", P.document(ids), None),
        ("prefix_lm", P.prefix_lm(8), None),
        ("sliding_window", P.sliding_window(16), None),
        ("alibi", P.causal, P.alibi(torch.rand(2))),
        ("softcap", None, P.softcap(30.0)),
        ("relative_position_bias", None, P.relative_position_bias(torch.rand(2, 63), 31)),
        ("t5_bucket_bias", None, P.t5_bucket_bias(torch.rand(2, 8), 8, 32)),
        ("tree_mask", P.tree_mask(P.tree_ancestors(parents), 60), None),
        ("neighborhood", neighborhood(Layout((8, 8), tile=(4, 4)), 3), None),
        ("neighborhood_1d", neighborhood_1d(64, 5)[1], None),
        ("neighborhood_2d", neighborhood_2d(8, 8, 3, tile=(4, 4))[1], None),
        ("neighborhood_3d", neighborhood_3d(4, 4, 4, 3, tile=(2, 2, 2))[1], None),
        ("sliding_tile", sliding_tile(sta_layout((4, 4, 4), (2, 2, 2)), (1, 1, 1)), None),
        ("sliding_tile_3d", sliding_tile_3d((4, 4, 4), (2, 2, 2), (1, 1, 1))[1], None),
        ("radial", radial(2, 32, block=16), None),
        ("radial_block", radial_block(2, 32, block=16), None),
        ("radial_via_tables", radial_via_tables(2, 32, block=16), None),
    ]


SHIPPED = ("causal_bottom_right", "chunked", "document", "prefix_lm", "sliding_window", "alibi", "softcap",
           "relative_position_bias", "t5_bucket_bias", "tree_mask", "neighborhood", "neighborhood_1d",
           "neighborhood_2d", "neighborhood_3d", "sliding_tile", "sliding_tile_3d", "radial", "radial_block",
           "radial_via_tables")
#: public functions of ``patterns/`` that make no pattern: helpers, layouts, tables; ``causal`` is
#: the mask itself (no factory, nothing held)
_NOT_FACTORIES = {"alibi_slopes", "doc_ids_from_lengths", "t5_bucket", "tree_ancestors", "causal", "window_1d",
                  "window_width", "split_keep", "block_offsets", "radial_layout", "radial_tables", "sta_layout"}


def test_the_shipped_pattern_list_is_complete():
    """Every pattern factory of ``patterns/`` (its package's names and the locality modules'
    functions) has an entry in ``_shipped_patterns``, which builds exactly ``SHIPPED``."""
    import inspect
    from attndsl import patterns as P
    from attndsl.patterns import neighborhood, radial, sliding_tile
    public = set(P.__all__)
    for mod in (neighborhood, radial, sliding_tile):  # not re-exported by the package
        public |= {n for n, f in inspect.getmembers(mod, inspect.isfunction)
                   if f.__module__ == mod.__name__ and not n.startswith("_")}
    assert public - _NOT_FACTORIES == set(SHIPPED), sorted(public - _NOT_FACTORIES ^ set(SHIPPED))
    assert tuple(n for n, _, _ in _shipped_patterns()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_pattern_is_found_by_identity(name):
    """Each factory of ``patterns/`` makes a pattern the identity memo keeps (``FlatWalks``: only
    immutable values, tensors and functions reachable), so its one-shot calls skip the walk: a
    list in a closure (STA's tile counts, before) walked the pattern on every call."""
    from attndsl.runtime import patterns
    m, s = next((m, s) for n, m, s in _shipped_patterns() if n == name)
    flat = patterns.FlatWalks()
    key, tensors = patterns._walk_kept(flat, m, s)
    got = flat.get(m, s)
    assert got is not None, f"{name}: walked on every call (not flat)"
    assert got[0] == key and all(a is b for a, b in zip(got[1], tensors, strict=True))


# --- token selectors: the prepared backward (FastGatherBackward) ---------------------------------
@pytest.fixture
def gather_as_users_run(monkeypatch):
    """The gather runner's memo without the suite's verification: the prepared launches
    (``FastGather``/``FastGatherBackward``) launch themselves, as they do for users. Returns the
    list of prepared launches taken, by class."""
    from attndsl.selectors import sparse
    monkeypatch.setattr(sparse, "VERIFY_MEMO", False)
    taken = []
    for cls in (sparse.FastGather, sparse.FastGatherBackward):
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _f=cls.__call__: taken.append(type(self).__name__)
                            or _f(self, *a))
    return taken


def _sel_grads(attn, inputs, idx, loss="square", with_lse=False, **kw):
    """(out, *gradients of q, k, v and any extra leaves in ``inputs``) of one call with ``idx``."""
    q, k, v = inputs[:3]
    if with_lse:
        out, lse = attn(q, k, v, indices=idx, return_lse=True, **kw)
    else:
        out, lse = attn(q, k, v, indices=idx, **kw), None
    return (out, *_grads(out, inputs, loss, lse))


def _sel_ref_grads(inputs, idx, loss="square", with_lse=False, sinks=False, **kw):
    l64 = [t.detach().double().requires_grad_() for t in inputs]
    if sinks:
        kw["sinks"] = l64[3]
    ref, ref_lse = attndsl.reference.sparse_attention(*l64[:3], idx, **kw)
    return (ref, *_grads(ref, l64, loss, ref_lse if with_lse else None))


def _close_to(got, want, what, tol=1e-4):
    for i, (g, r) in enumerate(zip(got, want, strict=True)):
        err = float((g.detach().double() - r.detach()).abs().max())
        assert err < tol, f"{what}: {('out', 'dq', 'dk', 'dv', 'dsinks')[i]} off by {err:.2e}"


def test_prepared_gather_backward_is_taken_from_the_second_call_and_matches_the_reference(gather_as_users_run):
    """Forward+backward calls of one key with fresh inputs each time: the first launches the
    ordinary way, every later one takes the prepared forward and backward; each call's output and
    gradients match the float64 oracle, and the bits of a fresh pattern's first (ordinary) call."""
    attn = attndsl.compile(mask_mod=causal, score_mod=softcap)
    L = 24
    for n in range(3):
        inputs = qkv(L=L, grad=True)
        idx = _sel(L, K=7, seed=n)
        got = _sel_grads(attn, inputs, idx)
        assert gather_as_users_run == ["FastGather", "FastGatherBackward"] * n, gather_as_users_run
        _close_to(got, _sel_ref_grads(inputs, idx, mask_mod=causal, score_mod=softcap), f"call {n}")
        fresh = _sel_grads(attndsl.compile(mask_mod=causal, score_mod=softcap), inputs, idx)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, fresh):
            assert torch.equal(a, b), (n, name)


def test_prepared_gather_backward_rekeys_on_shapes_dtypes_and_gradient_layouts(gather_as_users_run):
    """Calls that differ from a prepared one in lengths, heads, value head dim, dtype (a 16-bit
    key: dK/dV converted from the float32 accumulators), the output gradient's layout, an lse
    gradient or sinks, interleaved with the first call again, each twice (the second prepared):
    each matches the float64 oracle, output and gradients (a stale prepared launch would not)."""
    attn = attndsl.compile(mask_mod=causal)
    idx = _sel(24, K=6, seed=1)
    sinks = torch.tensor([0.4, -0.3], requires_grad=True)
    variants = {
        "plain": lambda: (qkv(L=24, grad=True), idx, {}),
        "longer": lambda: (qkv(L=40, grad=True), _sel(40, K=6, seed=2), {}),
        "more heads": lambda: (qkv(L=24, H=4, grad=True), idx, {}),
        # dK and dV of different sizes: their accumulators are two views of one flat buffer
        "value head dim 32": lambda: ([*qkv(L=24, grad=True)[:2], torch.randn(1, 2, 24, 32, requires_grad=True)],
                                      idx, {}),
        "float16": lambda: (qkv(L=24, grad=True, dtype=torch.float16), idx, {"tol": 3e-2}),
        "broadcast gradient": lambda: (qkv(L=24, grad=True), idx, {"loss": "sum"}),
        "lse gradient": lambda: (qkv(L=24, grad=True), idx, {"with_lse": True}),
        "sinks": lambda: ([*qkv(L=24, grad=True), sinks], idx, {"sinks": True}),
    }
    for name in [n for v_ in variants for n in ("plain", v_, v_)]:
        inputs, sel, kw = variants[name]()
        tol = kw.pop("tol", 1e-4)
        call_kw = {"sinks": sinks} if kw.pop("sinks", False) else {}
        got = _sel_grads(attn, inputs, sel, **kw, **call_kw)
        want = _sel_ref_grads(inputs, sel, mask_mod=causal, sinks=bool(call_kw), **kw)
        _close_to(got, want, name, tol)
        if name == "float16":
            assert all(g.dtype == torch.float16 for g in got[1:]), [g.dtype for g in got]
    assert gather_as_users_run.count("FastGatherBackward") >= len(variants), gather_as_users_run


def test_prepared_gather_backward_gradients_are_views_of_one_buffer_only_in_eager_mode():
    """The eager Function's dK and dV come from one zeroed float32 buffer (one fill, one
    conversion); the ordinary backward, as the ``torch.library`` op calls it, returns tensors that
    alias nothing (a custom op's outputs may not alias each other)."""
    from attndsl.selectors import sparse
    attn = attndsl.compile(mask_mod=causal)
    L = 16
    q, k, v = qkv(L=L, grad=True, dtype=torch.float16)
    idx = _sel(L, K=4, seed=3)
    for _ in range(2):
        _, dk, dv = torch.autograd.grad(attn(q, k, v, indices=idx).float().square().sum(), (q, k, v))
        assert dk.untyped_storage().data_ptr() == dv.untyped_storage().data_ptr()
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = sparse.gather_runner(attn, q).forward(q, k, v, idx, 0.25, [], sparse.Extras())
    # the op checks that its outputs alias nothing (torch.library.custom_op), and raises otherwise
    grads = torch.ops.attndsl.attention_bwd(q, k, v, out, lse, torch.randn_like(out), None, [], None, None, None, idx,
                                            None, attn.op_meta.key, 0.25, 0.0, 0, 0)
    assert len({g.untyped_storage().data_ptr() for g in grads[:3]}) == 3


def test_prepared_gather_backward_arguments_are_verified_under_the_suite(monkeypatch):
    """Under ATTNDSL_VERIFY_MEMO (the suite's setting) the prepared backward's argument list is
    checked against the ordinary path's on every call: a wrong position fails the call."""
    from attndsl.selectors import sparse
    assert sparse.VERIFY_MEMO
    attn = attndsl.compile(mask_mod=causal)
    L = 16
    q, k, v = qkv(L=L, grad=True)
    idx = _sel(L, K=4, seed=4)
    for _ in range(2):  # the second: verified against the first's prepared launch
        _grads(attn(q, k, v, indices=idx), (q, k, v))
    (fast,) = [b for b in sparse.gather_runner(attn, q)._fast_bwd.values() if b is not None]
    assert isinstance(fast, sparse.FastGatherBackward)
    good = fast.pos
    fast.pos = (good[1], good[0], *good[2:])  # q and k swapped
    with pytest.raises(AssertionError, match="gather backward: argument 0"):
        _grads(attn(q, k, v, indices=idx), (q, k, v))
    fast.pos = good
    _grads(attn(q, k, v, indices=idx), (q, k, v))


def test_learnable_tensors_and_factors_keep_the_ordinary_gather_backward(gather_as_users_run):
    """Calls with learnable captured tensors or low-rank factors (per-call gradient buffers and
    reductions) have no prepared backward; their gradients stay right on repeated calls."""
    L = 16
    idx = _sel(L, K=5, seed=6)
    slopes = torch.rand(2, requires_grad=True)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    attn = attndsl.compile(score_mod=alibi)
    s64 = slopes.detach().double().requires_grad_()

    def alibi64(score, b, h, q_idx, kv_idx):
        return score + s64[h] * (kv_idx - q_idx)
    for _ in range(3):
        inputs = [*qkv(L=L, grad=True), slopes]
        got = _sel_grads(attn, inputs, idx)
        l64 = [t.detach().double().requires_grad_() for t in inputs[:3]] + [s64]
        s64.grad = None
        ref, _ = attndsl.reference.sparse_attention(*l64[:3], idx, score_mod=alibi64)
        _close_to(got, (ref, *_grads(ref, l64)), "learnable")
    assert "FastGatherBackward" not in gather_as_users_run
    u, w = torch.randn(1, 2, L, 2, requires_grad=True), torch.randn(1, 2, L, 2, requires_grad=True)
    plain = attndsl.compile(mask_mod=causal)
    for _ in range(2):
        q, k, v = qkv(L=L, grad=True)
        out = plain(q, k, v, indices=idx, bias_factors=(u, w))
        grads = _grads(out, (q, k, v, u, w))
        l64 = [t.detach().double().requires_grad_() for t in (q, k, v, u, w)]
        ref, _ = attndsl.reference.sparse_attention(*l64[:3], idx, mask_mod=causal, bias_factors=tuple(l64[3:]))
        _close_to((out, *grads[:3]), (ref, *_grads(ref, l64)[:3]), "factors")
    assert "FastGatherBackward" not in gather_as_users_run


@pytest.mark.gpu
def test_prepared_gather_backward_on_a_gpu(monkeypatch):
    """On CUDA in bfloat16, as users run: repeated token-selector forward+backward calls of a key
    take the prepared launches (dK/dV: one fill, one conversion), match the float64 oracle with
    fresh inputs each call, and keep matching after a call of another length re-keys."""
    from attndsl.selectors import random_causal_indices, sparse
    monkeypatch.setattr(sparse, "VERIFY_MEMO", False)
    attn = attndsl.compile(mask_mod=causal)
    g = torch.Generator(device="cuda").manual_seed(torch.seed())
    for L in (512, 512, 512, 640, 512):
        q, k, v = (torch.randn(2, 4, L, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        idx = random_causal_indices(L, 32, B=2, G=2, device="cuda", seed=L)
        out = attn(q, k, v, indices=idx, check_indices=False)
        grads = torch.autograd.grad((out.float() ** 2).sum(), (q, k, v))
        assert all(t.dtype == torch.bfloat16 for t in grads)
        l64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = attndsl.reference.sparse_attention(*l64, idx, mask_mod=causal)
        assert float((out.double() - ref).abs().max()) < 2e-2
        for got, want in zip(grads, torch.autograd.grad((ref ** 2).sum(), l64)):
            assert float((got.double() - want).abs().max()) / float(want.abs().max()) < 2e-2
    plans = sparse._runners_of(attn).plans.values()
    assert all(isinstance(p.memo.bwd, sparse.FastGatherBackward) for p in plans), list(plans)


class _HopperFwdStandIn:
    """A Hopper forward on the CPU (no sm_90 here): the float64 reference, counting how often the
    runtime asks whether it takes a call and how often it runs."""

    unsupported, heavy_first = None, True

    def __init__(self, takes=True):
        self.takes, self.asked, self.keys = takes, 0, []

    def applies(self, q, k, v, extras=None, tables=None, count_visits=False):
        from attndsl.runtime import hopper
        self.asked += 1
        return self.takes and hopper.enabled() is not False and tables is None and not count_visits

    def forward(self, q, k, v, scale, sinks=None, buffers=(), key=None):
        self.keys.append(key)
        out, lse = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=causal, scale=scale)
        return out.to(q.dtype), lse.float()


def test_a_key_the_hopper_forward_takes_asks_once_per_switch_state():
    """Calls of a call key the Hopper forward takes have no FastForward; the plan keeps the verdict
    of ``HopperForward.applies`` (its call conditions are the key's), asked again only when the
    switch changes, and hands the Hopper launch the call key (its prepared launch's key)."""
    from attndsl.runtime import hopper
    attn = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    q, k, v = qkv()
    stand_in = _HopperFwdStandIn()
    attn.runner(q, 16, k).hopper = stand_in
    try:
        for _ in range(3):
            q, k, v = qkv()
            check(attn(q, k, v), q, k, v, mask_mod=causal)
        assert stand_in.asked == 1 and len(stand_in.keys) == 3
        assert stand_in.keys[0] is not None and all(x == stand_in.keys[0] for x in stand_in.keys)
        hopper.enable(False)  # the switch changed: asked again, and the portable kernels run
        check(attn(q, k, v), q, k, v, mask_mod=causal)
        assert stand_in.asked >= 2 and len(stand_in.keys) == 3
        hopper.enable(None)
        q, k, v = qkv()
        check(attn(q, k, v), q, k, v, mask_mod=causal)
        assert len(stand_in.keys) == 4
    finally:
        hopper.enable(None)
    # a verdict of no: the portable forward, its FastForward made and taken
    stand_in2 = _HopperFwdStandIn(takes=False)
    attn2 = attndsl.compile(mask_mod=causal, block_m=BLOCK, block_n=BLOCK)
    attn2.runner(q, 16, k).hopper = stand_in2
    for _ in range(3):
        q, k, v = qkv()
        check(attn2(q, k, v), q, k, v, mask_mod=causal)
    assert not stand_in2.keys
