"""Triton kernel templates: forward, backward (delta, dK/dV, dQ) and the block-table kernel.

Each template is filled from a KernelSpec: the pattern's expressions are emitted by
:class:`ExprEmitter` at the loop level where their inputs exist, and the visit plan (which tiles
to visit, which are full) comes from the spec's closed-form ranges or from a block table.
"""
from __future__ import annotations

from attndsl.spec import KernelSpec, VisitRange

from .expr import ExprEmitter

I1, I2, I3, I4 = (" " * n for n in (4, 8, 12, 16))


def buffer_params(spec: KernelSpec) -> str:
    out = []
    for b in spec.buffers:
        p = f"buf{b.slot}"
        out.append(p)
        out += [f"{p}_size{d}" for d in range(b.ndim)]
        out += [f"{p}_stride{d}" for d in range(b.ndim)]
    return "".join(f"{x}, " for x in out)


def _plan_lines(em: ExprEmitter, rng: VisitRange, stage: int, block: str, t_max: str, table: bool) -> list[str]:
    """Scalar code computing the tiles to visit along the target index (closed form)."""
    if table:
        return []
    lo, hi = (em.emit(x, stage) for x in rng.outer)
    ilo, ihi = (em.emit(x, stage) for x in rng.inner)
    return [
        f"lo = tl.maximum({lo}, 0)",
        f"hi = tl.minimum({hi}, {t_max})",
        f"t_begin = lo // {block}",
        f"t_end = tl.where(lo <= hi, hi // {block} + 1, t_begin)",
        f"f_begin = tl.maximum((tl.maximum({ilo}, 0) + {block} - 1) // {block}, t_begin)",
        f"f_end = tl.minimum((tl.minimum({ihi}, {t_max}) + 1) // {block}, t_end)",
        "n_full = tl.maximum(f_end - f_begin, 0)",
        "f_begin = tl.where(n_full > 0, f_begin, t_end)",
        "f_end = f_begin + n_full",
        "n_first = f_begin - t_begin",
        "n_tiles = t_end - t_begin",
    ]


def _table_plan_lines(prefix: str, bh_off: str, row: str) -> list[str]:
    return [
        f"tbl_off = {bh_off} + {row}.to(tl.int64) * tbl_stride_r",
        "n_full = tl.load(TBL_CNT + tbl_off // tbl_stride_r * 2)",
        "n_tiles = n_full + tl.load(TBL_CNT + tbl_off // tbl_stride_r * 2 + 1)",
    ]


def _tile_of_iteration(table: bool) -> list[str]:
    """Full tiles first (no mask), then the partial ones."""
    if table:
        return [
            "is_partial = it >= n_full",
            "tile = tl.load(tl.where(is_partial, TBL_PART + tbl_off + (it - n_full), TBL_FULL + tbl_off + it))",
        ]
    return [
        "j = it - n_full",
        "is_partial = j >= 0",
        "tile = tl.where(j < 0, f_begin + it, tl.where(j < n_first, t_begin + j, f_end + (j - n_first)))",
    ]


TABLE_PARAMS = "TBL_FULL, TBL_PART, TBL_CNT, tbl_stride_b, tbl_stride_h, tbl_stride_r, "


def _indent(lines, ind):
    return "".join(ind + line + "\n" for line in lines)


def _dot(a: str, b: str) -> str:
    return f"tl.dot({a}, {b}, input_precision=DOT_PRECISION)"


