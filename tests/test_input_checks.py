"""Clear errors before any launch for the cases of issue 31, item 5 (part 4), and what is accepted.

Refusals run with every kernel build and launch patched to fail (validation must come first).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attndsl
from attndsl.runtime import cache, launch


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


@pytest.fixture
def no_launch(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a kernel was built or launched before the inputs were validated")

    for name in ("forward", "backward", "table"):
        monkeypatch.setattr(launch.Runner, name, fail)
    monkeypatch.setattr(cache, "load", fail)


def refused(call, kind=ValueError):
    with pytest.raises(kind) as ei:
        call()
    return str(ei.value)


@pytest.mark.parametrize("kw,value", [("block_m", 48), ("block_n", 7), ("block_n", 512),
                                      ("block_m", 0), ("block_n", -16)])
def test_tile_sizes_must_be_powers_of_two(no_launch, kw, value):
    msg = refused(lambda: attndsl.compile(mask_mod=causal, **{kw: value}))
    assert f"{kw}={value}" in msg and "power of two" in msg and "16" in msg and "256" in msg


def test_tiles_under_16_run_only_in_the_interpreter():
    """Powers of two under 16 are taken on the CPU (exact visit plans in tests) and refused for a GPU
    launch before anything is built, naming the value."""
    from attndsl.runtime.checks import check_gpu_tiles
    attn = attndsl.compile(mask_mod=causal, block_m=8, block_n=4)
    q = torch.randn(1, 1, 24, 16)
    out = attn(q, q, q)
    ref, _ = attndsl.reference.attention(q, q, q, mask_mod=causal)
    assert torch.allclose(out.double(), ref, atol=1e-4)
    with pytest.raises(ValueError, match="block_m=8 runs only in the CPU interpreter"):
        check_gpu_tiles(8, 16)


def test_tile_size_type_and_warps(no_launch):
    assert "block_m must be an int" in refused(lambda: attndsl.compile(block_m=32.0), TypeError)
    assert "block_m must be an int" in refused(lambda: attndsl.compile(block_m=True), TypeError)
    assert "num_warps=3" in refused(lambda: attndsl.compile(num_warps=3))
    assert "num_stages=0" in refused(lambda: attndsl.compile(num_stages=0))


def test_legal_tiles_run():
    q, k, v = (torch.randn(1, 1, 20, 16) for _ in range(3))
    out = attndsl.compile(mask_mod=causal, block_m=16, block_n=32)(q, k, v)
    ref, _ = attndsl.reference.attention(q, k, v, mask_mod=causal)
    assert (out.double() - ref).abs().max() < 1e-4


def test_meta_device(no_launch):
    q = t(1, 2, 8, 32, device="meta")
    for call in (lambda: attndsl.attention(q, q, q, mask_mod=causal),
                 lambda: attndsl.compile(mask_mod=causal)(q, q, q)):
        msg = refused(call)
        assert "'meta' device" in msg and "'cuda'" in msg and "'cpu'" in msg


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_sinks_must_be_finite_or_minus_inf(no_launch, bad):
    q = t(1, 3, 8, 32)
    sinks = torch.tensor([0.5, bad, -1.0])
    for call in (lambda: attndsl.attention(q, q, q, mask_mod=causal, sinks=sinks),
                 lambda: attndsl.compile(mask_mod=causal)(q, q, q, sinks=sinks)):
        msg = refused(call)
        assert f"sinks[1] is {bad}" in msg and "-inf" in msg and "finite" in msg


def test_minus_inf_sink_means_no_sink():
    """``-inf`` is accepted and is the same as no sink for that head (output and lse)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g) for _ in range(3))
    sinks = torch.tensor([float("-inf"), 0.7])
    out, lse = attndsl.attention(q, k, v, mask_mod=causal, sinks=sinks, return_lse=True)
    plain, plain_lse = attndsl.attention(q, k, v, mask_mod=causal, return_lse=True)
    torch.testing.assert_close(out[:, 0], plain[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, 0], plain_lse[:, 0], atol=1e-5, rtol=1e-5)
    ref, ref_lse = attndsl.reference.attention(q, k, v, mask_mod=causal, sinks=sinks)
    assert (out.double() - ref).abs().max() < 1e-4 and (lse.double() - ref_lse).abs().max() < 1e-4


@pytest.mark.parametrize("scale", [True, False])
def test_bool_scale_is_refused(no_launch, scale):
    q = t(1, 2, 8, 32)
    for call in (lambda: attndsl.attention(q, q, q, scale=scale), lambda: attndsl.compile()(q, q, q, scale=scale)):
        msg = refused(call, TypeError)
        assert "scale must be a real number" in msg and repr(scale) in msg


@pytest.mark.parametrize("scale", [np.float32(0.3), np.float64(0.3), np.int64(1), 0.3])
def test_numpy_scales_are_accepted(scale):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 16, 16, generator=g) for _ in range(3))
    out = attndsl.attention(q, k, v, mask_mod=causal, scale=scale)
    ref, _ = attndsl.reference.attention(q, k, v, mask_mod=causal, scale=float(scale))
    assert (out.double() - ref).abs().max() < 1e-4


def test_non_finite_numpy_scale(no_launch):
    q = t(1, 2, 8, 32)
    assert "scale must be finite" in refused(lambda: attndsl.attention(q, q, q, scale=np.float32("inf")))


def _plus_inf_at(qi, ki):
    def sm(score, b, h, q_idx, kv_idx):
        return torch.where((q_idx == qi) & (kv_idx == ki), float("inf"), score)
    return sm


def test_plus_inf_score_gives_the_reference_lse():
    """A ``+inf`` score: the reference (and FlexAttention's eager path) give that row ``lse = +inf``
    and a NaN output; the other rows are untouched."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 8, 16, generator=g) for _ in range(3))
    sm = _plus_inf_at(3, 2)
    out, lse = attndsl.attention(q, k, v, score_mod=sm, return_lse=True)
    ref, ref_lse = attndsl.reference.attention(q, k, v, score_mod=sm)
    assert torch.isnan(out[0, 0, 3]).all() and torch.isnan(ref[0, 0, 3]).all()
    assert lse[0, 0, 3].item() == float("inf") == ref_lse[0, 0, 3].item()
    keep = torch.arange(8) != 3
    assert (out[0, 0, keep].double() - ref[0, 0, keep]).abs().max() < 1e-4
    # the backward then reads lse = +inf: p = 0 at finite scores, NaN only at the +inf one, as in
    # the reference (dV: only the +inf key's row is NaN; dQ: only that query's row)
    grads = []
    for f, dt in ((attndsl.attention, torch.float32), (attndsl.reference.attention, torch.float64)):
        x = [a.detach().to(dt).requires_grad_() for a in (q, k, v)]
        o = f(*x, score_mod=sm)
        (o[0] if isinstance(o, tuple) else o).sum().backward()
        grads.append([torch.isnan(a.grad).any(-1) for a in x])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][2], grads[1][2])
