"""Kernel launches: argument marshalling, grids, block tables and shared-memory fallbacks."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import contextlib
import functools

import torch
import triton

from .. import ir
from . import cache
from .fastlaunch import Direct, launcher
from .hopper import HopperForward
from .scope import NO_CONTEXT, launch_scope
from .config import INTERPRETER_SECTION, Configs, TileConfig, block_d, forward_tiles, section, split_head_dim

POISON = os.environ.get("ATTNDSL_POISON", "0") == "1"
#: check every memoised launch against a fresh computation of its grid, constants and argument
#: specialisation (``Runner._launch``); the test suite turns it on
VERIFY_MEMO = os.environ.get("ATTNDSL_VERIFY_MEMO", "0") == "1"
#: memoised launches kept per runner before the memo starts over (one per kernel and call key)
MEMO_SIZE = 256


def acc_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype kernels compute in for inputs like ``q`` (their ``ACC_DTYPE``), and of the row
    statistics and gradient scratch: float32, or float64 for float64 inputs (CPU only)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def use_interpreter(t: torch.Tensor) -> bool:
    """CPU tensors run through Triton's interpreter, so everything works without a GPU."""
    return t.device.type == "cpu" or os.environ.get("ATTNDSL_FORCE_INTERPRET") == "1"


#: device-side tensor descriptors (Triton 3.3 on)
_HAS_DESCRIPTORS = hasattr(triton.language, "make_tensor_descriptor")


def tma_ready(interpret: bool, *tensors) -> bool:
    """May these tensors' row tiles be read through tensor descriptors (TMA)? The interpreter
    always; a GPU from Hopper on (NVIDIA), when every tensor's last stride is 1 and its base and
    its other strides (of dimensions longer than 1) are multiples of 16 bytes. The row stride is the
    descriptor's own and must be aligned even where there is one row (Lkv = 1)."""
    if not _HAS_DESCRIPTORS or not (interpret or _tma_device(tensors[0].device)):
        return False
    for t in tensors:
        es = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(-2) * es) % 16:
            return False
        if any(n > 1 and (s * es) % 16 for n, s in zip(t.shape[:-2], t.stride()[:-2])):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _gpu(index: int):
    """A CUDA device's properties, asked once (the launch path consults them on every call)."""
    return torch.cuda.get_device_properties(index)


def _tma_device(dev: torch.device) -> bool:
    """An NVIDIA GPU from Hopper on."""
    return dev.type == "cuda" and torch.version.hip is None and _gpu(dev.index).major >= 9


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for kernels that build tensor descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:  # Triton's allocator context variable, looked up once (the forward's launch path uses it)
    from triton.runtime._allocation import _NULL_ALLOCATOR, _allocator
except ImportError:
    _allocator = None


@contextlib.contextmanager
def _descriptor_scratch():
    """Give Triton a scratch allocator for the launch unless the caller set one."""
    if _allocator is None:  # a Triton that keeps the allocator elsewhere: set ours for the thread
        triton.set_allocator(_scratch)
        yield
        return
    if _allocator.get() is not _NULL_ALLOCATOR:
        yield
        return
    token = _allocator.set(_scratch)
    try:
        yield
    finally:
        _allocator.reset(token)


def _poisoned(t):
    """``t``, filled with NaN (or -7) under ATTNDSL_POISON so an element a kernel forgets shows."""
    if POISON:
        t.fill_(float("nan") if t.dtype.is_floating_point else -7)
    return t


def _new(shape, like, dtype=None):
    """An output of ``shape`` on ``like``'s device."""
    if dtype is None and shape == like.shape:
        return _like(like)
    return _poisoned(torch.empty(shape, device=like.device, dtype=dtype or like.dtype))


def _like(t):
    """A contiguous output of ``t``'s shape and dtype: ``empty_like``, at a third of ``empty``'s host time."""
    return _poisoned(torch.empty_like(t, memory_format=torch.contiguous_format))


def buffer_args(tensors, dense=frozenset()) -> list:
    """Pointer, sizes and strides of each captured tensor. Slots in ``dense`` (learnable tensors)
    are passed contiguous, so their gradient buffers share their strides with no stride-0 aliasing."""
    args = []
    for i, t in enumerate(tensors):
        if i in dense:
            t = t.contiguous()
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        args.append(t)
        args += list(t.shape)
        args += list(t.stride())
    return args