# -------------------------------------------------------------------------------------------
def forward(spec: KernelSpec, table: bool) -> str:
    name = f"{spec.name}_fwd"
    env = {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", 1), "q_lo": ("q_lo", 1), "q_hi": ("q_hi", 1),
           "kv_max": ("kv_max", 1), "q_max": ("q_max", 1), "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2),
           "kv_hi": ("kv_hi", 2), "score": ("score", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    plan = _plan_lines(em, spec.fwd_range, 1, "BLOCK_N", "kv_max", table)
    tbl_bh = "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h"
    if table:
        plan = _table_plan_lines("", tbl_bh, "pid_m")
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    check = ""
    visit_if = ""
    body_ind = I2
    if spec.fwd_range.tile_check and not table and spec.tile_full is not None:
        full = em.emit(spec.tile_full, 2)
        nonempty = em.emit(spec.tile_nonempty, 2)
        check = em.take(2, I2) + f"{I2}is_partial = is_partial & ({full} == 0)\n"
        visit_if = f"{I2}if {nonempty}:\n"
        body_ind = I3
    if spec.score is not None:
        s = em.emit(spec.score, 2)
        score_block = (f"{body_ind}score = qk * sm_scale\n" + em.take(2, body_ind)
                       + f"{body_ind}s = {s} * LOG2E\n")
    else:
        score_block = f"{body_ind}s = qk * (sm_scale * LOG2E)\n"
    keep = "kv_idx < LKV"
    if spec.mask is not None:
        m = em.emit(spec.mask, 2)
        keep = f"({m}) & (kv_idx < LKV)"
    mask_block = em.take(2, body_ind + I1) + f"{body_ind}{I1}s = tl.where({keep}, s, float(\"-inf\"))\n"
    B = body_ind
    return f'''
@triton.jit
def {name}(
    Q, K, V, Out, Lse, VISITS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    HQ, GROUP, LQ, LKV, sm_scale,
    {buffer_params(spec)}{TABLE_PARAMS if table else ""}
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, COUNT_VISITS: tl.constexpr,
):
    """Forward: one program per (query tile, batch*head); online softmax in fp32 with exp2."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
{pre0}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = offs_m[:, None]
    q_lo = pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, LQ) - 1
    q_max = LQ - 1
    kv_max = LKV - 1
    d_ok = offs_d < HEAD_D
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
{pre1}{_indent(plan, I1)}
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    visited = 0
    for it in range(0, n_tiles):
{_indent(_tile_of_iteration(table), I2)}        kv_lo = tile * BLOCK_N
        kv_hi = kv_lo + BLOCK_N - 1
        offs_n = kv_lo + tl.arange(0, BLOCK_N)
        kv_idx = offs_n[None, :]
{check}{visit_if}{B}kT = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd,
{B}             mask=(offs_n[None, :] < LKV) & d_ok[:, None], other=0.0)
{B}v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
{B}            mask=(offs_n[:, None] < LKV) & d_ok[None, :], other=0.0)
{B}if UPCAST:
{B}    kT = kT.to(tl.float32)
{B}    v = v.to(tl.float32)
{B}qk = {_dot("q", "kT")}
{score_block}{B}if is_partial:
{mask_block}{B}m_new = tl.maximum(m_i, tl.max(s, 1))
{B}m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
{B}p = tl.exp2(s - m_use[:, None])
{B}alpha = tl.exp2(m_i - m_use)
{B}l_i = l_i * alpha + tl.sum(p, 1)
{B}acc = acc * alpha[:, None] + {_dot("p.to(v.dtype)", "v")}
{B}m_i = m_new
{B}visited += 1
    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(dead, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < LQ) & d_ok[None, :])
    tl.store(Lse + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)
    if COUNT_VISITS:
        tl.store(VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visited)
'''


def preprocess(spec: KernelSpec) -> str:
    return f'''
@triton.jit
def {spec.name}_bwd_delta(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    HQ, LQ,
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O), the softmax backward's correction term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < LQ) & (offs_d[None, :] < HEAD_D)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)
'''


def _bwd_score(spec: KernelSpec, em: ExprEmitter, ind: str, stage: int, qk: str) -> str:
    """Recompute the (modified) score in log2 units and, with a score_mod, its derivative."""
    if spec.score is None:
        return f"{ind}s = {qk} * (sm_scale * LOG2E)\n"
    s = em.emit(spec.score, stage)
    ds = em.emit(spec.dscore, stage)
    return (f"{ind}score = {qk} * sm_scale\n" + em.take(stage, ind)
            + f"{ind}s = {s} * LOG2E\n{ind}dmod = {ds}\n")


def _bwd_mask(spec: KernelSpec, em: ExprEmitter, ind: str, stage: int) -> str:
    keep = "(q_idx < LQ) & (kv_idx < LKV)"
    if spec.mask is not None:
        keep = f"({em.emit(spec.mask, stage)}) & {keep}"
    return em.take(stage, ind + I1) + f"{ind}{I1}s = tl.where({keep}, s, float(\"-inf\"))\n"


def dkdv(spec: KernelSpec, table: bool) -> str:
    """dK/dV: one program per (key tile, batch*kv head); loops over the group's query heads."""
    env = {"b": ("b", 0), "kv": ("kv_idx", 0), "kv_lo": ("kv_lo", 0), "kv_hi": ("kv_hi", 0),
           "kv_max": ("kv_max", 0), "q_max": ("q_max", 0), "h": ("h", 1),
           "q": ("q_idx", 2), "q_lo": ("q_lo", 2), "q_hi": ("q_hi", 2), "score": ("score", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    tbl_bh = "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h"
    plan = _table_plan_lines("", tbl_bh, "pid_n") if table else _plan_lines(em, spec.bwd_range, 1, "BLOCK_M", "q_max", False)
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I2)
    check, visit_if, B = "", "", I3
    if spec.bwd_range.tile_check and not table and spec.tile_full is not None:
        full = em.emit(spec.tile_full, 2)
        nonempty = em.emit(spec.tile_nonempty, 2)
        check = em.take(2, I3) + f"{I3}is_partial = is_partial & ({full} == 0)\n"
        visit_if = f"{I3}if {nonempty}:\n"
        B = I4
    score = _bwd_score(spec, em, B, 2, "qkT")
    mask = _bwd_mask(spec, em, B, 2)
    dmod = "\n" + f"{B}dsT = dsT * dmod" if spec.score is not None else ""
    return f'''
@triton.jit
def {spec.name}_bwd_dkdv(
    Q, K, V, DO, DK, DV, Lse, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HQ, HKV, GROUP, LQ, LKV, sm_scale,
    {buffer_params(spec)}{TABLE_PARAMS if table else ""}
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    kv_idx = offs_n[:, None]
    kv_lo = pid_n * BLOCK_N
    kv_hi = tl.minimum(kv_lo + BLOCK_N, LKV) - 1
    kv_max = LKV - 1
    q_max = LQ - 1
{pre0}
    kv_ok = (offs_n[:, None] < LKV) & d_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
{pre1}{_indent(plan, I2)}        for it in range(0, n_tiles):
{_indent(_tile_of_iteration(table), I3)}            q_lo = tile * BLOCK_M
            q_hi = q_lo + BLOCK_M - 1
            offs_m = q_lo + tl.arange(0, BLOCK_M)
            q_idx = offs_m[None, :]
{check}{visit_if}{B}q_ok = (offs_m[:, None] < LQ) & d_ok[None, :]
{B}q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
{B}do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod, mask=q_ok, other=0.0)
{B}if UPCAST:
{B}    q = q.to(tl.float32)
{B}    do = do.to(tl.float32)
{B}lse = tl.load(Lse + bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
{B}lse = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
{B}delta = tl.load(Delta + bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
{B}qkT = {_dot("k", "tl.trans(q)")}
{score}{B}if is_partial:
{mask}{B}pT = tl.exp2(s - lse[None, :])
{B}dv += {_dot("pT.to(do.dtype)", "do")}
{B}dpT = {_dot("v", "tl.trans(do)")}
{B}dsT = pT * (dpT - delta[None, :]){dmod}
{B}dk += {_dot("dsT.to(q.dtype)", "q")}
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=kv_ok)
'''


def dq(spec: KernelSpec, table: bool) -> str:
    """dQ: one program per (query tile, batch*head), visiting key tiles like the forward."""
    env = {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", 1), "q_lo": ("q_lo", 1), "q_hi": ("q_hi", 1),
           "kv_max": ("kv_max", 1), "q_max": ("q_max", 1), "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2),
           "kv_hi": ("kv_hi", 2), "score": ("score", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    tbl_bh = "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h"
    plan = _table_plan_lines("", tbl_bh, "pid_m") if table else _plan_lines(em, spec.fwd_range, 1, "BLOCK_N", "kv_max", False)
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    check, visit_if, B = "", "", I2
    if spec.fwd_range.tile_check and not table and spec.tile_full is not None:
        full = em.emit(spec.tile_full, 2)
        nonempty = em.emit(spec.tile_nonempty, 2)
        check = em.take(2, I2) + f"{I2}is_partial = is_partial & ({full} == 0)\n"
        visit_if = f"{I2}if {nonempty}:\n"
        B = I3
    score = _bwd_score(spec, em, B, 2, "qk")
    mask = _bwd_mask(spec, em, B, 2)
    dmod = f" * dmod" if spec.score is not None else ""
    return f'''
@triton.jit
def {spec.name}_bwd_dq(
    Q, K, V, DO, DQ, Lse, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    HQ, GROUP, LQ, LKV, sm_scale,
    {buffer_params(spec)}{TABLE_PARAMS if table else ""}
    HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
{pre0}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q_idx = offs_m[:, None]
    q_lo = pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, LQ) - 1
    q_max = LQ - 1
    kv_max = LKV - 1
    q_ok = (offs_m[:, None] < LQ) & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :] * stride_dod, mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
    delta = tl.load(Delta + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
{pre1}{_indent(plan, I1)}
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for it in range(0, n_tiles):
{_indent(_tile_of_iteration(table), I2)}        kv_lo = tile * BLOCK_N
        kv_hi = kv_lo + BLOCK_N - 1
        offs_n = kv_lo + tl.arange(0, BLOCK_N)
        kv_idx = offs_n[None, :]
{check}{visit_if}{B}kT = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kn + offs_d[:, None] * stride_kd, mask=(offs_n[None, :] < LKV) & d_ok[:, None], other=0.0)
{B}vT = tl.load(v_base + offs_n[None, :].to(tl.int64) * stride_vn + offs_d[:, None] * stride_vd, mask=(offs_n[None, :] < LKV) & d_ok[:, None], other=0.0)
{B}if UPCAST:
{B}    kT = kT.to(tl.float32)
{B}    vT = vT.to(tl.float32)
{B}qk = {_dot("q", "kT")}
{score}{B}if is_partial:
{mask}{B}p = tl.exp2(s - lse[:, None])
{B}dp = {_dot("do", "vT")}
{B}ds = p * (dp - delta[:, None]){dmod}
{B}dq += {_dot("ds.to(kT.dtype)", "tl.trans(kT)")}
    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_ok)
'''


def block_table(spec: KernelSpec, transposed: bool) -> str:
    """Classify (row tile, column tile) pairs on the device: full / partial / empty lists.

    Forward tables have query tiles as rows and key tiles as columns; the transposed table
    (for dK/dV) the other way round. Only columns in the closed-form outer range are examined.
    """
    row, col = ("kv", "q") if transposed else ("q", "kv")
    rng = spec.bwd_range if transposed else spec.fwd_range
    env = {"b": ("b", 0), "h": ("h", 0),
           row: (f"{row}_idx", 1), f"{row}_lo": (f"{row}_lo", 1), f"{row}_hi": (f"{row}_hi", 1),
           f"{row}_max": (f"{row}_max", 1), f"{col}_max": (f"{col}_max", 1),
           col: (f"{col}_idx", 2), f"{col}_lo": (f"{col}_lo", 2), f"{col}_hi": (f"{col}_hi", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    plan = _plan_lines(em, rng, 1, "BLOCK_C", f"{col}_max", False)
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    m = em.emit(spec.mask, 2)
    elem = em.take(2, I2)
    r_len, c_len = ("LKV", "LQ") if transposed else ("LQ", "LKV")
    r_shape, c_shape = ("offs_r[:, None]", "offs_c[None, :]")
    name = f"{spec.name}_table{'_t' if transposed else ''}"
    return f'''
@triton.jit
def {name}(
    TBL_FULL, TBL_PART, TBL_CNT, tbl_stride_b, tbl_stride_h, tbl_stride_r,
    TH, LQ, LKV,
    {buffer_params(spec)}
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Block table: for one {row} tile, the {col} tiles where the mask holds everywhere / somewhere."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // TH
    h = pid_bh % TH
{pre0}
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    {row}_idx = {r_shape.replace("offs_r", "offs_r")}
    {row}_lo = pid_r * BLOCK_R
    {row}_hi = tl.minimum({row}_lo + BLOCK_R, {r_len}) - 1
    {row}_max = {r_len} - 1
    {col}_max = {c_len} - 1
    r_ok = offs_r[:, None] < {r_len}
{pre1}{_indent(plan, I1)}
    base = b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h + pid_r.to(tl.int64) * tbl_stride_r
    n_full = 0
    n_part = 0
    for tile in range(t_begin, t_end):
        {col}_lo = tile * BLOCK_C
        {col}_hi = {col}_lo + BLOCK_C - 1
        offs_c = {col}_lo + tl.arange(0, BLOCK_C)
        {col}_idx = {c_shape}
        valid = r_ok & (offs_c[None, :] < {c_len})
{elem}        keep = ({m}) & valid
        n_keep = tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
        n_valid = tl.sum(tl.sum(valid.to(tl.int32), 1), 0)
        if n_keep == BLOCK_R * BLOCK_C:
            tl.store(TBL_FULL + base + n_full, tile)
            n_full += 1
        elif n_keep > 0:
            tl.store(TBL_PART + base + n_part, tile)
            n_part += 1
    cnt = TBL_CNT + (base // tbl_stride_r) * 2
    tl.store(cnt, n_full)
    tl.store(cnt + 1, n_part)
'''
