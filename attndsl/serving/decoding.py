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
from ..runtime.launch import _new, use_interpreter
from ..runtime.marshal import buffer_named, fill
from ..runtime.memo import VERIFY_MEMO
from ..runtime.scope import launch_scope
from ..runtime.tuned import device_label
from ..spec import VisitBox

#: the decode kernels' spec suffix (their cache key and kernel names)
DECODE_TAG = "dec"


def decode_spec(spec):
    """The spec of the decode kernels: the pattern's, under a name and key of their own."""
    return dataclasses.replace(spec, name=f"{spec.name}_{DECODE_TAG}", key=f"{spec.key}d{codegen.DECODE_VERSION}")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Tiles, warps and split policy of one decode launch."""

    block_n: int
    block_m: int      # rows per program at most (GQA heads x query tokens)
    num_warps: int
    num_stages: int
    per_sm: int = 2   # programs the split heuristic counts resident per SM (more: more, shorter splits)
    rotate: bool = False  # each program starts its key range at a tile of its own (ROTATE)
    fused_merge: bool = True  # the last split to finish merges the partials (FUSED), no merge kernel


#: GPU tiles of the decode kernel by case: ``(regime, layout) -> (BLOCK_N, num_warps, num_stages, per_sm,
#: rotate)``
#: for head dims up to 128 (wider heads halve BLOCK_N and keep at most 2 stages). ``regime``
#: (:func:`decode_regime`): ``"many"`` (the grid of sequences x KV heads already fills the GPU: B=64
#: at 4K), ``"short"`` (it does not, and the visited range is at most ``SHORT_WIDTH`` keys: a 4096
#: window), ``"long"`` (B=8 at 32K, B=1 at 128K), ``"gather"`` (``indices``, DSA top-k). ``layout``:
#: ``"contiguous"``, ``"paged"`` (pages of at least 64 rows) or ``"paged_small"`` (16 or 32).
#: Rows come from ``python -m benchmarks.decode --sweep`` on an H100, which prints the best
#: entry of each case in this form; an entry nobody measured yet keeps the first run's defaults
#: (64, 4, 3, 2, no rotation: measured 2026-12-06 at 0.97 of the copy's bandwidth for B=8 at 32K).
#: The commented rows come from the sweep of 2026-12-06 on an H100 (CUDA-graph replays; the other
#: rows' best candidate was within 1% of the default, so they keep it).
TUNING: dict[tuple[str, str], tuple[int, int, int, int, int]] = {
    ("long", "contiguous"): (64, 4, 2, 2, 0),       # B=1 at 128K, 32 splits: 0.1990 -> 0.1960 ms (SDPA 0.1895)
    ("long", "paged"): (64, 4, 3, 2, 0),
    ("long", "paged_small"): (64, 4, 2, 4, 0),      # B=1 at 128K: 0.212 -> 0.193 ms; B=8 at 32K: 0.385 -> 0.363
    ("short", "contiguous"): (64, 4, 3, 2, 0),
    ("short", "paged"): (64, 4, 3, 2, 0),
    ("short", "paged_small"): (16, 2, 4, 8, 0),     # 4096 window, pages of 16: 0.0665 -> 0.0642 ms
    ("many", "contiguous"): (128, 8, 3, 2, 0),      # B=64 at 4K: 0.393 -> 0.355 ms (1.00 of copy)
    ("many", "paged"): (64, 4, 3, 2, 0),
    ("many", "paged_small"): (16, 4, 6, 2, 0),      # B=64 at 4K, pages of 16: 0.457 -> 0.360 ms
    ("gather", "contiguous"): (64, 4, 3, 2, 0),
    ("gather", "paged"): (64, 4, 3, 2, 0),
    ("gather", "paged_small"): (64, 4, 3, 2, 0),
}
#: rows of :data:`TUNING` measured on another GPU, by ``torch.cuda.get_device_name``: a GPU named here
#: takes its own row of a case where it has one, :data:`TUNING`'s (the H100's) otherwise. A faster
#: memory moves the balance between the page lookups and the reads (the H200's 4.8 TB/s against the
#: H100's 3.35), so a paged case can want other tiles there. Rows come from
#: ``python -m benchmarks.decode --sweep`` on that GPU.
TUNING_BY_GPU: dict[str, dict[tuple[str, str], tuple[int, int, int, int, int]]] = {}
#: the longest visited range (keys) of the "short" regime
SHORT_WIDTH = 8192
#: programs per SM below which a grid does not fill the GPU (the "many" regime's bound, and the split
#: heuristic's default)
FILL_PER_SM = 2
#: the merge of split partials: in the split kernel (the last split of a program's rows to finish,
#: counted by an atomic counter per program; no second launch) or, False, in a merge kernel after
#: it. ``kernel_options={"fused_merge": 0}`` picks the merge kernel per call (``--quick`` times both).
FUSED_MERGE = True
OPTION_KEYS = ("BLOCK_N", "BLOCK_M", "num_warps", "num_stages", "per_sm", "rotate", "fused_merge")


def decode_regime(programs: int, width: int, sms: int, gather: bool) -> str:
    """The :data:`TUNING` regime of a launch of ``programs`` (batch x KV heads x row blocks) over a
    visited range of ``width`` keys on ``sms`` multiprocessors."""
    if gather:
        return "gather"
    if programs >= 0.8 * FILL_PER_SM * sms:
        return "many"
    return "short" if width <= SHORT_WIDTH else "long"


def decode_layout(page_size: int) -> str:
    """The :data:`TUNING` layout of a cache with pages of ``page_size`` rows (0: contiguous)."""
    if page_size == 0:
        return "contiguous"
    return "paged" if page_size >= 64 else "paged_small"


def tuning_row(case: tuple[str, str], gpu: str | None = None) -> tuple[int, int, int, int, int]:
    """The :data:`TUNING` row of ``case`` for the GPU named ``gpu`` (``torch.cuda.get_device_name``):
    its own (:data:`TUNING_BY_GPU`) where it has one, else :data:`TUNING`'s, else the
    ``("long", "contiguous")`` row."""
    own = TUNING_BY_GPU.get(gpu) if gpu is not None else None
    if own is not None and case in own:
        return own[case]
    return TUNING.get(case, TUNING[("long", "contiguous")])


def decode_config(head_dim: int, interpret: bool, kernel_options: dict | None = None,
                  case: tuple[str, str] = ("long", "contiguous"), gpu: str | None = None) -> DecodeConfig:
    """Tiles of the decode kernels for a :data:`TUNING` ``case`` on the GPU named ``gpu`` (None: the
    rows of :data:`TUNING`; :func:`tuning_row`); ``kernel_options`` may set
    ``BLOCK_N``, ``BLOCK_M``, ``num_warps``, ``num_stages``, ``per_sm`` (the split heuristic's
    programs per SM), ``rotate`` (0/1: each program starts at a tile of its own) and ``fused_merge``
    (0/1: the partials merged by the split kernel's last split, or by a merge kernel)."""
    if interpret:
        cfg = DecodeConfig(32, 64, 4, 1, fused_merge=FUSED_MERGE)
    else:
        bn, nw, ns, per_sm, rotate = tuning_row(case, gpu)
        if block_d(head_dim) > 128:  # wider rows: half the keys per tile, two stages of shared memory
            bn, ns = max(16, bn // 2), min(ns, 2)
        cfg = DecodeConfig(bn, 64, nw, ns, per_sm, bool(rotate), FUSED_MERGE)
    ko = dict(kernel_options or {})
    unknown = set(ko) - set(OPTION_KEYS)
    if unknown:
        raise ValueError(f"decode kernel_options: unknown keys {sorted(unknown)}; "
                         f"expected {', '.join(OPTION_KEYS)}")
    cfg = DecodeConfig(int(ko.get("BLOCK_N", cfg.block_n)), int(ko.get("BLOCK_M", cfg.block_m)),
                       int(ko.get("num_warps", cfg.num_warps)), int(ko.get("num_stages", cfg.num_stages)),
                       int(ko.get("per_sm", cfg.per_sm)), bool(ko.get("rotate", cfg.rotate)),
                       bool(ko.get("fused_merge", cfg.fused_merge)))
    for name, v in (("BLOCK_N", cfg.block_n), ("BLOCK_M", cfg.block_m)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"decode kernel_options: {name} must be a power of two >= 16, got {v}")
    if cfg.per_sm < 1:
        raise ValueError(f"decode kernel_options: per_sm must be >= 1, got {cfg.per_sm}")
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


#: the wave efficiency (``waves / ceil(waves)``) a split count must reach, relative to the best one
#: (:func:`num_splits_for`), by :data:`TUNING` case; :data:`WAVE_EFFICIENCY` where none is named.
#: Measured on an H100 (32:8 heads, D=128, one token, same run, plain ms; floors 0.85 / 0.95, splits
#: in brackets; ``benchmarks/results/decode/h100-2026-12-07-splits.json``): the long contiguous
#: cache gains from the higher floor, B=1 at 128K 0.2023 (29) / 0.1990 (32), at 32K 0.0712 / 0.0690;
#: the others do not: B=1 at 4K contiguous 0.0249 (28) / 0.0257 (31), pages of 16 at 32K 0.0799 (57) /
#: 0.0855 (63), at 4K 0.0521 / 0.0553 (a 4096 window over 32K, B=8, pages of 16, gains: 0.0833 (15)
#: / 0.0789 (16), but shares its case with the 4K cache), pages of 128 at 128K 0.1994 / 0.1985
WAVE_EFFICIENCY_BY_CASE: dict[tuple[str, str], float] = {("long", "contiguous"): 0.95}
WAVE_EFFICIENCY = 0.85


def num_splits_for(programs: int, units: int, device: torch.device, interpret: bool, min_units: int = 2,
                   per_sm: int = 2, efficiency: float | None = None) -> int:
    """Splits per (batch, KV head, row block), flash-decoding's wave heuristic: with ``per_sm``
    programs resident per SM, the smallest split count whose last wave is within ``efficiency``
    (default :data:`WAVE_EFFICIENCY`) of the best wave efficiency (``waves / ceil(waves)``), each
    split keeping ``min_units`` key tiles (or index chunks) of the ``units`` visited. A grid that
    already fills the GPU is not split."""
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
    floor = (WAVE_EFFICIENCY if efficiency is None else efficiency) * best
    return next(s for s, e in enumerate(eff, 1) if e >= floor)


class DecodeRunner:
    """The decode kernels of one spec for one backend."""

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


class Launch:
    """One kernel of a plan: its grid, constants and warps, and after its first launch the argument
    list with every value the call key fixes (``fixed``), the positions of the per-call values
    (tensors and float scalars, ``var``) and the prepared launch (``runtime.fastlaunch``)."""

    __slots__ = ("kernel", "name", "grid", "consts", "warps", "fixed", "var", "run")

    def __init__(self, kernel, name: str, grid: tuple, consts: dict, warps: tuple):
        self.kernel, self.name, self.grid, self.consts, self.warps = kernel, name, grid, consts, warps
        self.fixed = self.var = self.run = None

    def first(self, signature, named: dict, interpret: bool) -> None:
        """The first launch: arguments checked against the kernel's signature (``marshal.fill``),
        split into fixed and per-call values, launched, and the launch of later calls kept."""
        args = fill(self.name, signature, named, self.consts)
        order = [p.name for p in signature if p.kind != "constexpr"]
        self.var = tuple((i, n) for i, n in enumerate(order) if isinstance(named[n], (torch.Tensor, float)))
        self.fixed = args
        self.run = _start(self.kernel, self.grid, args, self.consts, self.warps, interpret)

    def again(self, values: dict) -> None:
        """A later launch: the per-call ``values`` (by parameter name) into the fixed arguments."""
        args = self.fixed.copy()
        for i, n in self.var:
            args[i] = values[n]
        self.run(args)

    def verify(self, signature, named: dict) -> None:
        """``VERIFY_MEMO``: the arguments a fresh computation gives agree with the memoised ones."""
        fresh = fill(self.name, signature, named, self.consts)
        var = {i for i, _ in self.var}
        stale = [(p.name, a, b) for i, (p, a, b) in enumerate(zip([p for p in signature if p.kind != "constexpr"],
                                                                   self.fixed, fresh))
                 if i not in var and a != b]
        if stale:
            raise AssertionError(f"decode launch memo of {self.name}: memoised arguments differ from a fresh "
                                 f"computation: {stale}")


def _start(kernel, grid, args, consts, warps, interpret):
    """Launch once; returns the launch of later argument lists of the same plan (a ``Direct`` or
    ``Launcher`` one on a GPU: no per-call binding or specialisation)."""
    if interpret:
        kernel[grid](*args, **consts, num_warps=warps[0], num_stages=warps[1])
        return lambda a: kernel[grid](*a, **consts, num_warps=warps[0], num_stages=warps[1])
    return launcher(kernel).prepared(grid, args, consts, warps[0], warps[1])


class Plan:
    """Everything of a decode call fixed by its call key (shapes, strides, dtypes, alignments,
    options): the kernels' launches, split count and output shapes; memoised in ``_PLANS``.
    ``counters``: the fused merge's (None: one split, or the merge kernel merges)."""

    __slots__ = ("decode", "merge", "nsplit", "direct", "counters", "sinks_in", "interpret", "signatures",
                 "buf_names", "case", "shape_args")

    def __init__(self, decode: Launch, merge: Launch, nsplit: int, counters, interpret: bool, signatures: dict,
                 n_buffers: int, case: tuple, shape_args: tuple):
        self.decode, self.merge, self.nsplit, self.direct = decode, merge, nsplit, nsplit == 1
        self.counters = counters
        self.sinks_in = self.direct or counters is not None  # the decode kernel adds the sinks (HAS_SINKS)
        self.interpret, self.signatures, self.case = interpret, signatures, case
        self.shape_args = shape_args  # _SHAPE_ARGS
        self.buf_names = tuple(f"buf{i}" for i in range(n_buffers))


#: the fused merge's counters per device (int32, zero between launches: the split that merges resets
#: its program's counter). Every buffer made is kept for the process: a captured CUDA graph may use it.
_COUNTERS: dict = {}


def merge_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """``n`` zeroed int32 counters on ``device`` for the fused merge, from the device's kept buffer
    (made, zeroed, once; a larger one when a plan needs more). None while the current stream
    captures a CUDA graph and no kept buffer is large enough: a buffer made inside a capture would
    be zeroed only by the graph's replays (that plan merges with the merge kernel instead).

    Calls share the buffer one after another (each leaves it zero); fused calls running at once on
    two streams of one device would share counters: give them ``kernel_options={"fused_merge": 0}``."""
    kept = _COUNTERS.setdefault(device, [])
    if kept and kept[-1].numel() >= n:
        return kept[-1][:n]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    kept.append(torch.zeros(max(n, 2 * kept[-1].numel() if kept else 1024), dtype=torch.int32, device=device))
    return kept[-1][:n]


#: call key -> Plan (cleared when it grows past PLANS_SIZE: keys are distinct call shapes)
_PLANS: dict = {}
PLANS_SIZE = 1024
_SHAPE_ARGS = ("HQ", "HKV", "GROUP", "QPG", "LQ", "NSEL", "NSPLIT", "NROWB")
#: rows (query head x token) per program of the merge kernel
MERGE_ROWS = 4


def _strides(t: str, row: str, strides) -> dict:
    """``stride_{t}b, stride_{t}h, stride_{t}{row}, stride_{t}d`` (the signatures' names)."""
    return dict(zip((f"stride_{t}b", f"stride_{t}h", f"stride_{t}{row}", f"stride_{t}d"), strides, strict=True))


def _device_sms(device: torch.device, interpret: bool) -> int:
    if interpret or device.type != "cuda":
        return 1
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def _plan(spec, query, Hkv, Dv, paged, page_size, indices, sinks, bias_factors, normalizer, sigmoid_bias,
          q_offsets, max_seq_len, num_splits, kernel_options, n_buffers, interpret) -> Plan:
    B, Hq, Lq, D = query.shape
    r = runner_for(spec, interpret)
    group = Hq // Hkv
    gather = indices is not None
    rows = group if gather else group * Lq
    width = indices.shape[3] if gather else visited_width(spec, (), max_seq_len, Lq, Hq)
    # the regime (TUNING) from the default row block; the tiles from the regime
    per_token = Lq if gather else 1
    case = (decode_regime(B * Hkv * triton.cdiv(rows, 64) * per_token, width, _device_sms(query.device, interpret),
                          gather), decode_layout(page_size if paged else 0))
    cfg = decode_config(D, interpret, kernel_options, case, None if interpret else device_label(query))
    block_m = min(cfg.block_m, max(16, triton.next_power_of_2(rows)))
    nrowb = triton.cdiv(rows, block_m)
    programs = B * Hkv * nrowb * per_token
    units = triton.cdiv(width, cfg.block_n)
    nsel = indices.shape[3] if gather else 0
    nsplit = int(num_splits) if num_splits else num_splits_for(programs, units, query.device, interpret,
                                                               per_sm=cfg.per_sm,
                                                               efficiency=WAVE_EFFICIENCY_BY_CASE.get(case))
    if nsplit < 1:
        _fail(f"num_splits must be >= 1, got {num_splits}")
    direct = nsplit == 1
    counters = merge_counters(query.device, programs) if cfg.fused_merge and not direct else None
    softmax = normalizer == "softmax"
    rank = bias_factors[0].shape[3] if bias_factors is not None else 1
    consts = dict(HEAD_D=D, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(D), HEAD_DV=Dv,
                  BLOCK_DV=block_d(Dv), PAGED=paged, PAGE_SIZE=max(page_size, 1),
                  UPCAST=interpret and query.dtype == torch.bfloat16,
                  DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", DIRECT=direct,
                  SIGMOID_DEFAULT=not softmax and sigmoid_bias is None, QOFF_FROM_LEN=q_offsets is None,
                  HAS_SINKS=sinks is not None and (direct or counters is not None), HAS_BIAS=bias_factors is not None,
                  BLOCK_R=max(16, 1 << (rank - 1).bit_length()), ROTATE=cfg.rotate and not gather,
                  FUSED=counters is not None)
    merge_consts = dict(HEAD_DV=Dv, BLOCK_DV=block_d(Dv), BLOCK_ROWS=MERGE_ROWS, HAS_SINKS=sinks is not None,
                        SOFTMAX=softmax)
    names = codegen.decode.kernel_names(r.spec)
    dec = Launch(r.k_gather if gather else r.k_decode, names["gather" if gather else "decode"], (nsplit, programs),
                 consts, (cfg.num_warps, cfg.num_stages))
    merge = Launch(r.k_merge, names["merge"], (triton.cdiv(B * Hq * Lq, MERGE_ROWS),), merge_consts,
                   (4 if Dv >= 128 else 2, 1))
    sigs = {k: r.spec.lowering.signature(k) for k in ("decode", "decode_merge")}
    qpg = Hq // indices.shape[1] if gather else 1
    return Plan(dec, merge, nsplit, counters, interpret, sigs, n_buffers, case,
                (Hq, Hkv, group, qpg, Lq, nsel, nsplit, nrowb))


def _fail(msg: str):
    raise ValueError(f"attndsl.serving.decode: {msg}")


def _check(query, k_cache, v_cache, seq_lens, q_offsets, page_table, sinks, bias_factors, indices):
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
    return B, Hq, Lq, D, Hkv, v_cache.shape[-1], paged, page_size


def _check_grads(query, k_cache, v_cache, sinks, bias_factors, tensors) -> None:
    """Inference only: no input (nor captured tensor) may require grad while autograd is on."""
    if not torch.is_grad_enabled():
        return
    grads = [n for n, t in (("query", query), ("k_cache", k_cache), ("v_cache", v_cache), ("sinks", sinks))
             if t is not None and t.requires_grad]
    grads += ["bias_factors"] if bias_factors is not None and any(t.requires_grad for t in bias_factors) else []
    grads += ["a captured tensor"] if any(t.requires_grad for t in tensors) else []
    if grads:
        raise RuntimeError(
            f"attndsl.serving.decode is inference only, but {', '.join(grads)} requires grad: run it under "
            "torch.no_grad() / torch.inference_mode(), or use attndsl.attention for training")


def _tk(t) -> tuple | None:
    """What of a tensor fixes a decode launch but its address: dtype, shape, strides, device and
    16-byte alignment (Triton specialises pointers by it)."""
    return None if t is None else (t.dtype, t.shape, t.stride(), t.device, t.data_ptr() & 15)


def _named(plan: Plan, values: dict, query, k_cache, v_cache, page_table, indices, bias_factors, tensors, Hkv) -> dict:
    """Every argument of the decode kernel by parameter name: the per-call ``values`` and what the
    call key fixes (strides, shape arguments, buffer sizes)."""
    out = values["Out"]
    if page_table is not None:
        ks = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1), k_cache.stride(3))
        vs = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1), v_cache.stride(3))
        pts = (page_table.stride(0), page_table.stride(1))
    else:
        ks, vs, pts = k_cache.stride(), v_cache.stride(), (0, 0)
    istr = indices.stride() if indices is not None else (0, 0, 0, 0)
    extra = _extra_args(query, Hkv, None, bias_factors, None)
    named = dict(**_strides("q", "m", query.stride()), **_strides("k", "n", ks), **_strides("v", "n", vs),
                 **_strides("o", "m", out.stride()), stride_ptb=pts[0], stride_ptp=pts[1],
                 **dict(zip(("stride_ib", "stride_ig", "stride_im", "stride_ij"), istr, strict=True)),
                 **dict(zip(_SHAPE_ARGS, plan.shape_args, strict=True)),
                 **{n: a for n, a in extra.items() if not isinstance(a, (torch.Tensor, float))},
                 **buffer_named(tensors))
    named.update(values)
    return named


