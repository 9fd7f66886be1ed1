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


@pytest.fixture
def launches(monkeypatch):
    seen = []
    run = InterpretedFunction.run

    def spy(self, *args, grid, warmup, **kwargs):
        names = list(self.arg_names)
        bound = set(names[:len(args)])
        seen.append((self.fn.__name__, len(args) <= len(names), bound & set(kwargs), bound | set(kwargs), set(names)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", spy)
    return seen


def _check(seen, want_kernels):
    names = {s[0] for s in seen}
    assert want_kernels <= names, (want_kernels, names)
    for name, fits, twice, given, params in seen:
        assert fits, f"{name}: more positional arguments than parameters"
        assert not twice, f"{name}: {sorted(twice)} given both by position and by name"
        assert given == params, f"{name}: missing {sorted(params - given)}, unknown {sorted(given - params)}"


def _qkv(L=40, H=2, D=16, grad=True):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, L, D, generator=g).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("case", ["dense", "causal", "document", "learnable", "sigmoid"])
def test_dense_kernels_get_every_parameter(case, launches):
    doc = torch.tensor([0] * 15 + [1] * 25, dtype=torch.int32)
    table = torch.zeros(2, 9, requires_grad=True)
    kw = {"dense": {}, "causal": dict(mask_mod=causal), "document": dict(mask_mod=document(doc)),
          "learnable": dict(mask_mod=causal, score_mod=relative_position_bias(table, 4)),
          "sigmoid": dict(mask_mod=causal, normalizer="sigmoid")}[case]
    attn = attndsl.compile(**kw)
    q, k, v = _qkv()
    attn(q, k, v).sum().backward()
    want = {f"{attn.spec.name}_fwd", f"{attn.spec.name}_bwd_dkdv", f"{attn.spec.name}_bwd_dq"}
    if case == "document":
        want |= {f"{attn.spec.name}_table", f"{attn.spec.name}_table_t"}
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
