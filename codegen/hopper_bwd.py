"""The Hopper (sm_90) backward: FlashAttention-3's shape in Gluon, rendered from the same KernelSpec
as the portable dK/dV and dQ kernels (``codegen/kernels.py``).

One program owns ``CONSUMERS`` key tiles of ``BLOCK_N`` rows of one (batch, kv head) and splits
into partitions (``gl.warp_specialize``), as the forward (``codegen/hopper.py``) does with its
query tiles:

* a producer warp (``_hopper_bwd_load``) brings the program's K and V tiles once, then Q and dO
  of every query tile the spec's dK/dV visit plan (``spec.bwd_range``, ``codegen/plan.py``) names,
  for every query head of the kv head's group (GQA), into a ring of ``STAGES`` shared-memory
  buffers through TMA, guarded by mbarriers ``q_ready``/``do_ready`` (the bytes arrived) and
  ``qdo_empty`` (every consumer is done with the buffer), and beside each buffer the forward's
  statistics of its rows (lse in log2 units, delta; ``stat_ready``), which the consumers read from
  shared memory rather than each from global memory;
* ``CONSUMERS`` consumer warp groups (``{name}_bwd_sm90_consumer``), each keeping the dK and dV of
  its own ``BLOCK_N`` keys in registers (wgmma accumulators) over the shared Q/dO stream. Per query
  tile, transposed as the portable dK/dV kernel is (keys on the rows):
  ``Sᵀ = K·Qᵀ`` and ``dPᵀ = V·dOᵀ`` (both in flight together), ``Pᵀ = exp2(sᵀ − lse)`` from the
  forward's logsumexp, ``dV += Pᵀ·dO``, ``dSᵀ = Pᵀ∘(dPᵀ − delta)`` times ∂score_mod/∂score,
  ``dK += dSᵀ·Q``; and with ``DQ_ATOMIC`` the tile's ``dQ = dS·K`` (float32) added into a float32
  buffer ``[B, H, Lq, D]`` as FlashAttention-3 adds it (``_hopper_bwd_dq``): the groups put their
  dSᵀ into one shared tile (mbarriers ``ds_ready``/``ds_empty``), each computes ``DQ_COLS`` columns
  of dQ over all the program's keys (at D=64 the groups take turns by tile), stores them to its
  shared-memory tile and adds them by a TMA reduce-add (``cp.reduce.async.bulk.tensor``; rows past
  Lq dropped by the descriptor), which runs on while the group goes on to the next tile (scaled and
  cast once at the end, on the host). With ``DQ_EARLY`` (where every group takes every tile) the
  dQ products are issued before dK's and only they are waited for, so dK's product runs while dQ
  goes out (FlashAttention-3's order); otherwise both are waited for at once. Without
  ``DQ_ATOMIC`` (``HopperBwdConfig.dq == "kernel"``, and deterministic runs) the runtime runs the
  portable dQ kernel, one program per query tile.

What depends on the pattern comes from the spec: the visit plan (full tiles first, with no mask
code, then the partial ones; a per-tile classification where the plan has one), the mask on
partial tiles, the score modifier, its derivative and their captured-tensor loads (``codegen/expr.py``,
at the loop level of their inputs). The plan is the program's (its ``CONSUMERS * BLOCK_N`` keys):
a query tile full for all of them is full for each consumer's, and one that a consumer's keys do
not see is masked whole there. A data-dependent mask (a document mask) reads its plan from the
transposed block table the runtime builds for these tiles (``Runner.table``: rows of
``CONSUMERS * BLOCK_N`` keys, columns of ``BLOCK_M`` queries).

:func:`supports_backward` says which specs this target renders (decided once per spec); every
other spec runs the portable backward.
"""
from __future__ import annotations

from attndsl import ir
from attndsl.passes.lower import _buffers
from attndsl.spec import KernelSpec, Param, VisitRange

from .attention import score_unit, scores_of
from .expr import ExprEmitter
from .hopper import GLUON_HELPERS, GLUON_IMPORTS, HOPPER_VERSION, UNSPECIALISED, _buffer_names, partitions
from .plan import _hoist_loads, _plan_lines
from .prelude import module_header
from .writer import Writer

