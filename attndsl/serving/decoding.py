"""The decode call: a few query tokens per sequence against a contiguous or paged KV cache.

The pattern is traced and analysed once (the pattern cache of :func:`attndsl.attention`); its
decode kernels (``codegen/decode.py``) are loaded under a key of their own. The host decides the
launch shape from host values only (batch, heads, ``max_seq_len``, the SM count and the
pattern's closed-form visit range evaluated at the longest sequence), so a call never syncs
with the device and a step can be captured in a CUDA graph.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton

from .. import codegen, ir
from ..runtime import cache
from ..runtime.config import block_d
from ..runtime.fastlaunch import launcher
from ..runtime.launch import _new, buffer_named, fill, use_interpreter
from ..runtime.scope import launch_scope
from ..spec import VisitBox

#: the decode kernels' spec suffix (their cache key and kernel names)
DECODE_TAG = "dec"


def decode_spec(spec):
    """The spec of the decode kernels: the pattern's, under a name and key of their own."""
    return dataclasses.replace(spec, name=f"{spec.name}_{DECODE_TAG}", key=f"{spec.key}d{codegen.DECODE_VERSION}")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_m: int      # rows per program at most (GQA heads x query tokens)
    num_warps: int
    num_stages: int


def decode_config(head_dim: int, interpret: bool, kernel_options: dict | None = None) -> DecodeConfig:
    """Tiles of the decode kernels; ``kernel_options`` may set ``BLOCK_N``, ``BLOCK_M``,
    ``num_warps``, ``num_stages``."""
    if interpret:
        cfg = DecodeConfig(32, 64, 4, 1)
    else:
        d = block_d(head_dim)
        cfg = DecodeConfig(64 if d <= 128 else 32, 64, 4, 3 if d <= 128 else 2)
    ko = dict(kernel_options or {})
    unknown = set(ko) - {"BLOCK_N", "BLOCK_M", "num_warps", "num_stages"}
    if unknown:
        raise ValueError(f"decode kernel_options: unknown keys {sorted(unknown)}; "
                         "expected BLOCK_N, BLOCK_M, num_warps, num_stages")
    cfg = DecodeConfig(int(ko.get("BLOCK_N", cfg.block_n)), int(ko.get("BLOCK_M", cfg.block_m)),
                       int(ko.get("num_warps", cfg.num_warps)), int(ko.get("num_stages", cfg.num_stages)))
    for name, v in (("BLOCK_N", cfg.block_n), ("BLOCK_M", cfg.block_m)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"decode kernel_options: {name} must be a power of two >= 16, got {v}")
    return cfg


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def visited_width(spec, tensors, max_seq_len: int, q_len: int, num_heads: int) -> int:
    """Keys the closed-form range visits for the last ``q_len`` queries of a ``max_seq_len``
    sequence (a window: the window, not the cache), on the host: no device read. A range that
    reads captured tensors, or no 1-D range, counts the whole sequence."""
    rng = spec.fwd_range
    if isinstance(rng, VisitBox):
        rng = rng.flat
    if rng is None or ir.loads(list(rng.outer)):
        return max_seq_len
    return _width(rng.outer, max_seq_len, q_len, num_heads)


@functools.lru_cache(maxsize=1024)
def _width(outer, max_seq_len, q_len, num_heads) -> int:
    from ..ir.evaluate import evaluate
    n = max_seq_len - 1
    env = {"b": torch.zeros(1, 1, dtype=torch.int64), "h": torch.arange(num_heads).view(1, -1),
           "q_lo": torch.tensor(max(n - q_len + 1, 0)), "q_hi": torch.tensor(n), "kv_max": torch.tensor(n),
           "q_max": torch.tensor(n)}
    try:
        lo, hi = evaluate(list(outer), env, [], device="cpu")
    except Exception:  # noqa: BLE001 - a form the host cannot evaluate: the whole sequence
        return max_seq_len
    lo, hi = max(int(lo.min()), 0), min(int(hi.max()), n)
    return max(hi - lo + 1, 0)


