"""torch.compile of models calling attndsl (issue 30 part 3): one torch.library op, fullgraph,
dynamic lengths without recompiles; eager vs compiled vs the float64 reference, outputs and
gradients (learnable captured tensors, sinks, bias_factors included).

CPU: kernels run in Triton's interpreter; the compile tests use ``backend="aot_eager"`` (dynamo +
AOT autograd, which is what checks the op's fake and autograd registrations; inductor's CPU
codegen would only add C++ compile time around an op it does not look into)."""
import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

import attndsl
import attndsl.reference

H, D = 2, 16


@pytest.fixture(autouse=True)
def reset():
    torch._dynamo.reset()
    attndsl.clear_cache()
    yield
    torch._dynamo.reset()


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def make_alibi(slopes):
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)
    return alibi


class Block(torch.nn.Module):
    """A tiny attention block: projections, attndsl.attention with a mask, a score mod over a
    learnable captured tensor, sinks and low-rank bias factors."""

    def __init__(self, dim=32, compiled=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.qkv = torch.nn.Linear(dim, 3 * H * D)
        self.uw = torch.nn.Linear(dim, 2 * H * 2)
        self.slopes = torch.nn.Parameter(torch.rand(H, generator=g))
        self.sinks = torch.nn.Parameter(torch.randn(H, generator=g))
        self.score_mod = make_alibi(self.slopes)  # the closure holds the parameter
        self.pattern = attndsl.compile(mask_mod=causal, score_mod=self.score_mod) if compiled else None

    def parts(self, x):
        B, L, _ = x.shape
        lin = lambda m: torch.nn.functional.linear(x, m.weight.to(x.dtype), m.bias.to(x.dtype))  # noqa: E731
        q, k, v = lin(self.qkv).view(B, L, 3, H, D).permute(2, 0, 3, 1, 4)
        u, w = lin(self.uw).view(B, L, 2, H, 2).permute(2, 0, 3, 1, 4)
        return q, k, v, (u.contiguous(), w.contiguous())

    def forward(self, x):
        q, k, v, bf = self.parts(x)
        if self.pattern is not None:
            return self.pattern(q, k, v, sinks=self.sinks, bias_factors=bf)
        return attndsl.attention(q, k, v, mask_mod=causal, score_mod=self.score_mod, sinks=self.sinks,
                                 bias_factors=bf)

    def reference(self, x):
        q, k, v, bf = self.parts(x.double())
        s64 = self.slopes.double()
        out, _ = attndsl.reference.attention(q, k, v, mask_mod=causal, score_mod=make_alibi(s64),
                                             sinks=self.sinks.double(), bias_factors=bf)
        return out


def grads(model, x, fn):
    model.zero_grad()
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(torch.ones_like(out) * 0.01 + out.detach() * 0.1)
    return out.detach(), [x.grad.double()] + [p.grad.double() for p in model.parameters()]


@pytest.mark.parametrize("compiled", [False, True], ids=["attention", "compiled-pattern"])
def test_fullgraph_dynamic_block_matches_eager_and_reference(compiled):
    model = Block(compiled=compiled)
    cnt = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    cmodel = torch.compile(model, fullgraph=True, dynamic=True, backend=cnt)
    for L in (16, 24, 40):
        x = torch.randn(2, L, 32)
        eager, g_eager = grads(model, x, model)
        comp, g_comp = grads(model, x, cmodel)
        assert torch.allclose(eager, comp, atol=1e-5), f"L={L}: compiled output differs from eager"
        for a, b in zip(g_eager, g_comp):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"L={L}: compiled gradient differs from eager"
        ref, g_ref = grads(model, x.double(), model.reference)  # float64, same parameters
        assert float((comp.double() - ref).abs().max()) < 1e-4
        for a, b in zip(g_comp, g_ref):
            assert float((a - b).abs().max()) < 2e-3 * max(1.0, float(b.abs().max()))
        assert model.slopes.grad is not None and model.slopes.grad.abs().sum() > 0  # learnable tensor learns
    assert cnt.frame_count == 1, f"recompiled over lengths: {cnt.frame_count} frames"


def test_op_is_in_the_graph():
    from torch._dynamo.testing import EagerAndRecordGraphs
    rec = EagerAndRecordGraphs()
    q, k, v = (torch.randn(1, H, 32, D) for _ in range(3))
    torch.compile(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal), fullgraph=True, backend=rec)(q, k, v)
    code = rec.graphs[0].code
    assert "attndsl.attention_fwd" in code


DOC = torch.tensor([0] * 10 + [1] * 14 + [2] * 8, dtype=torch.int32)


