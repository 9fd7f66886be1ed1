"""The Hopper (sm_90) backward: when it runs, its launch, and an offline compile check.

The Gluon backward of ``codegen/hopper_bwd.py`` (dK/dV resident per key tile, dQ added in float32)
replaces the portable dK/dV and dQ kernels of ``Runner.backward`` only where all of these hold:

* the pattern is one it renders (:func:`attndsl.codegen.hopper_bwd.supports_backward`, decided once
  per spec and kept in :attr:`HopperBackward.unsupported`): softmax, a closed-form visit range or
  a data-dependent mask's block table, no constant-run loops, no learnable captured tensors (masks
  and score mods with captured tensors
  that get no gradient are fine; sink logits too: their gradient comes from lse and delta on the
  host, ``runtime/gradients.py``);
* it is enabled: ``ATTNDSL_HOPPER_BWD=1`` in the environment (read once) or
  ``enable_backward(True)``, independently of the Hopper forward's switch; with neither set, where
  the call's tuned entry says it beat the portable backward (``attndsl.autotune``, which also
  picks its :class:`HopperBwdConfig`), else where ``MEASURED_BWD_WINS`` lists the call's shape
  class (measured on an H100; dense and causal-like masks without score mods, bf16, from a least
  size on, and closed-form masks whose programs visit enough query rows, ``OTHER_MIN_QUERIES``);
* the call: CUDA tensors on a compute capability 9.0 device with Triton 3.6's Gluon, float16 or
  bfloat16, head dim 64 or 128 for q, k and v alike, q/k/v/dO whose strides a TMA descriptor takes,
  no low-rank bias, no block selection (a data-dependent mask's own block tables are fine: the
  runtime builds the one for this kernel's tiles, ``Runner.table``).

dQ comes one of two ways (:attr:`HopperBwdConfig.dq`): ``"atomic"``, the Gluon kernel adds it into a
float32 buffer by TMA reduce-adds (scaled and cast afterwards), or ``"kernel"``, the Gluon kernel
computes dK/dV only and the portable dQ kernel (one program per query tile, no atomics) adds the
three matrix products of dQ. Deterministic runs (``deterministic=True``) always take ``"kernel"``.
On an H100 the split wins for dense attention (the Gluon dK/dV kernel at 600 TFLOP/s), the atomic
kernel for long causal calls (``MEASURED_BWD_WINS``). Launches are prepared as the forward's
(``gluonlaunch``): later calls of a launch key skip Gluon's ``kernel.run``.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ..codegen import hopper_bwd as _gen
from ..passes import visit_width
from . import gluonlaunch
from .blocktables import BlockTables
from .hopper import (SMEM_LIMIT, _descriptor, call_fits, compile_gluon_sm90, hopper_spec, load_kernel, spec_class,
                     visited)
from .memo import tensor_key
from .switches import Switch

__all__ = ["HopperBackward", "HopperBwdConfig", "bwd_config_for", "sweep_configs", "backward_enabled", "enable_backward",
           "compile_sm90_bwd", "smoke_test", "MEASURED_BWD_WINS"]

#: the backward's switch (None: the calls MEASURED_BWD_WINS names)
SWITCH = Switch("ATTNDSL_HOPPER_BWD")


def enable_backward(on: bool | None) -> None:
    """Turn the Hopper backward on or off for this process; None: follow ``ATTNDSL_HOPPER_BWD`` as
    the environment says now (read here and kept)."""
    SWITCH.set(on)


def backward_enabled() -> bool | None:
    """True (every call that can take it), False (none), or None: the calls ``MEASURED_BWD_WINS``
    names. ``enable_backward()`` wins over ``ATTNDSL_HOPPER_BWD`` ("1" on, "0" off, unset: the
    table), which is read once, on first use, and again by ``enable_backward(None)``. Independent
    of the forward's switch: either Hopper kernel runs with the other's portable counterpart."""
    return SWITCH.get()


@dataclasses.dataclass(frozen=True)
class HopperBwdConfig:
    """Tiles of the Hopper backward: ``block_n`` keys per consumer warp group (dK and dV of them in
    its registers), ``consumers`` groups per program, ``block_m`` queries per Q/dO tile, ``stages``
    buffers in the Q/dO ring."""

    block_m: int = 64
    block_n: int = 64
    stages: int = 2
    consumers: int = 2
    #: "atomic": dQ added by the kernel's TMA reduce-adds; "kernel": dK/dV only, dQ by the
    #: portable dQ kernel (the deterministic runs' way, taken by every run with it)
    dq: str = "atomic"
    #: atomic dQ in FlashAttention-3's order (``DQ_EARLY``): dQ's products issued before dK's, so
    #: dK's runs while dQ goes out; taken where every group computes dQ every tile
    #: (:meth:`early_dq`). On by default: on an H100 (bf16, H=16, D=128) causal L=16384 5.683 →
    #: 5.491 ms, L=4096 0.506 → 0.501; dense within 1% either way (13.19 → 13.17 ms, 0.900 → 0.910)
    dq_early: bool = True

    def __post_init__(self):
        if self.consumers not in (1, 2):
            raise ValueError(f"consumers must be 1 or 2, got {self.consumers}")
        if self.dq not in ("atomic", "kernel"):
            raise ValueError(f"dq must be 'atomic' or 'kernel', got {self.dq!r}")
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.block_m != 64 or self.block_n != 64:
            # one wgmma row block per warp group, and dQ's tile shares dK/dV's layout
            raise ValueError(f"block_m and block_n must be 64, got {self.block_m}, {self.block_n}")

    def early_dq(self, head_dim: int, atomic: bool) -> bool:
        """Whether a launch with atomic dQ takes ``dq_early``'s order: only where each group computes
        its columns of dQ every tile (two groups at D=128, one group), not where they take turns."""
        return self.dq_early and atomic and self.consumers * self.dq_cols(head_dim) == head_dim

    def dq_cols(self, head_dim: int) -> int:
        """Columns of a dQ tile each consumer group computes (``DQ_COLS``): the groups split the head
        dim where each share is a whole 128-byte swizzle row of bf16 (64 columns or more); else each
        group computes all of it, the groups taking turns by query tile."""
        share = head_dim // self.consumers
        return share if share >= 64 else head_dim

    def shared_bytes(self, head_dim: int, dq_atomic: bool | None = None) -> int:
        """Shared memory of one program (bf16/fp16 inputs): the K/V tiles (consumers·2·block_n·D),
        the Q/dO ring (stages·2·block_m·D), two bytes each, with each buffer's forward statistics
        (lse and delta, block_m·8 bytes), and with ``dq_atomic`` the program's dSᵀ
        (consumers·block_n·block_m, two bytes) and each group's float32 share of a dQ tile
        (block_m·dq_cols·4), plus the barriers. At most 300 bytes above the compiled kernels' figure
        (Triton 3.6), never under. ``dq_atomic`` None: as :attr:`dq` says."""
        if dq_atomic is None:
            dq_atomic = self.dq == "atomic"
        ring = self.stages * (2 * self.block_m * head_dim * 2 + self.block_m * 8)
        kv = self.consumers * 2 * self.block_n * head_dim * 2
        dq = (self.consumers * (self.block_m * self.dq_cols(head_dim) * 4 + self.block_n * self.block_m * 2)
              if dq_atomic else 0)
        return ring + kv + dq + 768


def sweep_configs(head_dim: int) -> list:
    """The backward's configurations ``attndsl.autotune`` times: one or two consumer groups, rings
    of 1 to 4 buffers, dQ by TMA reduce-adds (in both orders, :attr:`HopperBwdConfig.dq_early`) or
    by the portable kernel, those that fit sm_90's shared memory."""
    cfgs = [HopperBwdConfig(stages=st, consumers=c, dq=dq) for dq in ("atomic", "kernel") for c in (2, 1)
            for st in (2, 3, 4, 1)]
    # the default order of atomic dQ as well, where FlashAttention-3's applies (dense 1% apart)
    cfgs += [dataclasses.replace(c, dq_early=False) for c in cfgs if c.dq == "atomic" and c.early_dq(head_dim, True)]
    return [c for c in cfgs if c.shared_bytes(head_dim) <= SMEM_LIMIT]


