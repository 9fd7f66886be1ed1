"""A whole transformer block under ``torch.compile``, with each attention inside (issue 30 part 5).

``run_block_case`` is the harness's runner for cases with ``runner="block"``: it builds one
pre-LayerNorm block, compiles a copy per attention (ours one-shot, ours compiled, FlexAttention,
SDPA) with ``fullgraph=True`` where that works, checks each against the SDPA block, and times the
forward and forward+backward of the whole block, GPU and host time.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from . import cases as _cases
from .measures import _err, _r, _randn, host_calls, mask_density, ratio, rel_error



class TransformerBlock(torch.nn.Module):
    """A pre-LayerNorm GPT-2-style block: x + proj(attention(LN(x))), then x + MLP(LN(x)) with a
    4x GELU MLP. ``attention(q, k, v)`` takes and returns ``[B, H, L, D]`` (q, k, v are views of one
    projection, as model code makes them)."""

    def __init__(self, d_model: int, n_heads: int, attention: Callable):
        super().__init__()
        self.n_heads, self.attention = n_heads, attention
        self.ln1, self.ln2 = torch.nn.LayerNorm(d_model), torch.nn.LayerNorm(d_model)
        self.qkv = torch.nn.Linear(d_model, 3 * d_model)
        self.proj = torch.nn.Linear(d_model, d_model)
        self.fc1, self.fc2 = torch.nn.Linear(d_model, 4 * d_model), torch.nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = self.attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, d))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


def compile_block(block: torch.nn.Module, run: Callable, compile_: bool = True):
    """``torch.compile(block, fullgraph=True)``, or ``fullgraph=False`` where that fails (a graph break
    in the attention); ``run(compiled)`` is the first call that compiles. Returns (compiled, fullgraph
    True/False/None when not compiled, the fullgraph error or None)."""
    if not compile_:
        run(block)
        return block, None, None
    try:
        c = torch.compile(block, fullgraph=True)
        run(c)
        return c, True, None
    except Exception as e:
        err = _err(e)
    c = torch.compile(block, fullgraph=False)
    run(c)
    return c, False, err


def run_block_case(r, name, L, D, cfg, ctx):
    """Time a compiled transformer block with each attention inside: ours one-shot
    (``attndsl.attention`` in the forward), ours compiled (an ``attndsl.compile`` object built once),
    FlexAttention (``flex_attention`` with its block mask built once) and SDPA. Checked first: each
    block's attention branch and input gradient against the SDPA block on the same weights."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import flex_attention
    be, dev, dt = ctx.backend, ctx.device, ctx.dtype
    B, H = r["B"], r["H"]
    case = _cases.get_case(name)
    r["description"] = case.description
    r["phase"] = "build"
    inst = case.build(L=L, H=H, B=B, device=dev, seed=cfg.seed, dtype=dt)
    mask = inst.mask_mod
    causal = inst.sdpa == "causal"
    r["density"] = _r(mask_density(mask, L, L, dev), 6)
    d_model = H * D
    r["d_model"] = d_model
    ours = ctx.ours()
    gen = torch.Generator(device=dev)
    gen.manual_seed(_cases.case_seed(name, cfg.seed))
    torch.manual_seed(_cases.case_seed(name, cfg.seed))
    base = TransformerBlock(d_model, H, None).to(dev, dt)
    r["phase"] = "flex.create_block_mask"
    bm = ctx.create_block_mask(mask, None, None, L, L, device=dev) if mask is not None else None
    compiled_attn = ours.compile(mask_mod=mask)
    variants = [
        ("att", lambda q, k, v: ours.attention(q, k, v, mask_mod=mask)),
        ("ours", lambda q, k, v: compiled_attn(q, k, v)),
        ("flex", lambda q, k, v: flex_attention(q, k, v, block_mask=bm)),
        ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
    ]
    # forward rows time the training forward (autograd recording) when the run has --bwd, else inference
    x = _randn((B, L, d_model), dt, dev, gen).requires_grad_(cfg.bwd)
    dy = _randn((B, L, d_model), dt, dev, gen)
    fns, outs = {}, {}
    for who, attention in variants:
        blk = TransformerBlock(d_model, H, attention).to(dev, dt)
        blk.load_state_dict(base.state_dict())
        blk.requires_grad_(cfg.bwd)
        r["phase"] = f"{who}.compile"

        def first(c):
            x.grad = None
            y = c(x)
            if cfg.bwd:
                y.backward(dy)
            be.sync()
            outs[who] = ((y - x).detach(), (x.grad - dy).detach() if cfg.bwd else None)
        t0 = time.time()
        try:
            c, fullgraph, err = compile_block(blk, first, compile_=be.name == "cuda")
        except Exception as e:  # this attention does not run in the block: the others still do
            r[f"{who}_error"] = _err(e)
            continue
        r[f"{who}_compile_s"] = _r(time.time() - t0, 2)
        r[f"{who}_fullgraph"] = fullgraph
        if err:
            r[f"{who}_fullgraph_error"] = err
        fns[who] = (c, [x, *blk.parameters()])
    if "sdpa" not in outs:
        raise RuntimeError(f"the SDPA block did not run: {r.get('sdpa_error')}")
    r["phase"] = "check"
    ref_y, ref_g = outs["sdpa"]
    problems = []
    for who in list(fns):
        ey = rel_error(outs[who][0], ref_y)
        eg = rel_error(outs[who][1], ref_g) if cfg.bwd else 0.0
        r[f"{who}_check_rel_err"] = _r(max(ey, eg), 8)
        if not (ey < cfg.tol and eg < cfg.grad_tol):
            r[f"{who}_error"] = f"block vs the SDPA block: attention branch {ey:.3g}, input grad {eg:.3g}"
            if who in ("ours", "att"):
                problems.append(f"{who}: {r[f'{who}_error']}")
            del fns[who]
    if "ours" not in fns:
        problems.append("ours (compiled pattern) did not run in the block: " + str(r.get("ours_error")))
    if "att" not in fns:
        r["att_status"], r["att_error"] = "failed" if "att" in outs else "error", r.get("att_error")
    if problems and "ours" not in fns:
        r["status"], r["check_detail"] = "failed", "; ".join(problems)
        r.pop("phase", None)
        return
    for who, (c, leaves) in fns.items():
        fwd = lambda c=c: c(x)  # noqa: E731
        fb = lambda c=c: c(x).backward(dy)  # noqa: E731
        r["phase"] = f"time.{who}"
        r[f"{who}_ms"] = _r(be.bench(fwd))
        r[f"{who}_host_us"] = _r(be.host_us(fwd, host_calls(r[f"{who}_ms"])), 1)
        r[f"{who}_peak_mib"], r[f"{who}_peak_extra_mib"] = map(lambda v: _r(v, 1), be.peak_mib(fwd))
        if cfg.bwd:
            r["phase"] = f"bwd.time.{who}"
            r[f"{who}_fwd_bwd_ms"] = _r(be.bench(fb, grad_to_none=leaves))
            r[f"{who}_fwd_bwd_host_us"] = _r(be.host_us(fb, host_calls(r[f"{who}_fwd_bwd_ms"]),
                                                        grad_to_none=leaves), 1)
            r[f"{who}_fwd_bwd_peak_mib"], r[f"{who}_fwd_bwd_peak_extra_mib"] = map(lambda v: _r(v, 1),
                                                                                 be.peak_mib(fb))
            for t in leaves:
                t.grad = None
    if "att" in fns:
        r["att_status"] = "ok"
        if cfg.bwd:
            r["att_bwd_status"] = "ok"
    if problems:
        r["check_detail"] = "; ".join(problems)
    r["flex_over_ours"] = _r(ratio(r.get("flex_ms"), r.get("ours_ms")), 3)
    r["sdpa_over_ours"] = _r(ratio(r.get("sdpa_ms"), r.get("ours_ms")), 3)
    r["status"] = "ok"
    if cfg.bwd:
        r["bwd_status"] = "ok"
        r["flex_over_ours_fwd_bwd"] = _r(ratio(r.get("flex_fwd_bwd_ms"), r.get("ours_fwd_bwd_ms")), 3)
        r["sdpa_over_ours_fwd_bwd"] = _r(ratio(r.get("sdpa_fwd_bwd_ms"), r.get("ours_fwd_bwd_ms")), 3)
    r.pop("phase", None)
