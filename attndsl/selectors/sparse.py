"""Token-level selectors (DSA): attention over the keys listed in ``indices[b, g, q, j]``.

Semantics: query ``q`` of batch ``b`` and query head ``h`` visits the keys
``indices[b, h // (Hq // G), q, :]``; a slot holding ``-1`` is unused. The pattern's mask and
score modifier apply on top, with ``kv_idx`` the selected key's position. Each slot is one
gathered key: a key listed twice in one row is attended twice (like an explicit gather;
``torch.topk`` never produces duplicates, and :func:`dedupe` removes them if your selector can).

Out-of-range indices (``< -1`` or ``>= Lkv``) are never read. In the **checked** mode (the
default) they raise an ``IndexError`` before any kernel is launched; this costs one pass over the
indices and a host synchronisation. In the **fast** mode they are treated as unused slots inside
the kernel. Switch per call with ``check_indices=False`` (or ``True``), or process-wide with the
environment variable ``ATTNDSL_CHECK_INDICES=0``. Under ``torch.compile`` the check is skipped
(it would need a host synchronisation).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import triton

from .. import codegen
from ..runtime import cache, fastlaunch
from ..runtime.config import HeadDims, gather_config
from ..runtime.memo import MAX_PLANS, plan_key
from ..runtime.scope import launch_scope
from ..runtime.autograd import any_grad, raw_apply, refuse_second_derivative
from ..runtime.checks import (call_shape, check_captured, check_extras, check_inputs, check_sink_values, compiling,
                              default_check)
from ..runtime.empty import empty_call, is_empty
from ..runtime.gradients import row_delta, sink_gradient
from ..runtime.launch import (Prepared, Runner, _alloc, _launch_in_scope, _needs_conversion, _new,
                              _same_arguments, _template, use_interpreter)
from ..runtime.marshal import Extras, buffer_layout, buffer_tensors, fill, qkv_strides, strides_named
from ..runtime.memo import MEMO_SIZE, VERIFY_MEMO, Memo, arg_classes, own_slots, tensor_key

GATHER_TAG = "sel"


def validate_indices(indices, query, key, checked: bool | None = None) -> int:
    """Validate ``indices`` for ``query``/``key``; return the number of groups ``G``.

    A batch dimension of 1 is allowed (the selection is then shared by the whole batch).

    Shape, dtype and device are always checked (no synchronisation). With ``checked`` (default:
    :func:`default_check`) the values are checked too: every entry must be ``-1`` or lie in
    ``[0, Lkv)``.
    """
    G = _index_layout(indices, query)
    if checked is None:
        checked = default_check()
    if checked and not compiling():
        check_index_values(indices, key.shape[2])
    return G


def _index_layout(indices, query) -> int:
    """The checks of ``indices`` that its type, dtype, shape and device decide; returns ``G``."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 (or int64), got {indices.dtype}")
    if indices.dim() != 4:
        raise ValueError(f"indices must have shape [B, G, Lq, K] (G groups of query heads share a selection), "
                         f"got rank {indices.dim()} ({tuple(indices.shape)})")
    if indices.device != query.device:
        raise ValueError(f"indices are on {indices.device}, the inputs on {query.device}")
    B, Hq, Lq, _ = query.shape
    Bi, G, Li, K = indices.shape
    if Bi not in (1, B) or Li != Lq:
        raise ValueError(f"indices {tuple(indices.shape)} must be [B={B} (or 1), G, Lq={Lq}, K]")
    if G == 0 or Hq % G:
        raise ValueError(f"indices have G={G} groups; the query's {Hq} heads must be a multiple of it")
    if K == 0:
        raise ValueError("indices have K=0 slots per query")
    return G


def check_index_values(indices: torch.Tensor, Lkv: int) -> None:
    """Every entry of ``indices`` is ``-1`` or in ``[0, Lkv)`` (one pass and a host sync), else
    IndexError naming the first bad entry."""
    bad = (indices < -1) | (indices >= Lkv)
    if bool(bad.any()):
        pos = tuple(int(x) for x in bad.nonzero()[0])
        raise IndexError(
            f"indices{list(pos)} = {int(indices[pos])} is out of range for Lkv={Lkv} (valid: -1 for an "
            f"unused slot, or 0..{Lkv - 1}); pass check_indices=False to treat such entries as unused")


def dedupe(indices: torch.Tensor) -> torch.Tensor:
    """A copy of ``indices`` where repeats of a key within one row are replaced by ``-1``."""
    srt, order = torch.sort(indices, dim=-1)
    dup = torch.zeros_like(srt, dtype=torch.bool)
    dup[..., 1:] = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    out = indices.clone()
    out.scatter_(-1, order, torch.where(dup, torch.full_like(srt, -1), srt))
    return out


def units(Hq: int, Hkv: int, G: int, max_heads: int = 64) -> int:
    """Query heads per program: heads that share the selection group and the key/value head."""
    share = Hq // math.lcm(G, Hkv)
    hpp = share
    if hpp > max_heads:
        hpp = max(d for d in range(1, max_heads + 1) if share % d == 0)
    return hpp