@functools.lru_cache(maxsize=None)  # one object per head dim and mode, as the forward's config_for
def bwd_config_for(head_dim: int, dq: str = "atomic") -> HopperBwdConfig:
    """The tiles for a head dim (:meth:`HopperBwdConfig.shared_bytes`): D=128 with 2 stages takes
    178 KiB of the 227 with atomic dQ (3 stages, 210 KiB, measured within 1.5% of it on an H100),
    D=64 with 4 stages 147 KiB."""
    if head_dim == 128:
        return HopperBwdConfig(stages=2, dq=dq)
    if head_dim == 64:
        return HopperBwdConfig(stages=4, dq=dq)
    raise ValueError(f"the Hopper backward supports head dims 64 and 128, got {head_dim}")


#: Where the Hopper backward was measured faster than the portable one on an H100 (same run,
#: bf16, 2026-12-07; BENCHMARKS.md, ``benchmarks/results/hopper/h100-2026-12-07-bwd-select.json``):
#: ``(plan, has_score_mod, head_dim, dtype, grouped)`` -> ``(least, config)``: the call is taken
#: from ``B * Hq * Lq * Lkv >= least`` on, with ``config`` (its ``dq`` mode above all), where
#: ``plan`` is the forward's class (``hopper.plan_class``: "dense", "growing" or "other") and
#: ``grouped`` says Hq > Hkv (GQA: dK/dV summed over the group's query heads in one program, where
#: atomic dQ measured slower). Backward times in ms (delta included), portable / atomic dQ / dQ by
#: the portable kernel:
#:
#: * dense, D=128, H=16: L=2048 0.246 / 0.767 / 0.552 (not taken: the Gluon launch's host time),
#:   L=4096 0.900 / 0.943 / 0.846, L=8192 3.423 / 3.471 / 3.239, L=16384 13.34 / 14.21 / 12.48;
#: * causal, D=128, H=16: L=4096 0.484 / 0.547 / 0.509 (not taken), L=8192 1.722 / 1.677 / 1.753,
#:   L=16384 6.856 / 6.285 / 6.489; prefix-LM (L/4) L=8192 1.876 / 1.716 / 1.728;
#: * causal, GQA 32:8 (Llama-3-8B), L=8192: 3.691 / 3.720 / 3.535;
#: * other masks, H=16, L=16384: sliding window 1024 1.136 / 1.170 / 1.039, 16 documents 0.826 /
#:   0.980 / 0.813; 64 documents in 32K, GQA 32:8: 1.990 / 2.521 / 1.913; but the model table's 64
#:   documents in 32K (H=16, its tuned portable tiles, tables built once) took 2.68 ms forward+
#:   backward with the split against 2.14 portable: a program of 128 keys visits 8 query tiles
#:   there, too few to pay for the Gluon program's fixed costs (warp specialisation, K/V loads,
#:   barriers). How many tiles a program visits varies within the class (a window's width, the
#:   documents' lengths), so an "other" mask is taken only where its closed-form range visits at
#:   least ``OTHER_MIN_QUERIES`` query rows per program of 128 keys on average
#:   (``passes.visit_width.mean_visited``: the window of 1024, 1115 rows), never a data-dependent
#:   one (its table is on the device);
#: * D=64, B=8, H=12, L=2048: dense 0.871 / 0.737 / 0.785; causal 0.436 / 0.512 / 0.490 (not
#:   taken); ViT-B/16 (B=32, L=197) 0.107 / 0.405 / 0.372 (not taken).
#:
#: Atomic dQ in FlashAttention-3's order (``dq_early``, the default since; same kind of run,
#: ``h100-2026-12-07-bwd-select-early.json`` and ``-score-select.json``): Llama-3-8B 3.597 / 3.452 /
#: 3.499, so GQA takes atomic dQ too; causal L=8192 1.726 / 1.616 / 1.741; window 1024 1.141 /
#: 1.040 / 1.043; score mods under a causal mask (H=16): ALiBi L=4096 0.501 / 0.596 / 0.613, L=16384
#: 6.781 / 6.365 / 7.641; softcap 30 L=4096 0.681 / 0.766 / 0.781, L=16384 9.425 / 8.481 / 9.842, so
#: the growing class with a score mod takes atomic dQ from 16·16384² (8192 unmeasured).
#:
#: Unmeasured classes (fp16, GQA dense, score mods without a growing mask) stay portable.
MEASURED_BWD_WINS: dict = {
    ("other", False, 128, torch.bfloat16, False): (16 * 16384 * 16384, bwd_config_for(128, "kernel")),
    ("dense", False, 128, torch.bfloat16, False): (16 * 4096 * 4096, bwd_config_for(128, "kernel")),
    ("growing", False, 128, torch.bfloat16, False): (16 * 8192 * 8192, bwd_config_for(128)),
    ("growing", False, 128, torch.bfloat16, True): (32 * 8192 * 8192, bwd_config_for(128)),
    ("growing", True, 128, torch.bfloat16, False): (16 * 16384 * 16384, bwd_config_for(128)),
    ("dense", False, 64, torch.bfloat16, False): (8 * 12 * 2048 * 2048, bwd_config_for(64)),
}


