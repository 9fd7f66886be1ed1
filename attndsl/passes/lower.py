"""Lowering: the decisions code generation and the runtime both depend on, made once per spec.

``lower(spec)`` is a pure function of a KernelSpec's analysed IR and plans; ``build_spec`` stores
its result as ``spec.lowering``. Codegen emits from it and the runtime launches from it, so neither
re-derives a decision from the IR, and neither imports the other's private code to agree.

Recorded (see :class:`attndsl.spec.Lowering`):

- ``additive``: ``R`` when score_mod is ``score + R`` with R free of the score (a bias): the kernels
  compute ``s = qk·(scale·unit) + R·unit``, one fused multiply-add per score.
- ``fwd_runs`` / ``bwd_runs`` / ``dq_runs``: whether each kernel's loop gets constant-run loops
  (``codegen/runs.py``), and ``run_folds``: whether the forward's run loop folds the scale and the
  run's scalar bias into the exponent.
- ``dq_whole_range``: the dQ kernel visits every key tile of its closed-form range, so it can
  zero the rest of a full-size learnable gradient (``GL{i}_ZERO_FILL``).
- ``binned``: per learnable load, the dimension the gather kernels bin its gradient along, or None;
  ``max_bins`` and ``bin_piece`` size those bins.
- ``signatures``: every kernel's parameters (:class:`attndsl.spec.Param`), in order: codegen
  renders each ``def`` from them and the runtime fills its arguments by name from them
  (``runtime/marshal.py``).
- ``required_length``: the shortest query and key sequence the kernels can serve (a layout's box
  visit plan covers its whole grid, prefix included; 0: any length), checked before launch.
- ``load_stages``: per captured load of the mask, the loop level it depends on ("program",
  "row" (q only), "col" (kv only) or "pair"): a row load is read once per query tile.
"""
from __future__ import annotations

from .. import ir
from ..ir import Node
from ..spec import KernelSpec, Lowering, Param, VisitBox
from .box_analysis import required_length

#: a table whose kv-indexed dimension has at most this many entries is binned in registers by the
#: gather backward, in pieces of at most ``BIN_PIECE`` bins: one one-hot product per piece that the
#: chunk's keys fall in. One [heads, 256] product spilled on an H100 (BENCHMARKS.md)
MAX_BINS = 256
BIN_PIECE = 64


def additive_bias(score: Node | None) -> Node | None:
    """``R`` when ``score`` is ``score + R`` with R free of the score variable (the sum may hold
    several terms in any order, ``score + t[h, ...] + s[h]``, R then their sum); else None."""
    if score is None:
        return None
    terms = []

    def flatten(n):
        if n.op == "add":
            for a in n.args:
                flatten(a)
        else:
            terms.append(n)
    flatten(score)
    is_score = [t.op == "var" and t.attr == ir.SCORE for t in terms]
    rest = [t for t, s in zip(terms, is_score) if not s]
    if sum(is_score) != 1 or not rest or any(ir.SCORE in ir.free_vars(t) for t in rest):
        return None
    r = rest[0]
    for t in rest[1:]:
        r = ir.node("add", r, t)
    return r


def run_loads(spec: KernelSpec, inner: str) -> dict:
    """The tile-uniform loads that vary along a kernel's inner index: load -> j."""
    return {ul.load: j for j, ul in enumerate(spec.uniform_loads) if inner in ir.free_vars(ul.load)}


def runs_apply(spec: KernelSpec, rng, table: bool, inner: str) -> bool:
    """Constant-run loops for a closed-form range without per-tile classification that has
    tile-uniform loads along its inner index (block tables and box plans keep per-tile tests)."""
    if table or isinstance(rng, VisitBox) or not run_loads(spec, inner):
        return False
    return not (rng.tile_check and spec.tile_full is not None)


def _run_folds(spec: KernelSpec, additive: Node | None) -> bool:
    """Does the softmax forward's constant-run loop scale scores inside its exponent? There a bias
    ``score + R`` whose R reads only the run's entries (and b, h) is one scalar per tile: the
    running max is ``max(qk)·c + R`` and ``p = exp2(qk·c − (m − R))``, one multiply-add per score as
    with no bias. On an H100 (bf16, causal, L=16384; BENCHMARKS.md) a T5 table's forward about 1%
    faster, near the noise."""
    if spec.normalizer != "softmax" or additive is None:
        return False
    runs = run_loads(spec, "kv")
    scalar = ir.substitute(additive, {ld: ir.var(f"_uv{j}", ir.FLOAT) for ld, j in runs.items()})
    return ir.free_vars(scalar) <= {"b", "h"} | {f"_uv{j}" for j in runs.values()}


