"""DSA's lightning indexer compiled from the DSL, and top-k selection in bounded memory.

``I[b, g, t, s] = Σ_j w[b, j, t] · f(scale · q_I[b, j, t] · k_I[b, g, s])`` over the indexer heads
``j`` of group ``g`` (DeepSeek-V3.2: one group, ``f = ReLU``, causal). ``f`` is a score modifier
and the mask a mask function, both traced by the DSL like any pattern (the modifier sees
``h = j``, the mask ``h = g``), fused into one Triton kernel.

Top-k never materialises ``[Lq, Lkv]``: the query rows are processed in chunks; each chunk's
scores cover only the keys the mask's closed-form range allows for those rows (for a causal mask:
keys ``0 .. last row``), and the chunk is sized so that it holds at most ``max_chunk_elems``
scores. Peak extra memory is ``O(max_chunk_elems + Lq · topk)``, whatever the length.
"""
from __future__ import annotations

import torch

from .. import codegen, ir
from ..dsl import trace
from ..ir.evaluate import evaluate
from ..passes import build_spec
from ..runtime import cache
from ..runtime.checks import IndexRangeCheck, check_captured
from ..runtime.config import block_d, indexer_tiles
from ..runtime.fastlaunch import run
from ..runtime.launch import use_interpreter
from ..runtime.memo import cdiv
from ..runtime.marshal import buffer_named, fill, strides_named
from ..runtime.scope import launch_scope