def doc_mask(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def test_global_capture_rebinding_under_compile():
    global DOC
    f = torch.compile(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=doc_mask), fullgraph=True,
                      backend="aot_eager")
    q, k, v = (torch.randn(1, H, 32, D) for _ in range(3))
    old = DOC
    try:
        for ids in (DOC, torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)):
            DOC = ids
            want, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=doc_mask)
            assert float((f(q, k, v).double() - want).abs().max()) < 1e-4
    finally:
        DOC = old


def test_selectors_under_compile():
    from attndsl.selectors import BlockSelection, random_causal_indices
    L = 32
    q, k, v = (torch.randn(1, H, L, D, requires_grad=True) for _ in range(3))
    idx = random_causal_indices(L, 8, B=1, G=1)
    f = torch.compile(lambda q, k, v, i: attndsl.attention(q, k, v, indices=i), fullgraph=True, backend="aot_eager")
    got = f(q, k, v, idx)
    want = attndsl.attention(q, k, v, indices=idx)
    assert torch.allclose(got, want, atol=1e-6)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    sel = BlockSelection(torch.tensor([[[[0, -1], [0, 1]]]], dtype=torch.int32), 16, 16)
    fb = torch.compile(lambda q, k, v: attndsl.attention(q, k, v, mask_mod=causal, blocks=sel), fullgraph=True,
                       backend="aot_eager")
    got = fb(q, k, v)
    want = attndsl.attention(q, k, v, mask_mod=causal, blocks=sel)
    assert torch.allclose(got, want, atol=1e-6)


