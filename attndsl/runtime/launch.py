"""The dense kernels' runner: outputs, grids, launches (memoised per call key, retried with smaller
tiles on a shared-memory overflow) and the backward's gradient buffers.

The pieces it shares with the gather runner (``selectors/sparse.py``) live in modules of their own:
arguments by name (``marshal``), the launch memo (``memo``), one launch (``fastlaunch.run``), tile
policy (``config``) and gradient post-processing (``gradients``).
"""
from __future__ import annotations

import os

import torch
import triton

from . import fastlaunch
from .blocktables import BlockTables, Table
from .config import Configs, HeadDims, TileConfig, atomic_dq, delta_in_dq, device_properties, dq_tma, \
    forward_tiles, grid_section, multiprocessors, retry_tiles
from .fastlaunch import Direct
from .hopper import HopperForward
from .hopper import enabled as hopper_enabled
from .hopper_bwd import HopperBackward
from .hopper_bwd import backward_enabled as hopper_bwd_enabled
from .gradients import gl_exact, ordered_rows_add, private_rows, reduce_to, sink_gradient, wide_offsets
from .marshal import Extras, buffer_layout, buffer_tensors, fill, qkv_strides, strides_named
from .memo import MEMO_SIZE, VERIFY_MEMO, Memo, arg_classes, cdiv, descriptor_scratch, own_slots, tensor_key
from .scope import NO_CONTEXT, launch_scope

POISON = os.environ.get("ATTNDSL_POISON", "0") == "1"
_NONE = object()  # a dict's "no entry" where None is an entry


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


def _tma_device(dev: torch.device) -> bool:
    """An NVIDIA GPU from Hopper on."""
    return dev.type == "cuda" and torch.version.hip is None and device_properties(dev.index).major >= 9


def _poisoned(t):
    """``t``, filled with NaN (or -7) under ATTNDSL_POISON so an element a kernel forgets shows."""
    if POISON:
        t.fill_(float("nan") if t.dtype.is_floating_point else -7)
    return t


def _new(shape, like, dtype=None):
    """An output of ``shape`` on ``like``'s device."""
    if dtype is None and shape == like.shape:
        return _like(like)
    return _poisoned(torch.empty(*shape, device=like.device, dtype=dtype or like.dtype))  # ints: see _alloc


def _like(t):
    """A contiguous output of ``t``'s shape and dtype: ``empty_like``, at a third of ``empty``'s host time."""
    return _poisoned(torch.empty_like(t, memory_format=torch.contiguous_format))


