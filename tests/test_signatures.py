"""Every kernel launch fills exactly the kernel's parameters: no missing one, no extra one.

Each launch through Triton's interpreter is recorded (positional arguments bound to the leading
parameters, the rest by name) for several patterns and modes: the dense forward and backward, a
block-table pattern, a learnable table, sigmoid, the gather kernels and the indexer.
"""
from __future__ import annotations

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

import attndsl
from attndsl.patterns.causal import causal
from attndsl.patterns.document import document
from attndsl.patterns.relative_bias import relative_position_bias
from attndsl.runtime.marshal import Extras
from attndsl.spec import Param


_LAUNCH_OPTIONS = {"num_warps", "num_stages", "num_ctas", "maxnreg"}  # Triton's, not the kernel's


@pytest.fixture
def launches(monkeypatch):
    seen = []
    run = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = set(names[:len(args)])
        kwargs_ = {k: v for k, v in kwargs.items() if k not in _LAUNCH_OPTIONS}
        seen.append((self.fn.__name__, len(args) <= len(names), bound & set(kwargs_), bound | set(kwargs_), set(names)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", spy)
    return seen


def _check(seen, want_kernels, spec=None):
    names = {s[0] for s in seen}
    assert want_kernels <= names, (want_kernels, names)
    for name, fits, twice, given, params in seen:
        assert fits, f"{name}: more positional arguments than parameters"
        assert not twice, f"{name}: {sorted(twice)} given both by position and by name"
        assert given == params, f"{name}: missing {sorted(params - given)}, unknown {sorted(given - params)}"


def _qkv(L=40, H=2, D=16, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("case", ["dense", "causal", "document", "document_bounds", "learnable", "sigmoid"])
def test_dense_kernels_get_every_parameter(case, launches, monkeypatch):
    # "document": the dense table kernels; "document_bounds": the per-tile bounds builder's kernels
    # that replace them for document masks
    monkeypatch.setattr("attndsl.runtime.tables.BOUNDS", case == "document_bounds")
    doc = torch.tensor([0] * 15 + [1] * 25, dtype=torch.int32)
    table = torch.zeros(2, 9, requires_grad=True)
    kw = {"dense": {}, "causal": dict(mask_mod=causal), "document": dict(mask_mod=document(doc)),
          "document_bounds": dict(mask_mod=document(doc)),
          "learnable": dict(mask_mod=causal, score_mod=relative_position_bias(table, 4)),
          "sigmoid": dict(mask_mod=causal, normalizer="sigmoid")}[case]
    attn = attndsl.compile(**kw)
    q, k, v = _qkv()
    attn(q, k, v).sum().backward()
    want = {f"{attn.spec.name}_fwd", f"{attn.spec.name}_bwd_dkdv", f"{attn.spec.name}_bwd_dq"}
    if case == "document":
        want |= {f"{attn.spec.name}_table", f"{attn.spec.name}_table_t"}
    if case == "document_bounds":
        want |= {f"{attn.spec.name}_{k}{t}" for k in ("tbounds", "tclass") for t in ("", "_t")}
    _check(launches, want)


def test_gather_and_indexer_kernels_get_every_parameter(launches):
    from attndsl.selectors import LightningIndexer
    from attndsl.selectors.sparse import random_causal_indices
    attn = attndsl.compile(mask_mod=causal)
    q, k, v = _qkv(L=24)
    idx = random_causal_indices(24, 8)
    attn(q, k, v, indices=idx).sum().backward()
    ix = LightningIndexer(topk=4)
    g = torch.Generator().manual_seed(1)
    ix(torch.randn(1, 2, 24, 16, generator=g), torch.randn(1, 1, 24, 16, generator=g))
    _check(launches, {"attn_sel_fwd", "attn_sel_bwd", f"{ix.spec.name}_scores"})


def test_rendered_defs_are_the_spec_signatures():
    """Codegen writes each kernel's ``def`` from ``spec.lowering.signatures``: the generated
    functions' parameters are those, in order (constexprs marked)."""
    from attndsl.codegen import render, render_gather, render_indexer
    from attndsl.selectors import LightningIndexer
    from attndsl.selectors.sparse import gather_spec
    import ast
    doc = torch.tensor([0] * 15 + [1] * 25, dtype=torch.int32)
    table = torch.zeros(2, 9, requires_grad=True)
    cases = []
    for kw in ({}, dict(mask_mod=document(doc)), dict(mask_mod=causal, score_mod=relative_position_bias(table, 4))):
        spec = attndsl.compile(**kw).spec
        cases.append((render(spec), spec, {f"{spec.name}_{k}": k for k in ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")}
                      | ({f"{spec.name}_{k}": k for k in ("table", "table_t", "tbounds", "tbounds_t", "tclass", "tclass_t")}
                         if spec.data_dependent else {})))
        gs = gather_spec(spec)
        cases.append((render_gather(gs), gs, {f"{gs.name}_fwd": "gather_fwd", f"{gs.name}_bwd": "gather_bwd"}))
    ix = LightningIndexer().spec
    cases.append((render_indexer(ix), ix, {f"{ix.name}_scores": "scores"}))
    for src, spec, kernels in cases:
        defs = {f.name: f for f in ast.parse(src).body if isinstance(f, ast.FunctionDef)}
        for fn, key in kernels.items():
            got = [(a.arg, a.annotation is not None) for a in defs[fn].args.args]
            want = [(p.name, p.kind == "constexpr") for p in spec.lowering.signature(key)]
            assert got == want, fn


def test_check_arguments_names_what_disagrees():
    from attndsl.runtime.marshal import check_arguments
    params = (Param("Q", "tensor"), Param("LQ", "int"), Param("BLOCK", "constexpr"))
    q = torch.zeros(1)
    check_arguments("k", params, [q, 3], {"BLOCK": 16})
    with pytest.raises(TypeError, match="2 parameters"):
        check_arguments("k", params, [q, 3, 4], {"BLOCK": 16})
    with pytest.raises(TypeError, match="LQ"):
        check_arguments("k", params, [q, q], {"BLOCK": 16})
    with pytest.raises(TypeError, match="BLOCK"):
        check_arguments("k", params, [q, 3], {})


def _with_signature(spec, kernel, edit):
    """``spec`` with ``kernel``'s signature replaced by ``edit(params)``."""
    import dataclasses
    sigs = tuple((k, tuple(edit(list(p))) if k == kernel else p) for k, p in spec.lowering.signatures)
    return dataclasses.replace(spec, lowering=dataclasses.replace(spec.lowering, signatures=sigs))


@pytest.mark.parametrize("kernel, edit, named", [
    ("fwd", lambda ps: ps + [Param("EXTRA_LEN", "int")], "EXTRA_LEN"),  # a parameter no value fills
    ("fwd", lambda ps: [p for p in ps if p.name != "LKV"], "LKV"),  # a value with no parameter
    ("bwd_delta", lambda ps: [p for p in ps if p.name != "Delta"], "Delta"),
    ("bwd_dkdv", lambda ps: [p for p in ps if p.name != "stride_dvn"], "stride_dvn"),
    ("bwd_dq", lambda ps: ps[:1] + [Param("DQ2", "tensor")] + ps[1:], "DQ2"),
])
def test_dense_runner_fills_by_name_and_names_what_disagrees(kernel, edit, named):
    """The dense runner fills each kernel's arguments by name from ``spec.lowering``'s signature: a
    signature with a parameter the runner has no value for, or without one it has a value for,
    raises TypeError naming it before anything launches (on the first, memoising call)."""
    comp = attndsl.CompiledAttention(causal, name=f"named_{kernel}_{named}".lower())
    q, k, v = _qkv(grad=False)
    runner = comp.runner(q)
    runner.spec = _with_signature(runner.spec, kernel, edit)
    key = runner.call_key(q, k, v, 0.25, Extras(), ())
    if kernel == "fwd":
        with pytest.raises(TypeError, match=named):
            runner.forward(q, k, v, 0.25, (), None, key=key)
        return
    out, lse, _ = runner.forward(q, k, v, 0.25, (), None, key=key)
    # the delta kernel runs where an lse gradient is subtracted (else the dQ kernel computes delta)
    dlse = torch.randn_like(lse) if kernel == "bwd_delta" else None
    with pytest.raises(TypeError, match=named):
        runner.backward(q, k, v, out, lse, torch.randn_like(out), dlse, 0.25, (), None, key=key)


def test_memo_places_a_calls_own_values_by_name():
    """A memoised launch's arguments are the memoising call's, with a later call's own values in
    their parameters' places, whether they lead the signature (one list) or not (slot by slot)."""
    from attndsl.runtime.memo import Memo, own_slots
    params = (Param("A", "tensor"), Param("n", "int"), Param("B", "tensor"), Param("s", "float"),
              Param("C", "constexpr"))
    a, b, a2, b2 = (torch.zeros(1) for _ in range(4))
    for own, later in (({"A": a, "B": b}, {"A": a2, "B": b2}), ({"B": b, "A": a}, {"B": b2, "A": a2})):
        memo = Memo(None, [a, 7, b, 0.5], own_slots("k", params, own), None, False)
        got = memo.args(later)
        assert got[0] is a2 and got[2] is b2 and got[1] == 7 and got[3] == 0.5
    memo = Memo(None, [a, b, 7, 0.5], own_slots("k", params[:1] + params[2:3] + params[1:2] + params[3:],
                                                 {"A": a, "B": b}), None, False)
    assert memo.rest == [7, 0.5] and memo.args({"A": a2, "B": b2}) == [a2, b2, 7, 0.5]
    with pytest.raises(TypeError, match="Z"):
        own_slots("k", params, {"A": a, "Z": b})