def test_op_autograd_directly_matches_eager():
    """The op's autograd registration (what AOT autograd differentiates), called without dynamo."""
    from attndsl.api import _compiled
    slopes = torch.rand(H, requires_grad=True)
    sm = make_alibi(slopes)
    q, k, v = (torch.randn(1, H, 24, D, requires_grad=True) for _ in range(3))
    sinks = torch.randn(H, requires_grad=True)
    compiled, tensors = _compiled(causal, sm, "softmax", False, None)
    out, lse = torch.ops.attndsl.attention_fwd(q, k, v, tensors, sinks, None, None, None, None,
                                               compiled.op_meta.key, D ** -0.5, 0.0, 0, 0)
    g_op = torch.autograd.grad((out.sum() + lse.sum()), (q, k, v, slopes, sinks))
    out2, lse2 = attndsl.attention(q, k, v, mask_mod=causal, score_mod=sm, sinks=sinks, return_lse=True)
    g_eager = torch.autograd.grad((out2.sum() + lse2.sum()), (q, k, v, slopes, sinks))
    assert torch.allclose(out, out2) and torch.allclose(lse, lse2)
    for a, b in zip(g_op, g_eager):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_opcheck_fake_and_schema():
    from attndsl.api import _compiled
    compiled, tensors = _compiled(causal, None, "softmax", False, None)
    q, k, v = (torch.randn(1, H, 16, D) for _ in range(3))
    torch.library.opcheck(torch.ops.attndsl.attention_fwd.default,
                          (q, k, v, tensors, None, None, None, None, None, compiled.op_meta.key, 0.25, 0.0, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["torch.cuda.graph", "reduce-overhead"])
def test_cuda_graph_capture_and_replay(how):
    """Capture, replay with new inputs (copied into the static ones, in-place change of the captured
    doc ids included), compare with eager and the reference."""
    dev = "cuda"
    L = 256
    ids = torch.zeros(L, dtype=torch.int32, device=dev)
    ids[100:] = 1

    def mask(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    slopes = torch.rand(4, device=dev)
    sm = make_alibi(slopes)
    sq, sk, sv = (torch.randn(2, 4, L, 64, device=dev, dtype=torch.float16) for _ in range(3))

    def f(q, k, v):
        return attndsl.attention(q, k, v, mask_mod=mask, score_mod=sm)

    if how == "torch.cuda.graph":
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                f(sq, sk, sv)  # warm up: kernels compiled, launches memoised
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            sout = f(sq, sk, sv)
        run = lambda: (g.replay(), sout)[1]  # noqa: E731
    else:
        cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
        run = lambda: cf(sq, sk, sv).clone()  # noqa: E731
        for _ in range(3):
            run()
    for step in range(3):
        for t in (sq, sk, sv):
            t.copy_(torch.randn_like(t))
        ids.zero_()
        ids[50 * (step + 1):] = 1  # in place: the replay rebuilds the table from the new ids
        got = run()
        torch.cuda.synchronize()
        eager = f(sq, sk, sv)
        want, _ = attndsl.reference.attention(sq.double(), sk.double(), sv.double(), mask_mod=mask, score_mod=sm)
        assert float((got.double() - eager.double()).abs().max()) < 2e-3
        assert float((got.double() - want).abs().max()) < 1e-2


def test_document_mask_under_compile_builds_its_tables_per_call():
    """A data-dependent mask under torch.compile: the op builds the call's block tables (never a
    cached one: a CUDA graph's replay must read the captured tensors' current contents), so an
    in-place change of the document ids between calls is honoured."""
    from attndsl.patterns import doc_ids_from_lengths
    ids = doc_ids_from_lengths([10, 17, 13])

    def doc(b, h, q_idx, kv_idx):
        return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)

    pattern = attndsl.compile(mask_mod=doc)
    fn = torch.compile(lambda q, k, v: pattern(q, k, v), fullgraph=True, backend="aot_eager")
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    for new in (None, doc_ids_from_lengths([25, 15])):
        if new is not None:
            ids.copy_(new)
        ref, _ = attndsl.reference.attention(q.double(), k.double(), v.double(), mask_mod=doc)
        out = fn(q, k, v)
        assert float((out.double() - ref).abs().max()) < 1e-4


def _attndsl_calls(fn, n):
    """``{(file, function): calls}`` of attndsl's own Python functions over ``n`` calls of ``fn``."""
    import cProfile
    import os
    import pstats
    root = os.path.dirname(attndsl.__file__)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    return {(os.path.relpath(f, root), name): st[1]
            for (f, _, name), st in pstats.Stats(prof).stats.items() if f.startswith(root)}


#: what resolves a pattern (cache walk, trace, analysis, registration, captured-tensor paths): trace
#: time only, never per call of a compiled model
_RESOLUTION = {"_resolve_for_trace", "_compiled", "lookup", "walk", "_walk", "paths_of", "follow", "trace",
               "build_spec", "register", "op_call", "check_inputs", "check_captured", "check_extras"}


def test_one_shot_attention_under_compile_costs_what_a_compiled_pattern_costs():
    """A compiled model calling ``attndsl.attention`` resolves its pattern once, while dynamo traces:
    after the first call no pattern-cache lookup, walk, trace, analysis or input check runs per call,
    and each call runs exactly the attndsl Python functions the same model with a pattern built by
    ``attndsl.compile`` runs (one op, same runner), forward and forward+backward; its graph holds the
    same ops. Its captured learnable tensor is still bound per call (an in-place change is seen)."""
    from torch._dynamo.backends.registry import lookup_backend
    from attndsl.runtime.patterns import PATTERNS
    x = torch.randn(1, 16, 32)
    profiles, graphs = {}, {}
    for compiled in (False, True):
        torch._dynamo.reset()
        model = Block(compiled=compiled)
        ops = graphs[compiled] = []

        def record(gm, example, ops=ops):
            ops.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
            return lookup_backend("aot_eager")(gm, example)
        cnt = torch._dynamo.testing.CompileCounterWithBackend(record)
        cmodel = torch.compile(model, fullgraph=True, backend=cnt)
        fwd_bwd = lambda: cmodel(x).sum().backward()  # noqa: E731
        with torch.no_grad():
            cmodel(x)
        fwd_bwd()
        seen = (PATTERNS.hits, PATTERNS.misses, PATTERNS.uncacheable)
        with torch.no_grad():
            fwd = _attndsl_calls(lambda: cmodel(x), 3)
        both = _attndsl_calls(fwd_bwd, 2)
        assert (PATTERNS.hits, PATTERNS.misses, PATTERNS.uncacheable) == seen, "pattern cache consulted per call"
        ran = {name for _, name in (*fwd, *both)}
        assert not ran & _RESOLUTION, f"resolved per call of the compiled model: {sorted(ran & _RESOLUTION)}"
        assert cnt.frame_count == 2, f"frames compiled: {cnt.frame_count} (inference + training, once each)"
        profiles[compiled] = (fwd, both)
        # the captured parameter is a graph input, bound per call: an in-place change is seen
        with torch.no_grad():
            before = cmodel(x)
            model.slopes.mul_(3.0)
            after, want = cmodel(x), model(x)
            model.slopes.div_(3.0)
        assert not torch.allclose(before, after) and torch.allclose(after, want, atol=1e-5)
    assert graphs[False] == graphs[True], "the one-shot call's graph differs from the compiled pattern's"
    assert profiles[False] == profiles[True], (
        "per call, attention() under torch.compile runs other attndsl code than a compiled pattern: "
        f"{set(profiles[False][0].items()) ^ set(profiles[True][0].items())}")