class Runner:
    """Launches the kernels of one spec for one backend and pair of head dims (query/key, value).

    Each launch names its values after the kernel's parameters (``spec.lowering.signature``): the
    call's own (tensors, scale) and those its call key fixes (strides, lengths, sections), which are
    computed only when a launch is decided, not when it is taken from the memo."""

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
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.dims = HeadDims(head_dim, self.head_dim_v)
        # the query/key head dim in one power-of-two part, or two (192 = 128 + 64: no padding to 256)
        self.bd, self.bd2, self.bdv = self.dims.tiles
        #: (kernel, call key) -> Memo: repeated calls of one shape skip the launch decisions
        self._memo: dict = {}
        #: call key -> its FastForward; backward key (``_backward_key``) -> its FastBackward (None: none)
        self._fast_fwd: dict = {}
        self._fast_bwd: dict = {}
        self._kernels: dict = {}
        self._signature_of: dict = {}  # kernel -> its name in spec.lowering.signatures
        # the Hopper (sm_90, Gluon) forward: whether the spec allows it is decided here, once
        # (``hopper.unsupported``); whether a call takes it, per call (runtime/hopper.py)
        self.hopper = None if interpret else HopperForward(spec)
        self.hopper_bwd = None if interpret else HopperBackward(spec)  # the same for the backward (hopper_bwd.py)

    # -- tile policy (runtime/config.py) ---------------------------------------------------------
    def section(self, t: torch.Tensor, n_heads: int, bytes_per_head: int) -> int:
        """Heads per section of a grid over ``n_heads`` rows (batch*head) on ``t``'s device whose
        programs each read ``bytes_per_head`` of their head (see ``config.section``)."""
        return grid_section(t.device, self.interpret, n_heads, bytes_per_head)

    def _kv_section(self, q, k, v) -> int:
        """The section of a grid over query heads whose programs read their K/V head (the forward and
        dQ): a K/V head serves GROUP query heads, so each counts a GROUP-th of its rows."""
        Hq, Hkv = q.shape[1], k.shape[1]
        return self.section(q, q.shape[0] * Hq, _row_bytes(k, v) // (Hq // Hkv))

    def forward_tiles(self, q) -> tuple[str, TileConfig]:
        """The forward's tiles for query ``q`` (which of ``self.cfg``'s entries, and its config)."""
        B, Hq, Lq = q.shape[:3]
        return forward_tiles(self.cfg, B * Hq * cdiv(Lq, self.cfg.fwd.block_m),
                             multiprocessors(q.device, self.interpret))

    def _zero_fills(self, gl, t, B, Hq, Lq, Lkv) -> bool:
        """Can the dQ kernel zero the untouched part of this full-size gradient itself? Only when its
        programs cover the tensor: one per (b, h, query tile), each dimension as long as the call's."""
        size = {"b": B, "h": Hq, "q": Lq, "kv": Lkv}
        return self._dq_whole_range and all(n == size[a.attr] for a, n in zip(gl.load.args, t.shape))

    def mode(self, t: torch.Tensor):
        """The launch context for kernels on ``t``'s data (its GPU, or the interpreter)."""
        return launch_scope(t, self.interpret)

    def _consts(self, dtype):
        return self.dims.consts(dtype, self.interpret)

    # -- launches ---------------------------------------------------------------------------------
    def _run(self, kernel, grid, args, consts, num_warps=4, num_stages=3):
        """One launch (inside ``self.mode``): ``fastlaunch.run``."""
        fastlaunch.run(kernel, grid, args, consts, self.interpret, num_warps, num_stages)

    def _prepared(self, kernel, grid, args, consts, num_warps, num_stages):
        """Launch, and return the launch of later argument lists of the same key (``_launch``)."""
        return fastlaunch.prepared(kernel, grid, args, consts, self.interpret, num_warps, num_stages)

    @staticmethod
    def call_key(q, k, v, scale, extras, buffers) -> tuple:
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

    def _memoised(self, memo: Memo | None, own: dict) -> bool:
        """Launch the memoised way, with the call's ``own`` values put in the memo's arguments, when
        there is a memo (and no VERIFY_MEMO: then ``_launch`` checks and launches it); False:
        ``_launch`` decides, launches and memoises."""
        if memo is None or VERIFY_MEMO:
            return False
        args = memo.args(own)
        scope = self.mode(args[0])
        if scope is NO_CONTEXT and not memo.allocator:  # the current device, nothing to set: no with
            memo.launch(args)
            return True
        with scope, (descriptor_scratch() if memo.allocator else NO_CONTEXT):
            memo.launch(args)
        return True

    @staticmethod
    def _tables_key(key, tables):
        """The memo key of a call with ``tables``: ``key`` marked as a block-table call; None (no
        memo) for tables other than ``BlockTables`` (a block selection's, whose layout is its own)."""
        if tables is None or key is None:
            return key
        return (key, "tables") if type(tables) is BlockTables else None

    def _table_memo(self, kernel, key, own: dict, tables, buffers, transposed: bool):
        """``(memo, own, key)`` of a launch: the memo of ``kernel`` for ``key`` and the call's own
        values. With block tables, the table of the memoised tiles joins the own values (its tensors
        are the call's: ``TABLES`` keeps them per captured tensors' versions), provided its
        arguments specialise as the memoised ones did; otherwise no memo and no key (decided afresh)."""
        memo = self._memo_of(kernel, key)
        if memo is None or tables is None:
            return memo, own, key
        targs = self._table_args(tables, buffers, transposed)(memo.cfg)
        if arg_classes(targs) != memo.table_classes:
            return None, own, None
        return memo, {**own, **dict(zip(Table.PARAMS, targs, strict=True))}, key

    def _launch(self, kernel, grid, own: dict, cfg: TileConfig, which: str, table_args=None, key=None,
                fixed=None, tiles=True, **consts):
        """Launch ``kernel`` with its arguments filled by name from the call's ``own`` values and
        ``fixed()``, those its call key fixes; on a shared-memory overflow retry with smaller tiles
        (``config.retry_tiles``; and remember them). ``table_args(cfg)``: the block-table arguments
        (``Table.args``), built for the tiles actually launched. ``key``: the call's key
        (``call_key`` and more); the launch's decisions are memoised by it (``_memoised`` takes them
        on the next call). ``tiles=False``: the kernel takes no BLOCK_M/BLOCK_N from ``cfg`` (only
        its warps and stages) and has no smaller fallback. Returns the config launched."""
        kname = self._signature_of[kernel]
        params = self.spec.lowering.signature(kname)
        memo_key = (kernel, key) if key is not None else None
        hit = self._memo.get(memo_key) if memo_key is not None else None  # here only when VERIFY_MEMO
        named = {**own, **fixed()} if fixed is not None else own
        while True:
            try:
                # constants that depend on the tile size are given as functions of the config
                cs = {k_: (v_(cfg) if callable(v_) else v_) for k_, v_ in consts.items()}
                own_all, targs = own, None
                if table_args is not None:  # the table's arguments are the call's own (see _table_memo)
                    targs = table_args(cfg)
                    tnamed = dict(zip(Table.PARAMS, targs, strict=True))
                    named, own_all = {**named, **tnamed}, {**own, **tnamed}
                scratch = (cs.get("KV_TMA") or cs.get("W_TMA") or cs.get("DQ_TMA")) and not self.interpret
                g = grid(cfg)
                all_consts = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **cs) if tiles else cs
                full = fill(kname, params, named, all_consts)
                check = (g, all_consts, arg_classes(full)) if VERIFY_MEMO and memo_key is not None else None
                if hit is not None:
                    if check != hit.check:
                        raise AssertionError(f"launch memo of {which}: the call key {key} was memoised with "
                                             f"{hit.check}, this call needs {check}")
                    hit.verify(kname, own_all, full)
                with self.mode(full[0]), (descriptor_scratch() if scratch else NO_CONTEXT):
                    if hit is not None:
                        hit.launch(full)
                    elif memo_key is None:
                        self._run(kernel, g, full, all_consts, cfg.num_warps, cfg.num_stages)
                    else:
                        launch = self._prepared(kernel, g, full, all_consts, cfg.num_warps, cfg.num_stages)
                        if len(self._memo) >= MEMO_SIZE:
                            self._memo.clear()
                        # a Direct launch allocates the descriptors' scratch itself
                        self._memo[memo_key] = Memo(launch, full, own_slots(kname, params, own_all), check,
                                                    bool(scratch) and not isinstance(launch, Direct), cfg=cfg,
                                                    table_classes=None if targs is None else arg_classes(targs))
                return cfg
            except triton.runtime.errors.OutOfResources:
                smaller = retry_tiles(cfg, bool(self.spec.tiles)) if tiles else None
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
        got = tables.get_table((transposed, br, bc)) if tables is not None else None
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
        (None: no memo; block tables and visit counts are never memoised)."""
        extras = extras or Extras()
        if (self.hopper is not None and not self.precise_delta
                and self.hopper.applies(q, k, v, extras, tables, count_visits)):
            out, lse = self.hopper.forward(q, k, v, scale, sinks=extras.sinks, buffers=buffers)
            return out, lse, None
        B, Hq, Lq = q.shape[:3]
        Hkv, Lkv = k.shape[1], k.shape[2]
        need = self.spec.lowering.required_length
        if need and min(Lq, Lkv) < need:
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
        fkey = key
        # visit counts are per-call tensors of the tiles' shape: no memo; block tables: see _table_memo
        key = None if count_visits else self._tables_key(key, tables)
        bufs = buffer_tensors(buffers, self.learnable)
        own = self._forward_own(q, k, v, out, stats, visits, scale, extras, bufs)
        memo, own, key = self._table_memo(kernel, key, own, tables, buffers, False)
        if self._memoised(memo, own):
            return out, lse, None
        which, cfg = self.forward_tiles(q)
        cfg = self._launch(kernel, lambda c: (cdiv(Lq, c.block_m), B * Hq), own, cfg, which,
                           table_args=self._table_args(tables, buffers, False), key=key,
                           fixed=lambda: {**qkv_strides(q, k, v), **strides_named(out, "ob", "oh", "om", "od"),
                                          "HQ": Hq, "GROUP": Hq // Hkv, "LQ": Lq, "LKV": Lkv,
                                          "SECTION": self._kv_section(q, k, v), **extras.layout(q, k),
                                          **buffer_layout(bufs)},
                           COUNT_VISITS=count_visits, **self._consts(q.dtype), **extras.consts(),
                           EVEN_KV=lambda c: Lkv % c.block_n == 0 and self.dims.even,
                           KV_TMA=lambda c: c.tma and tma_ready(self.interpret, k, v),
                           W_TMA=lambda c: c.tma and extras.w is not None and tma_ready(self.interpret, extras.w),
                           # float64: Triton would round the folded scale·log2(e) to a float32 scalar
                           FOLD_SCALE=scale > 0 and q.dtype != torch.float64)
        if count_visits:
            n = B * Hq * cdiv(Lq, cfg.block_m)
            visits = visits[:2 * n].view(2, B * Hq, n // (B * Hq))
        elif key is not None and key not in self._fast_fwd:  # key: None for tables other than BlockTables
            self._keep(self._fast_fwd, key, FastForward.make(self, fkey, self._memo.get((kernel, key)), out, lse,
                                                            buffers))
        return out, lse, (visits if count_visits else None)

    @staticmethod
    def _forward_own(q, k, v, out, stats, visits, scale, extras, bufs) -> dict:
        """The forward kernel's values that are the call's own (not fixed by its key), by name, in
        the order its signature leads with them (``FastForward`` passes the same as a list)."""
        return {"Q": q, "K": k, "V": v, "Out": out, "Lse": stats, "VISITS": visits, "sm_scale": scale, **extras.own(q),
                **bufs}

    def _keep(self, fast: dict, key, made) -> None:
        """Keep a prepared launch (``FastForward``/``FastBackward``; None: the key has none) for ``key``."""
        if len(fast) >= MEMO_SIZE:
            fast.clear()
        fast[key] = made

    # -- prepared calls: the launches of a call key a holder sees again ----------------------------
    def forward_prepared(self, p: "Prepared", q, k, v, scale, buffers, extras: Extras, tables=None):
        """``forward`` of a call with the call key ``p.key`` and no block tables, or the
        :class:`BlockTables` of a data-dependent mask: the key's ``FastForward`` once a call of the
        key has launched. Returns (out, lse or None)."""
        f = p.fwd
        if f is not None:
            got = f(q, k, v, scale, buffers, extras, tables)
            if got is not None:
                return got
        h = self.hopper
        if h is not None and tables is None and not self.precise_delta:
            # a key the Hopper forward takes has no FastForward: its verdict, kept per switch state
            on = hopper_enabled()
            verdict = p.hopper
            if verdict is None or verdict[0] is not on:
                verdict = p.hopper = (on, h.applies(q, k, v, extras))
            if verdict[1]:
                return h.forward(q, k, v, scale, sinks=extras.sinks, buffers=buffers, key=p.key)
        out, lse, _ = self.forward(q, k, v, scale, buffers, tables, extras, key=p.key)
        p.fwd = self._fast_fwd.get(self._tables_key(p.key, tables))
        return out, lse

    def backward_prepared(self, p: "Prepared", q, k, v, out, lse, dout, dlse, scale, buffers, extras: Extras,
                          tables=None):
        """``backward`` of a call made by ``forward_prepared`` (with its ``tables``): the
        ``FastBackward`` of its key and this gradient's layout (dtype, shape, strides, alignment;
        whether there is an lse gradient) once one has launched."""
        b = p.bwd
        if b is not None and b.dlse_none == (dlse is None):
            # a gradient laid out as the memoised one's (whose last stride is 1): no stride check
            key = tensor_key(dout)
            if key != b.dout_key and dout.stride(-1) != 1:
                dout = dout.contiguous()
                key = tensor_key(dout)
            if key == b.dout_key:
                got = b(q, k, v, out, lse, dout, dlse, scale, buffers, extras, tables)
                if got is not None:
                    return got
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        got = self.backward(q, k, v, out, lse, dout, dlse, scale, buffers, tables, extras, key=p.key)
        p.bwd = self._fast_bwd.get(self._tables_key(self._backward_key(p.key, dout, dlse), tables))
        return got

    def _backward_key(self, key, dout, dlse, mode: tuple | None = None) -> tuple:
        """The backward's memo key: the forward's call key, the output gradient's layout, whether
        there is an lse gradient, the determinism and the dQ mode (``mode``: ``_dq_mode``'s answer,
        asked here when None)."""
        return (key, tensor_key(dout), dlse is None, self.deterministic, _dq_mode(self) if mode is None else mode)

    # -- backward ------------------------------------------------------------------------------
    def backward(self, q, k, v, out, lse, dout, dlse, scale, buffers, tables, extras: Extras | None = None,
                 key=None, hop: bool | None = None):
        """Returns (dq, dk, dv, dsinks, du, dw, {slot: dbuf}). ``key``: the forward's ``call_key``
        (None: no memo); ``hop``: whether the Hopper backward takes the call, where the caller has
        asked it (None: asked here).

        dQ comes from the dQ kernel, or (``config.atomic_dq``: never deterministic) from the dK/dV
        kernel, which then adds it (and dU, and the learnable tensors' gradients) into zeroed
        float32 buffers with atomic adds; the dQ kernel does not run and one pass scales and
        casts dQ."""
        extras = extras or Extras()
        B, Hq, Lq = q.shape[:3]
        Hkv, Lkv = k.shape[1], k.shape[2]
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        det = self.deterministic
        mode = _dq_mode(self)  # asked once: the memo key and the launch's DQ_ATOMIC / DQ_TMA agree
        # the Hopper (sm_90) backward: dK/dV, and dQ where its configuration adds it (else the
        # portable dQ kernel); it replaces the portable dK/dV kernel and its atomic dQ
        if hop is None:
            hop = self.hopper_bwd is not None and self.hopper_bwd.applies(q, k, v, dout, extras, tables,
                                                                          self.precise_delta)
        atomic = mode[0] and not hop
        fkey = key
        key = self._tables_key(self._backward_key(key, dout, dlse, mode), tables) if key is not None else None
        softmax = self.spec.normalizer == "softmax"
        here = delta_in_dq(softmax, dlse, mode[0], hop)
        if not softmax:
            lse = delta = out  # placeholders: sigmoid kernels read no row statistics
            delta0 = None
        else:
            delta = delta0 = torch.empty((B, Hq, Lq), dtype=acc_dtype(q), device=q.device)
            bm = 64 if not self.interpret else self.cfg.dq.block_m
            kernel = self._kernel("bwd_delta")
            own = {"Out": out, "DO": dout, "Delta": delta}
            if not here and not self._memoised(self._memo_of(kernel, key), own):
                self._launch(kernel, lambda c: (cdiv(Lq, bm), B * Hq), own, TileConfig(bm, bm, 4, 3), "delta",
                             key=key, tiles=False,
                             fixed=lambda: {**strides_named(out, "ob", "oh", "om", "od"),
                                            **strides_named(dout, "db", "dh", "dm", "dd"), "HQ": Hq, "LQ": Lq},
                             HEAD_DV=self.head_dim_v, BLOCK_M=bm, BLOCK_DV=self.bdv)
            if dlse is not None:
                # d lse_i / d s_ij = p_ij, so an lse gradient shifts the softmax correction term
                delta = delta - dlse.to(delta.dtype)
        dq, dk, dv = _like(q), _like(k), _like(v)
        # atomic dQ: unscaled float32 sums, contiguous [B, Hq, Lq, D] (the kernel's row offsets)
        dqa = torch.zeros(q.shape, dtype=acc_dtype(q), device=q.device) if atomic else q
        R = extras.u.shape[3] if extras.u is not None else 1
        new = torch.zeros if atomic else torch.empty  # atomic: dU is added into, not stored
        du = new((B, Hq, Lq, R), dtype=acc_dtype(q), device=q.device) if extras.u is not None else q
        dw = torch.empty((B, Hq, Lkv, R), dtype=acc_dtype(q), device=q.device) if extras.u is not None else q
        dbufs, partials, gl_named, gl_consts = self._gradient_buffers(q, buffers, B, Hq, Lq, Lkv, atomic)
        xown = extras.own(q)
        bufs = buffer_tensors(buffers, self.learnable)

        def shared():  # the key-fixed arguments of the dK/dV and dQ kernels alike
            return {**qkv_strides(q, k, v), **strides_named(dout, "dob", "doh", "dom", "dod"), "HQ": Hq,
                    "GROUP": Hq // Hkv, "LQ": Lq, "LKV": Lkv, **extras.layout(q, k), **buffer_layout(bufs)}

        dkdv, dqk = self._kernel("bwd_dkdv"), self._kernel("bwd_dq")

        def consts():  # asked only where a launch is decided (not memoised)
            return {**self._consts(q.dtype), **extras.consts()}

        def launch_dq():
            o = out if here else q  # the dQ kernel reads Out only with DELTA_HERE
            own = self._dq_own(q, k, v, dout, dq, lse, delta, du, o, scale, xown, bufs, gl_named)
            # (the Hopper backward's split launches the kernel without DELTA_HERE under a key of its own)
            memo, own, dq_key = self._table_memo(dqk, _dq_key(key, hop), own, tables, buffers, False)
            if not self._memoised(memo, own):
                self._launch(dqk, lambda c: (cdiv(Lq, c.block_m), B * Hq), own, self.cfg.dq, "dq",
                             table_args=self._table_args(tables, buffers, False), key=dq_key,
                             fixed=lambda: {**shared(), **strides_named(dq, "dqb", "dqh", "dqm", "dqd"),
                                            **strides_named(o, "ob", "oh", "om", "od"),
                                            "SECTION": self._kv_section(q, k, v)},
                             **consts(), **gl_consts, DELTA_HERE=here,
                             EVEN_KV=lambda c: Lkv % c.block_n == 0 and self.dims.even)

        if here:
            launch_dq()
        own = self._dkdv_own(q, k, v, dout, dk, dv, lse, delta, dw, dqa, du, scale, xown, bufs, gl_named)
        hcfg = self.hopper_bwd.config(q, k) if hop else None  # (kept by a HopperFastBackward)
        dq_hop = self.hopper_bwd.backward(q, k, v, dout, lse, delta, dk, dv, scale, buffers, det, cfg=hcfg,
                                          table=lambda r, c: self.table(tables, buffers, True, r, c)) if hop else None
        memo, own, dkdv_key = self._table_memo(dkdv, key, own, tables, buffers, True)
        if not hop and not self._memoised(memo, own):
            self._launch(dkdv, lambda c: (cdiv(Lkv, c.block_n), B * Hkv), own, self.cfg.dkdv, "dkdv",
                         table_args=self._table_args(tables, buffers, True), key=dkdv_key,
                         # the programs of a K/V head visit its query heads one after another
                         fixed=lambda: {**shared(), **strides_named(dk, "dkb", "dkh", "dkn", "dkd"),
                                        **strides_named(dv, "dvb", "dvh", "dvn", "dvd"), "HKV": Hkv,
                                        "SECTION": self.section(q, B * Hkv, _row_bytes(q, dout))},
                         **consts(), **gl_consts, DQ_ATOMIC=atomic,
                         DQ_TMA=mode[1] and dqa.dtype == torch.float32 and tma_ready(self.interpret, dqa),
                         EVEN_Q=lambda c: Lq % c.block_m == 0 and self.dims.even)
        if dq_hop is not None:
            dq = dq_hop
        elif atomic:
            torch.mul(dqa, scale, out=dq)  # the scale and the cast in one pass
        elif not here:
            launch_dq()
        dsinks = sink_gradient(extras.sinks, lse, delta) if extras.sinks is not None else None
        if extras.u is not None:
            du = reduce_to(du, extras.u.shape).to(extras.u.dtype)
            if extras.w.shape[1] == Hkv and Hkv != Hq:
                dw = dw.view(B, Hkv, Hq // Hkv, Lkv, R).sum(2)
            dw = reduce_to(dw, extras.w.shape).to(extras.w.dtype)
        else:
            du = dw = None
        for slot, vals, offs, row in partials:
            ordered_rows_add(dbufs[slot], vals.view(-1, row), offs)
        if dbufs:
            dbufs = {s_: g.to(buffers[s_].dtype) for s_, g in dbufs.items()}
        # the key's prepared backward: the portable launches, or those around the Hopper backward; one
        # made for the other side of the Hopper verdict (its switch changed) is made again
        if key is not None:
            had = self._fast_bwd.get(key, _NONE)
            if had is _NONE or (had is not None and not had.current(hop)):
                if hop:  # (none kept where there is none: the portable one may be made later)
                    made = HopperFastBackward.make(self, fkey, key, dout, dlse, extras, buffers, delta0, (dq, dk, dv),
                                                   hcfg)
                    if made is not None:
                        self._keep(self._fast_bwd, key, made)
                else:
                    self._keep(self._fast_bwd, key, FastBackward.make(self, fkey, key, dout, dlse, extras, buffers,
                                                                      delta0, (dq, dk, dv)))
        return dq, dk, dv, dsinks, du, dw, dbufs

    @staticmethod
    def _dkdv_own(q, k, v, dout, dk, dv, lse, delta, dw, dqa, du, scale, xown, bufs, gl_named) -> dict:
        """The dK/dV kernel's own values by name, in its signature's order (see ``_forward_own``).
        ``dqa``, ``du`` and ``gl_named``: the atomic dQ mode's outputs (placeholders otherwise)."""
        return {"Q": q, "K": k, "V": v, "DO": dout, "DK": dk, "DV": dv, "Lse": lse, "Delta": delta, "DW": dw,
                "DQA": dqa, "DU": du, "sm_scale": scale, **xown, **bufs, **gl_named}

    @staticmethod
    def _dq_own(q, k, v, dout, dq, lse, delta, du, o, scale, xown, bufs, gl_named) -> dict:
        """The dQ kernel's own values by name, in its signature's order (see ``_forward_own``); ``o``:
        the forward's output where the kernel computes delta (``DELTA_HERE``), else a placeholder."""
        return {"Q": q, "K": k, "V": v, "DO": dout, "DQ": dq, "Lse": lse, "Delta": delta, "DU": du, "Out": o,
                "sm_scale": scale, **xown, **bufs, **gl_named}

    def _gradient_buffers(self, q, buffers, B, Hq, Lq, Lkv, atomic: bool = False):
        """The learnable tensors' gradient buffers for the dQ kernel (``atomic``: for the dK/dV
        kernel's dQ stage, zeroed, never zero-filled by a kernel): ({slot: gradient}, deterministic
        partials [(slot, values, offsets, row length)], the kernel's ``DBUF{slot}_{i}``/``GOFF{slot}_{i}``
        arguments by name, its ``GL{i}_*`` constants)."""
        det = self.deterministic
        dbufs, partials, named, consts = {}, [], {}, {}
        for i, gl in enumerate(self.spec.grad_loads):
            t = buffers[gl.slot]
            exact = gl_exact(gl, B, Hq)
            if gl.slot not in dbufs:
                # contiguous, like the copy of the tensor the kernels read (see buffer_tensors); a
                # full-size tensor read once, whose elements are each written by one program, gets
                # its gradient in its own dtype (no float32 copy and conversion pass)
                alone = exact and gl.slot in self._loaded_once
                if alone and not atomic and self._zero_fills(gl, t, B, Hq, Lq, Lkv):
                    # the dQ kernel writes every element: visited tiles their gradient, the rest zeros
                    dbufs[gl.slot] = _new(t.shape, t)
                    consts[f"GL{i}_ZERO_FILL"] = True
                else:
                    dbufs[gl.slot] = torch.zeros(t.shape, dtype=t.dtype if alone else acc_dtype(q), device=t.device)
            consts.setdefault(f"GL{i}_ZERO_FILL", False)
            consts[f"GL{i}_ATOMIC"] = not exact
            consts[f"GL{i}_WIDE"] = wide_offsets(t)
            vals = offs = dbufs[gl.slot]
            if det and gl.scope in ("program", "row"):
                # per-program partial sums and their offsets; sized for any tile of 16 rows or more
                n, row = B * Hq * (cdiv(Lq, 16) if gl.scope == "program" else Lq + 256), 1
            elif det and gl.scope in ("scatter", "col"):
                # one row of partial sums per program over the slice of the table it can touch
                n, row = private_rows(gl, t.shape, B, Hq, Lq)
            else:
                n = None
            if n is not None:
                vals = torch.zeros(n * row, dtype=acc_dtype(q), device=q.device)
                offs = torch.full((n,), -1, dtype=torch.int64, device=q.device)
                partials.append((gl.slot, vals, offs, row))
            named[f"DBUF{gl.slot}_{i}"], named[f"GOFF{gl.slot}_{i}"] = vals, offs
        if self.spec.grad_loads:
            consts["DETERMINISTIC"] = det
        return dbufs, partials, named, consts


def _row_bytes(*tensors) -> int:
    """Bytes of one head's rows of these [B, H, L, D] tensors together."""
    return sum(t.shape[2] * t.shape[3] * t.element_size() for t in tensors)


# -- prepared calls ------------------------------------------------------------------------------
class Prepared:
    """The prepared launches of one call key (``Runner.call_key``), for a holder that sees the key
    again (a call plan of ``attndsl.api``): the forward's ``FastForward`` and the ``FastBackward``
    of the last gradient layout met. Set by ``Runner.forward_prepared``/``backward_prepared``
    after a call of the key launched the ordinary way."""

    __slots__ = ("key", "fwd", "bwd", "hopper")

    def __init__(self, key: tuple):
        self.key = key
        self.fwd: FastForward | None = None
        self.bwd: FastBackward | None = None
        #: ``(the Hopper forward's switch, whether it takes the key's calls)`` as last asked: its call
        #: conditions are the key's (dtypes, shapes, strides, alignment, extras), so only a change of
        #: the switch asks ``HopperForward.applies`` again
        self.hopper: tuple | None = None


def _template(t: torch.Tensor) -> tuple | None:
    """``(sizes, dtype, device)`` of a contiguous ``t`` (sizes a tuple of ints, at least one), from
    which ``_alloc`` makes tensors like it; None where ``t`` is not contiguous. No tensor is kept:
    one made during a CUDA-graph warm-up or capture would hold memory of the graph's pool past the
    call."""
    return (tuple(t.shape), t.dtype, t.device) if t.is_contiguous() and t.dim() else None


def _alloc(template: tuple) -> torch.Tensor:
    """A contiguous tensor like ``template``'s (``_template``), poisoned under ATTNDSL_POISON."""
    shape, dtype, device = template
    # sizes as separate ints: torch parses them in half the time of one torch.Size (~1 us a call)
    t = torch.empty(*shape, dtype=dtype, device=device)
    return _poisoned(t) if POISON else t


def _needs_conversion(runner, buffers) -> bool:
    """Do these captured tensors reach the kernels other than as they are (``buffer_tensors``:
    learnable ones made contiguous, booleans viewed as bytes)? Fixed by the call key."""
    return any(i in runner.learnable or t.dtype == torch.bool for i, t in enumerate(buffers))


def _same_arguments(what: str, fast: list, slow: list, addresses: bool = True) -> None:
    """Under ``VERIFY_MEMO``: the prepared call's argument list is the one the ordinary path would
    launch with (tensors alike in dtype, shape, strides, device and, with ``addresses``, address).
    Raises AssertionError."""
    if len(fast) != len(slow):
        raise AssertionError(f"prepared {what}: {len(fast)} arguments, the ordinary path has {len(slow)}")
    for i, (a, b) in enumerate(zip(fast, slow)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = ((a.dtype, a.shape, a.stride(), a.device) == (b.dtype, b.shape, b.stride(), b.device)
                    and (not addresses or a.data_ptr() == b.data_ptr()))
        else:
            same = type(a) is type(b) and a == b
        if not same:
            raise AssertionError(f"prepared {what}: argument {i} is {a!r}, the ordinary path has {b!r}")


def _table_part(memo: Memo, transposed: bool) -> tuple | None:
    """``(tiles, classes)`` of the block table a memoised launch takes (``Runner.table``'s key for
    the memo's tiles, and ``arg_classes`` of the table arguments it was memoised with); None for a
    launch without one."""
    if memo.table_classes is None:
        return None
    c = memo.cfg
    return (True, c.block_n, c.block_m) if transposed else (False, c.block_m, c.block_n), memo.table_classes


def _table_args(runner, part, tables, buffers) -> tuple | None:
    """A prepared launch's block-table arguments from this call's ``tables`` (``part``:
    ``_table_part``; the table is built on first use, as ``Runner.table`` does): ``()`` for a launch
    without a table, None where the table's arguments specialise unlike the memoised ones (the
    ordinary path decides that launch afresh)."""
    if part is None:
        return ()
    tiles, classes = part
    t = tables.get_table(tiles) or runner.table(tables, buffers, *tiles)
    return t.args() if t.classes() == classes else None


class FastForward:
    """The forward of one call key once a call of it launched: the runner's memoised launch
    (``Memo``) with the outputs allocated from templates (``_template``) and the call's own values
    put straight into the list the memo launches (no name lookups, no key hashing). A call with
    the block tables of a data-dependent mask adds the table of the memoised tiles (its arguments
    end the list). Made by ``Runner.forward`` (``make``: None where the memo's own values are not
    in those places, or the outputs have no template); used through ``Runner.forward_prepared``.

    Whether the Hopper forward takes the key's calls (``HopperForward.applies``) is asked once per
    state of its switch; where it does, the call takes the ordinary path. Under ``VERIFY_MEMO``
    every call checks its argument list against the ordinary path's and then launches the ordinary
    (verified) way."""

    __slots__ = ("runner", "key", "memo", "rest", "table", "out", "lse", "convert", "hopper", "verdict")

    @staticmethod
    def make(runner, key, memo, out, lse, buffers) -> "FastForward | None":
        if memo is None:
            return None
        names = ("Q", "K", "V", "Out", "Lse", "VISITS", "sm_scale", *Extras.PARAMS,
                 *(f"buf{i}" for i in range(len(buffers))))
        f = FastForward()
        f.runner, f.key, f.memo = runner, key, memo
        f.table = _table_part(memo, False)
        f.rest = memo.between(names, () if f.table is None else Table.PARAMS)
        f.out, f.lse = _template(out), None if lse is None else _template(lse)
        if f.rest is None or f.out is None or (lse is not None and f.lse is None):
            return None
        f.convert = _needs_conversion(runner, buffers)
        h = runner.hopper
        # the Hopper forward takes no block tables (``HopperForward.applies``)
        f.hopper = h is not None and h.unsupported is None and not runner.precise_delta and f.table is None
        #: (the Hopper forward's switch state, whether it takes this key's calls then): the key fixes
        #: every other input of that answer
        f.verdict = None
        return f

    def __call__(self, q, k, v, scale, buffers, extras, tables=None):
        """(out, lse or None); None where the call's block table specialises unlike the memoised one."""
        r = self.runner
        if self.hopper:
            on, verdict = hopper_enabled(), self.verdict
            if verdict is None or verdict[0] is not on:
                verdict = self.verdict = (on, r.hopper.applies(q, k, v, extras, None, False))
            if verdict[1]:  # as ``Runner.forward``'s Hopper branch
                return r.hopper.forward(q, k, v, scale, sinks=extras.sinks, buffers=buffers, key=self.key)
        if self.table is None:
            targs = ()
        else:
            targs = _table_args(r, self.table, tables, buffers)
            if targs is None:
                return None
        shape, dtype, device = self.out  # _alloc, inline (a call less on the path of every call)
        out = torch.empty(*shape, dtype=dtype, device=device)
        if self.lse is not None:
            shape, dtype, device = self.lse
            lse = stats = torch.empty(*shape, dtype=dtype, device=device)
        else:
            lse, stats = None, out
        if POISON:
            _poisoned(out)
            if lse is not None:
                _poisoned(lse)
        bufs = buffer_tensors(buffers, r.learnable).values() if self.convert else buffers
        args = [q, k, v, out, stats, stats, scale, *extras.values(q), *bufs, *self.rest, *targs]
        if VERIFY_MEMO:
            own = r._forward_own(q, k, v, out, stats, stats, scale, extras, buffer_tensors(buffers, r.learnable))
            _same_arguments("forward", args, self.memo.args({**own, **dict(zip(Table.PARAMS, targs))}))
            want = [_new((*q.shape[:3], v.shape[3]), q, torch.float32 if self.out[1] != q.dtype else None)]
            if lse is not None:
                want.append(_new(q.shape[:3], q, acc_dtype(q)))
            _same_arguments("forward outputs", [out, *(() if lse is None else (lse,))], want, addresses=False)
            return r.forward(q, k, v, scale, buffers, tables, extras, key=self.key)[:2]
        _launch_in_scope(r, self.memo, args)
        return out, lse


def _dq_mode(r) -> tuple:
    """How runner ``r``'s backward adds dQ now: (the atomic mode, its TMA reduce-adds) — part of the
    backward's memo key, and asked again by each prepared backward (the switches may change)."""
    atomic = atomic_dq(r.cfg, r.deterministic)
    return atomic, atomic and dq_tma()


def _launch_in_scope(r, memo, args) -> None:
    """``memo.launch(args)`` inside the runner's launch scope (as ``Runner._memoised``)."""
    scope = r.mode(args[0])
    if scope is NO_CONTEXT and not memo.allocator:
        memo.launch(args)
        return
    with scope, (descriptor_scratch() if memo.allocator else NO_CONTEXT):
        memo.launch(args)


#: the dQ kernel's own values that lead its signature (``Runner._dq_own``), then ``_extra_names``
_DQ_OWN = ("Q", "K", "V", "DO", "DQ", "Lse", "Delta", "DU", "Out")


def _dq_key(key, hop: bool):
    """The dQ launch's memo key: the backward's, or beside the Hopper backward (whose dK/dV kernel
    reads delta first, so the dQ kernel does not compute it) one of its own."""
    return (key, "hopper") if hop and key is not None else key


def _extra_names(buffers) -> tuple:
    """The backward kernels' own values after their leading ones: the scale, the extras' and the
    captured tensors' (``Runner._dkdv_own``/``_dq_own``)."""
    return ("sm_scale", "Sinks", "U", "W", "sigmoid_bias", *(f"buf{i}" for i in range(len(buffers))))


def _extras_own(r, convert: bool, q, buffers, extras) -> tuple:
    """A prepared backward's values of ``_extra_names`` but the scale (``convert``: the captured
    tensors in the kernels' dtypes, ``buffer_tensors``)."""
    bufs = list(buffer_tensors(buffers, r.learnable).values()) if convert else buffers
    s = extras.sinks
    return (q if s is None else s, q, q, float(extras.sigmoid_bias), *bufs)


def _verify_dq(r, memo, args, q, k, v, dout, dq, lse, delta, o, scale, buffers, extras, t_dq=()) -> None:
    """Under ``VERIFY_MEMO``: a prepared dQ launch's ``args`` are the ordinary path's (``o``: the
    output where the kernel computes delta, else the placeholder ``q``)."""
    own = r._dq_own(q, k, v, dout, dq, lse, delta, q, o, scale, extras.own(q), buffer_tensors(buffers, r.learnable),
                    {})
    _same_arguments("backward dQ", args, memo.args({**own, **dict(zip(Table.PARAMS, t_dq))}))


class FastBackward:
    """The backward of one call key and gradient layout once a call of them launched: the dQ launch
    that computes delta, then the dK/dV launch, from the runner's memo (with an lse gradient: the
    delta, dK/dV and dQ launches; in the atomic dQ mode, ``config.atomic_dq``, no dQ launch but the
    delta one: a zeroed float32 dQ for the dK/dV kernel, then one scaling pass), the row statistics and
    gradients allocated from templates; with block tables, the dK/dV and dQ launches add the tables
    of their memoised tiles.
    Only for calls without learnable captured tensors and low-rank factors (their gradient buffers
    and reductions take the ordinary path). See :class:`FastForward`."""

    __slots__ = ("runner", "key", "dout_key", "dlse_none", "delta", "dkdv", "dq", "rest", "tables", "tpl", "convert",
                 "allocator", "hopper", "atomic", "mode", "verdict", "here", "softmax")

    @staticmethod
    def make(runner, fkey, key, dout, dlse, extras, buffers, delta, grads) -> "FastBackward | None":
        if runner.spec.grad_loads or extras.u is not None:
            return None
        memo = runner._memo
        b = FastBackward()
        b.runner, b.key, b.dout_key, b.dlse_none = runner, fkey, tensor_key(dout), dlse is None
        b.mode = _dq_mode(runner)
        b.atomic = b.mode[0]  # the dK/dV kernel adds dQ: no dQ launch
        b.softmax = delta is not None  # row statistics and delta (sigmoid has neither)
        b.here = delta_in_dq(b.softmax, dlse, b.atomic, False)  # (not the Hopper backward's)
        b.delta = memo.get((runner._kernel("bwd_delta"), key)) if delta is not None and not b.here else None
        b.dkdv = memo.get((runner._kernel("bwd_dkdv"), key))
        b.dq = None if b.atomic else memo.get((runner._kernel("bwd_dq"), key))
        if b.dkdv is None or (b.dq is None and not b.atomic) or (delta is not None and not b.here and b.delta is None):
            return None
        b.tpl = [_template(t) for t in (*grads, *(() if delta is None else (delta,)))]
        b.tables = (_table_part(b.dkdv, True), None if b.atomic else _table_part(b.dq, False))
        xs = _extra_names(buffers)
        want = [(b.dkdv, ("Q", "K", "V", "DO", "DK", "DV", "Lse", "Delta", "DW", "DQA", "DU", *xs), b.tables[0]),
                (b.dq, (*_DQ_OWN, *xs), b.tables[1])]
        if delta is not None:
            want.append((b.delta, ("Out", "DO", "Delta"), None))
        b.rest = [m.between(n, () if t is None else Table.PARAMS) if m is not None else [] for m, n, t in want]
        if b.tables == (None, None):
            b.tables = None  # no block tables: nothing to look up per call
        if any(r is None for r in b.rest) or any(t is None for t in b.tpl):
            return None
        b.convert = _needs_conversion(runner, buffers)
        b.allocator = any(m.allocator for m, _, _ in want if m is not None)
        h = runner.hopper_bwd
        b.hopper = h is not None and h.unsupported is None and not runner.precise_delta
        #: (the Hopper backward's switch state, whether it takes this key's calls then): every
        #: input of that answer but the switch is fixed by the key and the gradient's layout
        b.verdict = None
        return b

    @staticmethod
    def current(hop: bool) -> bool:
        """Whether this prepared backward still fits its key's calls (``hop``: the Hopper backward
        takes them now)."""
        return not hop

    def __call__(self, q, k, v, out, lse, dout, dlse, scale, buffers, extras, tables=None):
        """The gradients as ``Runner.backward`` returns them; None where a block table of the call
        specialises unlike the memoised one."""
        r = self.runner
        if self.hopper:
            on, verdict = hopper_bwd_enabled(), self.verdict
            if verdict is None or verdict[0] is not on:
                verdict = self.verdict = (on, r.hopper_bwd.applies(q, k, v, dout, extras, tables, False))
            if verdict[1]:
                return r.backward(q, k, v, out, lse, dout, dlse, scale, buffers, tables, extras, key=self.key,
                                  hop=True)
        if self.mode != _dq_mode(r):  # the dQ mode changed (ATTNDSL_ATOMIC_DQ, ATTNDSL_DQ_TMA): decide afresh
            return None
        if self.tables is None:
            t_dkdv = t_dq = ()
        else:
            t_dkdv = _table_args(r, self.tables[0], tables, buffers)
            t_dq = _table_args(r, self.tables[1], tables, buffers)
            if t_dkdv is None or t_dq is None:
                return None
        empty = torch.empty  # _alloc, inline (below: poisoned under POISON)
        softmax = self.softmax
        if softmax:  # row statistics; delta from its kernel or the dQ kernel
            shape, dtype, device = self.tpl[3]
            stats, delta = lse, empty(*shape, dtype=dtype, device=device)
            args_delta = [out, dout, delta, *self.rest[2]] if self.delta is not None else None
        else:
            stats = delta = out  # placeholders: sigmoid kernels read no row statistics
            args_delta = None
        (sq, tq, cq), (sk, tk, ck), (sv, tv, cv) = self.tpl[:3]
        dq, dk, dv = empty(*sq, dtype=tq, device=cq), empty(*sk, dtype=tk, device=ck), empty(*sv, dtype=tv, device=cv)
        if POISON:
            for t in (dq, dk, dv, *(() if args_delta is None else (delta,))):
                _poisoned(t)
        s = extras.sinks
        xown = _extras_own(r, self.convert, q, buffers, extras)
        if VERIFY_MEMO:
            self._verify(q, k, v, out, dout, dq, dk, dv, stats, delta, args_delta, scale, xown, buffers, extras,
                         t_dkdv, t_dq, softmax)
            return r.backward(q, k, v, out, lse, dout, dlse, scale, buffers, tables, extras, key=self.key)
        # one launch scope for the three launches (as ``Runner._memoised`` enters it)
        scope = r.mode(q)
        if scope is NO_CONTEXT and not self.allocator:
            delta = self._launch(q, k, v, out, dout, dq, dk, dv, stats, delta, dlse, args_delta, scale, xown, t_dkdv,
                                 t_dq)
        else:
            with scope, (descriptor_scratch() if self.allocator else NO_CONTEXT):
                delta = self._launch(q, k, v, out, dout, dq, dk, dv, stats, delta, dlse, args_delta, scale, xown,
                                     t_dkdv, t_dq)
        dsinks = sink_gradient(s, stats, delta) if s is not None else None
        return dq, dk, dv, dsinks, None, None, {}

    def _launch(self, q, k, v, out, dout, dq, dk, dv, stats, delta, dlse, args_delta, scale, xown, t_dkdv, t_dq):
        """The dQ launch that computes delta, then the dK/dV launch; or the delta, dK/dV and dQ
        launches (atomic mode: dQ from the dK/dV launch, scaled and cast into ``dq``); returns the
        delta the gradients used."""
        if self.here:
            self.dq.launch([q, k, v, dout, dq, stats, delta, q, out, scale, *xown, *self.rest[1], *t_dq])
            self.dkdv.launch([q, k, v, dout, dk, dv, stats, delta, q, q, q, scale, *xown, *self.rest[0], *t_dkdv])
            return delta
        if args_delta is not None:
            self.delta.launch(args_delta)
            if dlse is not None:
                # d lse_i / d s_ij = p_ij, so an lse gradient shifts the softmax correction term
                delta = delta - dlse.to(delta.dtype)
        if self.atomic:
            dqa = torch.zeros(q.shape, dtype=acc_dtype(q), device=q.device)
            self.dkdv.launch([q, k, v, dout, dk, dv, stats, delta, q, dqa, q, scale, *xown, *self.rest[0], *t_dkdv])
            torch.mul(dqa, scale, out=dq)
        else:
            self.dkdv.launch([q, k, v, dout, dk, dv, stats, delta, q, q, q, scale, *xown, *self.rest[0], *t_dkdv])
            self.dq.launch([q, k, v, dout, dq, stats, delta, q, q, scale, *xown, *self.rest[1], *t_dq])
        return delta

    def _verify(self, q, k, v, out, dout, dq, dk, dv, stats, delta, args_delta, scale, xown, buffers, extras,
                t_dkdv, t_dq, softmax: bool):
        """Under ``VERIFY_MEMO``: the argument lists are the ordinary path's (``_same_arguments``)."""
        r = self.runner
        if args_delta is not None:
            _same_arguments("backward delta", args_delta, self.delta.args({"Out": out, "DO": dout, "Delta": delta}))
        named, xo = buffer_tensors(buffers, r.learnable), extras.own(q)
        _same_arguments("backward dK/dV", [q, k, v, dout, dk, dv, stats, delta, q, q, q, scale, *xown, *self.rest[0],
                                           *t_dkdv],
                        self.dkdv.args({**r._dkdv_own(q, k, v, dout, dk, dv, stats, delta, q, q, q, scale, xo, named,
                                                      {}),
                                        **dict(zip(Table.PARAMS, t_dkdv))}))
        if not self.atomic:
            o = out if self.here else q
            _verify_dq(r, self.dq, [q, k, v, dout, dq, stats, delta, q, o, scale, *xown, *self.rest[1], *t_dq], q, k, v,
                       dout, dq, stats, delta, o, scale, buffers, extras, t_dq)
        _same_arguments("backward gradients", [dq, dk, dv, *(() if not softmax else (delta,))],
                        [_like(q), _like(k), _like(v),
                         *(() if not softmax else (_new(q.shape[:3], q, acc_dtype(q)),))], addresses=False)


class HopperFastBackward:
    """The backward of one call key and gradient layout that the Hopper backward takes
    (``hopper_bwd.py``), once a call of them launched: the delta launch from the runner's memo, the
    Hopper kernel (its own prepared launch, at the configuration of the first call), and where that
    configuration leaves dQ to the portable dQ kernel (or the run is deterministic) its launch from
    the memo; row statistics and gradients allocated from templates. Kept with the Hopper
    backward's switch as it was: under another switch state it declines and ``Runner.backward``
    decides afresh. Only for softmax calls without block tables, learnable captured tensors or
    low-rank factors (the Hopper backward takes no tables of its own here, nor the other two)."""

    __slots__ = ("runner", "key", "dout_key", "dlse_none", "delta", "dq", "rest", "tpl", "convert", "allocator", "cfg",
                 "switch")

    @staticmethod
    def make(runner, fkey, key, dout, dlse, extras, buffers, delta, grads, cfg) -> "HopperFastBackward | None":
        if (runner.spec.grad_loads or extras.u is not None or delta is None or runner.spec.data_dependent
                or cfg is None):
            return None
        memo = runner._memo
        b = HopperFastBackward()
        b.runner, b.key, b.dout_key, b.dlse_none = runner, fkey, tensor_key(dout), dlse is None
        b.cfg, b.switch = cfg, hopper_bwd_enabled()
        split = cfg.dq == "kernel" or runner.deterministic  # the portable dQ kernel adds dQ
        b.delta = memo.get((runner._kernel("bwd_delta"), key))
        b.dq = memo.get((runner._kernel("bwd_dq"), _dq_key(key, True))) if split else None
        if b.delta is None or (split and b.dq is None):
            return None
        b.tpl = [_template(t) for t in (*grads, delta)]
        want = [(b.delta, ("Out", "DO", "Delta"))]
        if split:
            want.append((b.dq, (*_DQ_OWN, *_extra_names(buffers))))
        b.rest = [m.between(n, ()) for m, n in want]
        if any(r is None for r in b.rest) or any(t is None for t in b.tpl):
            return None
        b.convert = _needs_conversion(runner, buffers)
        b.allocator = any(m.allocator for m, _ in want)
        return b

    def current(self, hop: bool) -> bool:
        """Whether this prepared backward still fits its key's calls (see :meth:`FastBackward.current`)."""
        return hop and self.switch is hopper_bwd_enabled()

    def __call__(self, q, k, v, out, lse, dout, dlse, scale, buffers, extras, tables=None):
        """The gradients as ``Runner.backward`` returns them; None where the switch changed (or the
        call has block tables): the ordinary path decides."""
        r = self.runner
        if tables is not None or hopper_bwd_enabled() is not self.switch:
            return None
        empty = torch.empty  # _alloc, inline
        (sq, tq, cq), (sk, tk, ck), (sv, tv, cv), (sd, td, cd) = self.tpl
        dq, dk, dv = empty(*sq, dtype=tq, device=cq), empty(*sk, dtype=tk, device=ck), empty(*sv, dtype=tv, device=cv)
        delta = empty(*sd, dtype=td, device=cd)
        if POISON:
            for t in (dq, dk, dv, delta):
                _poisoned(t)
        s = extras.sinks
        xown = _extras_own(r, self.convert, q, buffers, extras)
        args_delta = [out, dout, delta, *self.rest[0]]
        if VERIFY_MEMO:
            _same_arguments("backward delta", args_delta, self.delta.args({"Out": out, "DO": dout, "Delta": delta}))
            if self.dq is not None:
                _verify_dq(r, self.dq, [q, k, v, dout, dq, lse, delta, q, q, scale, *xown, *self.rest[1]], q, k, v,
                           dout, dq, lse, delta, q, scale, buffers, extras)
            return r.backward(q, k, v, out, lse, dout, dlse, scale, buffers, tables, extras, key=self.key, hop=True)
        # one launch scope for the three launches (the Hopper kernel's own scope nests in it)
        with r.mode(q), (descriptor_scratch() if self.allocator else NO_CONTEXT):
            self.delta.launch(args_delta)
            if dlse is not None:
                # d lse_i / d s_ij = p_ij, so an lse gradient shifts the softmax correction term
                delta = delta - dlse.to(delta.dtype)
            got = r.hopper_bwd.backward(q, k, v, dout, lse, delta, dk, dv, scale, buffers, r.deterministic,
                                        cfg=self.cfg, key=(self.key, self.dout_key, self.dlse_none))
            if got is None:
                self.dq.launch([q, k, v, dout, dq, lse, delta, q, q, scale, *xown, *self.rest[1]])
            else:
                dq = got
        dsinks = sink_gradient(s, lse, delta) if s is not None else None
        return dq, dk, dv, dsinks, None, None, {}
