"""The Hopper (sm_90) forward: when it runs, its launch, and an offline compile check.

The Gluon forward of ``codegen/hopper.py`` is chosen per call only where all of these hold, and
the portable Triton kernels run everywhere else:

* the pattern is one this target renders (:func:`attndsl.codegen.hopper.supports`, decided once
  per spec and kept in :attr:`HopperForward.unsupported`);
* it is enabled: ``ATTNDSL_HOPPER=1`` in the environment (read once, :func:`enabled`) or ``enable(True)``;
  with neither set, only where ``MEASURED_WINS`` says it was measured faster on an H100 (dense
  and causal-like masks without a score mod, bf16, D=128, ``B * Hq * Lq * Lkv >= 16 * 8192²``);
* the call: CUDA tensors on a compute capability 9.0 device, float16 or bfloat16, query/key and
  value head dim both 64 or both 128, q/k/v whose strides a TMA descriptor takes (last stride 1,
  the others and the base 16-byte aligned: ``[B, L, H, D]`` views too; the kernel reads them
  through 4-D descriptors), no low-rank bias, block tables or visit counts (sink logits and
  score_mod's captured tensors are supported).

The output and the logsumexp (natural log, ``[B, H, Lq]`` float32, -inf for a row that sees no
key) are the portable forward's, so the portable backward runs after either forward.

The launch (prepared launches on by default; ``ATTNDSL_GLUON_PREPARED=0`` turns them off): the first
call of a launch key (q/k/v/sinks/captured tensors' dtypes, shapes, strides and alignment, tiles,
program order, device) goes through Gluon's ``kernel.run`` and keeps a prepared launch
(:mod:`attndsl.runtime.gluonlaunch`); later calls of the key hand their tensors to the compiled kernel's
C launcher directly, the TMA descriptors' tensor maps kept per address
(:mod:`~attndsl.runtime.gluonlaunch`). :meth:`HopperForward.applies` asks nothing of the environment or
the device per call (the switch and each device's capability are read once).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ..codegen import hopper as _gen
from ..passes import visit_width
from . import gluonlaunch
from .marshal import buffer_args
from .memo import MEMO_SIZE, tensor_key
from .switches import Switch

__all__ = ["HopperForward", "enable", "enabled", "gluon_available", "HopperConfig", "config_for", "compile_sm90",
           "smoke_test", "check_runs", "MEASURED_WINS", "sweep_configs", "shared_bytes", "compile_ahead"]

#: the forward's switch (None: the calls MEASURED_WINS names)
SWITCH = Switch("ATTNDSL_HOPPER")


def enable(on: bool | None) -> None:
    """Turn the Hopper forward on or off for this process; None: follow ``ATTNDSL_HOPPER`` as the
    environment says now (read here and kept)."""
    SWITCH.set(on)


def enabled() -> bool | None:
    """True (every call that can take it), False (none), or None: the calls ``MEASURED_WINS`` names.
    ``enable()`` wins over ``ATTNDSL_HOPPER`` ("1" on, "0" off, unset: the table), which is read
    once, on first use, and again by ``enable(None)``: set it before the first call, or call
    ``enable(None)`` after changing it."""
    return SWITCH.get()


#: Where the Hopper forward was measured faster than the portable one on an H100 through the
#: one-shot ``attndsl.attention`` call, host time included (same run, 2026-12-07, bf16, D=128,
#: B=1, H=16, ``do_bench`` ms, portable / Hopper;
#: ``benchmarks/results/hopper/h100-2026-12-07-fwd-select.json``): ``(plan, has_score_mod,
#: head_dim, dtype)`` -> the smallest ``B * Hq * Lq * Lkv`` it is taken from, where ``plan`` is
#: "dense" (no mask), "growing" (a mask whose visited range grows along the query tiles,
#: :func:`attndsl.passes.visit_width.heavy_first`: causal, prefix-LM) or "other" (taken only where its
#: closed-form range visits at least ``OTHER_MIN_VISITED`` keys per program of 128 queries on
#: average, never a data-dependent mask). Calls with neither ``enable`` nor ``ATTNDSL_HOPPER`` set
#: take the Hopper forward only here:
#:
#: * dense: L=2048 0.0789 / 0.0711, L=4096 0.279 / 0.238 (kernels at L=16384: 4.13 / 3.63);
#: * causal: L=2048 0.0474 / 0.0467 (not taken: within the noise), L=4096 0.156 / 0.137; Llama-3-8B
#:   (GQA 32:8, L=8192) 1.028 / 0.989;
#: * sliding window 1024, L=16384: 0.378 / 0.333; 16 documents in 16K: 0.271 / 0.273 (the Hopper
#:   forward takes no block tables: portable either way);
#: * D=64 loses everywhere measured: ViT-B/16 (B=32, H=12, L=197) 0.0351 / 0.0432, GPT-2 (B=8,
#:   H=12, L=2048) causal 0.160 / 0.184, dense 0.261 / 0.282.
#:
#: The prepared launch brought the one-shot call's host time with the Hopper forward to 40 µs
#: (``benchmarks/hopper_host.py --gpu``; 102 µs before it, portable 20, SDPA 18), short of the
#: kernels from L=2048 on. Unmeasured classes (score mods, D=64 GQA, fp16) stay portable.
MEASURED_WINS: dict = {("dense", False, 128, torch.bfloat16): 16 * 2048 * 2048,
                       ("growing", False, 128, torch.bfloat16): 16 * 4096 * 4096,
                       ("other", False, 128, torch.bfloat16): 16 * 16384 * 16384}
#: the least keys an "other" mask's program of 128 queries visits on average where it takes the
#: Hopper forward (``MEASURED_WINS``; the window of 1024, 1150 keys at L=16384, won by 12%)
OTHER_MIN_VISITED = 1024


def plan_class(has_mask: bool, heavy_first: bool) -> str:
    """The shape class of ``MEASURED_WINS`` (and the backward's ``MEASURED_BWD_WINS``): "dense" (no
    mask), "growing" (a visited range that grows along the query tiles) or "other"."""
    return "dense" if not has_mask else "growing" if heavy_first else "other"


def spec_class(spec, heavy: bool) -> str:
    """:func:`plan_class` of a spec (``heavy``: its range grows along the query tiles); a
    data-dependent mask is "other" whatever its closed-form bound (a document mask's is causal), as
    its work is in its block table."""
    return "other" if spec.data_dependent else plan_class(spec.mask is not None, heavy)


def visited(runner, rng, other_len: int, target_len: int, rows: int) -> float | None:
    """:func:`attndsl.passes.visit_width.mean_visited` of ``runner.spec``, kept per shape in
    ``runner._visited`` (a Hopper forward's or backward's; at most ``MEMO_SIZE`` shapes)."""
    key = (rng.target, other_len, target_len, rows)
    got = runner._visited.get(key, _UNSEEN)
    if got is _UNSEEN:
        if len(runner._visited) >= MEMO_SIZE:  # lengths that vary call by call: start over
            runner._visited.clear()
        got = runner._visited[key] = visit_width.mean_visited(runner.spec, rng, other_len, target_len, rows)
    return got


_UNSEEN = object()


def _measured_win(hf: "HopperForward", q, k) -> bool:
    least = MEASURED_WINS.get((hf.plan, hf.spec.score is not None, q.shape[-1], q.dtype))
    if least is None or q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] < least:
        return False
    if hf.plan == "other":  # (asked only without a tuned entry: the default tiles' programs)
        cfg = config_for(q.shape[-1])
        keys = visited(hf, hf.spec.fwd_range, q.shape[2], k.shape[2], cfg.block_m * cfg.consumers)
        return keys is not None and keys >= OTHER_MIN_VISITED
    return True


@dataclasses.dataclass(frozen=True)
class HopperConfig:
    """Tiles of the Hopper forward: ``block_m`` rows per consumer warp group, ``consumers`` groups
    per program, ``block_n`` keys per K/V tile, ``stages`` buffers in the K/V ring; ``pipeline``:
    each group overlaps a tile's softmax with the previous tile's P·V (FlashAttention-3's
    intra-warpgroup pipelining); ``pingpong``: the two consumer groups take strict turns issuing
    their matrix products (FlashAttention-3's scheduler barrier; needs ``consumers=2``);
    ``thread_arrive``: a consumer group frees a K/V buffer (and passes a ping-pong turn) by an
    arrive of each of its threads (``cp.async.mbarrier.arrive.noinc``) instead of Gluon's
    ``mbarrier.arrive``, which syncs the group's 128 threads (``bar.sync``) before one thread
    arrives: one CTA barrier less per key tile and group (two less with ping-pong; docs/hopper.md,
    "Barriers in the main loop"); ``unroll``: key tiles per step of the pipelined main loop (1 or
    2; 2 guards odd tiles by a second set of barriers, so Triton syncs each group once per pair of
    tiles instead of once per tile; pipelined, without ping-pong)."""

    block_m: int = 64
    block_n: int = 128
    stages: int = 2
    consumers: int = 2
    pipeline: bool = True
    pingpong: bool = False
    thread_arrive: bool = False
    unroll: int = 1

    def __post_init__(self):
        if self.consumers not in (1, 2):
            raise ValueError(f"consumers must be 1 or 2, got {self.consumers}")
        if self.stages < 1 or ((self.pipeline or self.pingpong) and self.stages < 2):
            # a pipelined group frees tile i's buffer only after asking for tile i+1's; a ping-pong
            # group holds its turn from tile i's P·V to tile i+1's Q·Kᵀ, while the other group's
            # P·V of tile i (which frees the one buffer) waits for that turn: one buffer deadlocks
            raise ValueError(f"stages must be >= 1, and >= 2 with pipeline=True or pingpong=True; got "
                             f"stages={self.stages}, pipeline={self.pipeline}, pingpong={self.pingpong}")
        if self.pingpong and self.consumers != 2:
            raise ValueError(f"pingpong takes turns between two consumer groups: needs consumers=2, got "
                             f"{self.consumers}")
        if self.unroll not in (1, 2) or (self.unroll == 2 and (not self.pipeline or self.pingpong)):
            raise ValueError(f"unroll must be 1, or 2 with pipeline=True and pingpong=False; got unroll={self.unroll}, "
                             f"pipeline={self.pipeline}, pingpong={self.pingpong}")
        if self.block_m != 64 or self.block_n not in (64, 128):
            raise ValueError(f"block_m must be 64 and block_n 64 or 128, got {self.block_m}, {self.block_n}")


@functools.lru_cache(maxsize=None)
def config_for(head_dim: int) -> HopperConfig:
    """The tiles for a head dim (64 or 128). Shared memory per program: the query tiles
    (consumers·block_m·D) and the ring (stages·2·block_n·D), two bytes each: D=128 with 3 stages
    takes 224 KiB of the H100's 227, D=64 with 4 stages 144 KiB. D=128's ring of 3 won the H100
    sweep (``benchmarks/hopper.py --sweep``: 6–14% faster than 2 on dense and causal at L=4096 and
    16384; ping-pong within 1–2% either way, so it stays off)."""
    if head_dim == 128:
        return HopperConfig(stages=3)
    if head_dim == 64:
        return HopperConfig(stages=4)
    raise ValueError(f"the Hopper forward supports head dims 64 and 128, got {head_dim}")


#: shared memory per block on an H100 (227 KiB)
SMEM_LIMIT = 232448


def shared_bytes(cfg: HopperConfig, head_dim: int, itemsize: int = 2) -> int:
    """Shared memory of the forward's tiles under ``cfg``: the query tiles and the K/V ring (the
    mbarriers add a few hundred bytes)."""
    return itemsize * head_dim * (cfg.consumers * cfg.block_m + 2 * cfg.stages * cfg.block_n)


def sweep_configs(head_dim: int) -> list:
    """The tile configurations ``benchmarks/hopper.py --sweep`` times on an H100 (and
    ``tests/test_hopper_codegen.py`` compiles offline): two consumer groups, ping-pong on and off,
    pipelined and plain loops, rings of 2 and 3 buffers, key tiles of 64 and 128, those whose
    tiles fit in shared memory with 1 KiB to spare."""
    cfgs = [HopperConfig(block_n=bn, stages=st, pipeline=pipe, pingpong=pp)
            for pp in (False, True) for pipe in (True, False) for st in (2, 3) for bn in (128, 64)]
    return [c for c in cfgs if shared_bytes(c, head_dim) + 1024 <= SMEM_LIMIT]


def compile_ahead(jobs, workers: int | None = None) -> None:
    """Compile the kernels that ``HopperForward.forward(*args, **kwargs)`` would launch, for each
    ``(hopper_forward, args, kwargs)`` of ``jobs``, in parallel threads (Triton's
    ``AsyncCompileMode``; ptxas runs as a child process), so that a sweep over many tile
    configurations does not compile them one after the other. A compile that fails is left to the
    launch, which compiles again and raises its error; so is everything when the parallel compile
    itself fails (a warning says why): this only saves time."""
    import warnings
    from concurrent.futures import ThreadPoolExecutor
    try:
        from triton.runtime._async_compile import AsyncCompileMode
        with ThreadPoolExecutor(workers or os.cpu_count() or 4) as pool, AsyncCompileMode(pool, ignore_errors=True):
            for hf, args, kwargs in jobs:
                hf.warmup(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the launches compile what is missing
        warnings.warn(f"compiling the Hopper kernels ahead failed ({type(e).__name__}: {e}); they compile at launch")


#: Triton releases whose Gluon API the Hopper module is written for (3.6: ``tma.async_copy_global_to_shared``,
#: ``gl.warp_specialize(functions_and_args, worker_num_warps, worker_num_regs)``; 3.9 renamed the TMA copies)
GLUON_VERSIONS = ("3.6",)


def gluon_available() -> bool:
    """Whether this Triton has the Gluon API the Hopper module is written for (``GLUON_VERSIONS``).
    Other versions run the portable kernels."""
    if not _GLUON:
        try:
            import triton
            from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
            ok = triton.__version__.startswith(GLUON_VERSIONS)
        except Exception:  # no Gluon at all
            ok = False
        _GLUON.append(ok)
    return _GLUON[0]


_GLUON: list = []


def _sm90(dev: torch.device) -> bool:
    """Is ``dev`` a CUDA device of compute capability 9.0 (asked once per device)?"""
    if dev.type != "cuda":
        return False
    got = _SM90.get(dev.index)
    if got is None:
        got = torch.cuda.is_available() and torch.cuda.get_device_capability(dev) == (9, 0)
        if dev.index is not None:  # (a tensor's device always has its index)
            _SM90[dev.index] = got
    return got


_SM90: dict = {}  # device index -> whether its compute capability is 9.0


def _tma_strides(t: torch.Tensor) -> bool:
    """Can ``t`` ([B, H, L, D]) be read through a 4-D TMA descriptor: last stride 1, the base and
    the other strides multiples of 16 bytes (any order of the leading dims: [B, L, H, D] views too)."""
    st = t.stride()
    if st[-1] != 1 or t.data_ptr() % 16:
        return False
    es = t.element_size()
    for n, s in zip(t.shape[:-1], st[:-1]):  # a loop, not all(...): this runs per call
        if n != 1 and (s * es) % 16:
            return False
    return True


@functools.lru_cache(maxsize=None)
def _box_layout(gl, rows: int, d: int, el):
    """The shared-memory layout of a [1, 1, rows, d] box (a frozen value: one per box and dtype, made
    once; Gluon's ``get_default_for`` takes about 5-10 µs of host time per call)."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, d], el)


def _descriptor(TensorDescriptor, gl, t: torch.Tensor, rows: int, el, cols: int | None = None):
    """A 4-D descriptor over ``t`` [B, H, L, D] with [1, 1, rows, cols] boxes (cols: D unless
    given): rows past L read as zeros, and are dropped from writes."""
    d = t.shape[-1]
    cols = cols or d
    # a dim of one element may have any stride in torch: give it one TMA accepts
    strides = [st if n > 1 else d for n, st in zip(t.shape[:-1], t.stride()[:-1])] + [1]
    return TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, cols], _box_layout(gl, rows, cols, el))