#: the least query rows an "other" mask's program of 128 keys visits on average where it takes the
#: Hopper backward (``MEASURED_BWD_WINS``)
OTHER_MIN_QUERIES = 1024


def _measured_win(hb: "HopperBackward", q, k) -> HopperBwdConfig | None:
    """The configuration ``MEASURED_BWD_WINS`` gives this call, or None where it lists none."""
    plan = hb.plan
    key = (plan, hb.spec.score is not None, q.shape[-1], q.dtype, q.shape[1] != k.shape[1])
    least, cfg = MEASURED_BWD_WINS.get(key, (None, None))
    if least is None or q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] < least:
        return None
    if plan == "other":
        rows = visited(hb, hb.spec.bwd_range, k.shape[2], q.shape[2], cfg.block_n * cfg.consumers)
        if rows is None or rows < OTHER_MIN_QUERIES:
            return None
    return cfg


class HopperBackward:
    """The Hopper backward of one spec. ``unsupported``: why this pattern's backward runs on the
    portable kernels only (None when the Hopper target renders it)."""

    def __init__(self, spec):
        self.spec = dataclasses.replace(hopper_spec(spec), name=f"{spec.name}_sm90bwd")
        self.unsupported = _gen.supports_backward(spec)
        #: the shape class for ``MEASURED_BWD_WINS`` (``hopper.spec_class``: a data-dependent mask is
        #: "other"; as "growing", 16 documents in 16K measured 0.980 ms atomic against 0.826 portable)
        self.plan = spec_class(spec, self.unsupported is None and visit_width.heavy_first(spec))
        #: ``(HopperBwdConfig, whether it beat the portable backward)`` of a tuned entry
        #: (``attndsl.runtime.tuned``) for this runner's calls; None: :func:`bwd_config_for` and
        #: ``MEASURED_BWD_WINS``
        self.tuned = None
        self._kernel = None
        #: the prepared launch of each launch key (``gluonlaunch.Prepared``; None: the ordinary one)
        self._prepared: dict = {}
        self._placeholders: dict = {}
        self._visited: dict = {}

    def applies(self, q, k, v, dout, extras=None, tables=None, precise: bool = False) -> bool:
        """Whether this call runs the Hopper backward (see the module docstring)."""
        on = backward_enabled()
        if self.unsupported is not None or on is False or precise:
            return False
        # a data-dependent mask's own tables (built for any tiles); not a block selection's
        if tables is not None:
            if not self.spec.data_dependent or type(tables) is not BlockTables:
                return False
        if on is None and not (_measured_win(self, q, k) is not None if self.tuned is None else self.tuned[1]):
            return False
        if k.shape[0] * k.shape[1] > 65535:  # the grid's second dimension: (batch, kv head)
            return False
        return call_fits(extras, q, k, v, dout)

    def kernel(self):
        if self._kernel is None:
            self._kernel = load_kernel(self.spec, _gen.render, _gen.kernel_name)
        return self._kernel

    def config(self, q, k) -> HopperBwdConfig:
        """The configuration of this call: the tuned entry's, else ``MEASURED_BWD_WINS``'s for its
        class, else :func:`bwd_config_for`."""
        return (self.tuned and self.tuned[0]) or _measured_win(self, q, k) or bwd_config_for(q.shape[-1])

    def backward(self, q, k, v, dout, lse, delta, dk, dv, scale: float, buffers=(), deterministic: bool = False,
                 cfg: HopperBwdConfig | None = None, table=None, key: tuple | None = None):
        """Fill ``dk``, ``dv`` (``[B, Hkv, Lkv, D]``, last stride 1) and return dQ (``q``'s shape and
        dtype, contiguous), or None where the configuration's ``dq`` is "kernel" or with
        ``deterministic`` (then only dK/dV are computed: the caller runs the portable dQ kernel).
        ``cfg``: None for :meth:`config`. ``lse``, ``delta``: the forward's logsumexp (natural log) and
        rowsum(dO·O) − dlse, ``[B, Hq, Lq]`` float32 contiguous; ``buffers``: the pattern's captured
        tensors, in slot order; ``table``: for a data-dependent mask, ``table(rows, cols)`` gives the
        transposed block table (``blocktables.Table``) of key tiles of ``rows`` and query tiles of
        ``cols`` (``Runner.table``); ``key``: what fixes the call's launch besides the configuration
        (a prepared backward's call key and gradient layout: dK, dV, lse and delta then laid out as
        its templates), which keys the prepared launch in place of the arguments' own keys."""
        from .marshal import buffer_args
        if len(buffers) != len(self.spec.buffers):
            raise ValueError(f"the pattern captures {len(self.spec.buffers)} tensors, got {len(buffers)}")
        B, Hq, Lq, D = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        cfg = cfg or self.config(q, k)
        atomic = cfg.dq == "atomic" and not deterministic
        need = cfg.shared_bytes(D, atomic)
        if need > SMEM_LIMIT:
            raise ValueError(f"{cfg} needs about {need} bytes of shared memory at head dim {D}"
                             f"{' with atomic dQ' if atomic else ''}, more than sm_90's {SMEM_LIMIT}: "
                             "use fewer stages or one consumer group")
        lse, delta = lse.contiguous(), delta.contiguous()
        # dQ's float32 sum, added into by TMA (rows past Lq fall outside the descriptor); without
        # atomic dQ the kernel reads no descriptor of it, but its parameter needs one (kept per device)
        dq_acc = (q.new_zeros((B, Hq, Lq, D), dtype=torch.float32) if atomic
                  else self._placeholder(q.device, cfg.block_m, D))
        dq_cols = cfg.dq_cols(D)
        rows = cfg.block_n * cfg.consumers
        grid = ((Lkv + rows - 1) // rows, B * Hkv)
        tbl = []
        if self.spec.data_dependent:
            if table is None:
                raise ValueError("a data-dependent mask's Hopper backward needs its block table (table=)")
            tbl = table(rows, cfg.block_m).args()
        # the runtime arguments after the descriptors: those before the scale, the scale, those after
        head = [dk, dv, lse, delta, dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1),
                dv.stride(2), Hq, Hkv, Hq // Hkv, Lq, Lkv]
        tail = [*buffer_args(buffers), *tbl]
        rest = [*head, float(scale), *tail]
        tensors = (q, k, v, dout, dq_acc)
        call_key, key = key, None
        if gluonlaunch.PREPARED:
            # as the forward's (``HopperForward._launch``): what fixes every launch decision but the
            # addresses and the scale (a float argument, never specialised)
            key = ((cfg, atomic, q.get_device(), *map(tensor_key, tensors),
                    *(tensor_key(a) if isinstance(a, torch.Tensor) else a for a in (*head, *tail)))
                   if call_key is None else (cfg, atomic, q.get_device(), call_key))
            if gluonlaunch.launch_kept(self._prepared, key, q, tensors, rest):
                return self._dq(dq_acc, q, scale, atomic)
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        el = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
        descs = [_descriptor(TensorDescriptor, gl, t, rows, el)
                 for t, rows in ((q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n), (dout, cfg.block_m))]
        descs.append(_descriptor(TensorDescriptor, gl, dq_acc, cfg.block_m, gl.float32, dq_cols))
        consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=D, STAGES=cfg.stages, CONSUMERS=cfg.consumers,
                      DQ_ATOMIC=atomic, DQ_COLS=dq_cols, DQ_EARLY=cfg.early_dq(D, atomic))
        gluonlaunch.run_and_keep(self._prepared, key, self.kernel(), q, descs, rest, consts, grid)
        return self._dq(dq_acc, q, scale, atomic)

    @staticmethod
    def _dq(dq_acc, q, scale, atomic):
        """dQ from the float32 sum (scaled and cast in one pass), or None without atomic dQ."""
        if not atomic:
            return None
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return torch.mul(dq_acc, scale, out=dq)

    def _placeholder(self, device, rows: int, cols: int):
        """A float32 ``[1, 1, rows, cols]`` tensor for the dQ descriptor of a launch without atomic
        dQ (read by no instruction), one per device and shape: the prepared launch expands its
        descriptor once."""
        key = (device, rows, cols)
        t = self._placeholders.get(key)
        if t is None:
            t = self._placeholders[key] = torch.empty((1, 1, rows, cols), dtype=torch.float32, device=device)
        return t