def run(spec, tensors: list, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        seq_lens: torch.Tensor, q_offsets=None, page_table=None, *, scale: float | None = None,
        normalizer: str = "softmax", sigmoid_bias: float | None = None, sinks=None, bias_factors=None, indices=None,
        max_seq_len: int | None = None, num_splits: int | None = None, kernel_options: dict | None = None):
    """The decode call of a traced pattern (``spec``) with its captured ``tensors`` bound: ``(out, lse)``,
    ``lse`` None for the sigmoid normaliser; arguments as :func:`decode`.

    The first call of a call key (every shape, stride, dtype, device and alignment, and the options)
    checks the inputs, plans the launch (tiles, splits) and launches through Triton; later calls of the
    key only allocate the outputs, put this call's tensors into the memoised argument lists and
    launch them (``runtime.fastlaunch``): no analysis, no environment reads, no device sync."""
    u, w = bias_factors if bias_factors is not None else (None, None)
    key = (spec.key, normalizer, _tk(query), _tk(k_cache), _tk(v_cache), _tk(seq_lens), _tk(q_offsets),
           _tk(page_table), _tk(sinks), _tk(u), _tk(w), _tk(indices), sigmoid_bias is None, max_seq_len, num_splits,
           tuple(sorted(kernel_options.items())) if kernel_options else None, *map(_tk, tensors))
    plan = _PLANS.get(key)
    fresh = plan is None
    Hkv = k_cache.shape[2] if page_table is not None else k_cache.shape[1]
    if fresh:
        _, _, _, _, Hkv, Dv, paged, page_size = _check(query, k_cache, v_cache, seq_lens, q_offsets, page_table, sinks,
                                                       bias_factors, indices)
        if max_seq_len is None:
            max_seq_len = page_table.shape[1] * page_size if paged else k_cache.shape[2]
        if len(_PLANS) >= PLANS_SIZE:
            _PLANS.clear()
        plan = _plan(spec, query, Hkv, Dv, paged, page_size, indices, sinks, bias_factors, normalizer,
                     sigmoid_bias, q_offsets, max_seq_len, num_splits, kernel_options, len(tensors),
                     use_interpreter(query))
    _check_grads(query, k_cache, v_cache, sinks, bias_factors, tensors)
    B, Hq, Lq, D = query.shape
    Dv = v_cache.shape[3]
    scale = D ** -0.5 if scale is None else float(scale)
    direct = plan.direct
    # _new: NaN-filled under ATTNDSL_POISON, so an element no program writes fails the tests
    out = _new((B, Hq, Lq, Dv), query)
    softmax = normalizer == "softmax"
    lse = _new((B, Hq, Lq), query, torch.float32) if softmax else out
    if direct:
        op = lp = out
    else:
        op = _new((B * Hq * Lq * plan.nsplit * Dv,), query, torch.float32)
        lp = _new((B * Hq * Lq * plan.nsplit,), query, torch.float32)
    values = dict(Q=query, K=k_cache, V=v_cache, PT=seq_lens if page_table is None else page_table, SEQ=seq_lens,
                  QOFF=seq_lens if q_offsets is None else q_offsets, IDX=seq_lens if indices is None else indices,
                  Out=out, Lse=lse, OP=op, LP=lp, sm_scale=scale, U=query if u is None else u,
                  W=query if w is None else w, Sinks=sinks if sinks is not None and plan.sinks_in else query,
                  CNT=seq_lens if plan.counters is None else plan.counters, sigmoid_bias=float(sigmoid_bias or 0.0))
    for n, t in zip(plan.buf_names, tensors):
        values[n] = t.view(torch.uint8) if t.dtype == torch.bool else t
    merged = direct or plan.counters is not None  # no merge kernel
    if not merged:
        merge = dict(OP=op, LP=lp, Out=out, Lse=lse, Sinks=sinks if sinks is not None else out)
    dec, mrg = plan.decode, plan.merge
    with launch_scope(query, plan.interpret):
        if fresh or VERIFY_MEMO:
            named = _named(plan, values, query, k_cache, v_cache, page_table, indices, bias_factors, tensors, Hkv)
            if not merged:
                merge_named = dict(merge, HQ=Hq, LQ=Lq, NSPLIT=plan.nsplit, NROWS=B * Hq * Lq,
                                   **_strides("o", "m", out.stride()))
        if fresh:
            dec.first(plan.signatures["decode"], named, plan.interpret)
            if not merged:
                mrg.first(plan.signatures["decode_merge"], merge_named, plan.interpret)
            _PLANS[key] = plan  # only a plan that launched: a failed first launch is planned again
            return out, (lse if softmax else None)
        if VERIFY_MEMO:
            dec.verify(plan.signatures["decode"], named)
            if not merged:
                mrg.verify(plan.signatures["decode_merge"], merge_named)
        dec.again(values)
        if not merged:
            mrg.again(merge)
    return out, (lse if softmax else None)