def buffer_named(tensors, dense=frozenset()) -> dict:
    """``buffer_args`` by parameter name: ``buf{slot}``, ``buf{slot}_size{d}``, ``buf{slot}_stride{d}``."""
    out = {}
    for i, t in enumerate(tensors):
        if i in dense:
            t = t.contiguous()
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        out[f"buf{i}"] = t
        out.update((f"buf{i}_size{d}", n) for d, n in enumerate(t.shape))
        out.update((f"buf{i}_stride{d}", st) for d, st in enumerate(t.stride()))
    return out


def strides_named(t: torch.Tensor, *names: str) -> dict:
    """``stride_{name}`` of each dimension of ``t`` (``strides_named(q, "qb", "qh", "qm", "qd")``)."""
    return {f"stride_{n}": st for n, st in zip(names, t.stride())}


def fill(kernel: str, params, named: dict, consts: dict) -> list:
    """The positional arguments of ``kernel`` taken by name from ``named`` in its signature's order
    (``spec.lowering.signature``); a parameter with no value, a value with no parameter, or a
    constexpr missing from ``consts`` raises TypeError naming it."""
    runtime = [p.name for p in params if p.kind != "constexpr"]
    missing = [n for n in runtime if n not in named]
    unknown = sorted(set(named) - set(runtime))
    if missing or unknown:
        raise TypeError(f"{kernel}: no value for {missing}; no parameter for {unknown}")
    args = [named[n] for n in runtime]
    check_arguments(kernel, params, args, consts)
    return args


#: keywords of a launch that are Triton's options, not the kernel's parameters
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})


def check_arguments(kernel: str, params, args, consts) -> None:
    """The launch of ``kernel`` fills exactly its signature (``spec.lowering.signature``): one
    positional argument per runtime parameter, in order and of its kind (a tensor for a pointer, a
    number otherwise), and every constexpr by name (``LAUNCH_OPTIONS`` aside). Raises TypeError
    naming what disagrees."""
    runtime = [p for p in params if p.kind != "constexpr"]
    wanted = {p.name for p in params if p.kind == "constexpr"}
    consts = [c for c in consts if c not in LAUNCH_OPTIONS]
    if len(args) != len(runtime):
        raise TypeError(f"{kernel}: {len(args)} arguments for {len(runtime)} parameters "
                        f"({', '.join(p.name for p in runtime)})")
    if set(consts) != wanted:
        raise TypeError(f"{kernel}: constexprs missing {sorted(wanted - set(consts))}, "
                        f"unknown {sorted(set(consts) - wanted)}")
    for p, a in zip(runtime, args):
        if (p.kind == "tensor") != isinstance(a, torch.Tensor):
            raise TypeError(f"{kernel}: parameter {p.name} ({p.kind}) got {type(a).__name__}")


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function: microseconds a call)."""
    return -(-a // b)


def _strides(t):
    return list(t.stride())


def tensor_key(t) -> tuple:
    """What of a tensor fixes a launch's arguments and their specialisation, but its address."""
    return (t.dtype, t.shape, t.stride(), t.data_ptr() & 15)


