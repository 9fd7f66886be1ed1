"""Kernel launches: argument marshalling, grids, block tables and shared-memory fallbacks."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import contextlib

import torch
import triton

from . import cache
from .interpreter import interpreting
from .config import Configs, TileConfig, block_d

POISON = os.environ.get("ATTNDSL_POISON", "0") == "1"


def use_interpreter(t: torch.Tensor) -> bool:
    """CPU tensors run through Triton's interpreter, so everything works without a GPU."""
    return t.device.type == "cpu" or os.environ.get("ATTNDSL_FORCE_INTERPRET") == "1"


def _new(shape, like, dtype=None):
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    if POISON:
        t.fill_(float("nan") if t.dtype.is_floating_point else -7)
    return t


def buffer_args(tensors) -> list:
    args = []
    for t in tensors:
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        args.append(t)
        args += list(t.shape)
        args += list(t.stride())
    return args


def _strides(t):
    return list(t.stride())


@dataclass
class Table:
    """One block table: per row tile, the full and partial column tiles."""

    full: torch.Tensor
    part: torch.Tensor
    count: torch.Tensor
    uses_b: bool
    uses_h: bool

    def args(self) -> list:
        TB, TH, R, C = self.full.shape
        sb = TH * R * C if self.uses_b else 0
        sh = R * C if self.uses_h else 0
        return [self.full, self.part, self.count, sb, sh, C]


class BlockTables:
    """Device-side tile classification for data-dependent masks, reusable across calls."""

    def __init__(self, shape):
        self.shape = shape  # (B, Hq, Lq, Lkv)
        self.tables: dict = {}

    def __repr__(self):
        return f"BlockTables(shape={self.shape}, built={sorted(self.tables)})"


class Runner:
    """Launches the kernels of one spec for one backend and head dim."""

    def __init__(self, spec, module, configs: Configs, interpret: bool, head_dim: int):
        self.spec = spec
        self.mod = module
        self.cfg = configs
        self.interpret = interpret
        self.head_dim = head_dim
        self.bd = block_d(head_dim)

    # -- helpers ------------------------------------------------------------------------------
    def mode(self):
        return interpreting() if self.interpret else contextlib.nullcontext()

    def _consts(self, dtype):
        upcast = self.interpret and dtype == torch.bfloat16
        prec = "ieee" if dtype == torch.float32 else "tf32"
        return dict(HEAD_D=self.head_dim, BLOCK_D=self.bd, UPCAST=upcast, DOT_PRECISION=prec)

    def _launch(self, kernel, grid, args, cfg: TileConfig, which: str, **consts):
        """Launch; on a shared-memory overflow retry with smaller tiles (and remember them)."""
        while True:
            try:
                with self.mode():
                        kernel[grid(cfg)](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **consts,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                return cfg
            except triton.runtime.errors.OutOfResources:
                smaller = cfg.smaller()
                if smaller is None:
                    raise
                cfg = smaller
                self.cfg = Configs(**{**self.cfg.__dict__, which: cfg})

    # -- block tables --------------------------------------------------------------------------
    def table(self, tables: BlockTables | None, buffers, transposed: bool, br: int, bc: int) -> Table:
        key = (transposed, br, bc)
        if tables is not None and key in tables.tables:
            return tables.tables[key]
        B, Hq, Lq, Lkv = tables.shape
        spec = self.spec
        TB = B if spec.mask_uses_b else 1
        TH = Hq if spec.mask_uses_h else 1
        rows, cols = (Lkv, Lq) if transposed else (Lq, Lkv)
        R, C = triton.cdiv(rows, br), triton.cdiv(cols, bc)
        dev = buffers[0].device if buffers else tables.device
        full = torch.empty((TB, TH, R, C), dtype=torch.int32, device=dev)
        part = torch.empty((TB, TH, R, C), dtype=torch.int32, device=dev)
        count = torch.empty((TB, TH, R, 2), dtype=torch.int32, device=dev)
        kernel = getattr(self.mod, f"{spec.name}_table{'_t' if transposed else ''}")
        with self.mode():
            kernel[(R, TB * TH)](full, part, count, TH * R * C, R * C, C, TH, Lq, Lkv, *buffer_args(buffers),
                                 BLOCK_R=br, BLOCK_C=bc, num_warps=4)
        t = Table(full, part, count, spec.mask_uses_b, spec.mask_uses_h)
        if tables is not None:
            tables.tables[key] = t
        return t

    def new_tables(self, q, k, buffers) -> BlockTables:
        t = BlockTables((q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        t.device = q.device
        return t

    # -- forward -------------------------------------------------------------------------------
    def forward(self, q, k, v, scale, buffers, tables, count_visits=False):
        B, Hq, Lq, D = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        out = _new(q.shape, q)
        lse = _new((B, Hq, Lq), q, torch.float32)
        cfg = self.cfg.fwd
        visits = torch.zeros((B * Hq, triton.cdiv(Lq, cfg.block_m)), dtype=torch.int32, device=q.device) \
            if count_visits else lse
        targs = []
        if self.spec.data_dependent:
            targs = self.table(tables, buffers, False, cfg.block_m, cfg.block_n).args()
        args = [q, k, v, out, lse, visits, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
                Hq, Hq // Hkv, Lq, Lkv, scale, *buffer_args(buffers), *targs]
        kernel = getattr(self.mod, f"{self.spec.name}_fwd")
        self._launch(kernel, lambda c: (triton.cdiv(Lq, c.block_m), B * Hq), args, cfg, "fwd",
                     COUNT_VISITS=count_visits, **self._consts(q.dtype))
        return out, lse, (visits if count_visits else None)

    # -- backward ------------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, dout, dlse, scale, buffers, tables):
        B, Hq, Lq, D = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        consts = self._consts(q.dtype)
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        delta = torch.empty((B, Hq, Lq), dtype=torch.float32, device=q.device)
        bm = 64 if not self.interpret else self.cfg.dq.block_m
        with self.mode():
            getattr(self.mod, f"{self.spec.name}_bwd_delta")[(triton.cdiv(Lq, bm), B * Hq)](
                out, dout, delta, *_strides(out), *_strides(dout), Hq, Lq,
                HEAD_D=D, BLOCK_M=bm, BLOCK_D=self.bd)
        if dlse is not None:
            # d lse_i / d s_ij = p_ij, so an lse gradient shifts the softmax correction term
            delta = delta - dlse.to(torch.float32)
        dq = _new(q.shape, q)
        dk = _new(k.shape, k)
        dv = _new(v.shape, v)
        bargs = buffer_args(buffers)
        c = self.cfg.dkdv
        targs = self.table(tables, buffers, True, c.block_n, c.block_m).args() if self.spec.data_dependent else []
        self._launch(getattr(self.mod, f"{self.spec.name}_bwd_dkdv"),
                     lambda c: (triton.cdiv(Lkv, c.block_n), B * Hkv),
                     [q, k, v, dout, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                      *_strides(dk), *_strides(dv), Hq, Hkv, Hq // Hkv, Lq, Lkv, scale, *bargs, *targs],
                     c, "dkdv", **consts)
        c = self.cfg.dq
        targs = self.table(tables, buffers, False, c.block_m, c.block_n).args() if self.spec.data_dependent else []
        self._launch(getattr(self.mod, f"{self.spec.name}_bwd_dq"),
                     lambda c: (triton.cdiv(Lq, c.block_m), B * Hq),
                     [q, k, v, dout, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(dout),
                      *_strides(dq), Hq, Hq // Hkv, Lq, Lkv, scale, *bargs, *targs],
                     c, "dq", **consts)
        return dq, dk, dv