def _traced(query, k_cache, v_cache, seq_lens, q_offsets, page_table, mask_mod, score_mod, scale, normalizer,
            sigmoid_bias, sinks, bias_factors, indices, max_seq_len, num_splits, kernel_options):
    """:func:`attndsl.serving.decode` while dynamo traces: the pattern resolved once (a constant of
    the graph), its captured tensors followed from the functions (graph inputs bound per call), the
    shapes checked in plain Python, then the ``attndsl::decode`` op. Returns ``(out, lse | None)``."""
    from ..api import _resolve_for_trace
    from ..runtime.patterns import follow
    meta, paths = _resolve_for_trace(mask_mod, score_mod, normalizer, False, None)
    tensors = [follow((mask_mod, score_mod), p) for p in paths]
    _check(query, k_cache, v_cache, seq_lens, q_offsets, page_table, sinks, bias_factors, indices)
    _check_grads(query, k_cache, v_cache, sinks, bias_factors, tensors)
    ko = dict(kernel_options or {})
    unknown = set(ko) - set(OPTION_KEYS)
    if unknown:
        _fail(f"kernel_options: unknown keys {sorted(unknown)}; expected {', '.join(OPTION_KEYS)}")
    u, w = bias_factors if bias_factors is not None else (None, None)
    out, lse = torch.ops.attndsl.decode(query, k_cache, v_cache, seq_lens, q_offsets, page_table, tensors, sinks, u, w,
                                        indices, meta.key, query.shape[-1] ** -0.5 if scale is None else float(scale),
                                        None if sigmoid_bias is None else float(sigmoid_bias), int(max_seq_len or 0),
                                        int(num_splits or 0), [int(ko.get(n, -1)) for n in OPTION_KEYS])
    return out, (lse if normalizer == "softmax" else None)