def compile_sm90_bwd(spec, dtype: str = "bf16", head_dim: int = 128, cfg: HopperBwdConfig | None = None,
                     dq_atomic: bool | None = None):
    """Compile ``spec``'s Hopper backward for sm_90 with no GPU present (Triton's NVIDIA backend and
    its bundled ptxas). Returns the compiled kernel (``.asm["ptx"]``...). Raises ValueError for a
    spec it does not render, else whatever the compiler raises. ``dq_atomic`` None: as ``cfg.dq``."""
    from . import cache
    cfg = cfg or bwd_config_for(head_dim)
    dq_atomic = cfg.dq == "atomic" if dq_atomic is None else dq_atomic
    hb = HopperBackward(spec)
    if hb.unsupported is not None:
        raise ValueError(f"the Hopper target does not render this pattern's backward: {hb.unsupported}")
    mod = cache.load(hb.spec, interpret=False, render=_gen.render)
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=head_dim, STAGES=cfg.stages,
                  CONSUMERS=cfg.consumers, DQ_ATOMIC=dq_atomic, DQ_COLS=cfg.dq_cols(head_dim),
                  DQ_EARLY=cfg.early_dq(head_dim, dq_atomic))
    boxes = {"q_desc": cfg.block_m, "do_desc": cfg.block_m, "k_desc": cfg.block_n, "v_desc": cfg.block_n,
             "dq_desc": (cfg.block_m, cfg.dq_cols(head_dim))}
    return compile_gluon_sm90(getattr(mod, _gen.kernel_name(hb.spec)), _gen.signature(hb.spec), hb.spec.buffers,
                              dtype, head_dim, boxes, ("DK", "DV"), consts, float32=("dq_desc",))