def arg_classes(args) -> tuple:
    """The launch arguments as Triton tells them apart when it specialises a kernel (and stricter):
    tensors by dtype and 16-byte alignment, integers by ``== 1``, divisibility by 16 and width."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            out.append(a)
        elif isinstance(a, int):
            out.append(("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31))
        elif isinstance(a, float):
            out.append("f")
        else:
            out.append(a)
    return tuple(out)


@dataclass
class Memo:
    """A launch whose every decision but the arguments was taken once for its call key."""

    launch: object  # args -> None
    fixed: object  # the arguments the call key fixes (strides, lengths, sections), as the caller built them
    check: tuple | None  # (grid, constants, arg_classes) when VERIFY_MEMO
    allocator: bool  # needs Triton's scratch allocator set (device-side descriptors, not Direct)


@dataclass
class Extras:
    """Per-call tensors beyond q/k/v: sink logits, low-rank bias factors, sigmoid bias."""

    sinks: torch.Tensor | None = None
    u: torch.Tensor | None = None
    w: torch.Tensor | None = None
    sigmoid_bias: float = 0.0

    def args(self, q, k) -> list:
        B, Hq, Lq, _ = q.shape
        Hkv = k.shape[1]
        dummy = q
        if self.u is None:
            bias = [dummy, dummy, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
        else:
            u, w = self.u, self.w
            su = [0 if u.shape[0] == 1 else u.stride(0), 0 if u.shape[1] == 1 else u.stride(1), u.stride(2), u.stride(3)]
            sw = [0 if w.shape[0] == 1 else w.stride(0), 0 if w.shape[1] == 1 else w.stride(1), w.stride(2), w.stride(3)]
            w_group = Hq // Hkv if (w.shape[1] == Hkv and Hkv != Hq) else 1
            bias = [u, w, *su, *sw, w_group, u.shape[3]]
        return [self.sinks if self.sinks is not None else dummy, *bias, float(self.sigmoid_bias)]

    def key(self) -> tuple:
        """What of these tensors fixes the launch arguments (see ``Runner.call_key``)."""
        return (None if self.sinks is None else tensor_key(self.sinks),
                None if self.u is None else (tensor_key(self.u), tensor_key(self.w)))

    def named(self, q, k) -> dict:
        """``args`` by parameter name (the signature's ``Sinks, U, W, stride_u*, stride_w*, W_GROUP,
        RANK, sigmoid_bias``)."""
        names = ("Sinks", "U", "W", "stride_ub", "stride_uh", "stride_um", "stride_ur", "stride_wb", "stride_wh",
                 "stride_wn", "stride_wr", "W_GROUP", "RANK", "sigmoid_bias")
        return dict(zip(names, self.args(q, k), strict=True))

    def consts(self) -> dict:
        r = self.u.shape[3] if self.u is not None else 1
        return dict(HAS_SINKS=self.sinks is not None, HAS_BIAS=self.u is not None, BLOCK_R=max(16, 1 << (r - 1).bit_length()))


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
    """Launches the kernels of one spec for one backend and pair of head dims (query/key, value)."""

    def __init__(self, spec, module, configs: Configs, interpret: bool, head_dim: int, deterministic: bool = False,
                 head_dim_v: int | None = None):
        self.spec = spec
        self.deterministic = deterministic
        #: the forward also returns its output in float32, kept for the backward's delta = rowsum(dO·O)
        #: (``precise_delta``: learnable-tensor gradients in float16/bfloat16 lose less to rounding)
        self.precise_delta = False
        self.learnable = spec.learnable_slots
        # facts of the spec the backward consults on every call
        self._loaded_once = frozenset(s for s in self.learnable if sum(g.slot == s for g in spec.grad_loads) == 1)
        self._dq_whole_range = spec.lowering.dq_whole_range
        self.mod = module
        self.cfg = configs
        self.interpret = interpret
        self.head_dim = head_dim
        # the query/key head dim in one power-of-two part, or two (192 = 128 + 64: no padding to 256)
        self.bd, self.bd2 = split_head_dim(head_dim)
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.bdv = block_d(self.head_dim_v)
        #: (kernel, call key) -> Memo: repeated calls of one shape skip the launch decisions
        self._memo: dict = {}
        self._kernels: dict = {}
        self._signature_of: dict = {}  # kernel -> its name in spec.lowering.signatures
        # the Hopper (sm_90, Gluon) forward: whether the spec allows it is decided here, once
        # (``hopper.unsupported``); whether a call takes it, per call (runtime/hopper.py)
        self.hopper = None if interpret else HopperForward(spec)

    # -- helpers ------------------------------------------------------------------------------
    def _sms(self, device) -> int:
        """Multiprocessors of the device (the interpreter counts as one)."""
        if self.interpret or device.type != "cuda":
            return 1
        return _gpu(device.index).multi_processor_count

    def section(self, t: torch.Tensor, n_heads: int, bytes_per_head: int) -> int:
        """Heads per section of a grid over ``n_heads`` rows (batch*head) on ``t``'s device whose
        programs each read ``bytes_per_head`` of their head (see ``config.section``)."""
        if self.interpret or t.device.type != "cuda":
            return INTERPRETER_SECTION
        return section(bytes_per_head, _gpu(t.device.index).L2_cache_size, n_heads)

    def _kv_section(self, q, k, v) -> int:
        """The section of a grid over query heads whose programs read their K/V head (the forward and
        dQ): a K/V head serves GROUP query heads, so each counts a GROUP-th of its rows."""
        Hq, Hkv = q.shape[1], k.shape[1]
        return self.section(q, q.shape[0] * Hq, _row_bytes(k, v) // (Hq // Hkv))

    def forward_tiles(self, q) -> tuple[str, TileConfig]:
        """The forward's tiles for query ``q`` (which of ``self.cfg``'s entries, and its config)."""
        B, Hq, Lq = q.shape[:3]
        return forward_tiles(self.cfg, B * Hq * cdiv(Lq, self.cfg.fwd.block_m), self._sms(q.device))

    def _zero_fills(self, gl, t, B, Hq, Lq, Lkv) -> bool:
        """Can the dQ kernel zero the untouched part of this full-size gradient itself? Only when its
        programs cover the tensor: one per (b, h, query tile), each dimension as long as the call's."""
        size = {"b": B, "h": Hq, "q": Lq, "kv": Lkv}
        return self._dq_whole_range and all(n == size[a.attr] for a, n in zip(gl.load.args, t.shape))

    def mode(self, t: torch.Tensor):
        """The launch context for kernels on ``t``'s data (its GPU, or the interpreter)."""
        return launch_scope(t, self.interpret)

    def _consts(self, dtype):
        upcast = self.interpret and dtype == torch.bfloat16
        prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
        return dict(HEAD_D=self.head_dim, BLOCK_D=self.bd, HAS_D2=self.bd2 > 0, BLOCK_D2=max(self.bd2, 16),
                    HEAD_DV=self.head_dim_v, BLOCK_DV=self.bdv, UPCAST=upcast, DOT_PRECISION=prec)

    def _even_dims(self) -> bool:
        """Both head dims fill their tiles: full rows load without a column mask (EVEN_KV, EVEN_Q)."""
        return self.head_dim == self.bd + self.bd2 and self.head_dim_v == self.bdv

    def _run(self, kernel, grid, args, consts, num_warps=4, num_stages=3):
        """One launch (inside ``self.mode``): through the interpreter, or the compiled kernel kept by
        ``fastlaunch`` (Triton's defaults: 4 warps, 3 stages)."""
        if self.interpret:
            kernel[grid](*args, **consts, num_warps=num_warps, num_stages=num_stages)
        else:
            launcher(kernel)(grid, args, consts, num_warps, num_stages)

    def _prepared(self, kernel, grid, args, consts, num_warps, num_stages):
        """Launch, and return the launch of later argument lists of the same key (``_launch``)."""
        if self.interpret:
            self._run(kernel, grid, args, consts, num_warps, num_stages)
            return lambda a: kernel[grid](*a, **consts, num_warps=num_warps, num_stages=num_stages)
        return launcher(kernel).prepared(grid, args, consts, num_warps, num_stages)

    def call_key(self, q, k, v, scale, extras, buffers) -> tuple:
        """What fixes every launch decision of a forward call (tiles, grid, constants, the arguments'
        specialisation) but the tensors' addresses: q/k/v's dtype, shapes, strides and alignment, the
        scale's sign, the extra and captured tensors. Calls with one key share memoised launches."""
        return (q.dtype, q.shape, q.stride(), k.shape, k.stride(), v.stride(), q.data_ptr() & 15,
                k.data_ptr() & 15, v.data_ptr() & 15, scale > 0, extras.key(), *map(tensor_key, buffers))

    def _kernel(self, suffix: str):
        """The module's kernel ``<name>_<suffix>``, looked up once."""
        got = self._kernels.get(suffix)
        if got is None:
            got = self._kernels[suffix] = getattr(self.mod, f"{self.spec.name}_{suffix}")
            self._signature_of[got] = suffix
        return got

    def _memo_of(self, kernel, key) -> Memo | None:
        """The memoised launch of ``kernel`` for this call key, if a call with it launched before."""
        return self._memo.get((kernel, key)) if key is not None else None

    @staticmethod
    def _fixed(memo: Memo | None, make):
        """The launch arguments the call key fixes (strides, lengths, sections): the memo's, or
        ``make()`` when there is none (or, under VERIFY_MEMO, to check the memo's against)."""
        if memo is None:
            return make()
        if VERIFY_MEMO and memo.fixed != make():
            raise AssertionError(f"launch memo: a call key was memoised with arguments {memo.fixed}, "
                                 f"this call needs {make()}")
        return memo.fixed

    def _memoised(self, memo: Memo | None, args) -> bool:
        """Launch the memoised way when there is a memo (and no VERIFY_MEMO: then ``_launch`` checks
        and launches it); False: ``_launch`` decides, launches and memoises."""
        if memo is None or VERIFY_MEMO:
            return False
        scope = self.mode(args[0])
        if scope is NO_CONTEXT and not memo.allocator:  # the current device, nothing to set: no with
            memo.launch(args)
            return True
        with scope, (_descriptor_scratch() if memo.allocator else NO_CONTEXT):
            memo.launch(args)
        return True

    def _launch(self, kernel, grid, args, cfg: TileConfig, which: str, table_args=None, key=None, fixed=None,
                tiles=True, **consts):
        """Launch; on a shared-memory overflow retry with smaller tiles (and remember them).
        ``table_args(cfg)``: the block-table arguments, built for the tiles actually launched.
        ``key``: the call's key (``call_key`` and more); the launch's decisions are memoised by it,
        with ``fixed``, the arguments the key fixes (``_memoised`` takes them on the next call). ``tiles=False``: the kernel takes no
        BLOCK_M/BLOCK_N from ``cfg`` (only its warps and stages) and has no smaller fallback."""
        memo_key = (kernel, key) if key is not None else None
        hit = self._memo.get(memo_key) if memo_key is not None else None  # here only when VERIFY_MEMO
        while True:
            try:
                # constants that depend on the tile size are given as functions of the config
                cs = {k_: (v_(cfg) if callable(v_) else v_) for k_, v_ in consts.items()}
                targs = table_args(cfg) if table_args is not None else []
                scratch = (cs.get("KV_TMA") or cs.get("W_TMA")) and not self.interpret
                full, g = [*args, *targs], grid(cfg)
                all_consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cs) if tiles else cs
                check = (g, all_consts, arg_classes(full)) if VERIFY_MEMO and memo_key is not None else None
                if hit is not None and check != hit.check:
                    raise AssertionError(f"launch memo of {which}: the call key {key} was memoised with "
                                         f"{hit.check}, this call needs {check}")
                if hit is None:  # a launch decided here (not memoised): check it against the signature
                    kname = self._signature_of[kernel]
                    check_arguments(kname, self.spec.lowering.signature(kname), full, all_consts)
                with self.mode(args[0]), (_descriptor_scratch() if scratch else NO_CONTEXT):
                    if hit is not None:
                        hit.launch(full)
                    elif memo_key is None:
                        self._run(kernel, g, full, all_consts, cfg.num_warps, cfg.num_stages)
                    else:
                        launch = self._prepared(kernel, g, full, all_consts, cfg.num_warps, cfg.num_stages)
                        if len(self._memo) >= MEMO_SIZE:
                            self._memo.clear()
                        # a Direct launch allocates the descriptors' scratch itself
                        self._memo[memo_key] = Memo(launch, fixed, check,
                                                    bool(scratch) and not isinstance(launch, Direct))
                return cfg
            except triton.runtime.errors.OutOfResources:
                smaller = cfg.smaller() if tiles else None
                if smaller is not None and self.spec.tiles and (smaller.block_m, smaller.block_n) != (cfg.block_m, cfg.block_n):
                    smaller = None  # box visit plans are built for these tile sizes
                if smaller is None:
                    raise
                cfg = smaller
                self.cfg = Configs(**{**self.cfg.__dict__, which: cfg})

    # -- block tables --------------------------------------------------------------------------
    def _table_args(self, tables: BlockTables | None, buffers, transposed: bool):
        """The block-table arguments as a function of the launched tiles (None: no tables)."""
        if not self.spec.data_dependent:
            return None
        if transposed:  # dK/dV: rows are key tiles
            return lambda c: self.table(tables, buffers, True, c.block_n, c.block_m).args()
        return lambda c: self.table(tables, buffers, False, c.block_m, c.block_n).args()

    def table(self, tables: BlockTables | None, buffers, transposed: bool, br: int, bc: int) -> Table:
        """The block table for row tiles ``br`` and column tiles ``bc``: ``tables``' own, or built
        now and kept there (``runtime/tables.py: build_table``)."""
        got = tables.tables.get((transposed, br, bc)) if tables is not None else None
        if got is None:
            from .tables import build_table
            got = build_table(self, tables, buffers, transposed, br, bc)
        return got

    def new_tables(self, q, k, buffers) -> BlockTables:
        t = BlockTables((q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        t.device = q.device
        return t

    # -- forward -------------------------------------------------------------------------------
    def forward(self, q, k, v, scale, buffers, tables, extras: Extras | None = None, count_visits=False, key=None):
        """Returns (out, lse or None for sigmoid, visits or None). ``key``: the call's ``call_key``
        (None: no memo, as for block tables and visit counts)."""
        extras = extras or Extras()
        if (self.hopper is not None and not self.precise_delta
                and self.hopper.applies(q, k, v, extras, tables, count_visits)):
            out, lse = self.hopper.forward(q, k, v, scale, sinks=extras.sinks, buffers=buffers)
            return out, lse, None
        B, Hq, Lq = q.shape[:3]
        Hkv, Lkv = k.shape[1], k.shape[2]
        if self.spec.tiles:
            from ..passes.box_analysis import required_length
            need = required_length(self.spec)
            if min(Lq, Lkv) < need:
                raise ValueError(f"the pattern's layout has {need} tokens up to the end of its grid; "
                                 f"got Lq={Lq}, Lkv={Lkv}")
        softmax = self.spec.normalizer == "softmax"
        wide = self.precise_delta and softmax and q.element_size() < 4  # a float32 output for the backward
        out = _new((B, Hq, Lq, v.shape[3]), q, torch.float32 if wide else None)
        # sigmoid kernels keep no row statistics: no lse (``out`` fills its pointer slot)
        lse = _new((B, Hq, Lq), q, acc_dtype(q)) if softmax else None
        stats = lse if softmax else out
        visits = stats
        if count_visits:
            # [0]: tiles each program visited; [1]: how many of them in constant runs (codegen/runs.py);
            # sized for these tiles or any of 16 rows or more (a shared-memory retry may shrink the
            # tiles down to 16; layout plans may fix smaller ones)
            bm = min(self.forward_tiles(q)[1].block_m, 16)
            visits = torch.zeros(2 * B * Hq * cdiv(Lq, bm), dtype=torch.int32, device=q.device)
        kernel = self._kernel("fwd")
        # block tables and visit counts are per-call tensors of the tiles' shape: no memo
        memo = self._memo_of(kernel, key if tables is None and not count_visits else None)
        head, tail = fixed = self._fixed(memo, lambda: (
            [*_strides(q), *_strides(k), *_strides(v), *_strides(out), Hq, Hq // Hkv, Lq, Lkv],
            [self._kv_section(q, k, v)]))
        args = [q, k, v, out, stats, visits, *head, scale, *tail, *extras.args(q, k), *buffer_args(buffers, self.learnable)]
        if self._memoised(memo, args):
            return out, lse, None
        which, cfg = self.forward_tiles(q)
        cfg = self._launch(kernel, lambda c: (cdiv(Lq, c.block_m), B * Hq), args, cfg, which,
                           table_args=self._table_args(tables, buffers, False), key=key, fixed=fixed,
                           COUNT_VISITS=count_visits, **self._consts(q.dtype), **extras.consts(),
                           EVEN_KV=lambda c: Lkv % c.block_n == 0 and self._even_dims(),
                           KV_TMA=lambda c: c.tma and tma_ready(self.interpret, k, v),
                           W_TMA=lambda c: c.tma and extras.w is not None and tma_ready(self.interpret, extras.w),
                           # float64: Triton would round the folded scale·log2(e) to a float32 scalar
                           FOLD_SCALE=scale > 0 and q.dtype != torch.float64)
        if count_visits:
            n = B * Hq * cdiv(Lq, cfg.block_m)
            visits = visits[:2 * n].view(2, B * Hq, n // (B * Hq))
        return out, lse, (visits if count_visits else None)

    # -- backward ------------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, dout, dlse, scale, buffers, tables, extras: Extras | None = None,
                 key=None):
        """Returns (dq, dk, dv, dsinks, du, dw, {slot: dbuf}). ``key``: the forward's ``call_key``
        (None: no memo)."""
        extras = extras or Extras()
        B, Hq, Lq = q.shape[:3]
        Hkv, Lkv = k.shape[1], k.shape[2]
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        det = self.deterministic
        if key is not None and tables is None:
            key = (key, tensor_key(dout), dlse is None, det)
        else:
            key = None
        softmax = self.spec.normalizer == "softmax"
        if not softmax:
            lse = delta = out  # placeholders: sigmoid kernels read no row statistics
        else:
            delta = torch.empty((B, Hq, Lq), dtype=acc_dtype(q), device=q.device)
            bm = 64 if not self.interpret else self.cfg.dq.block_m
            kernel = self._kernel("bwd_delta")
            args = [out, dout, delta, *_strides(out), *_strides(dout), Hq, Lq]
            if not self._memoised(self._memo_of(kernel, key), args):
                self._launch(kernel, lambda c: (cdiv(Lq, bm), B * Hq), args, TileConfig(bm, bm, 4, 3), "delta",
                             key=key, tiles=False, HEAD_DV=self.head_dim_v, BLOCK_M=bm, BLOCK_DV=self.bdv)
            if dlse is not None:
                # d lse_i / d s_ij = p_ij, so an lse gradient shifts the softmax correction term
                delta = delta - dlse.to(delta.dtype)
        dq, dk, dv = _like(q), _like(k), _like(v)
        R = extras.u.shape[3] if extras.u is not None else 1
        du = torch.empty((B, Hq, Lq, R), dtype=acc_dtype(q), device=q.device) if extras.u is not None else q
        dw = torch.empty((B, Hq, Lkv, R), dtype=acc_dtype(q), device=q.device) if extras.u is not None else q
        dbufs, partials = {}, []
        gl_args, gl_consts = [], {}
        for i, gl in enumerate(self.spec.grad_loads):
            t = buffers[gl.slot]
            exact = gl_exact(gl, B, Hq)
            if gl.slot not in dbufs:
                # contiguous, like the copy of the tensor the kernels read (see buffer_args); a
                # full-size tensor read once, whose elements are each written by one program, gets
                # its gradient in its own dtype (no float32 copy and conversion pass)
                alone = exact and gl.slot in self._loaded_once
                if alone and self._zero_fills(gl, t, B, Hq, Lq, Lkv):
                    # the dQ kernel writes every element: visited tiles their gradient, the rest zeros
                    dbufs[gl.slot] = _new(t.shape, t)
                    gl_consts[f"GL{i}_ZERO_FILL"] = True
                else:
                    dbufs[gl.slot] = torch.zeros(t.shape, dtype=t.dtype if alone else acc_dtype(q), device=t.device)
            gl_consts.setdefault(f"GL{i}_ZERO_FILL", False)
            gl_consts[f"GL{i}_ATOMIC"] = not exact
            gl_consts[f"GL{i}_WIDE"] = wide_offsets(t)
            if det and gl.scope in ("program", "row"):
                # per-program partial sums and their offsets; sized for any tile of 16 rows or more
                n = B * Hq * (cdiv(Lq, 16) if gl.scope == "program" else Lq + 256)
                vals = torch.zeros(n, dtype=acc_dtype(q), device=q.device)
                offs = torch.full((n,), -1, dtype=torch.int64, device=q.device)
                gl_args += [vals, offs]
                partials.append((gl.slot, vals, offs, 1))
            elif det and gl.scope in ("scatter", "col"):
                # one row of partial sums per program over the slice of the table it can touch
                n, row = private_rows(gl, t.shape, B, Hq, Lq)
                vals = torch.zeros(n * row, dtype=acc_dtype(q), device=q.device)
                offs = torch.full((n,), -1, dtype=torch.int64, device=q.device)
                gl_args += [vals, offs]
                partials.append((gl.slot, vals, offs, row))
            else:
                gl_args += [dbufs[gl.slot], dbufs[gl.slot]]
        if self.spec.grad_loads:
            gl_consts["DETERMINISTIC"] = det
        xargs = extras.args(q, k)
        bargs = buffer_args(buffers, self.learnable)
        dkdv, dqk = self._kernel("bwd_dkdv"), self._kernel("bwd_dq")
        memo = self._memo_of(dkdv, key)
        head, tail = fixed = self._fixed(memo, lambda: (
            [*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dk), *_strides(dv),
             Hq, Hkv, Hq // Hkv, Lq, Lkv],
            # the programs of a K/V head visit its query heads one after another
            [self.section(q, B * Hkv, _row_bytes(q, dout))]))
        args = [q, k, v, dout, dk, dv, lse, delta, dw, *head, scale, *tail, *xargs, *bargs]
        consts = None
        if not self._memoised(memo, args):
            consts = {**self._consts(q.dtype), **extras.consts()}
            self._launch(dkdv, lambda c: (cdiv(Lkv, c.block_n), B * Hkv), args, self.cfg.dkdv, "dkdv",
                         table_args=self._table_args(tables, buffers, True), key=key, fixed=fixed, **consts,
                         EVEN_Q=lambda c: Lq % c.block_m == 0 and self._even_dims())
        memo = self._memo_of(dqk, key)
        head, tail = fixed = self._fixed(memo, lambda: (
            [*_strides(q), *_strides(k), *_strides(v), *_strides(dout), *_strides(dq), Hq, Hq // Hkv, Lq, Lkv],
            [self._kv_section(q, k, v)]))
        args = [q, k, v, dout, dq, lse, delta, du, *head, scale, *tail, *xargs, *bargs, *gl_args]
        if not self._memoised(memo, args):
            consts = consts or {**self._consts(q.dtype), **extras.consts()}
            self._launch(dqk, lambda c: (cdiv(Lq, c.block_m), B * Hq), args, self.cfg.dq, "dq",
                         table_args=self._table_args(tables, buffers, False), key=key, fixed=fixed, **consts,
                         **gl_consts, EVEN_KV=lambda c: Lkv % c.block_n == 0 and self._even_dims())
        dsinks = sink_gradient(extras.sinks, lse, delta) if extras.sinks is not None else None
        if extras.u is not None:
            du = _reduce_to(du, extras.u.shape).to(extras.u.dtype)
            if extras.w.shape[1] == Hkv and Hkv != Hq:
                dw = dw.view(B, Hkv, Hq // Hkv, Lkv, R).sum(2)
            dw = _reduce_to(dw, extras.w.shape).to(extras.w.dtype)
        else:
            du = dw = None
        for slot, vals, offs, row in partials:
            _ordered_rows_add(dbufs[slot], vals.view(-1, row), offs)
        if dbufs:
            dbufs = {s_: g.to(buffers[s_].dtype) for s_, g in dbufs.items()}
        return dq, dk, dv, dsinks, du, dw, dbufs


def sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """∂L/∂sinks from the rows' logsumexp ``lse`` [B, H, L] and ``delta`` = rowsum(dO·O) − dlse
    (dense and gather kernels alike): d out_i / d sink = −p_sink_i · out_i and
    d lse_i / d sink = p_sink_i."""
    p_sink = torch.exp(sinks.to(lse.dtype)[None, :, None] - lse)  # lse is float64 for float64 calls
    return -(p_sink * delta).sum(dim=(0, 2)).to(sinks.dtype)


def _row_bytes(*tensors) -> int:
    """Bytes of one head's rows of these [B, H, L, D] tensors together."""
    return sum(t.shape[2] * t.shape[3] * t.element_size() for t in tensors)


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
    return B * Hq * cdiv(Lq, 16), math.prod(shape[d0:])


def _ordered_rows_add(dbuf: torch.Tensor, rows: torch.Tensor, offs: torch.Tensor) -> None:
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


def _reduce_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Sum a gradient over the dimensions an input broadcast (size 1 there)."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dim=dims, keepdim=True) if dims else g