def dq_visits_whole_range(spec: KernelSpec) -> bool:
    """Does each dQ program visit every key tile of its closed-form range ``[t_begin, t_end)`` (no
    block table, box plan or per-tile emptiness test)? Then the tiles it does not visit are exactly
    the others, and it can zero them in a full-size gradient (``GL{i}_ZERO_FILL``)."""
    rng = spec.dq_range or spec.fwd_range
    return not spec.data_dependent and not isinstance(rng, VisitBox) and not (rng.tile_check and spec.tile_full is not None)


def binned_dim(load: Node) -> int | None:
    """The dimension a learnable load's gradient can be binned along in the gather backward, or None.

    Binned: exactly one dimension follows ``kv_idx``, its index is clamped (not a plain ``kv_idx``)
    and does not follow the head, as in ``table[h, bucket(q_idx - kv_idx)]``. Every packed head then
    sees the same entry at a slot, so one matrix product with the slots' one-hot entries sums a chunk
    into per-head bins."""
    args = load.args
    kv_dims = [d for d, a in enumerate(args) if "kv" in ir.free_vars(a)]
    if len(kv_dims) != 1:
        return None
    a = args[kv_dims[0]]
    if a.op == "var" or "h" in ir.free_vars(a):
        return None
    return kv_dims[0]


def load_stages(mask: Node | None) -> tuple:
    """(load, stage) per captured load of the mask: "program", "row", "col" or "pair"."""
    if mask is None:
        return ()
    out = []
    for ld in ir.loads([mask]):
        fv = ir.free_vars(ld)
        q, kv = "q" in fv, "kv" in fv
        out.append((ld, "pair" if q and kv else "row" if q else "col" if kv else "program"))
    return tuple(out)


def lower(spec: KernelSpec) -> Lowering:
    """The lowering decisions of ``spec`` (pure: the same spec always lowers the same way)."""
    additive = additive_bias(spec.score)
    fwd_runs = runs_apply(spec, spec.fwd_range, spec.data_dependent, "kv")
    return Lowering(
        additive=additive,
        fwd_runs=fwd_runs,
        bwd_runs=runs_apply(spec, spec.bwd_range, spec.data_dependent, "q"),
        dq_runs=runs_apply(spec, spec.dq_range or spec.fwd_range, spec.data_dependent, "kv"),
        run_folds=fwd_runs and _run_folds(spec, additive),
        dq_whole_range=dq_visits_whole_range(spec),
        binned=tuple(binned_dim(gl.load) for gl in spec.grad_loads),
        max_bins=MAX_BINS, bin_piece=BIN_PIECE,
        load_stages=load_stages(spec.mask),
        required_length=required_length(spec),
        signatures=signatures(spec),
    )


# -- kernel signatures ---------------------------------------------------------------------------
def _strides(*names: str) -> list:
    return [f"stride_{n}" for n in names]


def _ints(*names: str) -> list:
    return [Param(n, "int") for n in names]


def _tensors(*names: str) -> list:
    return [Param(n, "tensor") for n in names]


def _consts(*names: str) -> list:
    return [Param(n, "constexpr") for n in names]


def _qkv_strides(*tensors: str) -> list:
    """``stride_{t}b, stride_{t}h, stride_{t}{row}, stride_{t}d`` per tensor prefix (row: m for
    query-like tensors, n for key-like ones)."""
    out = []
    for t in tensors:
        row = "n" if t in ("k", "v", "dk", "dv") else "m"
        out += _ints(*_strides(f"{t}b", f"{t}h", f"{t}{row}", f"{t}d"))
    return out


#: the extras' parameters a call brings (``marshal.Extras.own``) and those its shapes fix (``Extras.layout``)
_EXTRAS_OWN = _tensors("Sinks", "U", "W") + [Param("sigmoid_bias", "float")]
_EXTRAS_LAYOUT = _ints(*_strides("ub", "uh", "um", "ur", "wb", "wh", "wn", "wr"), "W_GROUP", "RANK")
_EXTRAS = _EXTRAS_OWN[:3] + _EXTRAS_LAYOUT + _EXTRAS_OWN[3:]
_EXTRA_CONSTS = _consts("HAS_SINKS", "HAS_BIAS", "BLOCK_R")
_TABLE = _tensors("TBL_FULL", "TBL_PART", "TBL_CNT") + _ints("tbl_stride_b", "tbl_stride_h", "tbl_stride_r")
_DIMS = _consts("HEAD_D", "BLOCK_M", "BLOCK_N", "BLOCK_D", "HEAD_DV", "BLOCK_DV", "HAS_D2", "BLOCK_D2", "UPCAST",
                "DOT_PRECISION")
