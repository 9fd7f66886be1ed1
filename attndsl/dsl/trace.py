"""Tracing: capture a pattern function with torch's ``make_fx`` and lower the graph to IR.

One path for every pattern: :func:`attndsl.dsl.capture.capture` records what torch runs on 0-d
index tensors (as FlexAttention traces a ``mask_mod``/``score_mod``), and
:func:`attndsl.dsl.lower.lower_graph` turns that aten graph into the IR the passes analyse.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import ir
from .capture import capture
from .errors import PatternError, definition_site
from .lower import HANDLED_PACKETS, Buffers, lower_graph


@dataclass
class Trace:
    """What tracing a pattern produced: IR roots and the tensors they read.

    ``buffers[i]`` is the kernel's view of ``tensors[i]`` (slot ``i``), in order of first use.
    ``sized`` holds the slots whose tensor's *shape* the IR depends on (a dimension unrolled by a
    reduction such as ``torch.dot`` over a captured row, a slice, an index from the end): the IR is
    valid for other tensors in those slots only if their shapes are the same. Other captured
    tensors are read with runtime shapes and strides."""

    mask: ir.Node | None
    score: ir.Node | None
    buffers: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    sized: frozenset = frozenset()


def _trace_one(fn, what: str, bufs: Buffers) -> tuple:
    if not callable(fn):
        raise PatternError(f"{what} must be callable, got {type(fn).__name__}", site="<call>")
    n = 5 if what == "score_mod" else 4
    try:
        gm = capture(fn, n, HANDLED_PACKETS)
    except PatternError as e:
        cause = e.__cause__
        if isinstance(cause, TypeError) and "positional argument" in str(cause):  # a wrong signature
            raise PatternError(f"{what} {getattr(fn, '__name__', fn)!r} failed while tracing: {cause}",
                               "a score_mod takes (score, b, h, q_idx, kv_idx)" if n == 5
                               else "a mask_mod takes (b, h, q_idx, kv_idx)", site=definition_site(fn)) from None
        raise
    inputs = [ir.var(v) for v in ir.INDEX_VARS]
    if n == 5:
        inputs.insert(0, ir.var(ir.SCORE, ir.FLOAT))
    return lower_graph(gm, inputs, bufs)


def trace(mask_mod=None, score_mod=None) -> Trace:
    """Trace ``mask_mod(b, h, q_idx, kv_idx)`` and ``score_mod(score, b, h, q_idx, kv_idx)`` to IR.

    Args:
        mask_mod: a function of four 0-d int tensors returning a 0-d bool tensor (or a Python bool),
            or None.
        score_mod: a function of the float score and the four indices returning the new score, or None.

    Returns:
        :class:`Trace` with the mask (BOOL) and score (FLOAT) roots, and the captured tensors with
        their buffers (one per distinct tensor, mask's first).

    Raises:
        PatternError: naming the construct and the pattern's ``file:line`` when something cannot be
            traced or lowered.
    """
    bufs = Buffers()
    mask = score = None
    if mask_mod is not None:
        r, site = _trace_one(mask_mod, "mask_mod", bufs)
        mask = _result(r, site, mask_mod, "mask")
        if mask.dtype != ir.BOOL:
            article = "an" if mask.dtype == ir.INT else "a"
            raise PatternError(f"mask_mod returned {article} {mask.dtype} value, expected a boolean",
                               site=site or definition_site(mask_mod))
    if score_mod is not None:
        r, site = _trace_one(score_mod, "score_mod", bufs)
        score = _result(r, site, score_mod, "score")
        if score.dtype == ir.BOOL:
            raise PatternError("score_mod returned a boolean", "did you mean mask_mod?",
                               site=site or definition_site(score_mod))
        score = ir.coerce(score, ir.FLOAT)
    sized = frozenset(i for i, t in enumerate(bufs.tensors) if id(t) in bufs.sized)
    return Trace(mask, score, bufs.buffers, bufs.tensors, sized)


def _result(r, site, fn, what) -> ir.Node:
    if isinstance(r, ir.Node):
        return r
    if isinstance(r, (bool, int, float)):
        return ir.const(r)
    shape = getattr(r, "shape", None)
    if shape is not None and tuple(shape) != ():
        raise PatternError(f"the {what} function returned a value of shape {tuple(shape)}, expected a scalar "
                           "(one value per b, h, q_idx, kv_idx)",
                           "index captured tensors in every dimension", site=site or definition_site(fn))
    raise PatternError(f"the {what} function returned a {type(r).__name__}", site=site or definition_site(fn))