#: Bump when the generated Hopper backward changes meaning (part of the module's cache key).
HOPPER_BWD_VERSION = 5

#: the TMA reduce-add (Triton 3.6's Gluon has the operation in its builder, not in its language)
IMPORTS = "from attndsl.runtime.gluon_ops import async_atomic_add, fence_async_shared"

LOADER = '''

@gluon.jit
def _hopper_bwd_load(q_desc, do_desc, k_desc, v_desc, Lse, Delta, q_smem, do_smem, k_smem, v_smem, lse_smem,
                     delta_smem, kv_bar, q_ready, do_ready, stat_ready, qdo_empty, b, hk, pid_n, kv_lo, kv_hi, HQ,
                     GROUP, LQ, LKV, {bufs}BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                     CONSUMERS: gl.constexpr):
    """The producer warp: the program's K and V tiles once, then Q and dO of each visited query
    tile (every query head of the group) into the ring, and the forward's statistics of its rows
    (lse in log2 units, a dead row's -inf as 0: its P is 0; delta) beside them. 4-D descriptors
    over [B, H, L, D]: rows past a head's length read as zeros. The captured tensors, for a visit
    plan that reads them."""
    mbarrier.expect(kv_bar, CONSUMERS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(CONSUMERS):
        tma.async_copy_global_to_shared(k_desc, [b, hk, kv_lo + c * BLOCK_N, 0], kv_bar, k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [b, hk, kv_lo + c * BLOCK_N, 0], kv_bar, v_smem.index(c))
    q_max = LQ - 1
    kv_max = LKV - 1
    offs_stat = gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [1], [0]))
{plan0}
    cnt = 0
    for g in range(0, GROUP):
        h = hk * GROUP + g
{plan1}
        for it in range(0, n_tiles):
            {tile}
            slot = cnt % STAGES
            # a fresh barrier counts as having completed the phase before its first: the first
            # pass over the ring does not wait
            mbarrier.wait(qdo_empty.index(slot), ((cnt // STAGES) & 1) ^ 1)
            row = tile * BLOCK_M
            mbarrier.expect(q_ready.index(slot), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, h, row, 0], q_ready.index(slot), q_smem.index(slot))
            mbarrier.expect(do_ready.index(slot), do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(do_desc, [b, h, row, 0], do_ready.index(slot), do_smem.index(slot))
            # the consumers read the statistics from shared memory: read from global memory by each
            # consumer thread, 32 values a tile, their latency stalled the groups (ncu, H100 2026-12-07:
            # long-scoreboard stalls 6.5 cycles per issued instruction against the portable kernel's 0.5)
            rows = row + offs_stat
            stat = (b * HQ + h).to(gl.int64) * LQ + rows
            lse = gl.load(Lse + stat, mask=rows < LQ, other=0.0)
            lse_smem.index(slot).store(gl.where(lse == float("-inf"), 0.0, lse * LOG2E))
            delta_smem.index(slot).store(gl.load(Delta + stat, mask=rows < LQ, other=0.0))
            mbarrier.arrive(stat_ready.index(slot), count=1)
            cnt += 1
'''