def call_fits(extras, q, k, *more) -> bool:
    """The call conditions of both Hopper kernels (forward, ``hopper_bwd.py``): no low-rank bias
    (``extras.u``), float16 or bfloat16 for ``q``, ``k`` and ``more`` alike, head dim 64 or 128 for
    all of them, at least one query and one key, strides a TMA descriptor takes, a compute
    capability 9.0 CUDA device and Triton 3.6's Gluon."""
    if extras is not None and getattr(extras, "u", None) is not None:
        return False
    dt, d = q.dtype, q.shape[-1]
    if (dt is not torch.float16 and dt is not torch.bfloat16) or (d != 64 and d != 128):
        return False
    if q.shape[2] < 1 or k.shape[2] < 1:
        return False
    for t in (q, k, *more):  # (a loop, not any(...): this runs per call)
        if t.dtype is not dt or t.shape[-1] != d or not _tma_strides(t):
            return False
    return _sm90(q.device) and gluon_available()


def load_kernel(spec, render, kernel_name):
    """The compiled module's entry kernel of ``spec`` (rendered by ``render``, cached per spec)."""
    from . import cache
    mod = cache.load(spec, interpret=False, render=render)
    return getattr(mod, kernel_name(spec))


def hopper_spec(spec):
    """``spec`` renamed for its Hopper module: kernel names and the module cache key differ from
    the portable module's."""
    return dataclasses.replace(spec, name=f"{spec.name}_sm90")


