"""Gradient post-processing on the host, shared by the dense and gather runners: the sinks'
gradient, low-rank factors' reductions over broadcast dimensions, and the bitwise-repeatable sums
of deterministic partials of learnable tables."""
from __future__ import annotations

import math

import torch

from .. import ir


def sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """∂L/∂sinks from the rows' logsumexp ``lse`` [B, H, L] and ``delta`` = rowsum(dO·O) − dlse
    (dense and gather kernels alike): d out_i / d sink = −p_sink_i · out_i and
    d lse_i / d sink = p_sink_i."""
    p_sink = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)  # lse is float64 for float64 calls
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


def row_delta(out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None) -> torch.Tensor:
    """``delta`` = rowsum(dO·O) − dlse [B, H, L] in float32, on the host (the dense backward's delta
    kernel computes the same on the device)."""
    delta = (out.float() * dout.float()).sum(-1)
    return delta - dlse.float() if dlse is not None else delta


def reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient over the dimensions an input broadcast (size 1 there)."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dim=dims, keepdim=True) if dims else g


def wide_offsets(t: torch.Tensor) -> bool:
    """Do offsets into learnable tensor ``t`` (passed contiguous) need 64 bits? Otherwise the dQ
    kernel keys a scattered gradient's entries in 32 bits (``codegen.grads._scatter_code``)."""
    return t.numel() > 2**31


def gl_exact(gl, B: int, Hq: int) -> bool:
    """A full-size learnable tensor whose every element is written by one program (no atomics)."""
    fv = {a.attr for a in gl.load.args if a.op == "var"}
    return gl.scope == "exact" and ("b" in fv or B == 1) and ("h" in fv or Hq == 1)


#: deterministic gradients of shared tables keep one row of partial sums per dQ program; more
#: float32 partials than this is refused before launch (attndsl/api.py) rather than risk the memory
MAX_PRIVATE_PARTIALS = 1 << 28


def private_rows(gl, shape, B: int, Hq: int, Lq: int) -> tuple[int, int]:
    """(rows, row length) of the deterministic partials of a scatter/col gradient: one row per dQ
    program (sized for any tile of 16 rows or more), covering the table's dimensions from the first
    one indexed by q or kv (the kernel's ``_private_row``)."""
    d0 = next(d for d, a in enumerate(gl.load.args) if ir.free_vars(a) & {"q", "kv"})
    return B * Hq * -(-Lq // 16), math.prod(shape[d0:])


def ordered_rows_add(dbuf: torch.Tensor, rows: torch.Tensor, offs: torch.Tensor) -> None:
    """Add per-program partials into ``dbuf`` in a fixed order (bitwise repeatable): row ``i`` of
    ``rows [n, S]`` goes to elements ``offs[i] .. offs[i] + S - 1`` (``offs < 0``: unused). Sort by
    offset (stable, so program order within a run), sum each run in float64 through a cumulative
    sum, write each element once."""
    keep = offs >= 0
    o, r = offs[keep], rows[keep].to(torch.float64)
    if o.numel() == 0:
        return
    o, order = torch.sort(o, stable=True)
    r = r[order]
    uniq, counts = torch.unique_consecutive(o, return_counts=True)
    ends = counts.cumsum(0) - 1
    cs = r.cumsum(0)
    seg = cs[ends] - torch.cat([cs.new_zeros(1, r.shape[1]), cs[ends[:-1]]])
    flat = dbuf.as_strided((dbuf.untyped_storage().nbytes() // dbuf.element_size(),), (1,), 0)
    idx = (uniq[:, None] + torch.arange(r.shape[1], device=uniq.device)[None, :]).reshape(-1)
    flat[idx] += seg.reshape(-1).to(flat.dtype)
