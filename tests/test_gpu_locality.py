"""GPU: the three locality benchmark cases against FlexAttention with the same masks.

NA-2D (128x128 image, kernel 13, 8x8 tile-major layout), STA (16x32x32 video, tiles 4x8x8,
window 3x3x3 tiles) and radial attention (16 frames x 1024 tokens), as registered in
``benchmarks.cases``. For each: forward and backward in bf16 against FlexAttention (compiled,
``create_block_mask``) on the same inputs, both measured against a float32 SDPA result with the dense mask
(ours must be about as accurate as Flex in bf16); the visit counts of the forward kernel against
the tiles the mask touches; and the box visit plan with the layout's tile sizes in use.
Timings are printed (``-s``), not asserted: BENCHMARKS.md records the harness's numbers.
"""
from __future__ import annotations

import math
import time

import pytest
import torch

import attndsl
from benchmarks import cases as C
from attndsl.spec import VisitBox

pytestmark = pytest.mark.gpu

H, D = 4, 128


def _case(name):
    c = C.get_case(name)
    inst = c.build(L=c.fixed_L, H=H, device="cuda")
    ours = inst.ours_mask_mod if not (isinstance(inst.ours_mask_mod, str) and inst.ours_mask_mod == "same") else inst.mask_mod
    return c.fixed_L, inst, ours


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def _bench(fn, reps=10):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def _dense_mask(mask_mod, L, rows=1024):
    zero = torch.zeros((), dtype=torch.int64, device="cuda")
    kv = torch.arange(L, device="cuda").view(1, -1)
    out = torch.empty(L, L, dtype=torch.bool, device="cuda")
    for r0 in range(0, L, rows):
        q = torch.arange(r0, min(r0 + rows, L), device="cuda").view(-1, 1)
        out[r0:r0 + rows] = torch.broadcast_to(mask_mod(zero, zero, q, kv), (q.shape[0], L))
    return out


@pytest.mark.parametrize("name", C.LOCALITY_CASES)
def test_locality_case_matches_flex(name):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L, inst, ours_mask = _case(name)
    attn = attndsl.compile(mask_mod=ours_mask, **inst.compile_kwargs)
    assert isinstance(attn.spec.fwd_range, VisitBox) and isinstance(attn.spec.bwd_range, VisitBox)
    g = torch.Generator(device="cuda").manual_seed(0)
    q32, k32, v32, do32 = (torch.randn(1, H, L, D, device="cuda", generator=g) for _ in range(4))
    bm = create_block_mask(inst.mask_mod, None, None, L, L, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def run(fn, dtype):
        q, k, v = (x.detach().to(dtype).requires_grad_(True) for x in (q32, k32, v32))
        o = fn(q, k, v)
        o.backward(do32.to(dtype))
        return o.detach(), q.grad, k.grad, v.grad

    # the float32 reference: SDPA with the dense boolean mask (Flex in float32 at D=128 can run out
    # of shared memory)
    dense = _dense_mask(inst.mask_mod, L)
    ref = run(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense), torch.float32)
    del dense
    try:
        fb = run(lambda q, k, v: flex(q, k, v, block_mask=bm), torch.bfloat16)
    except Exception as e:  # Flex's backward for the radial table mask needs more shared memory than an H100 has
        print(f"\n{name}: FlexAttention failed ({type(e).__name__}: {str(e).splitlines()[-1][:160]}); ours vs the reference only")
        fb = (None,) * 4
    ob = run(attn, torch.bfloat16)
    for what, o, f, r in zip(("out", "dq", "dk", "dv"), ob, fb, ref):
        e_ours = _rel(o, r)
        bound = 2 * _rel(f, r) + 2e-3 if f is not None else 2e-2
        assert math.isfinite(e_ours) and e_ours <= bound, f"{name} {what}: ours {e_ours:.3g}, bound {bound:.3g}"
    q, k, v = (x.to(torch.bfloat16) for x in (q32, k32, v32))
    t_ours = _bench(lambda: attn(q, k, v))
    t_flex = _bench(lambda: flex(q, k, v, block_mask=bm))
    print(f"\n{name}: forward ours {t_ours:.3f} ms, flex {t_flex:.3f} ms (B=1, H={H}, D={D}, bf16)")


@pytest.mark.parametrize("name", C.LOCALITY_CASES)
def test_locality_case_visits_touched_tiles(name):
    L, inst, ours_mask = _case(name)
    attn = attndsl.compile(mask_mod=ours_mask, **inst.compile_kwargs)
    bm, bn = attn.spec.tiles
    q = torch.randn(1, 1, L, 64, device="cuda", dtype=torch.bfloat16)
    visits = attn.visit_counts(q, q, q)[0].cpu()
    kv = torch.arange(L, device="cuda").view(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device="cuda")
    want = []
    for t in range(L // bm):
        rows = torch.arange(t * bm, (t + 1) * bm, device="cuda").view(-1, 1)
        m = torch.broadcast_to(ours_mask(zero, zero, rows, kv), (bm, L))
        want.append(int(m.view(bm, L // bn, bn).any(2).any(0).sum()))
    assert visits.tolist() == want