DQ = '''

@gluon.jit
def _hopper_bwd_ds_share(ds16, ds_smem, ds_ready, ds_empty, cnt, C: gl.constexpr, BLOCK_N: gl.constexpr):
    """The group's ``ds16`` (dSᵀ of its keys) into the program's shared dSᵀ, and wait until every
    group's is there."""
    # every group's product of the previous tile has read the shared dSᵀ (a fresh barrier counts as
    # having completed the phase before its first)
    mbarrier.wait(ds_empty, (cnt & 1) ^ 1)
    ds_smem.slice(C * BLOCK_N, BLOCK_N).store(ds16)
    fence_async_shared()  # the group's stores, seen by the other group's wgmma (the async proxy)
    mbarrier.arrive(ds_ready, count=1)
    mbarrier.wait(ds_ready, cnt & 1)


@gluon.jit
def _hopper_bwd_dq_products(ds_smem, k_smem, C: gl.constexpr, CONSUMERS: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, DQ_COLS: gl.constexpr):
    """The products of the group's DQ_COLS columns of the tile's dQ = dS·K over all the program's
    keys, from the shared dSᵀ: issued, not waited for (returns their accumulator)."""
    COL: gl.constexpr = (C % (HEAD_D // DQ_COLS)) * DQ_COLS  # the group's first column of dQ
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])
    dq = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=dq_layout)
    for c in gl.static_range(CONSUMERS):  # dS·K over each group's keys
        dq = warpgroup_mma(ds_smem.slice(c * BLOCK_N, BLOCK_N).permute((1, 0)),
                           k_smem.index(c).reshape([BLOCK_N, HEAD_D]).slice(COL, DQ_COLS, dim=1), dq, is_async=True)
    return dq


@gluon.jit
def _hopper_bwd_dq_add(dq, dq_smem, dq_desc, ds_empty, b, h, q_lo, C: gl.constexpr, BLOCK_M: gl.constexpr,
                       HEAD_D: gl.constexpr, DQ_COLS: gl.constexpr):
    """The tile's dQ columns (their products waited for) out: the shared dSᵀ freed, the group's
    shared tile refilled once the previous tile's add has read it, and added into float32 dQ by a
    TMA reduce-add, which runs on while the group goes on (rows past LQ are dropped)."""
    COL: gl.constexpr = (C % (HEAD_D // DQ_COLS)) * DQ_COLS
    mbarrier.arrive(ds_empty, count=1)
    tma.store_wait(0)
    dq_smem.reshape([BLOCK_M, DQ_COLS]).store(dq)
    fence_async_shared()
    async_atomic_add(dq_desc, [b, h, q_lo, COL], dq_smem)


@gluon.jit
def _hopper_bwd_dq(ds16, ds_smem, k_smem, dq_smem, dq_desc, ds_ready, ds_empty, cnt, b, h, q_lo, C: gl.constexpr,
                   CONSUMERS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                   DQ_COLS: gl.constexpr):
    """A query tile's dQ = dS·K, shared out over the consumer groups as FlashAttention-3 does: each
    group puts ``ds16`` (dSᵀ of its keys) into the program's shared dSᵀ; then each takes DQ_COLS
    columns of dQ over all the program's keys (groups past the column count take turns by tile),
    stores them to its shared tile and adds them into float32 dQ by a TMA reduce-add. One add per
    program and tile rather than one per group, and a [BLOCK_M, DQ_COLS] accumulator beside dK and
    dV rather than [BLOCK_M, HEAD_D], which did not fit the registers at D=128 (ptxas serialised
    the wgmmas). The products are waited for at once, with dK's issued before them (the consumer's
    ``DQ_EARLY`` order issues them before dK's instead, where every group takes every tile)."""
    GROUPS: gl.constexpr = HEAD_D // DQ_COLS
    TURNS: gl.constexpr = CONSUMERS // GROUPS
    _hopper_bwd_ds_share(ds16, ds_smem, ds_ready, ds_empty, cnt, C, BLOCK_N)
    if cnt % TURNS == C // GROUPS:
        dq = _hopper_bwd_dq_products(ds_smem, k_smem, C, CONSUMERS, BLOCK_M, BLOCK_N, HEAD_D, DQ_COLS)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
        _hopper_bwd_dq_add(dq, dq_smem, dq_desc, ds_empty, b, h, q_lo, C, BLOCK_M, HEAD_D, DQ_COLS)
    else:
        mbarrier.arrive(ds_empty, count=1)
'''


def supports_backward(spec: KernelSpec) -> str | None:
    """None when this target renders ``spec``'s backward; else why not (the runtime records it and
    runs the portable backward). Decided from the spec alone."""
    if spec.normalizer != "softmax":
        return f"normaliser {spec.normalizer!r} (the Hopper backward is softmax only)"
    if spec.data_dependent:
        return None  # its visit plan is a block table (rows of CONSUMERS * BLOCK_N keys)
    if not isinstance(spec.bwd_range, VisitRange):
        return "layout (box) visit plan of the dK/dV kernel"
    if spec.lowering.bwd_runs:
        return "constant-run loops in the dK/dV kernel"
    if spec.grad_loads:
        return "learnable captured tensors (their gradients come from the portable dQ kernel)"
    return None


