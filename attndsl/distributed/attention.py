"""Context-parallel attention: ring and all-gather, forward and backward, for any attndsl pattern.

Each rank holds the queries, keys and values of its shard (:class:`Sharding`). Every (query
chunk, key chunk) pair the mask leaves non-empty is one call of the pattern at the chunks' global
positions (:class:`ShiftedPattern`), giving ``(o_j, lse_j)``; partial results merge by logsumexp:

    lse = log(Σ_j exp(lse_j) + exp(sink)),   out = Σ_j exp(lse_j - lse) · o_j

(the sink joins the merged denominator once, never a block's). The backward recomputes each
block's ``(o_j, lse_j)`` through the differentiable public call and feeds it the gradients of the
merge, which are exact:

    ∂/∂o_j   = w_j · dout,      ∂/∂lse_j = w_j · (rowsum(dout ⊙ o_j) − rowsum(dout ⊙ out) + dlse),
    w_j = exp(lse_j − lse),     dsink = Σ_rows exp(sink − lse) · (dlse − rowsum(dout ⊙ out))

so the block kernels' own backward (which already handles ``dlse``) gives dq, dk, dv, du, dw and
the learnable captured tensors' gradients. In the ring, dK/dV (and dw) accumulate in float32 and
travel with the K/V blocks until they come home; sinks' and learnable tensors' gradients are
all-reduced, so every rank holds the gradient of the sum of all ranks' losses.
"""
from __future__ import annotations

import torch

from .comm import Group, RingExchange
from .plan import pair_may, trace_mask
from .shifted import ShiftedPattern
from .sharding import Chunk, Sharding

_NEG_INF = float("-inf")