_GATHER_DIMS = _consts("HEAD_D", "BLOCK_H", "BLOCK_N", "BLOCK_D", "HEAD_DV", "BLOCK_DV", "HAS_D2", "BLOCK_D2",
                       "UPCAST", "DOT_PRECISION")


def _buffers(spec: KernelSpec) -> list:
    out = []
    for b in spec.buffers:
        out += _buffer_pointers(spec, b) + _buffer_layout(spec, b)
    return out


def _buffer_pointers(spec: KernelSpec, *only) -> list:
    """``buf{slot}`` of each captured tensor (or of ``only``)."""
    return [Param(f"buf{b.slot}", "tensor") for b in only or spec.buffers]


def _buffer_layout(spec: KernelSpec, *only) -> list:
    """``buf{slot}_size{d}`` and ``buf{slot}_stride{d}`` of each captured tensor (or of ``only``)."""
    return [p for b in only or spec.buffers
            for p in _ints(*(f"buf{b.slot}_size{d}" for d in range(b.ndim)),
                           *(f"buf{b.slot}_stride{d}" for d in range(b.ndim)))]


def signatures(spec: KernelSpec) -> tuple:
    """((kernel, (Param, ...)), ...): every kernel's parameters in order, as codegen writes its
    ``def`` and the runtime fills its arguments. Kernels: the dense family ("fwd", "bwd_delta",
    "bwd_dkdv", "bwd_dq"; for block tables "table", and "tbounds"/"tclass" that build them from
    per-tile bounds, each with a "_t" twin for the transposed tables), the gather family
    ("gather_fwd", "gather_bwd"), the lightning indexer ("scores") and the decode family ("decode"
    for both the split-KV and the gather decode kernel, "decode_merge").

    The dense kernels lead with the values each call brings (tensors, scale, sigmoid bias), followed
    by those the call's shapes fix (strides, lengths, sections): the runtime's launch memo then
    relaunches with ``[*call's own values, *memoised rest]`` (``runtime/memo.py``)."""
    bufs = _buffers(spec)
    own = [Param("sm_scale", "float")] + _EXTRAS_OWN + _buffer_pointers(spec)
    fixed = [Param("SECTION", "int")] + _EXTRAS_LAYOUT + _buffer_layout(spec)
    table = _TABLE if spec.data_dependent else []
    n = len(spec.grad_loads)
    grads = [p for i, g in enumerate(spec.grad_loads) for p in _tensors(f"DBUF{g.slot}_{i}", f"GOFF{g.slot}_{i}")]
    grad_consts = [p for i in range(n) for p in _consts(f"GL{i}_ATOMIC", f"GL{i}_ZERO_FILL", f"GL{i}_WIDE")]
    grad_consts += _consts("DETERMINISTIC") if n else []
    sel_grads = [Param(f"DBUF{g.slot}_{i}", "tensor") for i, g in enumerate(spec.grad_loads)]
    sel_consts = [p for i in range(n) for p in _consts(f"GL{i}_BINS", f"GL{i}_PIECES")]
    sel_consts += _consts("BIN_PRECISION") if n else []
    sigs = {
        "fwd": (_tensors("Q", "K", "V", "Out", "Lse", "VISITS") + own + _qkv_strides("q", "k", "v", "o")
                + _ints("HQ", "GROUP", "LQ", "LKV") + fixed + table + _DIMS
                + _consts("COUNT_VISITS", "EVEN_KV", "KV_TMA", "W_TMA", "FOLD_SCALE") + _EXTRA_CONSTS),
        "bwd_delta": (_tensors("Out", "DO", "Delta") + _qkv_strides("o") + _ints(*_strides("db", "dh", "dm", "dd"))
                      + _ints("HQ", "LQ") + _consts("HEAD_DV", "BLOCK_M", "BLOCK_DV")),
        # with DQ_ATOMIC the dK/dV kernel also adds dQ (into DQA; DQ_TMA: whole tiles by TMA reduce-adds),
        # dU (DU) and the learnable tensors' gradients (DBUF*), and the dQ kernel does not run
        # (``Runner.backward``)
        "bwd_dkdv": (_tensors("Q", "K", "V", "DO", "DK", "DV", "Lse", "Delta", "DW", "DQA", "DU") + own + grads
                     + _qkv_strides("q", "k", "v", "do", "dk", "dv") + _ints("HQ", "HKV", "GROUP", "LQ", "LKV")
                     + fixed + table + _DIMS + _consts("EVEN_Q", "DQ_ATOMIC", "DQ_TMA") + _EXTRA_CONSTS + grad_consts),
        # with DELTA_HERE the dQ kernel also computes delta from Out and DO and stores it for the dK/dV
        # kernel, launched after it (no delta kernel: ``Runner.backward``)
        "bwd_dq": (_tensors("Q", "K", "V", "DO", "DQ", "Lse", "Delta", "DU", "Out") + own + grads
                   + _qkv_strides("q", "k", "v", "do", "dq", "o") + _ints("HQ", "GROUP", "LQ", "LKV") + fixed + table
                   + _DIMS + _consts("EVEN_KV", "DELTA_HERE") + _EXTRA_CONSTS + grad_consts),
        "gather_fwd": (_tensors("Q", "K", "V", "IDX", "Out", "Lse") + _qkv_strides("q", "k", "v")
                       + _ints(*_strides("ib", "ig", "im", "ij")) + _qkv_strides("o")
                       + _ints("NU", "HPU", "GROUP", "QPG", "LQ", "LKV", "NSEL") + [Param("sm_scale", "float")]
                       + _EXTRAS + bufs + _GATHER_DIMS + _EXTRA_CONSTS),
        "gather_bwd": (_tensors("Q", "K", "V", "IDX", "Out", "DO", "Lse", "DLse", "DQ", "DK", "DV", "DU", "DW")
                       + _qkv_strides("q", "k", "v") + _ints(*_strides("ib", "ig", "im", "ij"))
                       + _qkv_strides("o", "do", "dq", "dk", "dv")
                       + _ints(*_strides("dub", "duh", "dum", "dwb", "dwh", "dwn"))
                       + _ints("NU", "HPU", "GROUP", "QPG", "LQ", "LKV", "NSEL") + [Param("sm_scale", "float")]
                       + _EXTRAS + bufs + sel_grads + _GATHER_DIMS + _consts("HAS_DLSE") + _EXTRA_CONSTS + sel_consts),
        "scores": (_tensors("QI", "KI", "W", "S") + _ints(*_strides("qb", "qh", "qm", "qd", "kb", "kg", "kn", "kd",
                                                                    "wb", "wh", "wm", "sb", "sg", "sm", "sn"))
                   + _ints("G", "HPG", "LQ", "LKV", "T0", "NT", "S0", "NS") + [Param("scale", "float")] + bufs
                   + _consts("HEAD_D", "BLOCK_T", "BLOCK_S", "BLOCK_D", "UPCAST", "DOT_PRECISION", "HAS_W")),
    }
    # the decode family (codegen/decode.py): "decode" is the split-KV kernel's and the gather
    # decode's (one signature, so the runtime fills both alike; CNT: the fused merge's counters),
    # "decode_merge" the partials' merge (the two-kernel path)
    sigs["decode"] = (_tensors("Q", "K", "V", "PT", "SEQ", "QOFF", "IDX", "Out", "Lse", "OP", "LP", "CNT")
                      + _qkv_strides("q", "k", "v", "o") + _ints(*_strides("ptb", "ptp", "ib", "ig", "im", "ij"))
                      + _ints("HQ", "HKV", "GROUP", "QPG", "LQ", "NSEL", "NSPLIT", "NROWB") + [Param("sm_scale", "float")]
                      + _EXTRAS + bufs
                      + _consts("HEAD_D", "BLOCK_M", "BLOCK_N", "BLOCK_D", "HEAD_DV", "BLOCK_DV", "PAGED", "PAGE_SIZE",
                                "UPCAST", "DOT_PRECISION", "DIRECT", "SIGMOID_DEFAULT", "QOFF_FROM_LEN", "ROTATE",
                                "FUSED")
                      + _EXTRA_CONSTS)
    sigs["decode_merge"] = (_tensors("OP", "LP", "Out", "Lse", "Sinks") + _ints("HQ", "LQ", "NSPLIT", "NROWS")
                            + _qkv_strides("o") + _consts("HEAD_DV", "BLOCK_DV", "BLOCK_ROWS", "HAS_SINKS", "SOFTMAX"))
    if spec.data_dependent:
        # block tables: the dense table kernel (codegen/table.py), and the per-tile-bounds builder's
        # two (codegen/tilebounds.py: each column tile's bounds "tbounds", the classifier "tclass",
        # which reads them from TBND; NT = column tiles). "_t": the transposed tables of dK/dV
        sigs["table"] = sigs["table_t"] = (_TABLE + _ints("TH", "LQ", "LKV") + bufs + _consts("BLOCK_R", "BLOCK_C"))
        tiles = _ints("TH", "LQ", "LKV", "NT")
        sigs["tbounds"] = sigs["tbounds_t"] = _tensors("TBND") + tiles + bufs + _consts("BLOCK_C", "BLOCK_T")
        sigs["tclass"] = sigs["tclass_t"] = (_TABLE + _tensors("TBND") + tiles + bufs
                                             + _consts("BLOCK_R", "BLOCK_C", "BLOCK_T"))
    return tuple((k, tuple(v)) for k, v in sigs.items())