def kernel_name(spec: KernelSpec) -> str:
    return f"{spec.name}_bwd"


def signature(spec: KernelSpec) -> tuple:
    """The Hopper backward's parameters, in order (the runtime fills them by name)."""
    t = [Param(n, "tensor") for n in ("q_desc", "k_desc", "v_desc", "do_desc", "dq_desc", "DK", "DV", "Lse", "Delta")]
    i = [Param(n, "int") for n in ("stride_dkb", "stride_dkh", "stride_dkn", "stride_dvb", "stride_dvh", "stride_dvn",
                                   "HQ", "HKV", "GROUP", "LQ", "LKV")]
    c = [Param(n, "constexpr") for n in ("BLOCK_M", "BLOCK_N", "HEAD_D", "STAGES", "CONSUMERS", "DQ_ATOMIC", "DQ_COLS",
                                         "DQ_EARLY")]
    return tuple(t + i + [Param("sm_scale", "float")] + _buffers(spec) + list(_table_params(spec)) + c)


#: a data-dependent mask's block table (``runtime/launch.py: Table.PARAMS``): per key-tile row, its
#: full and partial query tiles and their counts
TABLE = ("TBL_FULL", "TBL_PART", "TBL_CNT", "tbl_stride_b", "tbl_stride_h", "tbl_stride_r")


def _table_params(spec: KernelSpec) -> tuple:
    if not spec.data_dependent:
        return ()
    return tuple(Param(n, "tensor" if n.isupper() else "int") for n in TABLE)


def _table_names(spec: KernelSpec) -> str:
    """The block table's parameters, passed on to the partitions ("" for none)."""
    return "".join(f"{n}, " for n in TABLE) if spec.data_dependent else ""


def _env() -> dict:
    """Names of the index variables (the portable dK/dV kernel's stages: keys per program, the head
    per group member, queries per tile). ``kv_lo``/``kv_hi`` are the program's keys (the plan's)."""
    return {"b": ("b", 0), "kv": ("kv_idx", 0), "kv_lo": ("kv_lo", 0), "kv_hi": ("kv_hi", 0),
            "kv_max": ("kv_max", 0), "q_max": ("q_max", 0), "h": ("h", 1),
            "q": ("q_idx", 2), "q_lo": ("q_lo", 2), "q_hi": ("q_hi", 2), "score": ("score", 2)}


def _plan(spec: KernelSpec) -> tuple[str, str]:
    """(per program, per query head) code of the dK/dV visit plan, for the producer and the
    consumers alike (each computes it: the counts are scalars)."""
    if spec.data_dependent:  # the table's row of this program (plan.py's _table_plan_lines)
        return "", ("tbl_off = (b.to(gl.int64) * tbl_stride_b + h.to(gl.int64) * tbl_stride_h\n"
                    "           + pid_n.to(gl.int64) * tbl_stride_r)\n"
                    "n_full = gl.load(TBL_CNT + tbl_off // tbl_stride_r * 2)\n"
                    "n_tiles = n_full + gl.load(TBL_CNT + tbl_off // tbl_stride_r * 2 + 1)\n")
    em = ExprEmitter(_env(), 3, prefix="w")
    lines = _plan_lines(em, spec.bwd_range, 1, "BLOCK_M", "q_max", False)
    return em.take(0, ""), em.take(1, "") + "".join(ln + "\n" for ln in lines)


def _tile_line(spec: KernelSpec) -> str:
    """The query tile of iteration ``it``: full tiles first, then the partial ones."""
    if spec.data_dependent:
        return ("tile = gl.load(gl.where(it >= n_full, TBL_PART + tbl_off + (it - n_full), "
                "TBL_FULL + tbl_off + it))")
    return "tile = _hopper_tile(it, n_full, f_begin, t_begin, n_first, f_end)"


def _indent(text: str, ind: str) -> str:
    return "".join(ind + ln + "\n" for ln in text.splitlines())


