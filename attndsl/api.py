"""Public entry points: ``attndsl.attention`` and ``attndsl.compile``."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from . import codegen, flexcompat
from .dsl import trace
from .hints import AttentionResult, MaskMod, ScoreMod
from .passes import build_spec
from .runtime import cache
from .runtime.tuned import entry_for
from .runtime.autograd import Call, any_grad, apply as _apply
import math

from typing import NamedTuple

from .runtime import op
from .runtime.checks import (call_shape, check_captured, check_extras, check_gpu_tiles, check_inputs,
                             check_sink_values, check_tiles, index_check_for)
from .runtime.config import Configs, choose, for_pattern
from .runtime.empty import empty_call, is_empty
from .runtime.indexcheck import check_indices_of
from .runtime.blocktables import BlockTables
from .runtime.launch import Prepared, Runner, use_interpreter
from .runtime.marshal import Extras
from .runtime.memo import MAX_PLANS, Plans, plan_key
from .runtime.patterns import PATTERNS
from .runtime.tables import TABLES


class OpMeta(NamedTuple):
    """What traced code needs of a compiled pattern: its registry key and normalizer."""

    key: str
    normalizer: str


#: ``check_indices`` of a call that ran every check itself (``CompiledAttention._run``)
_CHECKED = object()


class _Plan(NamedTuple):
    """What the checks of one call key decided (``plan_key``): a later call with the same key
    skips them and launches at once."""

    runner: Runner
    scale: float  # the default scale, 1/sqrt(D)
    extras: Extras  # the sigmoid bias of the length (sinks and low-rank factors are bound per call)
    memo: Prepared  # the launches of the call key (``Runner.call_key``)
    shape: tuple  # (B, Hq, Lq, Lkv)
    value_checks: bool  # the pattern's index checks read captured values: run every call
    whole: bool  # return the Function's result as it is (sigmoid, or return_lse): not just out
    tables: tuple | None  # data-dependent masks: the part of the block tables' key the call key fixes
    call: Call  # the autograd Function's argument for calls with the default scale and no sinks, factors, tables


class CompiledAttention:
    """A pattern traced and analysed once; kernels are built per backend/dtype/head dim on first use.

    Captured tensors are held by reference: mutating them in place is seen by later calls,
    rebinding a Python name to a new tensor needs a new ``compile``.

    Calls are planned per *call key* (each input's and captured tensor's shape, strides, dtype,
    device and 16-byte alignment, the scale's sign, ``return_lse``; up to 256 keys): the first call
    of a key runs every input check, later ones skip them and launch at once. Checks of captured
    *values* (indices read from captured tensors) still run as documented in :func:`attention`;
    ``sinks`` are keyed like the inputs (their values are checked once per version of the
    tensor); token-selector calls (``indices=``) are planned the same way, with the indices'
    layout in the key and their values checked as documented; calls with ``sigmoid_bias``,
    ``block_tables``, ``blocks=`` or ``deterministic=True`` are checked in full every time.
    """

    def __init__(self, mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None, *,
                 normalizer: str = "softmax", block_m: int | None = None, block_n: int | None = None,
                 num_warps: int | None = None, num_stages: int | None = None, name: str = "attn",
                 deterministic: bool = False, precise_delta: bool = False) -> None:
        self.mask_mod, self.score_mod = mask_mod, score_mod
        check_tiles(block_m, block_n, num_warps, num_stages)
        t = trace(mask_mod, score_mod)
        self.tensors = list(t.tensors)
        # slot -> shape of the captured tensors whose sizes the IR bakes in (unrolled dims): another
        # tensor in such a slot must have the same shape (the pattern cache checks)
        self.sized = {i: tuple(self.tensors[i].shape) for i in sorted(t.sized)}
        # floating tensors that require grad and are read by score_mod learn; mask tensors are constants
        learnable = frozenset(i for i, x in enumerate(self.tensors) if x.requires_grad and x.dtype.is_floating_point)
        self.spec = build_spec(t.mask, t.score, t.buffers, name=name, normalizer=normalizer, learnable=learnable,
                               tiles=(block_m, block_n))
        self._tiles = (block_m, block_n, num_warps, num_stages)
        self._runners: dict = {}
        # captured-tensor indices must stay inside their tensors for every call (kernels clamp them)
        self.index_check = index_check_for(self.spec)
        # bitwise-repeatable gradients of learnable tensors: partial sums reduced in a fixed order
        self.deterministic = bool(deterministic)
        # the backward's delta from a float32 copy of the output (docs/precision.md)
        self.precise_delta = bool(precise_delta)
        #: the pattern's name for the torch.library ops (runtime/op.py), and what traced code needs
        self.op_meta = OpMeta(op.register(self), self.spec.normalizer)

    def __deepcopy__(self, memo):
        """A copy that reads the copies of its captured tensors (``copy.deepcopy`` of a model copies
        its parameters first, so a learnable slope or table stays the copied model's own); its
        kernels are loaded again from the source cache on first use. ``mask_mod``/``score_mod``
        stay the original functions (closures are not copied): they still read the original
        tensors where something evaluates them again (the reference, ``assert_matches_reference``)."""
        new = copy.copy(self)
        memo[id(self)] = new
        new.tensors = [copy.deepcopy(t, memo) for t in self.tensors]
        new._runners = {}
        new.__dict__.pop("_plans", None)
        new.__dict__.pop("_block_variants", None)
        new.__dict__.pop("_gather_runners", None)
        return new

    # -- kernels ---------------------------------------------------------------------------
    def runner(self, q: torch.Tensor, dv: int | None = None, k: torch.Tensor | None = None) -> Runner:
        """The runner for queries like ``q`` and values of head dim ``dv`` (default: q's); with keys
        ``k``, the tiles of a tuned entry of the call's key where there is one (``attndsl.tuning``)."""
        dv = q.shape[-1] if dv is None else dv
        dev = q.device
        # per element size too: a launch that overflows shared memory keeps its smaller tiles for
        # later calls, and float32 inputs need twice the shared memory of 16-bit ones. Keyed by the
        # device: whether it runs in the interpreter (ATTNDSL_FORCE_INTERPRET) is decided once
        key = (dev.type, dev.index, q.shape[-1], dv, q.element_size())
        tuned = None if k is None or any(self._tiles) else entry_for(self.spec, q, k, dv)  # explicit tiles win
        if tuned is not None:
            key += (tuned.key,)
        r = self._runners.get(key)
        if r is None:
            interpret = use_interpreter(q)
            if not interpret:
                check_gpu_tiles(*self._tiles[:2])
            module = cache.load(self.spec, interpret, float64=q.dtype == torch.float64)
            tiles = (self.spec.tiles or self._tiles[:2]) + self._tiles[2:]  # box plans fix the tile sizes
            cfg = choose(q.shape[-1], interpret, *tiles, element_size=q.element_size(), head_dim_v=dv)
            if self.spec.tiles:  # ... per kernel
                cfg = Configs(cfg.fwd, replace(cfg.dkdv, block_m=self.spec.bwd_tiles[0], block_n=self.spec.bwd_tiles[1]),
                              replace(cfg.dq, block_m=self.spec.dq_tiles[0], block_n=self.spec.dq_tiles[1]))
            cfg = for_pattern(cfg, self.spec.has_mask, self.spec.score is not None, self.spec.data_dependent)
            r = Runner(self.spec, module, cfg, interpret, q.shape[-1], head_dim_v=dv)
            if tuned is not None:
                tuned.install(r)
            r.deterministic = self.deterministic
            r.precise_delta = self.precise_delta
            self._runners[key] = r
        return r

    @property
    def source(self) -> str:
        """The generated Triton module's source text."""
        return codegen.render(self.spec)

    def build_block_tables(self, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor | None = None) -> BlockTables | None:
        """Build the device-side block table now (data-dependent masks); None when closed form suffices
        (or the call is empty: it launches nothing). ``value``: when its head dim differs from the
        query's, the call's tiles may too; pass it so the table is built for them."""
        if not self.spec.data_dependent or is_empty(query, key):
            return None
        check_captured(self.tensors, query.device)
        check_indices_of(self.index_check, self.tensors, call_shape(query, key), query.device)
        r = self.runner(query, None if value is None else value.shape[-1], key)
        tables = r.new_tables(query, key, self.tensors)
        r.table(tables, self.tensors, False, r.cfg.fwd.block_m, r.cfg.fwd.block_n)
        return tables

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None,
                 return_lse: bool = False, block_tables: BlockTables | None = None,
                 sigmoid_bias: float | torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                 bias_factors: tuple[torch.Tensor, torch.Tensor] | None = None, indices: torch.Tensor | None = None,
                 blocks=None, check_indices: bool | None = None) -> AttentionResult:
        """Run the compiled pattern; arguments, shapes and results as :func:`attention`.

        ``block_tables``: tables from :meth:`build_block_tables` for this call's shape (eager mode;
        tables are also cached automatically, see :func:`attention`). Under ``torch.compile`` the
        call is one ``torch.library`` op (``attndsl::attention_fwd``) reading ``self.tensors``."""
        if torch.compiler.is_compiling():
            return self._traced(self.tensors, query, key, value, scale, return_lse, block_tables, sigmoid_bias, sinks,
                                bias_factors, indices, blocks)
        return self._eager(self.tensors, query, key, value, scale, return_lse, block_tables, sigmoid_bias, sinks,
                           bias_factors, indices, blocks, check_indices)

    def _traced(self, tensors, query, key, value, scale, return_lse, block_tables, sigmoid_bias, sinks, bias_factors,
                indices, blocks):
        """The call while torch.compile traces it: the ``attndsl::attention_fwd`` op."""
        if block_tables is not None:
            raise ValueError("block_tables= is an eager-mode argument; under torch.compile the tables of a "
                             "call are cached by its captured tensors (attndsl.attention's docstring)")
        return op_call(self.op_meta, tensors, query, key, value, scale=scale, return_lse=return_lse,
                       sigmoid_bias=sigmoid_bias, sinks=sinks, bias_factors=bias_factors, indices=indices,
                       blocks=blocks)

    def _eager(self, tensors, query, key, value, scale, return_lse, block_tables, sigmoid_bias, sinks, bias_factors,
               indices, blocks, check_indices):
        """The call with the captured tensors ``tensors`` (bound per call by :func:`attention`),
        outside torch.compile; arguments positional, in :meth:`__call__`'s order."""
        if indices is not None or blocks is not None:
            # index selectors (attndsl.selectors): token-level gather kernels or block-table mode
            if check_indices is None and query.is_cuda and torch.cuda.is_current_stream_capturing():
                check_indices = False  # no sync inside a CUDA graph capture
            if tensors is not self.tensors:
                # bound in place: block variants (copies of this object) share the list
                self.tensors[:] = tensors
            return _selected_call()(self, query, key, value, indices=indices, blocks=blocks,
                                    check_indices=check_indices, block_tables=block_tables, scale=scale,
                                    return_lse=return_lse, sigmoid_bias=sigmoid_bias, sinks=sinks,
                                    bias_factors=bias_factors)
        plain = sigmoid_bias is None and not self.deterministic
        if plain:  # the common call: its checks were passed by an earlier call of the same key
            pkey = plan_key(tensors, query, key, value, scale, return_lse, sinks, bias_factors)
            plans = self.__dict__.get("_plans")
            if plans is None or plans.runners is not self._runners:  # a copy's runners: its own plans
                plans = self._plans = Plans(self._runners)
            plan = plans.get(pkey) if pkey is not None else None
            if plan is not None:
                if sinks is not None:  # values: once per version of the tensor
                    check_sink_values(sinks)
                if block_tables is not None:
                    self._check_tables(block_tables, plan.shape)
                if bias_factors is None:
                    return self._run(plan, tensors, query, key, value, scale, sinks, None, None, block_tables,
                                     check_indices)
                u, w = bias_factors
                return self._run(plan, tensors, query, key, value, scale, sinks, u, w, block_tables, check_indices)
        check_inputs(query, key, value, scale)
        check_captured(tensors, query.device)
        check_extras(query, key, normalizer=self.spec.normalizer, return_lse=return_lse, sinks=sinks,
                     bias_factors=bias_factors, sigmoid_bias=sigmoid_bias)
        if is_empty(query, key):  # no (query, key) pair: every row is a fully masked one, no launch
            learnable = sorted(self.spec.learnable_slots)
            return empty_call(query, key, value, softmax=self.spec.normalizer == "softmax", return_lse=return_lse,
                              sinks=sinks, others=(*(bias_factors or ()), *(tensors[s] for s in learnable)))
        shape = call_shape(query, key)
        check_indices_of(self.index_check, tensors, shape, query.device, check_indices)
        if self.spec.normalizer == "sigmoid" and sigmoid_bias is None:
            sigmoid_bias = -math.log(key.shape[2])
        u, w = tuple(bias_factors) if bias_factors is not None else (None, None)
        if self.deterministic:
            check_deterministic(self.spec, tensors, query)
        r = self.runner(query, value.shape[-1], key)
        extras = Extras(sinks, u, w, float(sigmoid_bias or 0.0))
        if block_tables is not None:
            self._check_tables(block_tables, shape)
        # one launch-memo key for the call's launches, forward and backward (block tables: no memo)
        memo = Prepared(r.call_key(query, key, value, query.shape[-1] ** -0.5 if scale is None else float(scale),
                                   extras, tensors))
        scale0, extras0 = query.shape[-1] ** -0.5, Extras(sigmoid_bias=extras.sigmoid_bias)
        plan = _Plan(r, scale0, extras0, memo, shape, self.index_check.reads_values(),
                     return_lse or self.spec.normalizer != "softmax",
                     TABLES.layout_key(r, query, key, tensors) if self.spec.data_dependent else None,
                     Call(r, scale0, None, extras0, memo))
        if plain and pkey is not None:  # every check above passed for this key: later calls skip them
            if len(plans) >= MAX_PLANS:
                plans.clear()
            plans[pkey] = plan
        return self._run(plan, tensors, query, key, value, scale, sinks, u, w, block_tables, _CHECKED)

    def _check_tables(self, block_tables, shape) -> None:
        """Tables passed to a data-dependent pattern's call must be built for its shape (other
        patterns read none)."""
        if self.spec.data_dependent and block_tables.shape != shape:
            raise ValueError(f"block_tables were built for shape {block_tables.shape}, the call has {shape}")

    def _run(self, plan, tensors, query, key, value, scale, sinks, u, w, block_tables=None, check_indices=None):
        """Launch a call whose checks passed (``plan``): the runner's forward directly when nothing
        needs a gradient, else through the autograd Function. The index checks that read captured
        values run again (``check_indices`` as passed, see :func:`attention`; ``_CHECKED``: this
        call ran every check itself)."""
        if check_indices is not _CHECKED and (plan.value_checks or check_indices is True):
            check_indices_of(self.index_check, tensors, plan.shape, query.device, check_indices)
        if sinks is None and u is None:
            extras, default = plan.extras, scale is None  # default: plan.call's arguments, unless tables
        else:
            extras, default = Extras(sinks, u, w, plan.extras.sigmoid_bias), False
        scale = plan.scale if scale is None else float(scale)
        r = plan.runner
        tables = None
        if self.spec.data_dependent:
            tables = block_tables if block_tables is not None else TABLES.get(r, query, key, tensors, plan.tables)
        if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad
                                        or ((tensors or sinks is not None or u is not None)
                                            and any_grad(sinks, u, w, tensors))):
            call = plan.call if default and tables is None else Call(r, scale, tables, extras, plan.memo)
            got = _apply(query, key, value, sinks, u, w, call, *tensors)
        else:  # inference: no graph node, no saved tensors
            fast = plan.memo.fwd  # the key's FastForward (``Runner.forward_prepared``'s first try)
            got = fast(query, key, value, scale, tensors, extras, tables) if fast is not None else None
            out, lse = got if got is not None else r.forward_prepared(plan.memo, query, key, value, scale, tensors,
                                                                      extras, tables)
            if out.dtype != query.dtype:  # float32 under precise_delta
                out = out.to(query.dtype)
            got = out if lse is None else (out, lse)
        if plan.whole:  # sigmoid: out alone (return_lse was refused); softmax with return_lse: (out, lse)
            return got
        return got[0]

    def visit_counts(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None,
                     runs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tiles each forward program visited, ``[B*Hq, n_q_tiles]`` (for tests and tuning); with
        ``runs=True`` also how many of them it visited in constant runs (one table entry per run,
        ``codegen/runs.py``), as a pair."""
        check_inputs(query, key, value, scale)
        if is_empty(query, key):
            raise ValueError(f"visit_counts of an empty call (query {tuple(query.shape)}, key {tuple(key.shape)}): "
                             "no kernel runs, nothing is visited")
        check_captured(self.tensors, query.device)
        check_indices_of(self.index_check, self.tensors, call_shape(query, key), query.device)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        r = self.runner(query, value.shape[-1], key)
        tables = r.new_tables(query, key, self.tensors) if self.spec.data_dependent else None
        visits = r.forward(query, key, value, scale, self.tensors, tables, count_visits=True)[2]
        return (visits[0], visits[1]) if runs else visits[0]

    def explain(self) -> str:
        from .explain import explain
        return explain(self)

    def __repr__(self):
        return f"CompiledAttention(key={self.spec.key}, mask={self.mask_mod!r}, score_mod={self.score_mod!r})"


_selected = None


def _selected_call():
    """``attndsl.selectors.selected_call``, imported once, on first use (the selectors import this
    module, so not at its top)."""
    global _selected
    if _selected is None:
        from .selectors import selected_call as _selected
    return _selected


def check_deterministic(spec, tensors, query) -> None:
    """Refuse ``deterministic=True`` calls whose repeatable gradients cannot be kept (before launch)."""
    from .runtime.gradients import MAX_PRIVATE_PARTIALS, gl_exact, private_rows
    for gl in spec.grad_loads:
        if gl.scope in ("scatter", "col") and tensors[gl.slot].requires_grad:
            n, row = private_rows(gl, tensors[gl.slot].shape, query.shape[0], query.shape[1], query.shape[2])
            if n * row > MAX_PRIVATE_PARTIALS:
                raise ValueError(
                    f"deterministic=True: learnable tensor #{gl.slot} (shape {tuple(tensors[gl.slot].shape)}) "
                    f"is shared by many (q, kv) pairs; its bitwise-repeatable gradient keeps {row} partial "
                    f"sums for each of {n} query tiles ({n * row * 4 / 2**30:.1f} GiB, over the "
                    f"{MAX_PRIVATE_PARTIALS * 4 / 2**30:.0f} GiB limit); index it by head first "
                    "(table[h, ...]) to shrink each row, or use deterministic=False")
        if gl.scope == "exact" and not gl_exact(gl, query.shape[0], query.shape[1]):
            raise NotImplementedError(
                f"deterministic=True: learnable tensor #{gl.slot} has no batch/head dimension but the "
                f"call has B={query.shape[0]}, Hq={query.shape[1]}, so its gradient would be summed with "
                "atomic adds; give it the batch/head dimensions (expand) or use deterministic=False")


def op_call(meta: OpMeta, tensors, query, key, value, *, scale=None, return_lse=False, sigmoid_bias=None,
            sinks=None, bias_factors=None, indices=None, blocks=None):
    """The call as the ``attndsl::attention_fwd`` op (what torch.compile traces): validation in plain
    Python on shapes and dtypes, then one op. Value checks of indices are not run here (no sync
    in a graph); ``check_indices=True`` in eager mode runs them."""
    check_inputs(query, key, value, scale)
    check_captured(tensors, query.device)
    check_extras(query, key, normalizer=meta.normalizer, return_lse=return_lse, sinks=sinks,
                 bias_factors=bias_factors, sigmoid_bias=sigmoid_bias)
    softmax = meta.normalizer == "softmax"
    q_block = kv_block = 0
    sel = None
    if indices is not None and blocks is not None:
        raise ValueError("pass either indices= (token selection) or blocks= (block selection), not both")
    if indices is not None:
        from .selectors.sparse import validate_indices
        validate_indices(indices, query, key, False)
        if indices.shape[0] != query.shape[0]:
            indices = indices.expand(query.shape[0], -1, -1, -1)
    elif blocks is not None:
        from .selectors.blocks import BlockSelection
        if not isinstance(blocks, BlockSelection):
            raise TypeError(f"blocks must be an attndsl.selectors.BlockSelection, got {type(blocks).__name__}")
        blocks.check(query, key)
        sel, q_block, kv_block = blocks.indices, blocks.q_block, blocks.kv_block
    if is_empty(query, key):
        return empty_call(query, key, value, softmax=softmax, return_lse=return_lse, sinks=sinks,
                          others=(*(bias_factors or ()), *(t for t in tensors if t.requires_grad)))
    if not softmax and sigmoid_bias is None:
        sigmoid_bias = -math.log(key.shape[2])
    u, w = tuple(bias_factors) if bias_factors is not None else (None, None)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    out, lse = torch.ops.attndsl.attention_fwd(query, key, value, list(tensors), sinks, u, w, indices, sel,
                                               meta.key, scale, float(sigmoid_bias or 0.0), q_block, kv_block)
    out = out.to(query.dtype)  # a precise_delta pattern's op returns the float32 copy its backward reads
    if not softmax:
        return out
    return (out, lse) if return_lse else out


def compile(*, mask_mod: MaskMod | None = None, score_mod: ScoreMod | None = None,  # noqa: A001
            normalizer: str = "softmax", block_m: int | None = None, block_n: int | None = None,
            num_warps: int | None = None, num_stages: int | None = None,
            deterministic: bool = False, precise_delta: bool = False) -> CompiledAttention:
    """Trace and analyse a pattern once; the result is called like :func:`attention`.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True: the pair attends), or None.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, or None.
        normalizer: ``"softmax"`` or ``"sigmoid"`` (fixed here; ``sigmoid_bias`` goes to the call).
        block_m, block_n, num_warps, num_stages: override the tile-size heuristics (tuning, tests);
            tiles are powers of two from 16 to 256.
        deterministic: bitwise-repeatable gradients of learnable captured tensors.
        precise_delta: compute the backward's ``delta = rowsum(dO·O)`` from a float32 copy of the
            output (16-bit inputs; see :func:`attention` and docs/precision.md).

    Returns:
        A :class:`CompiledAttention`, called as ``compiled(query, key, value, **kwargs)`` with the
        keywords of :func:`attention` (``sinks``, ``bias_factors``, ``indices``, ``blocks``, ...).
        Its captured tensors are held by reference: an in-place change is seen by later calls;
        rebinding a Python name to another tensor needs a new ``compile`` (or use :func:`attention`,
        which binds them per call).
    """
    return CompiledAttention(mask_mod, score_mod, normalizer=normalizer, block_m=block_m, block_n=block_n,
                             num_warps=num_warps, num_stages=num_stages, deterministic=deterministic,
                             precise_delta=precise_delta)


def clear_cache() -> None:
    """Forget the patterns :func:`attention` has traced, the block tables it keeps, the index
    checks it remembers and what it decided for each torch ``BlockMask`` (the next call traces,
    checks and builds again). Kernels stay loaded and the on-disk source cache is untouched;
    patterns named by compiled ``torch.compile`` graphs stay registered
    (``attndsl.runtime.op.REGISTRY``)."""
    from .runtime import indexcheck
    PATTERNS.clear()
    TABLES.clear()
    indexcheck.clear()
    flexcompat.forget_block_masks()


def _tile_options(kernel_options) -> tuple:
    """(block_m, block_n, num_warps, num_stages) from FlexAttention's ``kernel_options``."""
    if kernel_options is None:
        return (None, None, None, None)
    return flexcompat.tile_options(kernel_options)


#: ``_tile_options(None)``
_NO_TILES = (None, None, None, None)


def _compiled(mask_mod, score_mod, normalizer, deterministic, kernel_options, precise_delta=False):
    """``(compiled pattern, its captured tensors bound for this call)`` through the pattern cache."""
    tiles = _NO_TILES if kernel_options is None else _tile_options(kernel_options)
    options = (normalizer, bool(deterministic), bool(precise_delta), tiles)
    got = PATTERNS.found(mask_mod, score_mod, options)  # the same functions as an earlier call's
    if got is not None:
        return got

    def make():
        return CompiledAttention(mask_mod, score_mod, normalizer=normalizer, block_m=tiles[0], block_n=tiles[1],
                                 num_warps=tiles[2], num_stages=tiles[3], deterministic=deterministic,
                                 precise_delta=precise_delta)
    return PATTERNS.lookup(mask_mod, score_mod, options, make)


def _mask_pattern(mask_mod):
    """A ``mask_mod``'s compiled pattern and captured tensors (softmax, default options), through the
    pattern cache: what ``flexcompat.block_mask_parts`` checks a torch BlockMask's block tensors by."""
    return _compiled(mask_mod, None, "softmax", False, None)


@torch.compiler.assume_constant_result
def _resolve_for_trace(mask_mod, score_mod, normalizer, deterministic, kernel_options, precise_delta=False):
    """Run while dynamo traces (its result is a constant of the graph): the pattern's op metadata
    and where each captured tensor sits (paths the traced code follows to bind them per call)."""
    from .runtime.patterns import paths_of
    compiled, tensors = _compiled(mask_mod, score_mod, normalizer, deterministic, kernel_options, precise_delta)
    paths = paths_of(mask_mod, score_mod, tensors)
    if paths is None:
        raise RuntimeError(
            "attndsl.attention under torch.compile: the pattern reads a tensor that is not held in a closure "
            "cell, global or default of its functions; capture it there, or build the pattern outside the "
            "compiled region with attndsl.compile")
    return compiled.op_meta, paths


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, mask_mod: MaskMod | None = None,
              score_mod: ScoreMod | None = None, block_mask=None, scale: float | None = None,
              enable_gqa: bool | None = None, return_lse: bool = False, return_aux=None,
              kernel_options: dict | None = None, normalizer: str = "softmax",
              sigmoid_bias: float | torch.Tensor | None = None, sinks: torch.Tensor | None = None,
              bias_factors: tuple[torch.Tensor, torch.Tensor] | None = None, indices: torch.Tensor | None = None,
              blocks=None, check_indices: bool | None = None, deterministic: bool = False,
              precise_delta: bool = False):
    r"""Fused attention with an optional mask and score modifier (FlexAttention conventions).

    .. math::
        \text{out}_i = \sum_j \operatorname{softmax}_j\big(\text{score\_mod}(s_{ij}, b, h, i, j)\big)\, v_j,
        \quad s_{ij} = \text{scale}\cdot q_i\cdot k_j, \quad j \text{ over keys where mask\_mod}(b, h, i, j)

    Args:
        query (Tensor): ``[B, Hq, Lq, D]``, float16, bfloat16 or float32 (float64 on the CPU).
        key (Tensor): ``[B, Hkv, Lkv, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
        value (Tensor): ``[B, Hkv, Lkv, Dv]`` (``Dv`` may differ from ``D``, as in MLA).
        mask_mod (Callable | None): ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
        score_mod (Callable | None): ``score_mod(score, b, h, q_idx, kv_idx) -> score``.
        block_mask (BlockMask | PatternMask | None): :func:`attndsl.create_block_mask`'s object (its
            ``mask_mod``, O(1)) or a FlexAttention ``BlockMask``, meaning what it means in
            FlexAttention: a key is visible iff its kv block is listed for the (b, h, query block)
            in the block tensors (partial or full) and the block is full or ``mask_mod`` holds.
            One whose block tensors are exactly what its ``mask_mod`` implies (torch's
            ``create_block_mask``) runs from the ``mask_mod`` alone; this is checked on the host
            once per BlockMask (call shape and tensor versions). Any other (``from_kv_blocks``,
            VSA), and every BlockMask under ``torch.compile``, runs as a block selection of the
            listed blocks (full blocks that may disagree with the ``mask_mod``: a second selection
            without it, merged through the logsumexp). ``BLOCK_SIZE`` must be powers of two
            >= 16; its batch and heads 1 or the call's; its lengths the call's. Not with
            ``mask_mod``, nor (a block-tensor mask) with ``indices``/``blocks``.
        scale (float | None): score scale; default ``1/sqrt(D)``.
        enable_gqa (bool | None): ``None`` (default): heads may differ (``Hq % Hkv == 0``). ``False``:
            refuse ``Hq != Hkv`` as FlexAttention does; ``True``: as None.
        return_lse (bool): also return the natural-log logsumexp ``[B, Hq, Lq]`` (float32).
        return_aux (AuxRequest | None): FlexAttention's ``AuxRequest(lse=True)``: return
            ``(out, AuxOutput(lse=lse))``. ``max_scores`` is not computed (NotImplementedError).
        kernel_options (dict | None): FlexAttention's kernel options; ``BLOCK_M``, ``BLOCK_N``,
            ``num_warps`` and ``num_stages`` set our tiles; Flex's other documented options tune
            Flex's own kernel and are ignored; an unknown key raises.
        normalizer (str): ``"softmax"`` or ``"sigmoid"``: ``Σ_j σ(s_ij + sigmoid_bias)·v_j``
            (default bias ``-log(Lkv)``, no lse).
        sigmoid_bias (float | None): see ``normalizer``.
        sinks (Tensor | None): ``[Hq]`` per-head logits that join the softmax denominator (a fully
            masked row gives 0 and ``lse = sink``); they receive gradients.
        bias_factors (tuple[Tensor, Tensor] | None): ``(u [B|1, Hq|1, Lq, R], w [B|1, Hq|Hkv|1, Lkv, R])``;
            adds ``u·wᵀ`` to the scaled score inside the kernel.
        indices (Tensor | None): ``[B, G, Lq, K]`` int32 (``-1`` = unused): the keys each query visits,
            shared by the query heads of group ``g`` (DeepSeek Sparse Attention,
            :mod:`attndsl.selectors`); out-of-range entries raise unless ``check_indices=False``.
        blocks (BlockSelection | None): key blocks per query block (MoBA, NSA).
        check_indices (bool | None): ``True``: check every index the pattern computes from captured
            values on every call (a host sync); ``None`` (default): once per captured tensor version
            (see below); ``False``: never (the kernels clamp: wrong values, no fault).
        deterministic (bool): bitwise-repeatable gradients of learnable captured tensors.
        precise_delta (bool): in float16/bfloat16 the backward's ``delta = rowsum(dO·O)`` uses the
            output rounded to the input dtype, and a score modifier with a large multiplier
            (``slope[h] * (q_idx - kv_idx)``) amplifies that rounding in a learnable tensor's
            gradient; ``True`` keeps a float32 copy of the output for the backward (one float32
            output of memory) and computes ``delta`` from it (docs/precision.md).

    float64 inputs (CPU tensors only, through Triton's interpreter) compute in float64 throughout
    (lse too), so ``torch.autograd.gradcheck`` applies. ``sinks`` must be finite, or ``-inf`` for a
    head with no sink.

    Returns:
        ``out [B, Hq, Lq, Dv]`` in the inputs' dtype; with ``return_lse`` the pair ``(out, lse)``;
        with ``return_aux`` the pair ``(out, AuxOutput)``. Rows whose every key is masked give zeros
        and ``lse = -inf``; so does every row of an empty call (a size of 0), which launches nothing.
        Captured floating tensors read by ``score_mod`` that require grad receive gradients.

    What is cached, and how to clear it (:func:`attndsl.clear_cache`):

    * **Patterns**: the trace, analysis and kernels of a pattern are kept (LRU, 256 patterns) and
      found again by the functions' code and the Python constants they read (closure cells, the
      globals their code names, defaults; ints, floats, bools, strings, tuples/lists/dicts of
      those, nested functions, a :class:`Layout` by its value), with each captured tensor's dtype,
      rank and ``requires_grad``
      (and shape, when the code reads a shape). A fresh closure from a factory
      (``sliding_window(256)`` inside ``forward``) is found again. Captured tensors are bound per
      call: a closure cell or global rebound to another tensor is read, an in-place change is
      seen. A pattern holding something else (an arbitrary object) is traced on every call. For
      plain functions whose cells, globals and defaults hold only constants, tensors, modules,
      layouts, tuples of those and plain functions of the same kind (the locality patterns'
      helpers), the walk that finds the pattern is itself kept, by the identities of the objects
      read; and
      the very function objects of earlier calls (a module-level ``causal``, a closure made once
      in ``__init__``, no functions at all) are found by their identities without a walk, each
      call checking that they still read the same objects (a rebound cell or global, or a held
      tensor changed in dtype, rank, ``requires_grad``, device or shape, walks again).
    * **Block tables** of data-dependent masks (document masks): kept across calls and layers, keyed
      by the pattern, the call's shape and each mask-read captured tensor's address, shape, strides
      and version counter (an in-place change rebuilds). Not cached inside a CUDA graph capture.
    * **Call plans**: the input checks a call passed, per call key (shapes, strides, dtypes,
      devices, alignment; see :class:`CompiledAttention`), kept with the cached pattern, with the
      key's launches prepared (tiles, grid, constants and argument specialisation decided once,
      forward and backward: a later call allocates its outputs and launches). A call with block
      tables takes its own tables into the prepared launches.
    * **Index checks** of indices computed from captured values (``table[ids[q_idx]]``): by default
      once per captured tensor version (a host sync the first time only).

    Under ``torch.compile`` the call is one ``torch.library`` op (``attndsl::attention_fwd``, with a fake
    implementation and autograd), so ``fullgraph=True`` and ``dynamic=True`` work; the pattern is
    resolved while dynamo traces (Python constants the pattern reads are taken as they are then:
    changing a global constant later does not retrace); its captured tensors are graph inputs, bound
    per call. A closure created *inside* the compiled function that holds a tensor cannot be
    resolved there (dynamo cannot read its cells): build it outside, e.g. in ``__init__`` (an
    in-place update of the tensor is seen), or with :func:`compile`, or capture the tensor through a
    global.
    """
    if block_mask is not None:
        if mask_mod is not None:
            raise ValueError("pass either mask_mod= or block_mask= (whose mask_mod is used), not both")
        mask_mod, parts = flexcompat.block_mask_parts(block_mask, query, key, _mask_pattern)
        if parts is not None:  # a torch BlockMask whose block tensors say more than its mask_mod
            if indices is not None or blocks is not None:
                raise ValueError("block_mask= with a BlockMask whose block tensors select key blocks cannot be "
                                 "combined with indices= or blocks=; pass one selection")
            return _block_mask_call(parts, query, key, value, score_mod=score_mod, scale=scale, enable_gqa=enable_gqa,
                                    return_lse=return_lse, return_aux=return_aux, kernel_options=kernel_options,
                                    normalizer=normalizer, sigmoid_bias=sigmoid_bias, sinks=sinks,
                                    bias_factors=bias_factors, check_indices=check_indices,
                                    deterministic=deterministic, precise_delta=precise_delta)
    if enable_gqa is False and query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1]:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.shape[1]} "
                         f"and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA (attndsl.attention accepts "
                         "GQA with enable_gqa=None, its default).")
    if return_aux is not None:
        flexcompat.check_aux(return_aux, return_lse, normalizer)
        return_lse = bool(return_aux.lse)
    if torch.compiler.is_compiling():
        # NOTE: a closure made inside the compiled function that holds a tensor cannot be resolved here
        # (dynamo cannot read its cells: ClosureConversionError); build it outside or with attndsl.compile
        meta, paths = _resolve_for_trace(mask_mod, score_mod, normalizer, deterministic, kernel_options, precise_delta)
        from .runtime.patterns import follow
        got = op_call(meta, [follow((mask_mod, score_mod), p) for p in paths], query, key, value, scale=scale,
                      return_lse=return_lse, sigmoid_bias=sigmoid_bias, sinks=sinks, bias_factors=bias_factors,
                      indices=indices, blocks=blocks)
    else:
        compiled, tensors = _compiled(mask_mod, score_mod, normalizer, deterministic, kernel_options, precise_delta)
        got = compiled._eager(tensors, query, key, value, scale, return_lse, None, sigmoid_bias, sinks, bias_factors,
                              indices, blocks, check_indices)
    if return_aux is not None:
        return flexcompat.aux_output(got, return_aux)
    return got


def _block_mask_call(parts, query, key, value, *, return_lse, return_aux, sinks, normalizer, **kw):
    """:func:`attention` over a torch BlockMask's block selections (``attndsl.flexcompat.block_mask_parts``):
    one call per part, merged through the logsumexp; the sinks join the first part only."""
    if return_aux is not None:
        flexcompat.check_aux(return_aux, return_lse, normalizer)
        return_lse = bool(return_aux.lse)
    softmax = normalizer == "softmax"
    if len(parts) == 1:
        got = attention(query, key, value, mask_mod=parts[0].mask_mod, blocks=parts[0].blocks,
                        return_lse=return_lse, sinks=sinks, normalizer=normalizer, **kw)
    else:
        got = flexcompat.merge_parts([attention(query, key, value, mask_mod=p.mask_mod, blocks=p.blocks,
                                     return_lse=softmax, sinks=sinks if i == 0 else None,
                                     normalizer=normalizer, **kw)
                           for i, p in enumerate(parts)], softmax, return_lse)
    return flexcompat.aux_output(got, return_aux) if return_aux is not None else got