class HopperForward:
    """The Hopper forward of one spec. ``unsupported``: why this pattern runs on the portable
    kernels only (None when the Hopper target renders it); ``heavy_first``: the programs start
    with the query tiles of most work (:func:`attndsl.passes.visit_width.heavy_first`, decided here
    once per spec)."""

    def __init__(self, spec):
        self.spec = hopper_spec(spec)
        self.unsupported = _gen.supports(spec)
        self.heavy_first = self.unsupported is None and visit_width.heavy_first(spec)
        #: the shape class for ``MEASURED_WINS`` (:func:`spec_class`)
        self.plan = spec_class(spec, self.heavy_first)
        self._visited: dict = {}
        #: ``(HopperConfig, whether it beat the portable forward)`` of a tuned entry (``attndsl.runtime.tuned``)
        #: for this runner's calls; None: :func:`config_for` and ``MEASURED_WINS``
        self.tuned = None
        self._kernel = None
        #: the prepared launch of each launch key (``gluonlaunch.Prepared``; None: the ordinary one)
        self._prepared: dict = {}

    def applies(self, q, k, v, extras=None, tables=None, count_visits: bool = False) -> bool:
        """Whether this call runs the Hopper forward (see the module docstring)."""
        if self.unsupported is not None or tables is not None or count_visits:
            return False
        on = enabled()
        if on is False:
            return False
        if on is None and not (_measured_win(self, q, k) if self.tuned is None else self.tuned[1]):
            return False
        return call_fits(extras, q, k, v)

    def kernel(self):
        if self._kernel is None:
            self._kernel = load_kernel(self.spec, _gen.render, _gen.kernel_name)
        return self._kernel

    def forward(self, q, k, v, scale: float, cfg: HopperConfig | None = None, sinks: torch.Tensor | None = None,
                buffers=(), heavy_first: bool | None = None, key: tuple | None = None):
        """(out, lse) for ``q [B, Hq, Lq, D]``, ``k, v [B, Hkv, Lkv, D]`` (see :meth:`applies`);
        ``sinks``: per-head sink logits ``[Hq]`` that join the softmax denominator, or None;
        ``buffers``: the pattern's captured tensors, in slot order; ``cfg``: the tiles (None:
        :func:`config_for` the head dim); ``heavy_first``: the program order (None: the spec's,
        :attr:`heavy_first`; the benchmark times both); ``key``: the call's ``Runner.call_key``,
        which then keys the prepared launch in place of the tensors' own keys."""
        return self._launch(q, k, v, scale, cfg, sinks, buffers, heavy_first, warmup=False, call_key=key)

    def warmup(self, q, k, v, scale: float, cfg: HopperConfig | None = None, sinks: torch.Tensor | None = None,
               buffers=(), heavy_first: bool | None = None) -> None:
        """Compile the kernel :meth:`forward` would launch with these arguments, without launching
        it. Under ``triton.runtime._async_compile.AsyncCompileMode`` the compiles run in its
        executor (the benchmark's sweep compiles its configurations in parallel)."""
        self._launch(q, k, v, scale, cfg, sinks, buffers, heavy_first, warmup=True)

    def _launch(self, q, k, v, scale, cfg, sinks, buffers, heavy_first, warmup: bool, call_key=None):
        if len(buffers) != len(self.spec.buffers):
            raise ValueError(f"the pattern captures {len(self.spec.buffers)} tensors, got {len(buffers)}")
        B, Hq, Lq, D = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        cfg = cfg or (self.tuned and self.tuned[0]) or config_for(D)
        heavy = self.heavy_first if heavy_first is None else heavy_first
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous, as the portable forward's
        lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
        # the runtime arguments after the descriptors
        rest = [out, lse, lse if sinks is None else sinks, out.stride(0), out.stride(1), out.stride(2), Hq, Hq // Hkv,
                Lq, Lkv, float(scale), *(buffer_args(buffers) if buffers else ())]
        key = None
        if gluonlaunch.PREPARED and not warmup:
            # what fixes every launch decision but the addresses (gluonlaunch): the descriptors'
            # shapes, strides and dtype, the other arguments' specialisation, tiles, grid, device
            # (a call key covers the tensors, the sinks and the captured tensors alike)
            key = ((cfg, heavy, tensor_key(q), tensor_key(k), tensor_key(v),
                    None if sinks is None else tensor_key(sinks), *map(tensor_key, buffers), q.get_device())
                   if call_key is None else (cfg, heavy, call_key, q.get_device()))
            if gluonlaunch.launch_kept(self._prepared, key, q, (q, k, v), rest):
                return out, lse
        gl, TensorDescriptor = _gluon()
        el = gl.bfloat16 if q.dtype == torch.bfloat16 else gl.float16
        descs = [_descriptor(TensorDescriptor, gl, q, cfg.block_m, el),
                 _descriptor(TensorDescriptor, gl, k, cfg.block_n, el),
                 _descriptor(TensorDescriptor, gl, v, cfg.block_n, el)]
        # heaviest first: the query tiles on the grid's second axis, launched after every head's
        # tile of the same index (the kernel reverses them)
        tiles = (Lq + cfg.block_m * cfg.consumers - 1) // (cfg.block_m * cfg.consumers)
        grid = (B * Hq, tiles) if heavy else (tiles, B * Hq)
        consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=D, STAGES=cfg.stages,
                      CONSUMERS=cfg.consumers, PIPELINE=cfg.pipeline, PINGPONG=cfg.pingpong,
                      THREAD_ARRIVE=cfg.thread_arrive, UNROLL=cfg.unroll, HEAVY_FIRST=heavy, HAS_SINKS=sinks is not None)
        gluonlaunch.run_and_keep(self._prepared, key, self.kernel(), q, descs, rest, consts, grid, warmup)
        return out, lse