def gather_spec(spec):
    """The spec of the gather kernels: the pattern's, under a name and key of their own."""
    sel_v = codegen.SELECTOR_VERSION
    return dataclasses.replace(spec, name=f"{spec.name}_{GATHER_TAG}", key=f"{spec.key}s{sel_v}")


class GatherRunner:
    """Launches the gather kernels of one spec for one backend and pair of head dims (query/key,
    value): the dense ``Runner``'s shape (arguments filled by name from ``spec.lowering``'s
    signatures, head-dim constants and tiles from ``runtime/config.py``, the sinks' gradient from
    ``runtime/gradients.py``) and its launch memo (``runtime/memo.py``): the first call of a key
    (``call_key``) decides grid, constants and the key-fixed arguments, launches and keeps a
    :class:`~attndsl.runtime.memo.Memo`; a later call of the key only puts its own values (tensors,
    scale, sigmoid bias) into the memo's arguments and relaunches."""

    def __init__(self, spec, interpret: bool, head_dim: int, block_n: int | None = None,
                 head_dim_v: int | None = None):
        self.spec = gather_spec(spec)
        self.learnable = spec.learnable_slots
        self.interpret = interpret
        self.head_dim = head_dim
        self.head_dim_v = head_dim if head_dim_v is None else head_dim_v
        self.dims = HeadDims(head_dim, self.head_dim_v)
        # the query/key head dim in one power-of-two part, or two (192 = 128 + 64: no padding to 256)
        self.bd, self.bd2, self.bdv = self.dims.tiles
        self.cfg = gather_config(max(head_dim, self.head_dim_v), interpret, block_n)
        self.mod = cache.load(self.spec, interpret, render=codegen.render_gather)
        #: (kernel, call key) -> Memo: repeated calls of one shape skip the launch decisions
        self._memo: dict = {}
        #: call key -> its FastGather (None: none), made after the key's first forward launch
        self._fast_fwd: dict = {}
        #: backward key (``_backward_key``) -> its FastGatherBackward (None: none), made after its first launch
        self._fast_bwd: dict = {}

    def call_key(self, q, k, v, indices, scale, extras, buffers) -> tuple:
        """What fixes every launch decision of a forward call but the tensors' addresses: the dense
        runner's key (``Runner.call_key``: q/k/v's dtype, shapes, strides and alignment, the extras,
        the captured tensors; it reads nothing of its runner, so it is shared as it stands) and the
        indices' dtype, shape, strides and alignment."""
        return Runner.call_key(q, k, v, scale, extras, buffers), tensor_key(indices)

    def mode(self, t: torch.Tensor):
        """The launch context for kernels on ``t``'s data (its GPU, or the interpreter)."""
        return launch_scope(t, self.interpret)

    def _prepared(self, kernel, grid, args, consts):
        """Launch, and return the launch of later argument lists of the same key (``fastlaunch.prepared``)."""
        return fastlaunch.prepared(kernel, grid, args, consts, self.interpret, self.cfg.num_warps, self.cfg.num_stages)

    def _consts(self, q, hpp):
        return dict(**self.dims.consts(q.dtype, self.interpret), BLOCK_H=max(16, triton.next_power_of_2(hpp)),
                    BLOCK_N=self.cfg.block_n)

    def _memoised(self, kernel: str, key, own: dict) -> bool:
        """Launch ``kernel`` from its memo of ``key`` with the call's ``own`` values (True), unless
        there is none or the memo is verified (``VERIFY_MEMO``: ``_launch`` checks and launches)."""
        memo = self._memo.get((kernel, key))
        if memo is None or VERIFY_MEMO:
            return False
        args = memo.args(own)
        with self.mode(args[0]):
            memo.launch(args)
        return True

    def _launch(self, kernel: str, key, own: dict, fixed: dict, grid: tuple, consts: dict) -> None:
        """Fill ``kernel``'s arguments by name from the call's ``own`` values and the key-``fixed``
        ones, launch it and memoise the launch by ``key``. Under ``VERIFY_MEMO`` a launch the memo
        has is checked against this fresh one (grid, constants, arguments) and taken from the memo."""
        params = self.spec.lowering.signature(kernel)
        args = fill(kernel, params, {**own, **fixed}, consts)
        check = (grid, consts, arg_classes(args))
        hit = self._memo.get((kernel, key))
        with self.mode(args[0]):
            if hit is not None:
                if check != hit.check:
                    raise AssertionError(f"launch memo of {kernel}: the call key {key} was memoised with "
                                         f"{hit.check}, this call needs {check}")
                hit.verify(kernel, own, args)
                hit.launch(args)
                return
            # the module's kernels are <name>_fwd and <name>_bwd ("gather_fwd", "gather_bwd" in the signatures)
            fn = getattr(self.mod, f"{self.spec.name}_{kernel.removeprefix('gather_')}")
            launch = self._prepared(fn, grid, args, consts)
        if len(self._memo) >= MEMO_SIZE:
            self._memo.clear()
            self._fast_fwd.clear()
            self._fast_bwd.clear()
        self._memo[(kernel, key)] = Memo(launch, args, own_slots(kernel, params, own), check, False)

    def _grad_consts(self, buffers) -> dict:
        """Bins per piece and pieces per learnable table (``spec.lowering.binned``, ``passes/lower.py``; no pieces:
        added per element) and the precision of the binning products: float32-exact on the GPU too
        (three TF32 products)."""
        if not self.spec.grad_loads:
            return {}
        consts = {"BIN_PRECISION": "ieee" if self.interpret else "tf32x3"}
        low = self.spec.lowering
        for i, gl in enumerate(self.spec.grad_loads):
            d = low.binned[i]
            n = buffers[gl.slot].shape[d] if d is not None else low.max_bins + 1
            width = min(low.bin_piece, max(16, triton.next_power_of_2(n)))
            consts[f"GL{i}_BINS"] = width  # bins per piece
            consts[f"GL{i}_PIECES"] = -(-n // width) if n <= low.max_bins else 0
        return consts

    def _shape_args(self, q, k, indices, extras):
        B, Hq, Lq, _ = q.shape
        Hkv, Lkv = k.shape[1], k.shape[2]
        G = indices.shape[1]
        hpp = units(Hq, Hkv, G)
        if extras.w is not None and 1 != extras.w.shape[1] == Hq != Hkv:
            hpp = 1  # w rows per query head: the packed heads of a unit would each need their own
        nu = Hq // hpp
        return (B, nu, Lq), hpp, dict(NU=nu, HPU=hpp, GROUP=Hq // Hkv, QPG=Hq // G, LQ=Lq, LKV=Lkv,
                                      NSEL=indices.shape[3])

    def forward(self, q, k, v, indices, scale, buffers, extras: Extras, key=None):
        """Returns (out, lse). ``key``: the call's ``call_key`` (None: computed here)."""
        key = self.call_key(q, k, v, indices, scale, extras, buffers) if key is None else key
        fast = self._fast_fwd.get(key)
        if fast is not None and not VERIFY_MEMO:
            return fast(q, k, v, indices, scale, buffers, extras)
        B, Hq, Lq = q.shape[:3]
        out = _new((B, Hq, Lq, v.shape[3]), q)
        lse = _new((B, Hq, Lq), q, torch.float32)
        bufs = buffer_tensors(buffers, self.learnable)
        own = {"Q": q, "K": k, "V": v, "IDX": indices, "Out": out, "Lse": lse, "sm_scale": scale, **extras.own(q),
               **bufs}
        if not self._memoised("gather_fwd", key, own):
            (B, nu, Lq), hpp, shape_args = self._shape_args(q, k, indices, extras)
            fixed = {**_qkv_strides(q, k, v, indices), **strides_named(out, "ob", "oh", "om", "od"), **shape_args,
                     **extras.layout(q, k), **buffer_layout(bufs)}
            self._launch("gather_fwd", key, own, fixed, (Lq, B * nu), {**extras.consts(), **self._consts(q, hpp)})
        if fast is not None:  # under VERIFY_MEMO (else taken above): its arguments are the verified launch's
            fast.verify(own, q, k, v, indices, out, lse, scale, buffers, extras)
        elif key not in self._fast_fwd:
            self._fast_fwd[key] = FastGather.make(self, self._memo.get(("gather_fwd", key)), out, lse, buffers)
        return out, lse

    def backward(self, q, k, v, indices, out, lse, dout, dlse, scale, buffers, extras: Extras, key=None,
                 shared: bool = False):
        """Returns (dq, dk, dv, dsinks, du, dw, {slot: gradient of each learnable captured tensor}),
        as the dense ``Runner.backward``. ``key``: the forward's ``call_key`` (None: computed here).
        ``shared``: dK and dV may be views of one tensor (``kv_accumulators``)."""
        dout = dout.contiguous() if dout.stride(-1) != 1 else dout
        dq = _new(q.shape, q)
        acc, dk, dv = kv_accumulators(k, v, shared)
        dl = dlse.contiguous().to(torch.float32) if dlse is not None else lse
        # low-rank factors' gradients in float32 buffers of their own shapes (stride 0 where they broadcast)
        du, dw = (torch.zeros(t.shape, dtype=torch.float32, device=q.device) if t is not None else q
                  for t in (extras.u, extras.w))
        dbufs = {slot: torch.zeros(buffers[slot].shape, dtype=torch.float32, device=q.device)
                 for slot in sorted(self.learnable)}
        bufs = buffer_tensors(buffers, self.learnable)
        own = {"Q": q, "K": k, "V": v, "IDX": indices, "Out": out, "DO": dout, "Lse": lse, "DLse": dl, "DQ": dq,
               "DK": dk, "DV": dv, "DU": du, "DW": dw, "sm_scale": scale, **extras.own(q), **bufs,
               **{f"DBUF{gl.slot}_{i}": dbufs[gl.slot] for i, gl in enumerate(self.spec.grad_loads)}}
        key = self.call_key(q, k, v, indices, scale, extras, buffers) if key is None else key
        key = self._backward_key(key, out, dout, dlse, dl)
        if not self._memoised("gather_bwd", key, own):
            (B, nu, Lq), hpp, shape_args = self._shape_args(q, k, indices, extras)
            bias_strides = [*_broadcast_strides(du, extras.u)[:3], *_broadcast_strides(dw, extras.w)[:3]]
            fixed = {**_qkv_strides(q, k, v, indices), **strides_named(out, "ob", "oh", "om", "od"),
                     **strides_named(dout, "dob", "doh", "dom", "dod"), **strides_named(dq, "dqb", "dqh", "dqm", "dqd"),
                     **strides_named(dk, "dkb", "dkh", "dkn", "dkd"), **strides_named(dv, "dvb", "dvh", "dvn", "dvd"),
                     **dict(zip(("stride_dub", "stride_duh", "stride_dum", "stride_dwb", "stride_dwh", "stride_dwn"),
                                bias_strides, strict=True)),
                     **shape_args, **extras.layout(q, k), **buffer_layout(bufs)}
            consts = dict(HAS_DLSE=dlse is not None, **extras.consts(), **self._consts(q, hpp),
                          **self._grad_consts(buffers))
            self._launch("gather_bwd", key, own, fixed, (Lq, B * nu), consts)
        fast = self._fast_bwd.get(key)
        if fast is not None:  # only under VERIFY_MEMO (else ``backward_prepared`` took it): check its arguments
            fast.verify(own, buffers, extras)
        elif key not in self._fast_bwd:
            self._fast_bwd[key] = FastGatherBackward.make(self, self._memo.get(("gather_bwd", key)), dout, dlse,
                                                          dl, dq, buffers, extras)
        dsinks = sink_gradient(extras.sinks, lse, row_delta(out, dout, dlse)) if extras.sinks is not None else None
        du = du.to(extras.u.dtype) if extras.u is not None else None
        dw = dw.to(extras.w.dtype) if extras.w is not None else None
        dk, dv = kv_gradients(acc, dk, dv, k, v)
        return dq, dk, dv, dsinks, du, dw, {slot: g.to(buffers[slot].dtype) for slot, g in dbufs.items()}

    @staticmethod
    def _backward_key(key, out, dout, dlse, dl) -> tuple:
        """The backward's memo key: the forward's call key, the output's and the output gradient's
        layouts, and the lse gradient's (its float32 copy ``dl``; None: no lse gradient)."""
        return key, tensor_key(out), tensor_key(dout), None if dlse is None else tensor_key(dl)

    # -- prepared calls: the launches of a call key a plan sees again (``launch.Prepared``) ----------
    def forward_prepared(self, p: Prepared, q, k, v, indices, scale, buffers, extras: Extras):
        """``forward`` of a call with the call key ``p.key``: the key's ``FastGather`` once a call of
        it launched (no key hashing, no dict of names). Returns (out, lse)."""
        f = p.fwd
        if f is not None and not VERIFY_MEMO:
            return f(q, k, v, indices, scale, buffers, extras)
        got = self.forward(q, k, v, indices, scale, buffers, extras, key=p.key)
        p.fwd = self._fast_fwd.get(p.key)
        return got

    def backward_prepared(self, p: Prepared, q, k, v, indices, out, lse, dout, dlse, scale, buffers,
                          extras: Extras):
        """``backward`` of a call made by ``forward_prepared``: the ``FastGatherBackward`` of its key
        and this gradient's layout (the output's, the output gradient's, the lse gradient's or
        none) once one has launched. Under ``VERIFY_MEMO`` the ordinary path runs and checks it."""
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dl = dlse.contiguous().to(torch.float32) if dlse is not None else None
        b = p.bwd
        if b is not None and not VERIFY_MEMO and b.matches(dout, dl):
            return b(q, k, v, indices, out, lse, dout, dlse, dl, scale, buffers, extras)
        got = self.backward(q, k, v, indices, out, lse, dout, dlse, scale, buffers, extras, key=p.key, shared=True)
        p.bwd = self._fast_bwd.get(self._backward_key(p.key, out, dout, dlse, dl))
        return got


def kv_accumulators(k: torch.Tensor, v: torch.Tensor, shared: bool = True) -> tuple:
    """(buffer or None, dK, dV): float32 accumulators of dK and dV (the gather backward adds into them
    with atomics), zeroed. ``shared``: contiguous views of one buffer, zeroed by one fill (one
    launch on a GPU, not two) and converted by one (``kv_gradients``); dV starts 16 bytes after
    the buffer's start, as a tensor of its own would (the memoised launches specialise on it).
    Else two tensors (a ``torch.library`` op's outputs may not alias each other)."""
    if not shared:
        return (None, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                torch.zeros(v.shape, dtype=torch.float32, device=v.device))
    nk = k.numel()
    if k.shape == v.shape and nk % 4 == 0:
        acc = torch.zeros(2, *k.shape, dtype=torch.float32, device=k.device)
        dk, dv = acc.unbind(0)
        return acc, dk, dv
    at = -(-nk // 4) * 4
    acc = torch.zeros(at + v.numel(), dtype=torch.float32, device=k.device)
    return acc, acc[:nk].view(k.shape), acc[at:].view(v.shape)


def kv_gradients(acc, dk, dv, k, v) -> tuple:
    """dK and dV in the key's and value's dtypes from their float32 accumulators
    (``kv_accumulators``): as they are for float32, else converted, by one conversion of a shared
    buffer where the two have one dtype (then views of one tensor, as the gradients of
    ``torch.cat``'s inputs are)."""
    if k.dtype == v.dtype == torch.float32:
        return dk, dv
    if acc is None or k.dtype != v.dtype:
        return dk.to(k.dtype), dv.to(v.dtype)
    g = acc.to(k.dtype)
    if g.dim() > 1:
        return g.unbind(0)
    return g[:k.numel()].view(k.shape), g[g.numel() - v.numel():].view(v.shape)


class FastGather:
    """The gather forward of one call key once a call of it launched (``launch.FastForward``'s
    shape): the memoised launch with the outputs allocated from templates and the call's own values
    put straight into their places in the memo's arguments (no dict of names). None from ``make``
    where the memo's own values are not the ones listed here or an output has no template. Under
    ``VERIFY_MEMO`` the ordinary path runs and checks this one's arguments (``verify``)."""

    __slots__ = ("runner", "memo", "pos", "out", "lse", "convert")
    OWN = ("Q", "K", "V", "IDX", "Out", "Lse", "sm_scale", *Extras.PARAMS)

    @staticmethod
    def make(runner, memo, out, lse, buffers) -> "FastGather | None":
        if memo is None or memo.slots[0] != (*FastGather.OWN, *(f"buf{i}" for i in range(len(buffers)))):
            return None
        f = FastGather()
        f.runner, f.memo, f.pos = runner, memo, memo.slots[1]
        f.out, f.lse = _template(out), _template(lse)
        f.convert = _needs_conversion(runner, buffers)
        return None if f.out is None or f.lse is None else f

    def args(self, q, k, v, indices, out, lse, scale, buffers, extras) -> list:
        """The launch's arguments for this call."""
        bufs = buffer_tensors(buffers, self.runner.learnable).values() if self.convert else buffers
        args = self.memo.template.copy()
        for i, a in zip(self.pos, (q, k, v, indices, out, lse, scale, *extras.values(q), *bufs)):
            args[i] = a
        return args

    def __call__(self, q, k, v, indices, scale, buffers, extras):
        """(out, lse)."""
        out, lse = _alloc(self.out), _alloc(self.lse)
        _launch_in_scope(self.runner, self.memo, self.args(q, k, v, indices, out, lse, scale, buffers, extras))
        return out, lse

    def verify(self, own, q, k, v, indices, out, lse, scale, buffers, extras) -> None:
        """Under ``VERIFY_MEMO``: this call's arguments and outputs are the ordinary path's
        (``own``, ``out``, ``lse``); AssertionError otherwise."""
        _same_arguments("gather forward", self.args(q, k, v, indices, out, lse, scale, buffers, extras),
                        self.memo.args(own))
        _same_arguments("gather forward outputs", [_alloc(self.out), _alloc(self.lse)], [out, lse], addresses=False)


class FastGatherBackward:
    """The gather backward of one backward key (``GatherRunner._backward_key``) once a call of it
    launched (``launch.FastBackward``'s shape): the memoised launch with ``dQ`` allocated from a
    template, dK/dV's float32 accumulators zeroed in one fill (``kv_accumulators``) and the call's
    own values put straight into their places in the memo's arguments (no dict of names, no key
    hashing). Only for calls without learnable captured tensors and low-rank factors (their
    gradient buffers take the ordinary path): ``make`` gives None for those, and where the memo's
    own values are not the ones listed here. Under ``VERIFY_MEMO`` the ordinary path runs and
    checks this one's arguments (``verify``)."""

    __slots__ = ("runner", "memo", "pos", "dq", "convert", "dout_key", "dlse_key")
    OWN = ("Q", "K", "V", "IDX", "Out", "DO", "Lse", "DLse", "DQ", "DK", "DV", "DU", "DW", "sm_scale",
           *Extras.PARAMS)

    @staticmethod
    def make(runner, memo, dout, dlse, dl, dq, buffers, extras) -> "FastGatherBackward | None":
        if memo is None or runner.spec.grad_loads or runner.learnable or extras.u is not None:
            return None
        if memo.slots[0] != (*FastGatherBackward.OWN, *(f"buf{i}" for i in range(len(buffers)))):
            return None
        b = FastGatherBackward()
        b.runner, b.memo, b.pos = runner, memo, memo.slots[1]
        b.dq = _template(dq)
        b.convert = _needs_conversion(runner, buffers)
        b.dout_key, b.dlse_key = tensor_key(dout), None if dlse is None else tensor_key(dl)
        return None if b.dq is None else b

    def matches(self, dout, dl) -> bool:
        """Is this the launch of a call with these gradients' layouts (``_backward_key``'s part; ``dl``:
        the lse gradient's float32 copy, None: none)? The output's layout is not asked: the forward
        of the call key allocated it from its template."""
        return ((dl is None) == (self.dlse_key is None) and tensor_key(dout) == self.dout_key
                and (dl is None or tensor_key(dl) == self.dlse_key))

    def args(self, q, k, v, indices, out, lse, dout, dl, dq, dk, dv, scale, buffers, extras) -> list:
        """The launch's arguments for this call (no factors: ``DU``/``DW`` are placeholders)."""
        bufs = buffer_tensors(buffers, self.runner.learnable).values() if self.convert else buffers
        args = self.memo.template.copy()
        for i, a in zip(self.pos, (q, k, v, indices, out, dout, lse, dl, dq, dk, dv, q, q, scale, *extras.values(q),
                                   *bufs)):
            args[i] = a
        return args

    def __call__(self, q, k, v, indices, out, lse, dout, dlse, dl, scale, buffers, extras):
        """The gradients as ``GatherRunner.backward`` returns them (``dl``: ``dlse``'s float32 copy)."""
        dq = _alloc(self.dq)
        acc, dk, dv = kv_accumulators(k, v)
        _launch_in_scope(self.runner, self.memo, self.args(q, k, v, indices, out, lse, dout, lse if dl is None else dl,
                                                           dq, dk, dv, scale, buffers, extras))
        s = extras.sinks
        dsinks = sink_gradient(s, lse, row_delta(out, dout, dlse)) if s is not None else None
        dk, dv = kv_gradients(acc, dk, dv, k, v)
        return dq, dk, dv, dsinks, None, None, {}

    def verify(self, own, buffers, extras) -> None:
        """Under ``VERIFY_MEMO``: this launch's arguments, and its allocations' layouts, are the
        ordinary path's (``own``: its values by name); AssertionError otherwise."""
        o = own
        _same_arguments("gather backward", self.args(o["Q"], o["K"], o["V"], o["IDX"], o["Out"], o["Lse"], o["DO"],
                                                     o["DLse"], o["DQ"], o["DK"], o["DV"], o["sm_scale"], buffers,
                                                     extras), self.memo.args(own))
        _, dk, dv = kv_accumulators(o["K"], o["V"])
        _same_arguments("gather backward allocations", [_alloc(self.dq), dk, dv], [o["DQ"], o["DK"], o["DV"]],
                        addresses=False)


def _qkv_strides(q, k, v, indices) -> dict:
    return {**qkv_strides(q, k, v), **strides_named(indices, "ib", "ig", "im", "ij")}


def _broadcast_strides(buf, factor) -> list:
    """Strides of a factor's gradient buffer, 0 along the dims the factor broadcasts (size 1):
    every batch or head that shares the row adds into it."""
    if factor is None:
        return [0, 0, 0, 0]
    return [0 if n == 1 else st for n, st in zip(factor.shape, buf.stride())]


class SparseCall(NamedTuple):
    """What a gather call's launches need besides the tensors: one argument of the Function."""

    runner: "GatherRunner"
    scale: float
    extras: Extras  # no sinks or factors (the Function takes those as inputs); the call's sigmoid bias
    #: the call key's prepared launches (``launch.Prepared``: ``FastGather``, ``FastGatherBackward``)
    prepared: Prepared
    softmax: bool  # the pattern's normaliser is softmax (else no lse gradient, lse not differentiable)


class SparseAttentionFunction(torch.autograd.Function):
    """Inputs: q, k, v, sinks (or None), u, w (low-rank factors, or None), indices, a
    :class:`SparseCall`, captured tensors. Outputs: (out, lse). dK and dV are views of one tensor
    (``kv_accumulators``)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, u, w, indices, call, *buffers):
        extras = call.extras if sinks is None and u is None else Extras(sinks, u, w, call.extras.sigmoid_bias)
        out, lse = call.runner.forward_prepared(call.prepared, q, k, v, indices, call.scale, buffers, extras)
        # sinks and factors are saved only when there are some (each saved slot costs unpacking)
        ctx.saved_extras = sinks is not None or u is not None
        if ctx.saved_extras:
            ctx.save_for_backward(q, k, v, indices, out, lse, sinks, u, w, *buffers)
        else:
            ctx.save_for_backward(q, k, v, indices, out, lse, *buffers)
        ctx.call = call
        ctx.set_materialize_grads(False)  # an unused lse gets None: the kernel skips its dlse term
        if not call.softmax:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        call = ctx.call
        if ctx.saved_extras:
            q, k, v, indices, out, lse, sinks, u, w, *buffers = ctx.saved_tensors
            extras = Extras(sinks, u, w, call.extras.sigmoid_bias)
        else:
            (q, k, v, indices, out, lse, *buffers), sinks, u, w = ctx.saved_tensors, None, None, None
            extras = call.extras
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks, du, dw, dbufs = call.runner.backward_prepared(
            call.prepared, q, k, v, indices, out, lse, dout, dlse if call.softmax else None, call.scale, buffers,
            extras)
        grads = tuple(dbufs.get(i) for i in range(len(buffers))) if buffers else ()
        if not torch.is_grad_enabled():  # the usual backward (no create_graph): nothing to tie
            return (dq, dk, dv, dsinks, du, dw, None, None, *grads)
        return refuse_second_derivative((q, k, v, sinks, u, w, *buffers),
                                        (dq, dk, dv, dsinks, du, dw, None, None) + grads)


_apply = raw_apply(SparseAttentionFunction)


class _GatherRunners(dict):
    """``(interpret, D, Dv, device index) -> GatherRunner`` of one compiled pattern, and its call
    plans (``plans``: plan key -> :class:`_SparsePlan`). A copy of the pattern drops both."""

    def __init__(self):
        super().__init__()
        self.plans: dict = {}


def gather_runner(compiled, query, dv: int | None = None) -> GatherRunner:
    """The (cached) gather runner of a :class:`~attndsl.api.CompiledAttention` for ``query`` and
    values of head dim ``dv`` (default: the query's)."""
    dv = query.shape[-1] if dv is None else dv
    runners = _runners_of(compiled)
    interpret = use_interpreter(query)
    key = (interpret, query.shape[-1], dv, query.device.index)
    r = runners.get(key)
    if r is None:
        tiles = getattr(compiled, "_tiles", (None, None))
        r = runners[key] = GatherRunner(compiled.spec, interpret, query.shape[-1], block_n=tiles[1], head_dim_v=dv)
    return r


def _runners_of(compiled) -> _GatherRunners:
    runners = compiled.__dict__.get("_gather_runners")
    if runners is None:
        runners = compiled._gather_runners = _GatherRunners()
    return runners


class _SparsePlan(NamedTuple):
    """What the checks of one plan key (``_plan_key``) decided for a token-selector call: a later
    call with the key skips the checks its shapes, dtypes, devices and strides vouch for."""

    runner: GatherRunner
    scale: float  # the default scale, 1/sqrt(D)
    extras: Extras  # no sinks or factors; the sigmoid bias of the length
    memo: Prepared  # the prepared launches of the runner's call key (the call's scale sign, extras and
    #: captured tensors included)
    shape: tuple  # (B, Hq, Lq, Lkv)
    value_checks: bool  # the pattern's index checks read captured values: run every call
    expand: bool  # the indices have batch 1 and the call more: expanded per call
    call: SparseCall  # the Function's argument for calls with the default scale


def _plan_key(tensors, query, key, value, indices, scale, return_lse, sinks, bias_factors) -> tuple | None:
    """The dense path's plan key (``attndsl.runtime.memo.plan_key``: the inputs', captured tensors', sinks'
    and factors' shapes, strides, dtypes, devices and alignment, the scale's sign, ``return_lse``)
    and the indices' dtype, shape, strides, device and alignment; None: a call checked in full."""
    if type(indices) is not torch.Tensor:
        return None
    got = plan_key(tensors, query, key, value, scale, return_lse, sinks, bias_factors)
    if got is None:
        return None
    return got, indices.dtype, indices.shape, indices.stride(), indices.device, indices.data_ptr() & 15


def sparse_call(compiled, query, key, value, indices, *, scale=None, return_lse=False, check_indices=None,
                sinks=None, sigmoid_bias=None, bias_factors=None):
    """``compiled(query, key, value, indices=...)``: the token-selector path of the public API.

    Everything the dense path takes works here too: softmax (with ``sinks``) and sigmoid
    normalisers, low-rank ``bias_factors`` and learnable captured tensors. Their gradients (and
    dK/dV) are added with atomic adds, so ``deterministic=True`` is refused for learnable tensors.

    Calls are planned per call key (``_plan_key``; calls without ``sigmoid_bias``): the checks that
    shapes, dtypes, devices and strides decide run on the first call of a key only. What depends on
    values runs on every call as before: the indices' range (``check_indices``), the sink logits
    (once per version), the pattern's index checks that read captured values."""
    tensors = compiled.tensors
    pkey = plans = None
    if sigmoid_bias is None:
        pkey = _plan_key(tensors, query, key, value, indices, scale, return_lse, sinks, bias_factors)
        plans = _runners_of(compiled).plans
        plan = plans.get(pkey) if pkey is not None else None
        if plan is not None:
            if sinks is not None:  # values: once per version of the tensor
                check_sink_values(sinks)
            if plan.value_checks:
                compiled.index_check(tensors, plan.shape, query.device)
            if check_indices is None:
                check_indices = default_check()
            if check_indices and not compiling():
                check_index_values(indices, plan.shape[3])
            if compiled.deterministic:
                _check_deterministic(compiled)
            if plan.expand:
                indices = indices.expand(query.shape[0], -1, -1, -1)
            u, w = bias_factors if bias_factors is not None else (None, None)
            return _run(plan, tensors, query, key, value, indices, scale, sinks, u, w, return_lse)
    check_inputs(query, key, value, scale, float64=False)
    check_captured(tensors, query.device)
    shape = call_shape(query, key)
    compiled.index_check(tensors, shape, query.device)
    normalizer = getattr(compiled.spec, "normalizer", "softmax")
    check_extras(query, key, normalizer=normalizer, return_lse=return_lse, sinks=sinks, bias_factors=bias_factors,
                 sigmoid_bias=sigmoid_bias)
    validate_indices(indices, query, key, check_indices)
    _check_deterministic(compiled)
    u, w = tuple(bias_factors) if bias_factors is not None else (None, None)
    if is_empty(query, key):  # no (query, key) pair: every row is a fully masked one, no launch
        learnable = sorted(compiled.spec.learnable_slots)
        return empty_call(query, key, value, softmax=normalizer == "softmax", return_lse=return_lse, sinks=sinks,
                          others=(*(bias_factors or ()), *(tensors[s] for s in learnable)))
    if normalizer == "sigmoid" and sigmoid_bias is None:
        sigmoid_bias = -math.log(key.shape[2])
    expand = indices.shape[0] != query.shape[0]
    if expand:
        indices = indices.expand(query.shape[0], -1, -1, -1)  # one selection for the whole batch
    scale0 = query.shape[-1] ** -0.5
    scale = scale0 if scale is None else float(scale)
    r = gather_runner(compiled, query, value.shape[-1])
    extras = Extras(sinks, u, w, float(sigmoid_bias or 0.0))
    memo = Prepared(r.call_key(query, key, value, indices, scale, extras, tensors))
    extras0 = Extras(sigmoid_bias=extras.sigmoid_bias)
    plan = _SparsePlan(r, scale0, extras0, memo, shape, compiled.index_check.reads_values(), expand,
                       SparseCall(r, scale0, extras0, memo, normalizer == "softmax"))
    if pkey is not None:  # every check above passed for this key: later calls skip those of shapes
        if len(plans) >= MAX_PLANS:
            plans.clear()
        plans[pkey] = plan
    return _run(plan, tensors, query, key, value, indices, scale, sinks, u, w, return_lse)


def _check_deterministic(compiled) -> None:
    learnable = sorted(compiled.spec.learnable_slots)
    if compiled.deterministic and any(compiled.tensors[s].requires_grad for s in learnable):
        raise NotImplementedError(
            "deterministic=True with indices=: the token selector adds the gradients of learnable captured "
            f"tensors (#{', #'.join(map(str, learnable))}) with atomic adds in no fixed order, so they are not "
            "bitwise repeatable; use blocks= or a mask_mod (block-level selection) for repeatable gradients, "
            "or deterministic=False")


def _run(plan, tensors, query, key, value, indices, scale, sinks, u, w, return_lse):
    """Launch a planned call: the runner's forward directly when nothing needs a gradient (no
    graph node, nothing saved), else through the autograd Function."""
    r = plan.runner
    extras = plan.extras if sinks is None and u is None else Extras(sinks, u, w, plan.extras.sigmoid_bias)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                    or ((tensors or sinks is not None or u is not None)
                                        and any_grad(sinks, u, w, tensors))):
        call = plan.call if scale is None else plan.call._replace(scale=float(scale))
        out, lse = _apply(query, key, value, sinks, u, w, indices, call, *tensors)
    else:  # inference: no graph node, nothing saved
        out, lse = r.forward_prepared(plan.memo, query, key, value, indices,
                                      plan.scale if scale is None else float(scale), tensors, extras)
    return (out, lse) if return_lse else out


def random_causal_indices(L: int, topk: int, *, B: int = 1, G: int = 1, device="cpu", seed: int = 0,
                          chunk_elems: int = 1 << 27) -> torch.Tensor:
    """DSA-like test/benchmark selections: each query's top-``topk`` of random scores over its causal
    keys, ``[B, G, L, topk]`` int32 with ``-1`` where a query has fewer than ``topk`` keys.

    Same construction as ``shared/bench/flex_anchors.py`` (random scores, future keys last, top-k),
    computed ``chunk_elems // L`` query rows at a time so no ``L×L`` tensor exists.
    """
    g = torch.Generator(device=torch.device(device))
    g.manual_seed(seed)
    out = torch.empty((B, G, L, topk), dtype=torch.int32, device=device)
    rows = max(1, chunk_elems // max(L, 1))
    kk = min(topk, L)
    cols = torch.arange(L, device=device)
    for t0 in range(0, L, rows):
        t1 = min(L, t0 + rows)
        s = torch.rand((B, G, t1 - t0, L), generator=g, device=device)
        future = cols[None, :] > torch.arange(t0, t1, device=device)[:, None]
        s = s.masked_fill(future, -1.0)
        val, idx = s.topk(kk, dim=-1)
        idx = torch.where(val < 0, torch.full_like(idx, -1), idx)
        out[:, :, t0:t1, :kk] = idx.to(torch.int32)
        out[:, :, t0:t1, kk:] = -1
    return out


def dense_selection_mask(indices: torch.Tensor, Lkv: int) -> torch.Tensor:
    """The boolean ``[B, G, Lq, Lkv]`` mask of a selection (duplicates collapse): ``O(Lq·Lkv)`` memory."""
    idx = indices.long()
    ok = (idx >= 0) & (idx < Lkv)
    m = torch.zeros(idx.shape[:3] + (Lkv + 1,), dtype=torch.bool, device=idx.device)
    m.scatter_(-1, torch.where(ok, idx, torch.full_like(idx, Lkv)), True)
    return m[..., :Lkv]