def relu(score, b, h, q_idx, kv_idx):
    """DSA's indexer activation."""
    return torch.clamp(score, min=0.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


class LightningIndexer:
    """A compiled lightning indexer: ``indexer(q_i, k_i, weights) -> indices [B, G, Lq, topk]``.

    ``q_i [B, HI, Lq, DI]`` (indexer queries), ``k_i [B, G, Lkv, DI]`` (indexer keys, one per group;
    ``G = 1`` for DSA), ``weights [B, HI, Lq]`` (per-query head weights; ``None`` = 1). Any
    strides work, so ``[B, L, H, D]`` tensors can be passed as ``x.transpose(1, 2)`` without a copy.
    The result feeds ``attndsl.attention(..., indices=...)``: unused slots (rows with fewer than
    ``topk`` allowed keys) hold ``-1``.
    """

    def __init__(self, *, score_mod=relu, mask_mod=causal, topk: int = 2048, scale: float = 1.0,
                 max_chunk_elems: int = 1 << 26, block: tuple[int, int] | None = None, name: str = "indexer"):
        t = trace(mask_mod, score_mod)
        self.tensors = list(t.tensors)
        self.spec = build_spec(t.mask, t.score, t.buffers, name=name)
        self.topk, self.scale, self.max_chunk_elems = int(topk), float(scale), int(max_chunk_elems)
        self.block = block
        self._mods: dict = {}
        spec = self.spec
        self._fv_range = (ir.free_vars(spec.fwd_range.outer[0]) | ir.free_vars(spec.fwd_range.outer[1]))
        # captured-tensor indices stay inside their tensors; h is the group in the mask, the head in the score
        self._mask_index_check = IndexRangeCheck([spec.mask])
        self._score_index_check = IndexRangeCheck([spec.score])

    # -- kernel ------------------------------------------------------------------------------
    def _module(self, interpret: bool):
        m = self._mods.get(interpret)
        if m is None:
            m = self._mods[interpret] = cache.load(self.spec, interpret, render=codegen.render_indexer)
        return m

    @staticmethod
    def _check(q_i, k_i, weights):
        for n, t in (("q_i", q_i), ("k_i", k_i)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
                raise ValueError(f"{n} must be a floating [B, H, L, D] tensor")
        B, HI, Lq, DI = q_i.shape
        Bk, G, Lkv, Dk = k_i.shape
        if Bk != B or Dk != DI or G == 0 or HI % G:
            raise ValueError(f"q_i {tuple(q_i.shape)} and k_i {tuple(k_i.shape)}: need the same B and D, "
                             "and a number of indexer heads that is a multiple of the key groups")
        if not 16 <= DI <= 256:
            raise ValueError(f"indexer head dim {DI} is outside 16..256")
        if q_i.dtype != k_i.dtype or q_i.device != k_i.device:
            raise ValueError("q_i and k_i must share dtype and device")
        if weights is not None and tuple(weights.shape) != (B, HI, Lq):
            raise ValueError(f"weights must be [B, HI, Lq] = {(B, HI, Lq)}, got {tuple(weights.shape)}")

    @torch.compiler.disable  # host code and Triton launches: a graph break under torch.compile
    def scores(self, q_i, k_i, weights=None, *, rows=None, cols=None, out=None):
        """Index scores ``[B, G, rows, cols]`` in float32 (masked entries ``-inf``).

        ``rows``/``cols`` are ``(start, stop)`` ranges of queries/keys (default: all)."""
        self._check(q_i, k_i, weights)
        check_captured(self.tensors, q_i.device)
        B, HI, Lq, DI = q_i.shape
        G, Lkv = k_i.shape[1], k_i.shape[2]
        self._mask_index_check(self.tensors, (B, G, Lq, Lkv), q_i.device)
        self._score_index_check(self.tensors, (B, HI, Lq, Lkv), q_i.device)
        t0, t1 = rows or (0, Lq)
        s0, s1 = cols or (0, Lkv)
        n, m = t1 - t0, s1 - s0
        if out is None:
            out = torch.empty((B, G, n, m), dtype=torch.float32, device=q_i.device)
        interpret = use_interpreter(q_i)
        bt, bs = self.tiles(interpret)
        grid = (cdiv(n, bt), cdiv(m, bs), B * G)
        w = weights if weights is not None else q_i
        ws = list(weights.stride()) if weights is not None else [0, 0, 0]
        named = dict(QI=q_i, KI=k_i, W=w, S=out, **strides_named(q_i, "qb", "qh", "qm", "qd"),
                     **strides_named(k_i, "kb", "kg", "kn", "kd"), stride_wb=ws[0], stride_wh=ws[1], stride_wm=ws[2],
                     **strides_named(out, "sb", "sg", "sm", "sn"), G=G, HPG=HI // G, LQ=Lq, LKV=Lkv, T0=t0, NT=n,
                     S0=s0, NS=m, scale=self.scale, **buffer_named(self.tensors))
        consts = dict(HEAD_D=DI, BLOCK_T=bt, BLOCK_S=bs, BLOCK_D=block_d(DI),
                      UPCAST=interpret and q_i.dtype == torch.bfloat16,
                      DOT_PRECISION="ieee" if q_i.dtype == torch.float32 else "tf32", HAS_W=weights is not None)
        args = fill("scores", self.spec.lowering.signature("scores"), named, consts)
        with launch_scope(q_i, interpret):
            run(getattr(self._module(interpret), f"{self.spec.name}_scores"), grid, args, consts, interpret)
        return out

    def tiles(self, interpret: bool) -> tuple[int, int]:
        """(query rows, keys) per program: large on the interpreter, where programs are costly."""
        if self.block is not None:
            return self.block
        return indexer_tiles(interpret)

    def key_range(self, t0: int, t1: int, B: int, G: int, Lq: int, Lkv: int, device) -> tuple[int, int]:
        """Keys the mask may allow for query rows ``[t0, t1)`` (closed form; ``[0, Lkv)`` if unknown)."""
        rng = self.spec.fwd_range
        if not self._fv_range <= {"q_lo", "q_hi", "kv_max", "q_max", "b", "h"}:
            return 0, Lkv
        env = {"q_lo": torch.tensor(t0, device=device), "q_hi": torch.tensor(t1 - 1, device=device),
               "kv_max": torch.tensor(Lkv - 1, device=device), "q_max": torch.tensor(Lq - 1, device=device),
               "b": torch.arange(B, device=device).view(B, 1), "h": torch.arange(G, device=device).view(1, G)}
        lo, hi = evaluate(list(rng.outer), env, [], device=device)
        lo, hi = max(int(lo.min()), 0), min(int(hi.max()), Lkv - 1)
        return (lo, hi + 1) if lo <= hi else (0, 0)

    # -- top-k ---------------------------------------------------------------------------------
    @torch.compiler.disable
    def __call__(self, q_i, k_i, weights=None, *, topk: int | None = None, max_chunk_elems: int | None = None,
                 return_scores: bool = False):
        """Top-``topk`` keys per query by index score: ``indices [B, G, Lq, topk]`` int32, ``-1`` unused.

        Processes query chunks so that at most ``max_chunk_elems`` scores exist at once."""
        self._check(q_i, k_i, weights)
        topk = self.topk if topk is None else int(topk)
        budget = self.max_chunk_elems if max_chunk_elems is None else int(max_chunk_elems)
        B, HI, Lq, DI = q_i.shape
        G, Lkv = k_i.shape[1], k_i.shape[2]
        dev = q_i.device
        out = torch.full((B, G, Lq, topk), -1, dtype=torch.int32, device=dev)
        vals_out = torch.full((B, G, Lq, topk), float("-inf"), device=dev) if return_scores else None
        bt = self.tiles(use_interpreter(q_i))[0]
        chunk = max(bt, (budget // max(1, B * G * Lkv)) // bt * bt)
        for t0 in range(0, Lq, chunk):
            t1 = min(Lq, t0 + chunk)
            s0, s1 = self.key_range(t0, t1, B, G, Lq, Lkv, dev)
            if s1 <= s0:
                continue
            sc = self.scores(q_i, k_i, weights, rows=(t0, t1), cols=(s0, s1))
            kk = min(topk, s1 - s0)
            val, idx = sc.topk(kk, dim=-1, sorted=False)
            del sc
            idx = torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx + s0)
            out[:, :, t0:t1, :kk] = idx.to(torch.int32)
            if vals_out is not None:
                vals_out[:, :, t0:t1, :kk] = val
        return (out, vals_out) if return_scores else out


_DEFAULT: dict = {}


def lightning_indexer(q_i: torch.Tensor, k_i: torch.Tensor, weights: torch.Tensor | None = None, *, topk: int = 2048,
                      scale: float = 1.0, max_chunk_elems: int = 1 << 26) -> torch.Tensor:
    """DSA's indexer (ReLU, causal) and top-k: ``indices [B, G, Lq, topk]`` int32, ``-1`` unused."""
    key = (scale,)
    ix = _DEFAULT.get(key)
    if ix is None:
        ix = _DEFAULT[key] = LightningIndexer(scale=scale)
    return ix(q_i, k_i, weights, topk=topk, max_chunk_elems=max_chunk_elems)