def _pattern(mask_mod, score_mod, normalizer):
    """``(compiled pattern, its captured tensors)`` through ``attndsl.attention``'s pattern cache
    (which finds functions met again by identity, re-reading what they hold, before any walk)."""
    from ..api import _compiled
    return _compiled(mask_mod, score_mod, normalizer, False, None)


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
            ``[num_pages, page_size, Hkv, D]`` (vLLM layout; ``page_size`` a power of two) with any
            strides: a head-major pool stored ``[num_pages, Hkv, page_size, D]`` (FlashInfer's
            ``HND``) is passed as its ``.transpose(1, 2)``. Never copied.
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
        kernel_options (dict | None): ``BLOCK_N``, ``BLOCK_M``, ``num_warps``, ``num_stages``,
            ``per_sm`` (programs per SM the split heuristic counts) and ``rotate`` (0/1: each program
            starts its key range at a tile of its own); default from :data:`TUNING`.

    Returns:
        ``out [B, Hq, Lq, Dv]`` in the query's dtype; with ``return_lse`` ``(out, lse)``. A row with
        no visible key gives zeros and ``lse = -inf`` (``lse = sink`` with sinks).

    Under ``torch.compile`` the call is one ``torch.library`` op (``attndsl::decode``, with a fake
    implementation), so a model's decode step compiles with ``fullgraph=True`` and captures in a
    CUDA graph. Eagerly, repeated calls of one shape reuse a memoised launch (see :func:`run`).

    Inference only: with autograd on, inputs (or captured tensors) that require grad raise a
    ``RuntimeError`` naming :func:`attndsl.attention` (no fallback). Values are not checked on the
    host (no device sync): ``seq_lens[b] <= max_pages * page_size`` and valid page-table entries are
    the caller's to keep.
    """
    if return_lse and normalizer != "softmax":
        _fail("return_lse needs the softmax normalizer")
    if torch.compiler.is_compiling():
        out, lse = _traced(query, k_cache, v_cache, seq_lens, q_offsets, page_table, mask_mod, score_mod, scale,
                                 normalizer, sigmoid_bias, sinks, bias_factors, indices, max_seq_len, num_splits,
                                 kernel_options)
    else:
        compiled, tensors = _pattern(mask_mod, score_mod, normalizer)
        out, lse = run(compiled.spec, tensors, query, k_cache, v_cache, seq_lens, q_offsets, page_table, scale=scale,
                       normalizer=normalizer, sigmoid_bias=sigmoid_bias, sinks=sinks, bias_factors=bias_factors,
                       indices=indices, max_seq_len=max_seq_len, num_splits=num_splits,
                       kernel_options=kernel_options)
    if return_lse:
        return out, lse
    return out