def _tile_code(spec: KernelSpec, em: ExprEmitter) -> tuple[str, str, str, str]:
    """(classification, scores, mask body, keep) of one query tile, emitted at stage 2 with no
    indentation: ``s`` (scores in log2 units) and ``dmod`` (∂score_mod/∂score) from ``qkT``."""
    cls = ""
    if not spec.data_dependent and spec.bwd_range.tile_check and spec.tile_full is not None:
        # a tile the plan counts partial may be full for these keys; one straddling the end of the
        # queries never is (its padding rows must be masked)
        full = em.emit(spec.tile_full, 2)
        cls = em.take(2, "") + f"is_partial = is_partial & (({full} == 0) | (q_lo + BLOCK_M > LQ))\n"
    unit = score_unit(spec.normalizer)
    if spec.score is None:
        score = f"s = qkT * (sm_scale * {unit})\n"
    else:
        code = em.emit(spec.score, 2)
        fv = ir.free_vars(spec.score)
        full = ir.SCORE in fv or {"q", "kv"} <= fv
        # Gluon creates tensors with a layout: gl.zeros_like, not tl.zeros_like (attention.scores_of)
        s = scores_of(spec, code, "qkT") if full else f"{code} * {unit} + gl.zeros_like(qkT)"
        dmod = em.emit(spec.dscore, 2)
        # ``score`` (the env's name of the score variable) is bound before the score_mod's code
        score = "score = qkT * sm_scale\n" + em.take(2, "") + f"s = {s}\ndmod = {dmod}\n"
    mask_body, keep = "", "(q_idx < LQ) & (kv_idx < LKV)"
    if spec.mask is not None:
        m, mask_body = em.branch(2, "", lambda: em.emit(spec.mask, 2))
        keep = f"({m}) & {keep}"
    return cls, score, mask_body, keep


def _own_tiles(spec: KernelSpec) -> tuple | None:
    """(per program, per query head, per tile code, condition): whether a query tile may be visible
    to this group's keys ``kv0..kv0_hi`` (``spec.tile_nonempty``), for the partial tiles of the
    program's plan that are empty for one group (a causal mask's diagonal, a window's edges). A
    skipped tile still waits for its buffers and frees them (the ring is shared). None where the
    spec has no such test (a block table)."""
    if spec.data_dependent or spec.tile_nonempty is None:
        return None
    env = {**_env(), "kv_lo": ("kv0", 0), "kv_hi": ("kv0_hi", 0)}
    em = ExprEmitter(env, 3, prefix="u")
    cond = em.emit(spec.tile_nonempty, 2)
    return em.take(0, ""), em.take(1, ""), em.take(2, ""), cond


