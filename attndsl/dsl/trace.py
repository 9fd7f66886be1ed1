"""Tracing: call a pattern function on symbolic index values and collect its IR."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import ir
from .errors import PatternError
from .symbolic import Sym, TraceContext, _CTX, lift


@dataclass
class Trace:
    """What tracing a pattern produced: IR roots and the tensors they read."""

    mask: ir.Node | None
    score: ir.Node | None
    buffers: list = field(default_factory=list)
    tensors: list = field(default_factory=list)


def index_syms():
    return tuple(Sym(ir.var(n)) for n in ir.INDEX_VARS)


def _site_of(fn) -> str:
    code = getattr(fn, "__code__", None)
    if code is None:
        return getattr(fn, "__name__", repr(fn))
    return f"{code.co_filename}:{code.co_firstlineno}"


def _call(fn, args, what):
    try:
        return fn(*args)
    except PatternError:
        raise
    except RecursionError:
        raise
    except TypeError as e:
        raise PatternError(f"{what} {getattr(fn, '__name__', fn)!r} failed while tracing: {e}",
                           f"a {what} takes {'(score, b, h, q_idx, kv_idx)' if what == 'score_mod' else '(b, h, q_idx, kv_idx)'}",
                           site=_site_of(fn)) from e


def trace(mask_mod=None, score_mod=None) -> Trace:
    """Trace ``mask_mod(b, h, q_idx, kv_idx)`` and ``score_mod(score, b, h, q_idx, kv_idx)``."""
    ctx = TraceContext()
    _CTX.append(ctx)
    try:
        mask = None
        if mask_mod is not None:
            if not callable(mask_mod):
                raise PatternError(f"mask_mod must be callable, got {type(mask_mod).__name__}", site="<call>")
            r = _call(mask_mod, index_syms(), "mask_mod")
            if isinstance(r, torch.Tensor) and r.dim() == 0 and r.dtype == torch.bool:
                r = bool(r)
            mask = ir.coerce(lift(r, "mask result"), ir.BOOL) if not isinstance(r, Sym) else r.node
            if mask.dtype != ir.BOOL:
                article = "an" if mask.dtype == ir.INT else "a"
                raise PatternError(f"mask_mod returned {article} {mask.dtype} value, expected a boolean",
                                   site=_site_of(mask_mod))
        score = None
        if score_mod is not None:
            if not callable(score_mod):
                raise PatternError(f"score_mod must be callable, got {type(score_mod).__name__}", site="<call>")
            r = _call(score_mod, (Sym(ir.var(ir.SCORE, ir.FLOAT)),) + index_syms(), "score_mod")
            score = lift(r, "score result")
            if score.dtype == ir.BOOL:
                raise PatternError("score_mod returned a boolean", "did you mean mask_mod?", site=_site_of(score_mod))
            score = ir.coerce(score, ir.FLOAT)
        return Trace(mask, score, ctx.buffers, ctx.tensors)
    finally:
        _CTX.pop()