def num_splits_for(programs: int, units: int, device: torch.device, interpret: bool, min_units: int = 2,
                   per_sm: int = 2) -> int:
    """Splits per (batch, KV head, row block), flash-decoding's wave heuristic: with ``per_sm``
    programs resident per SM, the smallest split count whose last wave is within 85% of the best
    wave efficiency (``waves / ceil(waves)``), each split keeping ``min_units`` key tiles (or index
    chunks) of the ``units`` visited. A grid that already fills the GPU is not split."""
    if interpret or device.type != "cuda" or programs <= 0:
        return 1
    slots = per_sm * _sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= 0.8 * slots:
        return 1
    most = max(1, min(128, slots, units // min_units))
    eff = []
    for s in range(1, most + 1):
        waves = programs * s / slots
        eff.append(waves / math.ceil(waves))
    best = max(eff)
    return next(s for s, e in enumerate(eff, 1) if e >= 0.85 * best)


class DecodeRunner:
    """Launches the decode kernels of one spec for one backend."""

    def __init__(self, spec, interpret: bool):
        self.spec = decode_spec(spec)
        self.interpret = interpret
        self.mod = cache.load(self.spec, interpret, render=codegen.render_decode)
        names = codegen.decode.kernel_names(self.spec)
        self.k_decode = getattr(self.mod, names["decode"])
        self.k_gather = getattr(self.mod, names["gather"])
        self.k_merge = getattr(self.mod, names["merge"])


_RUNNERS: dict = {}


def runner_for(spec, interpret: bool) -> DecodeRunner:
    key = (spec.key, spec.name, interpret)
    r = _RUNNERS.get(key)
    if r is None:
        r = _RUNNERS[key] = DecodeRunner(spec, interpret)
    return r


def _extra_args(q, hkv, sinks, bias_factors, sigmoid_bias) -> dict:
    """Sinks, the low-rank factors and the sigmoid bias, by parameter name (the "decode" signature's
    ``Sinks, U, W, stride_u*, stride_w*, W_GROUP, RANK, sigmoid_bias``)."""
    hq = q.shape[1]
    if bias_factors is None:
        bias = [q, q, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    else:
        u, w = bias_factors
        su = [0 if u.shape[0] == 1 else u.stride(0), 0 if u.shape[1] == 1 else u.stride(1), u.stride(2), u.stride(3)]
        sw = [0 if w.shape[0] == 1 else w.stride(0), 0 if w.shape[1] == 1 else w.stride(1), w.stride(2), w.stride(3)]
        w_group = hq // hkv if w.shape[1] == hkv else hq
        bias = [u, w, *su, *sw, w_group, u.shape[3]]
    names = ("U", "W", "stride_ub", "stride_uh", "stride_um", "stride_ur", "stride_wb", "stride_wh", "stride_wn",
             "stride_wr", "W_GROUP", "RANK")
    return dict(zip(names, bias, strict=True), Sinks=sinks if sinks is not None else q,
                sigmoid_bias=float(sigmoid_bias or 0.0))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything of a decode launch fixed by the call's shapes and options (memoised per call key)."""

    kernel: object
    merge: object
    grid: tuple
    nsplit: int
    shape_args: tuple           # _SHAPE_ARGS
    signatures: dict            # "decode"/"decode_merge" -> the kernel's parameters (spec.lowering)
    order: dict                 # "decode"/"decode_merge" -> the names of its runtime parameters, in order
    consts: dict
    warps: tuple                # (num_warps, num_stages)
    merge_consts: dict
    merge_warps: tuple


_PLANS: dict = {}
_SHAPE_ARGS = ("HQ", "HKV", "GROUP", "QPG", "LQ", "NSEL", "NSPLIT", "NROWB")


def _strides(t: str, row: str, strides) -> dict:
    """``stride_{t}b, stride_{t}h, stride_{t}{row}, stride_{t}d`` (the signatures' names)."""
    return dict(zip((f"stride_{t}b", f"stride_{t}h", f"stride_{t}{row}", f"stride_{t}d"), strides, strict=True))


def _fill(plan: Plan, kernel: str, named: dict, consts: dict, check: bool) -> list:
    """The positional arguments of ``kernel`` from ``named``: checked against its signature
    (``launch.fill``) on a plan's first call, taken in the plan's stored order after."""
    if check:
        return fill(kernel, plan.signatures[kernel], named, consts)
    return [named[n] for n in plan.order[kernel]]


def _plan(spec, tensors, query, Hkv, Dv, paged, page_size, indices, sinks, bias_factors, normalizer, sigmoid_bias,
          q_offsets, max_seq_len, num_splits, kernel_options, interpret) -> Plan:
    B, Hq, Lq, D = query.shape
    r = runner_for(spec, interpret)
    cfg = decode_config(D, interpret, kernel_options)
    group = Hq // Hkv
    gather = indices is not None
    rows = group if gather else group * Lq
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(rows)))
    nrowb = triton.cdiv(rows, block_m)
    programs = B * Hkv * nrowb * (Lq if gather else 1)
    if gather:
        nsel = indices.shape[3]
        units = triton.cdiv(nsel, cfg.block_n)
    else:
        nsel = 0
        units = triton.cdiv(visited_width(spec, tensors, max_seq_len, Lq, Hq), cfg.block_n)
    nsplit = int(num_splits) if num_splits else num_splits_for(programs, units, query.device, interpret)
    if nsplit < 1:
        _fail(f"num_splits must be >= 1, got {num_splits}")
    direct = nsplit == 1
    softmax = normalizer == "softmax"
    rank = bias_factors[0].shape[3] if bias_factors is not None else 1
    consts = dict(HEAD_D=D, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(D), HEAD_DV=Dv,
                  BLOCK_DV=block_d(Dv), PAGED=paged, PAGE_SIZE=max(page_size, 1),
                  UPCAST=interpret and query.dtype == torch.bfloat16,
                  DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", DIRECT=direct,
                  SIGMOID_DEFAULT=not softmax and sigmoid_bias is None, QOFF_FROM_LEN=q_offsets is None,
                  HAS_SINKS=sinks is not None and direct, HAS_BIAS=bias_factors is not None,
                  BLOCK_R=max(16, 1 << (rank - 1).bit_length()))
    merge_consts = dict(HEAD_DV=Dv, BLOCK_DV=block_d(Dv), BLOCK_S=max(2, triton.next_power_of_2(nsplit)),
                        HAS_SINKS=sinks is not None, SOFTMAX=softmax)
    qpg = Hq // indices.shape[1] if gather else 1
    sigs = {k: r.spec.lowering.signature(k) for k in ("decode", "decode_merge")}
    order = {k: tuple(p.name for p in ps if p.kind != "constexpr") for k, ps in sigs.items()}
    return Plan(r.k_gather if gather else r.k_decode, r.k_merge, (nsplit, programs), nsplit,
                (Hq, Hkv, group, qpg, Lq, nsel, nsplit, nrowb), sigs, order, consts, (cfg.num_warps, cfg.num_stages),
                merge_consts, (4 if Dv >= 128 else 2, 1))


def _launch(kernel, grid, args, consts, warps, interpret) -> None:
    """Through ``runtime.fastlaunch`` on a GPU (no per-call binding after the first launch)."""
    if interpret:
        kernel[grid](*args, **consts, num_warps=warps[0], num_stages=warps[1])
    else:
        launcher(kernel)(grid, args, consts, warps[0], warps[1])


def _fail(msg: str):
    raise ValueError(f"attndsl.serving.decode: {msg}")


def _check(query, k_cache, v_cache, seq_lens, q_offsets, page_table, sinks, bias_factors, indices, tensors):
    """Shapes, dtypes and devices, before any launch; returns (B, Hq, Lq, D, Hkv, Dv, paged, page_size)."""
    if query.dim() != 4:
        _fail(f"query must be [B, Hq, Lq, D], got shape {tuple(query.shape)}")
    B, Hq, Lq, D = query.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            _fail(f"{name} must be 4-D ([B, Hkv, Lmax, D] or a paged pool [pages, page_size, Hkv, D]), "
                  f"got shape {tuple(t.shape)}")
        if t.dtype != query.dtype or t.device != query.device:
            _fail(f"{name} is {t.dtype} on {t.device}; query is {query.dtype} on {query.device}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(f"query dtype must be float16, bfloat16 or float32, got {query.dtype}")
    paged = page_table is not None
    if paged:
        P, page_size, Hkv, Dk = k_cache.shape
        if tuple(v_cache.shape[:3]) != (P, page_size, Hkv):
            _fail(f"v_cache pool {tuple(v_cache.shape)} does not match k_cache pool {tuple(k_cache.shape)}")
        if page_size < 1 or page_size & (page_size - 1):
            _fail(f"page_size (k_cache.shape[1]) must be a power of two, got {page_size}")
        if page_table.dim() != 2 or page_table.shape[0] != B:
            _fail(f"page_table must be [B={B}, max_pages], got shape {tuple(page_table.shape)}")
        if page_table.dtype not in (torch.int32, torch.int64) or page_table.device != query.device:
            _fail(f"page_table must be int32/int64 on {query.device}, got {page_table.dtype} on {page_table.device}")
    else:
        if k_cache.shape[0] != B:
            _fail(f"k_cache batch {k_cache.shape[0]} != query batch {B} (for a paged pool pass page_table=)")
        _, Hkv, Lmax, Dk = k_cache.shape
        if tuple(v_cache.shape[:3]) != (B, Hkv, Lmax):
            _fail(f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}")
        page_size = 0
    if Dk != D:
        _fail(f"key head dim {Dk} != query head dim {D}")
    if Hkv < 1 or Hq % Hkv:
        _fail(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    for name, t in (("seq_lens", seq_lens), ("q_offsets", q_offsets)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != B:
            _fail(f"{name} must be a [B={B}] integer tensor, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in (torch.int32, torch.int64) or t.device != query.device:
            _fail(f"{name} must be int32/int64 on {query.device}, got {t.dtype} on {t.device}")
    if sinks is not None and (sinks.shape != (Hq,) or sinks.device != query.device):
        _fail(f"sinks must be [Hq={Hq}] on {query.device}, got {tuple(sinks.shape)} on {sinks.device}")
    if bias_factors is not None:
        u, w = bias_factors
        if u.dim() != 4 or u.shape[0] not in (1, B) or u.shape[1] not in (1, Hq) or u.shape[2] != Lq:
            _fail(f"bias_factors u must be [B|1, Hq|1, Lq={Lq}, R], got {tuple(u.shape)}")
        if w.dim() != 4 or w.shape[0] not in (1, B) or w.shape[1] not in (1, Hkv) or w.shape[3] != u.shape[3]:
            _fail(f"bias_factors w must be [B|1, Hkv={Hkv}|1, Lmax, R] (rows by logical position; one row per KV "
                  f"head so the packed query heads share it), got {tuple(w.shape)}")
    if indices is not None:
        if indices.dim() != 4 or indices.shape[0] != B or indices.shape[2] != Lq:
            _fail(f"indices must be [B={B}, G, Lq={Lq}, K], got {tuple(indices.shape)}")
        G = indices.shape[1]
        if G < 1 or Hkv % G:
            _fail(f"indices groups G={G} must divide the KV heads {Hkv} (the query heads of one KV head "
                  "share a selection)")
        if indices.dtype not in (torch.int32, torch.int64) or indices.device != query.device:
            _fail(f"indices must be int32/int64 on {query.device}, got {indices.dtype} on {indices.device}")
    if torch.is_grad_enabled():
        grads = [n for n, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache), ("sinks", sinks))
                 if t is not None and t.requires_grad]
        grads += ["bias_factors"] if bias_factors is not None and any(t.requires_grad for t in bias_factors) else []
        grads += ["a captured tensor"] if any(t.requires_grad for t in tensors) else []
        if grads:
            raise RuntimeError(
                f"attndsl.serving.decode is inference only, but {', '.join(grads)} requires grad: run it under "
                "torch.no_grad() / torch.inference_mode(), or use attndsl.attention for training")
    return B, Hq, Lq, D, Hkv, v_cache.shape[-1], paged, page_size


def decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, seq_lens: torch.Tensor,
           q_offsets: torch.Tensor | None = None, page_table: torch.Tensor | None = None, mask_mod=None,
           score_mod=None, scale: float | None = None, normalizer: str = "softmax", sigmoid_bias: float | None = None,
           sinks: torch.Tensor | None = None, bias_factors=None, indices: torch.Tensor | None = None,
           return_lse: bool = False, max_seq_len: int | None = None, num_splits: int | None = None,
           kernel_options: dict | None = None):
    r"""Attention of a few new query tokens per sequence over a KV cache (inference).

    Query row ``i`` of sequence ``b`` sits at position ``q_offsets[b] + i``; it attends to the
    cache's keys ``0 .. seq_lens[b] - 1`` where ``mask_mod(b, h, position, kv)`` holds, with scores
    ``score_mod(scale * q·k, b, h, position, kv)``: a pattern means exactly what it means in
    training (:func:`attndsl.attention` over the whole sequence). The keys the pattern's closed-form
    range rules out are never read (a 4096-token window over a 32K cache reads the window).

    Args:
        query (Tensor): ``[B, Hq, Lq, D]``, float16, bfloat16 or float32; ``Lq`` new tokens per
            sequence (1 for plain decoding, up to 64 draft tokens for speculative decoding).
        k_cache (Tensor): contiguous ``[B, Hkv, Lmax, D]``, or with ``page_table`` a paged pool
            ``[num_pages, page_size, Hkv, D]`` (vLLM layout; ``page_size`` a power of two). Never copied.
        v_cache (Tensor): like ``k_cache`` with head dim ``Dv``.
        seq_lens (Tensor): ``[B]`` int32/int64: keys in each sequence's cache (new tokens included
            when they were appended first, the usual order).
        q_offsets (Tensor | None): ``[B]`` int: position of each sequence's first query row;
            default ``seq_lens - Lq`` (the new tokens are the cache's last ones).
        page_table (Tensor | None): ``[B, max_pages]`` int32: the pool page of each sequence's
            logical page ``p`` (positions ``p * page_size ...``).
        mask_mod, score_mod: as :func:`attndsl.attention`, on logical positions.
        scale (float | None): score scale, default ``1/sqrt(D)``.
        normalizer (str): ``"softmax"`` or ``"sigmoid"`` (default bias ``-log(seq_lens[b])``).
        sigmoid_bias (float | None): see ``normalizer``.
        sinks (Tensor | None): ``[Hq]`` logits joining each row's softmax denominator.
        bias_factors (tuple[Tensor, Tensor] | None): ``(u [B|1, Hq|1, Lq, R], w [B|1, Hkv|1, Lmax, R])``:
            ``u·wᵀ`` added to the scaled score; ``w``'s rows are indexed by logical position.
        indices (Tensor | None): ``[B, G, Lq, K]`` int (``-1`` unused): the logical key positions each
            query token visits (DeepSeek Sparse Attention top-k), shared by the query heads of group
            ``g``; ``G`` must divide ``Hkv``. Only the selected rows are read (paged: through the page
            table); positions ``>= seq_lens[b]`` are skipped.
        return_lse (bool): also return the natural-log logsumexp ``[B, Hq, Lq]`` float32 (softmax).
        max_seq_len (int | None): the longest sequence the launch is planned for (default: the
            contiguous cache's ``Lmax`` or ``max_pages * page_size``). The launch shape depends only
            on it, ``B`` and the heads, so one shape serves every step of a CUDA graph.
        num_splits (int | None): key splits per (sequence, KV head); default from the SM count
            and the visited range at ``max_seq_len``.
        kernel_options (dict | None): ``BLOCK_N``, ``BLOCK_M``, ``num_warps``, ``num_stages``.

    Returns:
        ``out [B, Hq, Lq, Dv]`` in the query's dtype; with ``return_lse`` ``(out, lse)``. A row with
        no visible key gives zeros and ``lse = -inf`` (``lse = sink`` with sinks).

    Inference only: with autograd on, inputs (or captured tensors) that require grad raise a
    ``RuntimeError`` naming :func:`attndsl.attention` (no fallback). Values are not checked on the
    host (no device sync): ``seq_lens[b] <= max_pages * page_size`` and valid page-table entries are
    the caller's to keep.
    """
    from ..api import _compiled
    compiled, tensors = _compiled(mask_mod, score_mod, normalizer, False, None)
    B, Hq, Lq, D, Hkv, Dv, paged, page_size = _check(query, k_cache, v_cache, seq_lens, q_offsets, page_table,
                                                      sinks, bias_factors, indices, tensors)
    if return_lse and normalizer != "softmax":
        _fail("return_lse needs the softmax normalizer")
    interpret = use_interpreter(query)
    if max_seq_len is None:
        max_seq_len = page_table.shape[1] * page_size if paged else k_cache.shape[2]
    key = (compiled.spec.key, interpret, query.device.index, tuple(query.shape), query.dtype, Hkv, Dv, paged,
           page_size, None if indices is None else tuple(indices.shape), sinks is not None,
           None if bias_factors is None else bias_factors[0].shape[3], normalizer, sigmoid_bias is None,
           q_offsets is None, max_seq_len, num_splits, tuple(sorted((kernel_options or {}).items())))
    plan = _PLANS.get(key)
    fresh = plan is None  # a new plan's arguments are checked against the signatures (launch.fill)
    if fresh:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(compiled.spec, tensors, query, Hkv, Dv, paged, page_size, indices, sinks,
                                   bias_factors, normalizer, sigmoid_bias, q_offsets, max_seq_len, num_splits,
                                   kernel_options, interpret)
    scale = D ** -0.5 if scale is None else float(scale)
    nsplit, direct = plan.nsplit, plan.nsplit == 1
    # _new: NaN-filled under ATTNDSL_POISON, so an element no program writes fails the tests
    out = _new((B, Hq, Lq, Dv), query)
    softmax = normalizer == "softmax"
    lse = _new((B, Hq, Lq), query, torch.float32) if softmax else out
    if direct:
        op = lp = out
    else:
        op = _new((B * Hq * Lq * nsplit * Dv,), query, torch.float32)
        lp = _new((B * Hq * Lq * nsplit,), query, torch.float32)
    if paged:
        ks = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), k_cache.stride(3))
        vs = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), v_cache.stride(3))
        pt, pts = page_table, (page_table.stride(0), page_table.stride(1))
    else:
        ks, vs = k_cache.stride(), v_cache.stride()
        pt, pts = seq_lens, (0, 0)
    gather = indices is not None
    idx = indices if gather else seq_lens
    istr = indices.stride() if gather else (0, 0, 0, 0)
    named = dict(Q=query, K=k_cache, V=v_cache, PT=pt, SEQ=seq_lens, QOFF=seq_lens if q_offsets is None else q_offsets,
                 IDX=idx, Out=out, Lse=lse, OP=op, LP=lp, sm_scale=scale,
                 **_strides("q", "m", query.stride()), **_strides("k", "n", ks), **_strides("v", "n", vs),
                 **_strides("o", "m", out.stride()), stride_ptb=pts[0], stride_ptp=pts[1],
                 **dict(zip(("stride_ib", "stride_ig", "stride_im", "stride_ij"), istr, strict=True)),
                 **dict(zip(_SHAPE_ARGS, plan.shape_args, strict=True)),
                 **_extra_args(query, Hkv, sinks if direct else None, bias_factors, sigmoid_bias),
                 **buffer_named(tensors))
    args = _fill(plan, "decode", named, plan.consts, fresh)
    with launch_scope(query, interpret):
        _launch(plan.kernel, plan.grid, args, plan.consts, plan.warps, interpret)
        if not direct:
            merge = dict(OP=op, LP=lp, Out=out, Lse=lse, Sinks=sinks if sinks is not None else out, HQ=Hq, LQ=Lq,
                         NSPLIT=nsplit, **_strides("o", "m", out.stride()))
            _launch(plan.merge, (B * Hq * Lq,), _fill(plan, "decode_merge", merge, plan.merge_consts, fresh),
                    plan.merge_consts, plan.merge_warps, interpret)
    if return_lse:
        return out, lse
    return out