def _consumer(spec: KernelSpec, w: Writer, plan0: str, plan1: str) -> None:
    """One consumer warp group: dK/dV of ``BLOCK_N`` keys (rows ``kv0..``) over the Q/dO ring."""
    em = ExprEmitter(_env(), 3, prefix="v")
    # the mask's captured loads of one key (a document mask's ids[kv]) once per program
    _hoist_loads(spec, em, {"program": 0, "col": 0})
    cls, score, mask_body, keep = _tile_code(spec, em)
    own = _own_tiles(spec)
    name = kernel_name(spec)
    w.code(f"""
    @gluon.jit
    def {name}_consumer(q_smem, do_smem, k_smem, v_smem, dq_smem, ds_smem, lse_smem, delta_smem, kv_bar, q_ready,
                 do_ready, stat_ready, qdo_empty, ds_ready, ds_empty, dq_desc, DK, DV,
                 stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn, b, hk, pid_n, kv_lo, kv_hi,
                 HQ, GROUP, LQ, LKV, sm_scale, {_buffer_names(spec)}{_table_names(spec)}
                 C: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
                 STAGES: gl.constexpr, CONSUMERS: gl.constexpr, DQ_ATOMIC: gl.constexpr, DQ_COLS: gl.constexpr,
                 DQ_EARLY: gl.constexpr):
        \"\"\"Consumer group C: dK and dV of keys kv0..kv0+BLOCK_N, and its share of each visited query tile's dQ.\"\"\"
        # the transposed score tile [BLOCK_N keys, BLOCK_M queries], the [BLOCK_N, HEAD_D]
        # accumulators (dK, dV) and their A operands from registers
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
        a_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=a_layout, k_width=2)
        col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        q_max = LQ - 1
        kv_max = LKV - 1
        kv0 = kv_lo + C * BLOCK_N
        offs_n = kv0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
        kv_idx = gl.expand_dims(offs_n, 1)
        offs_m0 = gl.arange(0, BLOCK_M, layout=col_layout)
        k_tile = k_smem.index(C).reshape([BLOCK_N, HEAD_D])  # this group's [1, 1, BLOCK_N, D] TMA boxes
        v_tile = v_smem.index(C).reshape([BLOCK_N, HEAD_D])
        dq_tile = dq_smem.index(C)  # the group's [1, 1, BLOCK_M, DQ_COLS] TMA box of dQ
        dtype: gl.constexpr = k_smem.dtype
        # keys past LKV (zeros from TMA) add nothing to dQ whatever their score
        kv_pad = kv0 + BLOCK_N > LKV
    """)
    with w.indented():
        w.emitted(_indent(plan0, w.ind))
        w.emitted(em.take(0, w.ind))
        if own is not None:
            w.line("kv0_hi = kv0 + BLOCK_N - 1")
            w.emitted(_indent(own[0], w.ind))
        w.code("""
        dk = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=a_layout)
        dv = gl.zeros([BLOCK_N, HEAD_D], gl.float32, layout=a_layout)
        s0 = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
        mbarrier.wait(kv_bar, 0)
        cnt = 0
        """)
        with w.block("for g in range(0, GROUP):"):
            w.code("""
            h = hk * GROUP + g
            """)
            w.emitted(_indent(plan1, w.ind))
            w.emitted(em.take(1, w.ind))
            if own is not None:
                w.emitted(_indent(own[1], w.ind))
            with w.block("for it in range(0, n_tiles):"):
                w.code(f"""
                slot = cnt % STAGES
                phase = (cnt // STAGES) & 1
                is_partial = it >= n_full
                {_tile_line(spec)}
                q_lo = tile * BLOCK_M
                q_hi = q_lo + BLOCK_M - 1
                offs_m = q_lo + offs_m0
                q_idx = gl.expand_dims(offs_m, 0)
                """)
                w.emitted(_indent(cls, w.ind))
                if own is not None:  # skip the tiles this group's keys do not see (the ring still turns)
                    w.emitted(_indent(own[2], w.ind))
                    w.line(f"visit = (it < n_full) | ({own[3]})")
                    w.line("if visit:")
                with w.indented(own is not None):
                    w.code("""
                    q_tile = _kv_tile(q_smem, slot)
                    do_tile = _kv_tile(do_smem, slot)
                    mbarrier.wait(q_ready.index(slot), phase)
                    qkT = warpgroup_mma(k_tile, q_tile.permute((1, 0)), s0, use_acc=False, is_async=True)
                    mbarrier.wait(do_ready.index(slot), phase)
                    dpT = warpgroup_mma(v_tile, do_tile.permute((1, 0)), s0, use_acc=False, is_async=True)
                    # wgmma groups complete in order: one pending means Sᵀ is done, dPᵀ may not be
                    qkT = warpgroup_mma_wait(num_outstanding=1, deps=(qkT, ))
                    # the forward's statistics of the tile's rows (the producer's, in log2 units)
                    mbarrier.wait(stat_ready.index(slot), phase)
                    lse = lse_smem.index(slot).load(col_layout)
                    """)
                    w.emitted(_indent(score, w.ind))
                    with w.block("if is_partial:"):
                        w.emitted(_indent(mask_body, w.ind))
                        w.line(f's = gl.where({keep}, s, float("-inf"))')
                    w.code("""
                    pT = gl.exp2(s - gl.expand_dims(lse, 0))
                    dv = warpgroup_mma(gl.convert_layout(pT.to(dtype), op_layout), do_tile, dv, is_async=True)
                    dpT = warpgroup_mma_wait(num_outstanding=1, deps=(dpT, ))
                    dsT = pT * (dpT - gl.expand_dims(delta_smem.index(slot).load(col_layout), 0))
                    """)
                    if spec.score is not None:
                        w.line("dsT = dsT * dmod")
                    w.code("""
                    if kv_pad:
                        dsT = gl.where(kv_idx < LKV, dsT, 0.0)
                    ds16 = dsT.to(dtype)
                    if DQ_EARLY:
                        # FlashAttention-3's order: dQ's products first, then dK's, which runs on
                        # while dQ goes out to shared memory and its reduce-add
                        _hopper_bwd_ds_share(ds16, ds_smem, ds_ready, ds_empty, cnt, C, BLOCK_N)
                        dq = _hopper_bwd_dq_products(ds_smem, k_smem, C, CONSUMERS, BLOCK_M, BLOCK_N, HEAD_D, DQ_COLS)
                        dk = warpgroup_mma(gl.convert_layout(ds16, op_layout), q_tile, dk, is_async=True)
                        dq = warpgroup_mma_wait(num_outstanding=1, deps=(dq, ))  # (in order: dV's and dQ's)
                        _hopper_bwd_dq_add(dq, dq_tile, dq_desc, ds_empty, b, h, q_lo, C, BLOCK_M, HEAD_D, DQ_COLS)
                    else:
                        dk = warpgroup_mma(gl.convert_layout(ds16, op_layout), q_tile, dk, is_async=True)
                        if DQ_ATOMIC:
                            _hopper_bwd_dq(ds16, ds_smem, k_smem, dq_tile, dq_desc, ds_ready, ds_empty, cnt, b, h,
                                           q_lo, C, CONSUMERS, BLOCK_M, BLOCK_N, HEAD_D, DQ_COLS)
                    dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
                    mbarrier.arrive(qdo_empty.index(slot), count=1)
                    """)
                if own is not None:
                    w.code("""
                    else:
                        mbarrier.wait(q_ready.index(slot), phase)
                        mbarrier.wait(do_ready.index(slot), phase)
                        if DQ_ATOMIC:  # this group's dSᵀ is zero; it still takes its share of dQ
                            _hopper_bwd_dq(gl.zeros([BLOCK_N, BLOCK_M], dtype, layout=s_layout), ds_smem, k_smem,
                                           dq_tile, dq_desc, ds_ready, ds_empty, cnt, b, h, q_lo, C, CONSUMERS, BLOCK_M,
                                           BLOCK_N, HEAD_D, DQ_COLS)
                        mbarrier.arrive(qdo_empty.index(slot), count=1)
                    """)
                w.line("cnt += 1")
        w.code("""
        om = kv0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, a_layout))
        od = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, a_layout))
        ok = gl.expand_dims(om < LKV, 1)
        rows = gl.expand_dims(om.to(gl.int64), 1)
        dk_ptrs = DK + b.to(gl.int64) * stride_dkb + hk.to(gl.int64) * stride_dkh + rows * stride_dkn + gl.expand_dims(od, 0)
        gl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
        dv_ptrs = DV + b.to(gl.int64) * stride_dvb + hk.to(gl.int64) * stride_dvh + rows * stride_dvn + gl.expand_dims(od, 0)
        gl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=ok)
        if DQ_ATOMIC:
            tma.store_wait(0)  # the last reduce-add has read the shared tile before the program ends
        """)