_SMOKE = r"""
import math, sys, torch
import attndsl
from attndsl.runtime import hopper_bwd
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
for d in (128, 64):
    for mask in (None, causal):
        for det in (False, True):
            comp = attndsl.compile(mask_mod=mask)
            q, k, v, do = (torch.randn(1, 2, 300, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
            out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=mask is not None)
            out.backward(do.float())
            o, lse = comp(q, k, v, return_lse=True)
            delta = (o.float() * do.float()).sum(-1)
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dq = hopper_bwd.HopperBackward(comp.spec).backward(q, k, v, do, lse, delta, dk, dv, 1 / math.sqrt(d),
                                                             deterministic=det)
            torch.cuda.synchronize()
            for name, got, want in (("dq", dq, ref[0].grad), ("dk", dk, ref[1].grad), ("dv", dv, ref[2].grad)):
                if got is None:
                    continue
                err = float((got.float() - want).abs().max()) / float(want.abs().max())
                if not err < 3e-2:
                    sys.exit(f"D={d} mask={mask is not None} deterministic={det}: {name} relative error {err:.3g}")
print("ok")
"""


def smoke_test(timeout: float = 300) -> str | None:
    """Run small Hopper backwards (D 64 and 128, dense and causal, atomic and deterministic dQ) in
    a child process with a time limit and compare them with float32 SDPA's gradients. Returns None
    when they pass, else what went wrong (an error, a wrong result, or a hang: the child is killed,
    so a deadlocked kernel cannot stall the caller)."""
    import subprocess
    import sys
    from pathlib import Path
    path = os.pathsep.join([str(Path(__file__).resolve().parents[2])] + [os.environ.get("PYTHONPATH", "")])
    try:
        p = subprocess.run([sys.executable, "-c", _SMOKE], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "ATTNDSL_HOPPER": "0", "ATTNDSL_HOPPER_BWD": "0",
                                "PYTHONPATH": path.rstrip(os.pathsep)})
    except subprocess.TimeoutExpired:
        return f"the Hopper backward did not finish within {timeout:.0f} s (a deadlock?)"
    if p.returncode != 0 or "ok" not in p.stdout:
        return f"the Hopper backward smoke test failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}"
    return None