def _gluon():
    """Gluon's language module and its host TMA descriptor class (imported on first use: Triton
    builds without Gluon import this module too)."""
    if not _GLUON_MODULES:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        _GLUON_MODULES.extend((gl, TensorDescriptor))
    return _GLUON_MODULES


_GLUON_MODULES: list = []


def compile_sm90(spec, dtype: str = "bf16", head_dim: int = 128, cfg: HopperConfig | None = None):
    """Compile ``spec``'s Hopper forward for sm_90 with no GPU present (Triton's NVIDIA backend and
    its bundled ptxas). Returns the compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``...).
    Raises whatever the compiler raises."""
    from . import cache
    cfg = cfg or config_for(head_dim)
    hs = hopper_spec(spec)
    mod = cache.load(hs, interpret=False, render=_gen.render)
    consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_D=head_dim, STAGES=cfg.stages,
                  CONSUMERS=cfg.consumers, PIPELINE=cfg.pipeline, PINGPONG=cfg.pingpong,
                  THREAD_ARRIVE=cfg.thread_arrive, UNROLL=cfg.unroll, HEAVY_FIRST=visit_width.heavy_first(spec),
                  HAS_SINKS=True)
    return compile_gluon_sm90(getattr(mod, _gen.kernel_name(hs)), _gen.signature(hs), hs.buffers, dtype, head_dim,
                              {"q_desc": cfg.block_m, "k_desc": cfg.block_n, "v_desc": cfg.block_n}, ("Out",), consts)


