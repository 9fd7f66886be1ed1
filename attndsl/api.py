"""Public entry points: ``attndsl.attention`` and ``attndsl.compile``."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from . import codegen
from .dsl import trace
from .passes import build_spec
from .runtime import cache
from .runtime.autograd import AttentionFunction
import math

from .runtime.checks import call_shape, check_captured, check_extras, check_inputs, index_check_for
from .runtime.config import Configs, choose, for_pattern
from .runtime.empty import empty_call, is_empty
from .runtime.launch import BlockTables, Extras, Runner, use_interpreter


class CompiledAttention:
    """A pattern traced and analysed once; kernels are built per backend/dtype/head dim on first use.

    Captured tensors are held by reference: mutating them in place is seen by later calls,
    rebinding a Python name to a new tensor needs a new ``compile``.
    """

    def __init__(self, mask_mod=None, score_mod=None, *, normalizer="softmax", block_m=None, block_n=None,
                 num_warps=None, num_stages=None, name="attn", deterministic=False):
        self.mask_mod, self.score_mod = mask_mod, score_mod
        t = trace(mask_mod, score_mod)
        self.tensors = list(t.tensors)
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
        new.__dict__.pop("_block_variants", None)
        new.__dict__.pop("_gather_runners", None)
        return new

    # -- kernels ---------------------------------------------------------------------------
    def runner(self, q: torch.Tensor, dv: int | None = None) -> Runner:
        """The runner for queries like ``q`` and values of head dim ``dv`` (default: q's)."""
        interpret = use_interpreter(q)
        dv = q.shape[-1] if dv is None else dv
        # per element size too: a launch that overflows shared memory keeps its smaller tiles for
        # later calls, and float32 inputs need twice the shared memory of 16-bit ones
        key = (interpret, q.shape[-1], dv, q.device.index, q.element_size())
        r = self._runners.get(key)
        if r is None:
            module = cache.load(self.spec, interpret)
            tiles = (self.spec.tiles or self._tiles[:2]) + self._tiles[2:]  # box plans fix the tile sizes
            cfg = choose(q.shape[-1], interpret, *tiles, element_size=q.element_size(), head_dim_v=dv)
            if self.spec.tiles:  # ... per kernel
                cfg = Configs(cfg.fwd, replace(cfg.dkdv, block_m=self.spec.bwd_tiles[0], block_n=self.spec.bwd_tiles[1]),
                              replace(cfg.dq, block_m=self.spec.dq_tiles[0], block_n=self.spec.dq_tiles[1]))
            cfg = for_pattern(cfg, self.spec.has_mask, self.spec.score is not None, self.spec.data_dependent)
            r = Runner(self.spec, module, cfg, interpret, q.shape[-1], head_dim_v=dv)
            r.deterministic = self.deterministic
            self._runners[key] = r
        return r

    @property
    def source(self) -> str:
        """The generated Triton module's source text."""
        return codegen.render(self.spec)

    def build_block_tables(self, query, key, value=None) -> BlockTables | None:
        """Build the device-side block table now (data-dependent masks); None when closed form suffices
        (or the call is empty: it launches nothing). ``value``: when its head dim differs from the
        query's, the call's tiles may too; pass it so the table is built for them."""
        if not self.spec.data_dependent or is_empty(query, key):
            return None
        check_captured(self.tensors, query.device)
        self.index_check(self.tensors, call_shape(query, key), query.device)
        r = self.runner(query, None if value is None else value.shape[-1])
        tables = r.new_tables(query, key, self.tensors)
        r.table(tables, self.tensors, False, r.cfg.fwd.block_m, r.cfg.fwd.block_n)
        return tables

    # torch.compile runs the call as it is (a graph break): the tracer, the checks and the Triton
    # launches are host code that dynamo cannot and need not trace
    @torch.compiler.disable
    def __call__(self, query, key, value, *, scale=None, return_lse=False, block_tables=None,
                 sigmoid_bias=None, sinks=None, bias_factors=None, indices=None, blocks=None, check_indices=None):
        if indices is not None or blocks is not None:
            # index selectors (attndsl.selectors): token-level gather kernels or block-table mode
            from .selectors import selected_call
            return selected_call(self, query, key, value, indices=indices, blocks=blocks, check_indices=check_indices,
                                 block_tables=block_tables, scale=scale, return_lse=return_lse,
                                 sigmoid_bias=sigmoid_bias, sinks=sinks, bias_factors=bias_factors)
        check_inputs(query, key, value, scale)
        check_captured(self.tensors, query.device)
        check_extras(query, key, normalizer=self.spec.normalizer, return_lse=return_lse, sinks=sinks,
                     bias_factors=bias_factors, sigmoid_bias=sigmoid_bias)
        if is_empty(query, key):  # no (query, key) pair: every row is a fully masked one, no launch
            learnable = sorted(self.spec.learnable_slots)
            return empty_call(query, key, value, softmax=self.spec.normalizer == "softmax", return_lse=return_lse,
                              sinks=sinks, others=(*(bias_factors or ()), *(self.tensors[s] for s in learnable)))
        self.index_check(self.tensors, call_shape(query, key), query.device)
        if self.spec.normalizer == "sigmoid" and sigmoid_bias is None:
            sigmoid_bias = -math.log(key.shape[2])
        u, w = tuple(bias_factors) if bias_factors is not None else (None, None)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        if self.deterministic:
            from .runtime.launch import MAX_PRIVATE_PARTIALS, gl_exact, private_rows
            for gl in self.spec.grad_loads:
                if gl.scope in ("scatter", "col") and self.tensors[gl.slot].requires_grad:
                    n, row = private_rows(gl, self.tensors[gl.slot].shape, query.shape[0], query.shape[1],
                                          query.shape[2])
                    if n * row > MAX_PRIVATE_PARTIALS:
                        raise ValueError(
                            f"deterministic=True: learnable tensor #{gl.slot} (shape {tuple(self.tensors[gl.slot].shape)}) "
                            f"is shared by many (q, kv) pairs; its bitwise-repeatable gradient keeps {row} partial "
                            f"sums for each of {n} query tiles ({n * row * 4 / 2**30:.1f} GiB, over the "
                            f"{MAX_PRIVATE_PARTIALS * 4 / 2**30:.0f} GiB limit); index it by head first "
                            "(table[h, ...]) to shrink each row, or use deterministic=False")
                if gl.scope == "exact" and not gl_exact(gl, query.shape[0], query.shape[1]):
                    raise NotImplementedError(
                        f"deterministic=True: learnable tensor #{gl.slot} has no batch/head dimension but the "
                        f"call has B={query.shape[0]}, Hq={query.shape[1]}, so its gradient would be summed with "
                        "atomic adds; give it the batch/head dimensions (expand) or use deterministic=False")
        r = self.runner(query, value.shape[-1])
        tables = None
        if self.spec.data_dependent:
            shape = call_shape(query, key)
            if block_tables is not None:
                if block_tables.shape != shape:
                    raise ValueError(f"block_tables were built for shape {block_tables.shape}, the call has {shape}")
                tables = block_tables
            else:
                tables = r.new_tables(query, key, self.tensors)
        got = AttentionFunction.apply(query, key, value, sinks, u, w, r, scale, tables,
                                      float(sigmoid_bias or 0.0), *self.tensors)
        if self.spec.normalizer != "softmax":  # out alone (return_lse was refused above)
            return got
        return got if return_lse else got[0]

    def visit_counts(self, query, key, value, *, scale=None, runs=False):
        """Tiles each forward program visited, ``[B*Hq, n_q_tiles]`` (for tests and tuning); with
        ``runs=True`` also how many of them it visited in constant runs (one table entry per run,
        ``codegen/runs.py``), as a pair."""
        check_inputs(query, key, value, scale)
        if is_empty(query, key):
            raise ValueError(f"visit_counts of an empty call (query {tuple(query.shape)}, key {tuple(key.shape)}): "
                             "no kernel runs, nothing is visited")
        check_captured(self.tensors, query.device)
        self.index_check(self.tensors, call_shape(query, key), query.device)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        r = self.runner(query, value.shape[-1])
        tables = r.new_tables(query, key, self.tensors) if self.spec.data_dependent else None
        visits = r.forward(query, key, value, scale, self.tensors, tables, count_visits=True)[2]
        return (visits[0], visits[1]) if runs else visits[0]

    def explain(self) -> str:
        from .explain import explain
        return explain(self)

    def __repr__(self):
        return f"CompiledAttention(key={self.spec.key}, mask={self.mask_mod!r}, score_mod={self.score_mod!r})"


def compile(*, mask_mod=None, score_mod=None, normalizer="softmax", block_m=None, block_n=None,  # noqa: A001
            num_warps=None, num_stages=None, deterministic=False) -> CompiledAttention:
    """Trace and analyse a pattern once; the result is called like :func:`attention`
    (``normalizer`` is fixed here; ``sinks``, ``bias_factors`` and ``sigmoid_bias`` go to the call).
    Tile sizes, warps and pipeline stages override the heuristics (mainly for tuning and tests)."""
    return CompiledAttention(mask_mod, score_mod, normalizer=normalizer, block_m=block_m, block_n=block_n,
                             num_warps=num_warps, num_stages=num_stages, deterministic=deterministic)


@torch.compiler.disable
def attention(query, key, value, *, mask_mod=None, score_mod=None, scale=None, return_lse=False,
              normalizer="softmax", sigmoid_bias=None, sinks=None, bias_factors=None, indices=None, blocks=None,
              check_indices=None, deterministic=False):
    """Fused attention with an optional mask and score modifier (FlexAttention conventions).

    ``query [B, Hq, Lq, D]``, ``key [B, Hkv, Lkv, D]``, ``value [B, Hkv, Lkv, Dv]`` with ``Hq % Hkv == 0``
    (``Dv`` may differ from ``D``, as in MLA). Returns the output ``[B, Hq, Lq, Dv]`` (and, with
    ``return_lse``, the natural-log logsumexp ``[B, Hq, Lq]`` in float32). Rows whose every key is
    masked give zeros and ``lse = -inf``; so does every row of an empty call (a size of 0), which
    launches nothing. The pattern is traced on every call
    (tracing is cheap; kernels are cached by the IR hash); use :func:`compile` in hot loops.

    Further keywords: ``normalizer="sigmoid"`` computes ``Σ_j σ(s_ij + sigmoid_bias)·v_j``
    (default bias ``-log(Lkv)``, no lse); ``sinks [Hq]`` are per-head logits that join the softmax
    denominator (a fully masked row gives 0 and ``lse = sink``); ``bias_factors=(u, w)`` adds
    ``u·wᵀ`` to the scaled score inside the kernel. Captured floating tensors read by ``score_mod``
    that require grad receive gradients; ``deterministic=True`` makes those bitwise repeatable.

    Index selectors (:mod:`attndsl.selectors`) restrict the keys before the mask:
    ``indices [B, G, Lq, K]`` (int32, ``-1`` = unused) lists the keys each query visits, shared by
    the query heads of group ``g`` (DeepSeek Sparse Attention); out-of-range entries raise unless
    ``check_indices=False`` (then they are unused slots). ``blocks`` (a
    :class:`~attndsl.selectors.BlockSelection`) lists key blocks per query block (MoBA, NSA).
    """
    check_inputs(query, key, value, scale)
    return CompiledAttention(mask_mod, score_mod, normalizer=normalizer, deterministic=deterministic)(
        query, key, value, scale=scale, return_lse=return_lse, sigmoid_bias=sigmoid_bias, sinks=sinks,
        bias_factors=bias_factors, indices=indices, blocks=blocks, check_indices=check_indices)
