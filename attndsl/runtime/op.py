"""The attention call as ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` sees one op.

``attndsl::attention_fwd`` and ``attndsl::attention_bwd`` take the pattern as a *registry key*
(a string: a function cannot be an op argument) and its captured tensors as a list of tensor
inputs, bound per call. Each has a fake (meta) implementation, so dynamo/AOT trace it over
symbolic shapes (``dynamic=True`` compiles once for every sequence length), and the forward has an
autograd registration whose backward is the backward op (captured tensors that require grad,
sinks and ``bias_factors`` get gradients).

Eager calls (not under torch.compile) take the shorter ``torch.autograd.Function`` path of
``attndsl/api.py``: the same runner launches, without the dispatcher's per-op host time.
"""

import copy
import threading
from typing import Optional

import torch
from torch import Tensor

from .launch import Prepared, Runner
from .marshal import Extras
from .memo import MAX_PLANS, Plans

#: registry key -> CompiledAttention (the template whose runners the ops use; its own captured
#: tensors are not read: the op's ``buffers`` are). Grows by distinct patterns only and is never
#: cleared: compiled graphs name their pattern by this key.
REGISTRY: dict = {}
_LOCK = threading.Lock()


def register(compiled) -> str:
    """The registry key of a compiled pattern (one per spec and compile options). The registry keeps
    a copy without captured tensors (the ops take them as inputs; a registered pattern must not
    keep the first call's tensors alive)."""
    key = f"{compiled.spec.key}|{compiled.deterministic}|{compiled._tiles}"
    with _LOCK:
        if key not in REGISTRY:
            template = copy.copy(compiled)
            template.__dict__.pop("_block_variants", None)
            template.__dict__.pop("_gather_runners", None)
            template.tensors, template._runners = [], {}
            template.mask_mod = template.score_mod = None
            REGISTRY[key] = template
    return key


def _selection(compiled, blocks, q_block, kv_block):
    from ..selectors.blocks import BlockSelection, block_variant
    sel = BlockSelection(blocks, q_block, kv_block)
    return sel, block_variant(compiled, sel)


def _dense_runner(compiled, q, k, v, buffers, blocks, q_block, kv_block):
    """(runner, tables) of a dense or block-selection call."""
    from .checks import call_shape
    if blocks is not None:
        from ..selectors.blocks import SelectionTables
        sel, variant = _selection(compiled, blocks, q_block, kv_block)
        r = variant.runner(q, v.shape[-1])
        return r, SelectionTables(sel, variant.spec, buffers, call_shape(q, k))
    r = compiled.runner(q, v.shape[-1], k)
    # Under torch.compile the tables are built for each call, not kept: with mode="reduce-overhead"
    # the ops run in the CUDA graph's memory pool (its warm-up run is not a capture), where a
    # tensor that outlives the call is an allocation the graph does not track (and a replay must
    # read the captured tensors' current data anyway)
    # (``Runner.table`` builds each on first use, from per-tile bounds where the mask allows)
    return r, (r.new_tables(q, k, buffers) if compiled.spec.data_dependent else None)


def _prepared(compiled, q, k, v, scale, extras, buffers):
    """(runner, ``launch.Prepared``) of a dense call without block tables, kept per call key as the
    eager path's call plans keep them (``attndsl.api``): a later call of the key skips the runner
    lookup and takes the key's prepared launches (``Runner.forward_prepared``/``backward_prepared``),
    forward and backward alike. Kept on the registered pattern for its runners (a new set of runners,
    after ``attndsl.autotune`` installs entries or ``attndsl.clear_cache``, starts a new map)."""
    plans = compiled.__dict__.get("_op_plans")
    if plans is None or plans.runners is not compiled._runners:
        plans = compiled._op_plans = Plans(compiled._runners)
    key = Runner.call_key(q, k, v, scale, extras, buffers)
    pkey = (q.device, v.shape, key)  # runners are per device and value head dim
    got = plans.get(pkey)
    if got is None:
        if len(plans) >= MAX_PLANS:  # dynamic shapes: one key per length
            plans.clear()
        got = plans[pkey] = (compiled.runner(q, v.shape[-1], k), Prepared(key))
    return got


def _memo_key(r, q, k, v, scale, extras, buffers, tables):
    """The runner's launch-memo key of a dense call (as the eager path passes it): later calls of the
    key replay the launch decisions (grid, constants, specialisation). None with block tables (their
    tensors are per call)."""
    return r.call_key(q, k, v, scale, extras, buffers) if tables is None else None


@torch.library.custom_op("attndsl::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, buffers: list[Tensor], sinks: Optional[Tensor],
                  u: Optional[Tensor], w: Optional[Tensor], indices: Optional[Tensor], blocks: Optional[Tensor],
                  pattern: str, scale: float, sigmoid_bias: float, q_block: int, kv_block: int) -> tuple[Tensor, Tensor]:
    """Forward: ``(out [B, Hq, Lq, Dv], lse [B, Hq, Lq] float32)``; ``lse`` is empty (shape ``[0]``)
    for the sigmoid normaliser. ``indices``: token selection; ``blocks`` with ``q_block``/``kv_block``:
    a block selection (``BlockSelection.indices``); both None: the dense call."""
    compiled = REGISTRY[pattern]
    extras = Extras(sinks, u, w, sigmoid_bias)
    buffers = list(buffers)
    if indices is not None:
        from ..selectors.sparse import gather_runner
        out, lse = gather_runner(compiled, q, v.shape[-1]).forward(q, k, v, indices, scale, buffers, extras)
    elif blocks is None and not compiled.spec.data_dependent:
        r, prepared = _prepared(compiled, q, k, v, scale, extras, buffers)
        out, lse = r.forward_prepared(prepared, q, k, v, scale, buffers, extras)
    else:
        r, tables = _dense_runner(compiled, q, k, v, buffers, blocks, q_block, kv_block)
        out, lse, _ = r.forward(q, k, v, scale, buffers, tables, extras, key=_memo_key(r, q, k, v, scale, extras,
                                                                                        buffers, tables))
    if compiled.spec.normalizer != "softmax":
        lse = q.new_empty((0,), dtype=torch.float32)
    return out, lse