#: Triton's names of the captured tensors' element types (``Buffer.torch_dtype``)
_TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                 "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def compile_gluon_sm90(fn, params, buffers, dtype: str, head_dim: int, boxes: dict, own: tuple, consts: dict,
                       float32: tuple = ()):
    """Compile the Gluon kernel ``fn`` (parameters ``params``, ``Param`` s) for sm_90 with no GPU:
    ``boxes`` maps its descriptor parameters to their box rows, or (rows, columns) where a box is
    narrower than the head dim (over [B, H, L, head_dim] tensors of
    ``dtype``, "bf16" or "fp16"; of float32 for the descriptors ``float32`` names), ``own`` names the
    pointers of that dtype; the captured tensors'
    (``buffers``) pointers take their element types, block tables int32, other pointers float32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    el = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    boxes = {n: (r, None) if isinstance(r, int) else r for n, r in boxes.items()}
    base = torch.empty(1, 1, 16 * max(r for r, _ in boxes.values()), head_dim, dtype=tdt)
    bufs = {f"buf{b.slot}": str(b.torch_dtype).replace("torch.", "") for b in buffers}
    sig = {}
    for p in params:
        if p.kind == "constexpr":
            sig[p.name] = "constexpr"
        elif p.name in boxes:
            f32 = p.name in float32
            rows, cols = boxes[p.name]
            sig[p.name] = mangle_type(_descriptor(TensorDescriptor, gl, base.float() if f32 else base, rows,
                                                  gl.float32 if f32 else el, cols))
        elif p.name in own:
            sig[p.name] = "*" + dtype
        elif p.name in bufs:
            sig[p.name] = "*" + _TRITON_TYPES.get(bufs[p.name], "fp32")
        elif p.name.startswith("TBL_"):
            sig[p.name] = "*i32"
        elif p.kind == "tensor":
            sig[p.name] = "*fp32"
        elif p.kind == "float":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return triton.compile(GluonASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4))


_SMOKE = r"""
import math, torch
import attndsl
from attndsl.runtime import hopper
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx
runs = []
for d in (128, 64):
    for mask in (None, causal):
        hf = hopper.HopperForward(attndsl.compile(mask_mod=mask).spec)
        q, k, v = (torch.randn(1, 2, 300, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for pipe in (True, False):
            for pp in ((False, True) if d == 128 else (False,)):
                cfg = hopper.HopperConfig(**{**vars(hopper.config_for(d)), "pipeline": pipe, "pingpong": pp})
                runs.append((hf, (q, k, v, 1 / math.sqrt(d), cfg), {}, mask is not None))
hopper.check_runs(runs)
"""


def check_runs(runs: list) -> None:
    """A smoke script's end (:func:`smoke_test`): compile ``runs`` (``(HopperForward, args, kwargs,
    causal)`` each) ahead, run each and compare it with SDPA; exit with what went wrong, else
    print "ok"."""
    import sys
    compile_ahead([r[:3] for r in runs])
    for hf, (q, k, v, scale, cfg), kwargs, is_causal in runs:
        out, _ = hf.forward(q, k, v, scale, cfg, **kwargs)
        torch.cuda.synchronize()
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
        err = float((out.float() - want.float()).abs().max()) / float(want.float().abs().max())
        if not err < 2e-2:
            sys.exit(f"L={q.shape[2]} D={q.shape[-1]} causal={is_causal} {cfg}: relative error {err:.3g} "
                     "against SDPA")
    print("ok")


def smoke_test(timeout: float = 240, script: str | None = None) -> str | None:
    """Run small Hopper forwards (D 64 and 128, dense and causal, both loop shapes, and at D=128 with
    ping-pong too) in a child process with a time limit and compare them with SDPA. Returns None when
    they pass, else what went wrong (an error, a wrong result, or a hang: the child is killed, so a
    deadlocked kernel cannot stall the caller). For the GPU tests and the benchmark, before anything else runs.
    ``script``: other Python code for the child to run instead (it prints "ok" when it passes)."""
    import subprocess
    import sys
    from pathlib import Path
    # the child imports this attndsl, wherever it lives
    path = os.pathsep.join([str(Path(__file__).resolve().parents[2])] + [os.environ.get("PYTHONPATH", "")])
    try:
        p = subprocess.run([sys.executable, "-c", script or _SMOKE], capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, "ATTNDSL_HOPPER": "0", "PYTHONPATH": path.rstrip(os.pathsep)})
    except subprocess.TimeoutExpired:
        return f"the Hopper forward did not finish within {timeout:.0f} s (a deadlock?)"
    if p.returncode != 0 or "ok" not in p.stdout:
        return f"the Hopper smoke test failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}"
    return None