class ContextParallelAttention:
    """Attention over a sequence sharded across the ranks of a process group.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx)`` written over GLOBAL positions (as for the whole
            sequence on one device); captured per-token tensors (document ids) are indexed by
            global position, so every rank keeps the full ``[L]`` tensor (:func:`shard` cuts
            other per-token tensors).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` over global positions. Captured
            floating tensors that require grad learn; their gradients are all-reduced.
        sharding: the :class:`Sharding` of the sequence over the group's ranks.
        group: the ``torch.distributed`` process group (default: the world; a world of one
            when torch.distributed is not initialised).
        method: ``"ring"`` (K/V blocks circulate, overlapped with compute; memory per rank
            ``O(L / P)``) or ``"allgather"`` (K/V gathered once per pass; one launch per query
            chunk over the whole sequence).
        compile_kwargs: further keywords of :func:`attndsl.compile` (``block_m``, ...).

    Calling it: ``cp(query, key, value, *, scale=None, sinks=None, bias_factors=None,
    return_lse=False)`` with this rank's shards; see :meth:`__call__`.
    """

    def __init__(self, mask_mod=None, score_mod=None, *, sharding: Sharding, group=None, method: str = "ring",
                 **compile_kwargs):
        if method not in ("ring", "allgather"):
            raise ValueError(f"method must be 'ring' or 'allgather', got {method!r}")
        if compile_kwargs.get("normalizer", "softmax") != "softmax":
            raise NotImplementedError("context parallelism merges softmax blocks by logsumexp; "
                                      f"normalizer={compile_kwargs['normalizer']!r} is not supported")
        if not isinstance(sharding, Sharding):
            raise TypeError(f"sharding must be an attndsl.distributed.Sharding, got {type(sharding).__name__}")
        self.sharding, self.method = sharding, method
        self.group = Group(group)
        if self.group.size != sharding.world_size:
            raise ValueError(f"the sharding has {sharding.world_size} ranks, the process group {self.group.size}")
        self.pattern = ShiftedPattern(mask_mod, score_mod, **compile_kwargs)
        self._mask, self._mask_tensors = trace_mask(mask_mod)
        self._plan_key = None
        self._plan = None
        # chunk ids are rank-major: rank 0's chunks, then rank 1's...
        self._chunk_base = [0]
        for r in sharding.ranks:
            self._chunk_base.append(self._chunk_base[-1] + len(r))

    # -- planning --------------------------------------------------------------------------------
    def pairs(self, batch: int = 1, heads: int = 1) -> torch.Tensor:
        """bool ``[n_chunks, n_chunks]`` (rank-major chunk ids): which (query chunk, key chunk)
        pairs may be non-empty under the mask; recomputed when a captured mask tensor changes."""
        key = (batch, heads, tuple((id(t), t._version) for t in self._mask_tensors))
        if key != self._plan_key:
            ranges = [c.positions() for r in self.sharding.ranks for c in r]
            self._plan = pair_may(self._mask, self._mask_tensors, ranges, ranges, batch, heads)
            self._plan_key = key
        return self._plan

    def launches(self, batch: int = 1, heads: int = 1) -> int:
        """Block calls this rank makes per forward (the pairs it does not skip)."""
        pairs = self.pairs(batch, heads)
        r = self.group.rank
        mine = range(self._chunk_base[r], self._chunk_base[r + 1])
        if self.method == "allgather":
            return sum(bool(pairs[i].any()) for i in mine)
        return int(pairs[list(mine)].sum())

    # -- the call ---------------------------------------------------------------------------------
    # host code (planning, the ring loop, collectives): torch.compile runs it as a graph break
    @torch.compiler.disable
    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float | None = None,
                 sinks: torch.Tensor | None = None, bias_factors=None, return_lse: bool = False):
        """Context-parallel attention of this rank's shards.

        Args:
            query: ``[B, Hq, L/P, D]``, this rank's queries in its local order.
            key: ``[B, Hkv, L/P, D]`` with ``Hq % Hkv == 0`` (GQA/MQA).
            value: ``[B, Hkv, L/P, Dv]``.
            scale: score scale (default ``D ** -0.5``).
            sinks: ``[Hq]`` per-head sink logits, replicated on every rank; they join the merged
                softmax denominator once. Their gradient is all-reduced.
            bias_factors: ``(u, w)`` low-rank bias ``u·wᵀ`` added to the scaled score, ``u``
                ``[B|1, Hq|1, L/P, R]`` sharded with the queries and ``w`` ``[B|1, H|1, L/P, R]``
                with the keys (``w`` travels with K/V).
            return_lse: also return the logsumexp.

        Returns:
            ``out [B, Hq, L/P, Dv]`` (dtype of ``value``) for this rank's queries, and with
            ``return_lse`` the natural-log logsumexp ``[B, Hq, L/P]`` float32 (sink included).
            Rows that see no key and no sink give 0 and ``lse = -inf``.
        """
        self._check(query, key, value, sinks, bias_factors)
        scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
        u, w = (None, None) if bias_factors is None else tuple(bias_factors)
        learn = self.pattern.learnable(query.device)
        out, lse = _CPFunction.apply(self, scale, query, key, value, sinks, u, w, *learn)
        return (out, lse) if return_lse else out

    def _check(self, q, k, v, sinks, bias_factors):
        for n, t in (("query", q), ("key", k), ("value", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{n} must be a 4-D tensor [B, H, L/P, D], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        n = self.sharding.local_length
        if q.shape[2] != n or k.shape[2] != n or v.shape[2] != n:
            raise ValueError(f"each rank holds L/P = {n} tokens of the sharding, got query {tuple(q.shape)}, "
                             f"key {tuple(k.shape)}, value {tuple(v.shape)}")
        if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
            raise ValueError(f"shapes disagree: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} "
                             "(need one batch size and Hq % Hkv == 0)")
        if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != q.shape[1]):
            raise ValueError(f"sinks must be [Hq] = [{q.shape[1]}], got {tuple(sinks.shape)}")
        if bias_factors is not None:
            u, w = bias_factors
            if u.shape[2] != n or w.shape[2] != n:
                raise ValueError(f"bias_factors u and w are sharded like the queries and keys (L/P = {n} "
                                 f"along dim 2), got u {tuple(u.shape)}, w {tuple(w.shape)}")

    # -- blocks -----------------------------------------------------------------------------------
    def _blocks(self, pairs: torch.Tensor, owner: int | None, gathered: bool):
        """``(q chunk index, q chunk, q slice, kv chunk, kv slice)`` this rank computes against the
        key/value buffer of ``owner`` (or the gathered, global-order sequence), given the plan."""
        r = self.group.rank
        mine = self.sharding.chunk_slices(r)
        if gathered:
            whole = Chunk(0, self.sharding.length)
            for i, (qc, qs) in enumerate(mine):
                if pairs[self._chunk_base[r] + i].any():
                    yield i, qc, qs, whole, slice(0, self.sharding.length)
            return
        for i, (qc, qs) in enumerate(mine):
            for j, (kc, ks) in enumerate(self.sharding.chunk_slices(owner)):
                if pairs[self._chunk_base[r] + i, self._chunk_base[owner] + j]:
                    yield i, qc, qs, kc, ks

    def _gather(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The whole sequence of a sharded tensor, in global order (all-gather)."""
        if t is None:
            return None
        cat = torch.cat(self.group.all_gather(t), 2)
        return cat.index_select(2, _inverse(self.sharding, cat.device))

    def _scatter_back(self, g: torch.Tensor) -> torch.Tensor:
        """This rank's part of ``Σ_ranks g`` for a global-order gradient (reduce-scatter)."""
        rank_major = g.index_select(2, self.sharding.all_positions(g.device))
        return self.group.reduce_scatter(list(rank_major.chunk(self.group.size, 2)))


def _inverse(sharding: Sharding, device) -> torch.Tensor:
    pos = sharding.all_positions(device)
    inv = torch.empty_like(pos)
    inv[pos] = torch.arange(pos.numel(), device=device)
    return inv


def _merge(out_acc, lse_acc, o, lse):
    """Fold a block's ``(o, lse)`` into the running (normalised) ``(out_acc, lse_acc)`` in place."""
    new = torch.logaddexp(lse_acc, lse)
    safe = torch.where(new == _NEG_INF, 0.0, new)  # both -inf: keep zeros, not NaN
    out_acc.mul_(torch.exp(lse_acc - safe).unsqueeze(-1)).add_(o.float() * torch.exp(lse - safe).unsqueeze(-1))
    lse_acc.copy_(new)


def _slice(t, s):
    return None if t is None else t[:, :, s]


def _leaf(t):
    return None if t is None else t.detach().requires_grad_()


def _add(acc, g, s=None):
    if g is None:
        return
    if s is None:
        acc.add_(g.float())
    else:
        acc[:, :, s] += g.float()


class _CPFunction(torch.autograd.Function):
    """Inputs: the CP object, scale, q, k, v, sinks, u, w, then the learnable captured tensors
    (read by the kernels through the pattern; inputs here so their gradients are returned)."""

    @staticmethod
    def forward(ctx, cp: ContextParallelAttention, scale, q, k, v, sinks, u, w, *learnable):
        B, Hq, n = q.shape[0], q.shape[1], q.shape[2]
        pairs = cp.pairs(B, Hq)  # kept for the backward: the blocks it recomputes are these
        out_acc = torch.zeros(B, Hq, n, v.shape[-1], dtype=torch.float32, device=q.device)
        lse_acc = torch.full((B, Hq, n), _NEG_INF, dtype=torch.float32, device=q.device)
        gathered = cp.method == "allgather"
        for owner, (kb, vb, wb) in _kv_stream(cp, (k, v, w), gathered):
            for i, qc, qs, kc, ks in cp._blocks(pairs, owner, gathered):
                bf = None if u is None else (_slice(u, qs), _slice(wb, ks))
                o, lse = cp.pattern(q[:, :, qs], kb[:, :, ks], vb[:, :, ks], qc, kc, scale=scale, bias_factors=bf)
                _merge(out_acc[:, :, qs], lse_acc[:, :, qs], o, lse)
        if sinks is not None:
            s = sinks.detach().float()[None, :, None].expand_as(lse_acc)
            new = torch.logaddexp(lse_acc, s)
            out_acc.mul_(torch.exp(lse_acc - new).unsqueeze(-1))
            lse_acc = new
        out = out_acc.to(v.dtype)
        ctx.save_for_backward(q, k, v, sinks, u, w, out, lse_acc)
        ctx.cp, ctx.scale, ctx.pairs = cp, scale, pairs
        ctx.learnable = learnable
        ctx.set_materialize_grads(False)
        return out, lse_acc

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, sinks, u, w, out, lse = ctx.saved_tensors
        cp, scale = ctx.cp, ctx.scale
        learnable = ctx.learnable
        if dout is None and dlse is None:
            return (None,) * (8 + len(learnable))
        dout = torch.zeros_like(out, dtype=torch.float32) if dout is None else dout.float()
        dlse = torch.zeros_like(lse) if dlse is None else dlse.float()
        delta = (dout * out.float()).sum(-1)  # rowsum(dout ⊙ out)
        dq = torch.zeros_like(q, dtype=torch.float32)
        du = None if u is None else torch.zeros_like(u, dtype=torch.float32)
        dlearn = [torch.zeros_like(t, dtype=torch.float32) for t in learnable]
        gathered = cp.method == "allgather"

        def block_grads(kb, vb, wb, owner, gk, gv, gw):
            for i, qc, qs, kc, ks in cp._blocks(ctx.pairs, owner, gathered):
                qi, ki, vi = _leaf(q[:, :, qs]), _leaf(kb[:, :, ks]), _leaf(vb[:, :, ks])
                ui, wi = _leaf(_slice(u, qs)), _leaf(_slice(wb, ks))
                with torch.enable_grad():
                    o, l = cp.pattern(qi, ki, vi, qc, kc, scale=scale, bias_factors=None if u is None else (ui, wi))
                lse_i, dout_i = lse[:, :, qs], dout[:, :, qs]
                wgt = torch.where(l == _NEG_INF, 0.0, torch.exp(l - lse_i))
                g_o = (wgt.unsqueeze(-1) * dout_i).to(o.dtype)
                g_l = wgt * ((dout_i * o.detach().float()).sum(-1) - delta[:, :, qs] + dlse[:, :, qs])
                inputs = [qi, ki, vi] + ([ui, wi] if u is not None else []) + list(learnable)
                grads = torch.autograd.grad((o, l), inputs, (g_o, g_l), allow_unused=True)
                _add(dq, grads[0], qs)
                _add(gk, grads[1], ks)
                _add(gv, grads[2], ks)
                if u is not None:
                    _add(du, grads[3], qs)
                    _add(gw, grads[4], ks)
                for acc, g in zip(dlearn, grads[3 + (2 if u is not None else 0):]):
                    _add(acc, g)

        if gathered:
            (_, (kb, vb, wb)), = _kv_stream(cp, (k, v, w), True)
            gk, gv = torch.zeros_like(kb, dtype=torch.float32), torch.zeros_like(vb, dtype=torch.float32)
            gw = None if wb is None else torch.zeros_like(wb, dtype=torch.float32)
            block_grads(kb, vb, wb, None, gk, gv, gw)
            dk, dv = cp._scatter_back(gk), cp._scatter_back(gv)
            dw = None if gw is None else cp._scatter_back(gw)
        else:
            pending = None
            for owner, (kb, vb, wb) in _kv_stream(cp, (k, v, w), False):
                g = [torch.zeros_like(kb, dtype=torch.float32), torch.zeros_like(vb, dtype=torch.float32)]
                if wb is not None:
                    g.append(torch.zeros_like(wb, dtype=torch.float32))
                block_grads(kb, vb, wb, owner, *g, *([None] if wb is None else []))
                if pending is not None:  # what the earlier ranks computed for this block
                    g = [a + b for a, b in zip(g, pending.wait())]
                # on to the next rank; after the last step this sends each block home
                pending = RingExchange(cp.group, g, tag=8)  # tags apart from the K/V ring's
            dk, dv, *rest = pending.wait()
            dw = rest[0] if rest else None
        dsinks = None
        if sinks is not None:
            ps = torch.exp(sinks.detach().float()[None, :, None] - lse)
            dsinks = cp.group.all_reduce_((ps * (dlse - delta)).sum((0, 2))).to(sinks.dtype)
        for g in dlearn:
            cp.group.all_reduce_(g)
        return (None, None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks,
                None if du is None else du.to(u.dtype), None if dw is None else dw.to(w.dtype),
                *(g.to(t.dtype) for g, t in zip(dlearn, learnable)))


def _kv_stream(cp: ContextParallelAttention, kvw, gathered: bool):
    """Yield ``(owner, (k, v, w))``: the gathered global sequence once (owner None), or each
    rank's block in ring order, the next block's transfer running while this one is used."""
    if gathered:
        yield None, tuple(cp._gather(t) for t in kvw)
        return
    G = cp.group
    present = [t for t in kvw if t is not None]
    bufs = present
    for step in range(G.size):
        ex = RingExchange(G, bufs) if step < G.size - 1 else None
        it = iter(bufs)
        yield (G.rank - step) % G.size, tuple(next(it) if t is not None else None for t in kvw)
        if ex is not None:
            bufs = ex.wait()


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, sharding: Sharding,
                               mask_mod=None, score_mod=None, group=None, method: str = "ring",
                               scale: float | None = None, sinks: torch.Tensor | None = None, bias_factors=None,
                               return_lse: bool = False):
    """One-shot context-parallel attention (traces the pattern on every call; build a
    :class:`ContextParallelAttention` once in training loops).

    Args:
        query, key, value: this rank's shards, ``[B, Hq, L/P, D]``, ``[B, Hkv, L/P, D]``,
            ``[B, Hkv, L/P, Dv]``.
        sharding: the :class:`Sharding` they were cut with.
        mask_mod, score_mod: the pattern over global positions.
        group: process group (default: the world).
        method: ``"ring"`` or ``"allgather"``.
        scale, sinks, bias_factors, return_lse: as in :meth:`ContextParallelAttention.__call__`.

    Returns:
        ``out [B, Hq, L/P, Dv]``, and ``lse [B, Hq, L/P]`` with ``return_lse``.
    """
    cp = ContextParallelAttention(mask_mod, score_mod, sharding=sharding, group=group, method=method)
    return cp(query, key, value, scale=scale, sinks=sinks, bias_factors=bias_factors, return_lse=return_lse)

