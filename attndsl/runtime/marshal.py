"""Kernel arguments by name: every runner (dense, gather, indexer, decode) names its values after the
kernel's parameters and ``fill`` puts them in the order of the kernel's signature
(``spec.lowering.signature``, made by ``passes/lower.py``, the same one codegen renders the ``def``
from). A name the signature lacks, or a parameter no value fills, raises TypeError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .memo import tensor_key

#: keywords of a launch that are Triton's options, not the kernel's parameters
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})


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


def strides_named(t: torch.Tensor, *names: str) -> dict:
    """``stride_{name}`` of each dimension of ``t`` (``strides_named(q, "qb", "qh", "qm", "qd")``)."""
    return {f"stride_{n}": st for n, st in zip(names, t.stride())}


def qkv_strides(q, k, v) -> dict:
    """The query's, key's and value's strides under the names every attention kernel gives them."""
    return {**strides_named(q, "qb", "qh", "qm", "qd"), **strides_named(k, "kb", "kh", "kn", "kd"),
            **strides_named(v, "vb", "vh", "vn", "vd")}


def buffer_tensors(tensors, dense=frozenset()) -> dict:
    """Each captured tensor as its kernel parameter ``buf{slot}`` takes it. Slots in ``dense``
    (learnable tensors) are passed contiguous, so their gradient buffers share their strides with
    no stride-0 aliasing; booleans as bytes."""
    out = {}
    for i, t in enumerate(tensors):
        if i in dense:
            t = t.contiguous()
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        out[f"buf{i}"] = t
    return out


def buffer_layout(bufs: dict) -> dict:
    """``buf{slot}_size{d}`` and ``buf{slot}_stride{d}`` of the tensors of ``buffer_tensors``."""
    out = {}
    for name, t in bufs.items():
        out.update((f"{name}_size{d}", n) for d, n in enumerate(t.shape))
        out.update((f"{name}_stride{d}", st) for d, st in enumerate(t.stride()))
    return out


def buffer_named(tensors, dense=frozenset()) -> dict:
    """``buffer_tensors`` and their ``buffer_layout``: every captured tensor's parameters."""
    bufs = buffer_tensors(tensors, dense)
    return {**bufs, **buffer_layout(bufs)}


def buffer_args(tensors, dense=frozenset()) -> list:
    """``buffer_named`` in the signatures' order (pointer, sizes, strides per tensor), for the
    Hopper kernels' positional launch (runtime/hopper.py, runtime/hopper_bwd.py)."""
    args = []
    for name, t in buffer_tensors(tensors, dense).items():
        args += [t, *t.shape, *t.stride()]
    return args


@dataclass
class Extras:
    """Per-call tensors beyond q/k/v: sink logits, low-rank bias factors, sigmoid bias."""

    sinks: torch.Tensor | None = None
    u: torch.Tensor | None = None
    w: torch.Tensor | None = None
    sigmoid_bias: float = 0.0

    #: the kernels' parameters of the extras, in the order of :meth:`values`
    PARAMS = ("Sinks", "U", "W", "sigmoid_bias")

    def values(self, q) -> tuple:
        """The call's own values of :attr:`PARAMS` (tensors, the sigmoid bias); ``q`` fills the
        pointer of an absent tensor (the prepared launches put them straight into their lists)."""
        s, u, w = self.sinks, self.u, self.w
        return (q if s is None else s, q if u is None else u, q if w is None else w, float(self.sigmoid_bias))

    def own(self, q) -> dict:
        """:meth:`values` by parameter name."""
        return dict(zip(self.PARAMS, self.values(q)))

    def layout(self, q, k) -> dict:
        """The extras' parameters that ``key`` fixes: the factors' strides (0 where a factor
        broadcasts), ``W_GROUP`` (query heads per ``w`` head) and ``RANK``."""
        if self.u is None:
            return dict.fromkeys(("stride_ub", "stride_uh", "stride_um", "stride_ur", "stride_wb", "stride_wh",
                                  "stride_wn", "stride_wr"), 0) | dict(W_GROUP=1, RANK=1)
        Hq, Hkv = q.shape[1], k.shape[1]
        u, w = self.u, self.w
        out = strides_named(u, "ub", "uh", "um", "ur") | strides_named(w, "wb", "wh", "wn", "wr")
        for name, t in (("stride_ub", u), ("stride_wb", w)):
            out[name] = 0 if t.shape[0] == 1 else out[name]
        for name, t in (("stride_uh", u), ("stride_wh", w)):
            out[name] = 0 if t.shape[1] == 1 else out[name]
        out["W_GROUP"] = Hq // Hkv if (w.shape[1] == Hkv and Hkv != Hq) else 1
        out["RANK"] = u.shape[3]
        return out

    def named(self, q, k) -> dict:
        """Every parameter of the extras by name (``own`` and ``layout``)."""
        return {**self.own(q), **self.layout(q, k)}

    def key(self) -> tuple:
        """What of these tensors fixes the launch arguments (see ``Runner.call_key``)."""
        return (None if self.sinks is None else tensor_key(self.sinks),
                None if self.u is None else (tensor_key(self.u), tensor_key(self.w)))

    def consts(self) -> dict:
        r = self.u.shape[3] if self.u is not None else 1
        return dict(HAS_SINKS=self.sinks is not None, HAS_BIAS=self.u is not None, BLOCK_R=max(16, 1 << (r - 1).bit_length()))