@attention_fwd.register_fake
def _(q, k, v, buffers, sinks, u, w, indices, blocks, pattern, scale, sigmoid_bias, q_block, kv_block):
    compiled = REGISTRY[pattern]
    softmax = compiled.spec.normalizer == "softmax"
    out = q.new_empty((*q.shape[:3], v.shape[3]), dtype=out_dtype(compiled, q, indices))
    lse = q.new_empty(q.shape[:3] if softmax else (0,), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


def out_dtype(compiled, q: Tensor, indices) -> torch.dtype:
    """The forward op's output dtype: float32 for a 16-bit softmax call of a ``precise_delta`` pattern
    (the copy the backward's delta reads; the caller casts it to q's dtype), else q's."""
    if (getattr(compiled, "precise_delta", False) and indices is None and compiled.spec.normalizer == "softmax"
            and q.element_size() < 4):
        return torch.float32
    return q.dtype


def _grad_slots(compiled) -> list[int]:
    return sorted(compiled.spec.learnable_slots)


@torch.library.custom_op("attndsl::attention_bwd", mutates_args=())
def attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Optional[Tensor],
                  buffers: list[Tensor], sinks: Optional[Tensor], u: Optional[Tensor], w: Optional[Tensor],
                  indices: Optional[Tensor], blocks: Optional[Tensor], pattern: str, scale: float,
                  sigmoid_bias: float, q_block: int, kv_block: int) -> list[Tensor]:
    """Backward: ``[dq, dk, dv, dsinks (if sinks), du, dw (if u), d buffer for each learnable slot]``."""
    compiled = REGISTRY[pattern]
    extras = Extras(sinks, u, w, sigmoid_bias)
    buffers = list(buffers)
    softmax = compiled.spec.normalizer == "softmax"
    if indices is not None:
        from ..selectors.sparse import gather_runner
        if not softmax:  # the sigmoid kernels read no row statistics: a placeholder of the forward's shape
            lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        dq, dk, dv, dsinks, du, dw, dbufs = gather_runner(compiled, q, v.shape[-1]).backward(
            q, k, v, indices, out, lse, dout, dlse if softmax else None, scale, buffers, extras)
    elif blocks is None and not compiled.spec.data_dependent:
        r, prepared = _prepared(compiled, q, k, v, scale, extras, buffers)
        dq, dk, dv, dsinks, du, dw, dbufs = r.backward_prepared(prepared, q, k, v, out, lse if softmax else None, dout,
                                                                dlse if softmax else None, scale, buffers, extras)
    else:
        r, tables = _dense_runner(compiled, q, k, v, buffers, blocks, q_block, kv_block)
        dq, dk, dv, dsinks, du, dw, dbufs = r.backward(q, k, v, out, lse if softmax else None,
                                                       dout, dlse if softmax else None, scale, buffers, tables, extras,
                                                       key=_memo_key(r, q, k, v, scale, extras, buffers, tables))
    got = [dq, dk, dv]
    if sinks is not None:
        got.append(dsinks)
    if u is not None:
        got += [du.contiguous(), dw.contiguous()]
    for s in _grad_slots(compiled):
        g = dbufs.get(s)
        got.append(torch.zeros_like(buffers[s]) if g is None else g.to(buffers[s].dtype).reshape(buffers[s].shape))
    # a custom op's outputs may not alias its inputs or each other
    seen = set()
    for i, g in enumerate(got):
        if g.untyped_storage().data_ptr() in seen:
            got[i] = g.clone()
        seen.add(got[i].untyped_storage().data_ptr())
    return got


@attention_bwd.register_fake
def _(q, k, v, out, lse, dout, dlse, buffers, sinks, u, w, indices, blocks, pattern, scale, sigmoid_bias,
      q_block, kv_block):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    got = [like(q), like(k), like(v)]
    if sinks is not None:
        got.append(like(sinks))
    if u is not None:
        got += [like(u), like(w)]
    got += [like(buffers[s]) for s in _grad_slots(REGISTRY[pattern])]
    return got


def _setup_context(ctx, inputs, output):
    q, k, v, buffers, sinks, u, w, indices, blocks, pattern, scale, sigmoid_bias, q_block, kv_block = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, u, w, indices, blocks, *buffers)
    ctx.args = (pattern, scale, sigmoid_bias, q_block, kv_block)
    ctx.n_buffers = len(buffers)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, sinks, u, w, indices, blocks, *buffers = ctx.saved_tensors
    pattern, scale, sigmoid_bias, q_block, kv_block = ctx.args
    if dout is None:
        dout = torch.zeros_like(out, dtype=q.dtype)
    if dlse is not None and dlse.numel() == 0:
        dlse = None
    got = list(attention_bwd(q, k, v, out, lse, dout, dlse, buffers, sinks, u, w, indices, blocks, pattern, scale,
                             sigmoid_bias, q_block, kv_block))
    dq, dk, dv = got[:3]
    i = 3
    dsinks = du = dw = None
    if sinks is not None:
        dsinks, i = got[i], i + 1
    if u is not None:
        du, dw, i = got[i], got[i + 1], i + 2
    dbufs: list = [None] * ctx.n_buffers
    for s in _grad_slots(REGISTRY[pattern]):
        dbufs[s], i = got[i], i + 1
    return dq, dk, dv, dbufs, dsinks, du, dw, None, None, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