def _kernel(spec: KernelSpec, w: Writer) -> None:
    """The entry: the program's keys, shared memory, barriers, partitions."""
    params = signature(spec)
    runtime = ", ".join(p.name for p in params if p.kind != "constexpr")
    consts = ", ".join(f"{p.name}: gl.constexpr" for p in params if p.kind == "constexpr")
    name = kernel_name(spec)
    w.code(f'''
    @gluon.jit(do_not_specialize={UNSPECIALISED!r})
    def {name}({runtime},
            {consts}):
        """dK/dV (and dQ with DQ_ATOMIC), warp-specialised for Hopper: one program per CONSUMERS key tiles of one (batch, kv head)."""
        pid_n = gl.program_id(0)  # the first key tiles see the most queries under a causal mask
        pid_bh = gl.program_id(1)
        b = pid_bh // HKV
        hk = pid_bh % HKV
        kv_lo = pid_n * (BLOCK_N * CONSUMERS)
        kv_hi = gl.minimum(kv_lo + BLOCK_N * CONSUMERS, LKV) - 1
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_D], q_desc.layout)
        do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_D], do_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, BLOCK_N, HEAD_D], k_desc.layout)
        # dSᵀ of the program's keys, shared by the groups for dQ, and each group's share of a dQ tile on
        # its way to the TMA reduce-add (the deterministic variant leaves both unused: no shared memory)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([CONSUMERS * BLOCK_N, BLOCK_M], dtype)
        ds_smem = gl.allocate_shared_memory(dtype, [CONSUMERS * BLOCK_N, BLOCK_M], ds_layout)
        dq_smem = gl.allocate_shared_memory(gl.float32, [CONSUMERS, 1, 1, BLOCK_M, DQ_COLS], dq_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, BLOCK_N, HEAD_D], v_desc.layout)
        kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        # the forward's statistics of each ring buffer's rows
        stat_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stat_layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stat_layout)
        stat_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        ds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ds_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(kv_bar, count=1)
        mbarrier.init(ds_ready, count=CONSUMERS)
        mbarrier.init(ds_empty, count=CONSUMERS)
        for i in gl.static_range(STAGES):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(do_ready.index(i), count=1)
            mbarrier.init(stat_ready.index(i), count=1)
            mbarrier.init(qdo_empty.index(i), count=CONSUMERS)
    ''')
    with w.indented():
        bufs = _buffer_names(spec)
        common = ("q_smem, do_smem, k_smem, v_smem, dq_smem, ds_smem, lse_smem, delta_smem, kv_bar, q_ready, do_ready, "
                  "stat_ready, qdo_empty, ds_ready, ds_empty, dq_desc, DK, DV, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, "
                  "stride_dvn, b, hk, pid_n, kv_lo, kv_hi, HQ, GROUP, LQ, LKV, sm_scale, ")
        bufs += _table_names(spec)
        consumer = [f"({name}_consumer, ({common}{bufs}{c}, BLOCK_M, BLOCK_N, HEAD_D, STAGES, CONSUMERS, DQ_ATOMIC, "
                    "DQ_COLS, DQ_EARLY))" for c in range(2)]
        load = ("(_hopper_bwd_load, (q_desc, do_desc, k_desc, v_desc, Lse, Delta, q_smem, do_smem, k_smem, v_smem, "
                f"lse_smem, delta_smem, kv_bar, q_ready, do_ready, stat_ready, qdo_empty, b, hk, pid_n, kv_lo, kv_hi, HQ, GROUP, LQ, LKV, {bufs}BLOCK_M, BLOCK_N, STAGES, "
                "CONSUMERS))")
        partitions(w, consumer, load)


def render(spec: KernelSpec) -> str:
    """The Gluon module of ``spec``'s Hopper backward (call only where :func:`supports_backward` is None)."""
    why = supports_backward(spec)
    if why is not None:
        raise ValueError(f"the Hopper target does not render this pattern's backward: {why}")
    plan0, plan1 = _plan(spec)
    w = Writer()
    w.code(GLUON_IMPORTS)
    w.line(IMPORTS)
    w.line()
    w.line()
    w.code(GLUON_HELPERS)
    w.emitted(LOADER.replace("{plan0}", _indent(plan0, "    ").rstrip("\n"))
              .replace("{plan1}", _indent(plan1, "        ").rstrip("\n")).replace("{bufs}", _buffer_names(spec) + _table_names(spec)).replace("{tile}", _tile_line(spec)))
    w.emitted(DQ)
    w.line()
    w.line("#: registers per thread of a worker consumer warp group and of the producer warp (setmaxnreg)")
    w.line("CONSUMER_REGS = gl.constexpr(240)")
    w.line("LOADER_REGS = gl.constexpr(24)")
    w.line()
    w.line()
    _consumer(spec, w, plan0, plan1)
    w.line()
    w.line()
    _kernel(spec, w)
    return module_header(spec, f"hopper{HOPPER_VERSION}-bwd{HOPPER_BWD_VERSION}", spec.key,
                         "  (dense, no modifiers)") + w.text()
