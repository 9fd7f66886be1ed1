"""The dense kernel family: forward, backward (delta, dK/dV, dQ).

Each kernel is a composition: its visit plan and loops (``codegen/plan.py``), tile loads and
scores (``codegen/attention.py``), the shared math (``codegen/prelude.py``), gradients of
learnable tensors (``codegen/grads.py``); the pattern's expressions are emitted by
:class:`ExprEmitter` at the loop level where their inputs exist.
"""
from __future__ import annotations

from attndsl.passes.diagonal import DIST
from attndsl.spec import KernelSpec

from . import runs as _runs
from .attention import (FOLDED_SCALE, I1, I2, I3, I4, KV_DESCRIPTORS, SECOND_PART, _bwd_dscore, _bwd_mask, _dot,
                        _dot_acc, _folded_score_lines, _folds_scale, _kv_tile, _probs, _run_score_lines,
                        _score_lines, _second_q_rows, _softmax)
from .expr import ExprEmitter
from .grads import _grad_load_code, dkdv_grad_adds
from .plan import (_hoist_loads, _indent, _loop_head, _plan_lines, _split_backward, _split_extras, _split_loop,
                   _table_plan_lines, _tile_class)
from .writer import kernel_def


def forward(spec: KernelSpec, table: bool) -> str:
    name = f"{spec.name}_fwd"
    env = {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", 1), "q_lo": ("q_lo", 1), "q_hi": ("q_hi", 1),
           "kv_max": ("kv_max", 1), "q_max": ("q_max", 1), "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2),
           "kv_hi": ("kv_hi", 2), "score": ("score", 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "row": 1})
    plan = _plan_lines(em, spec.fwd_range, 1, "BLOCK_N", "kv_max", table)
    if table:
        plan = _table_plan_lines("", "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h", "pid_m")
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    runs = spec.lowering.fwd_runs
    check, visit_if, Bg = "", "", I2
    cls = _tile_class(spec, spec.fwd_range, em, table)
    if cls is not None:
        full, nonempty = cls
        # a tile straddling the end of the keys is never full: its padding keys must be masked
        check = em.take(2, I2) + f"{I2}is_partial = is_partial & (({full} == 0) | (kv_lo + BLOCK_N > LKV))\n"
        visit_if = f"{I2}if {nonempty}:\n"
        Bg = I3
    fold = _folds_scale(spec)
    run_fold = spec.lowering.run_folds
    if _softmax(spec):
        init = ((FOLDED_SCALE if fold or run_fold else "")
                + "    m_i, l_i = _softmax_start(Sinks + h, True, BLOCK_M, HAS_SINKS)\n")
        finish = "    out, lse = _softmax_finish(acc, m_i, l_i)\n"
        store_lse = "    tl.store(Lse + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)\n"
    else:
        init = ""
        finish = "    out = acc\n"
        store_lse = ""

    def kv_loop(mode: str, part: str = "both", bounds: tuple | None = None, tested: bool = True) -> str:
        """The loop over key tiles: a constant-run loop ("run": full tiles, no mask) or the general
        one, whole or as a loop over its full tiles (no mask code) and one over its partial tiles
        (``part``); ``bounds`` of its iterations and, with ``tested`` False, no emptiness test per
        tile (``_split_extras``)."""
        run = mode == "run"
        B = I2 if run or not tested else Bg
        head = _loop_head(spec, run, runs, table, spec.fwd_range, "kv", I1, part, bounds)
        folded = fold or (run and run_fold)
        if fold:
            score_block = _folded_score_lines(B, _dot("u", "wT"))
        elif folded:
            score_block = _run_score_lines(spec, em, B, _dot("u", "wT"))
        else:
            score_block = _score_lines(spec, em, B, 2, "qk", _dot("u", "wT"), mode=mode)
        masked = ""
        if not run and part != "full":
            M = B + I1 if part == "both" else B
            keep, mask_body = "kv_idx < LKV", ""
            if spec.mask is not None:
                m, mask_body = em.branch(2, M, lambda: em.emit(spec.mask, 2))
                keep = f"({m}) & (kv_idx < LKV)"
            masked = (f"{B}if is_partial:\n" if part == "both" else "") + mask_body + \
                f"{M}s = tl.where({keep}, s, float(\"-inf\"))\n"
        em.forget(2)
        tile = _kv_tile(B, "" if run else check + (visit_if if tested else ""), "v", "v_offs",
                        "(offs_n[:, None] < LKV) & dv_ok[None, :]", tma=True)
        if _softmax(spec):
            run_add = folded and not fold  # a run's scalar bias joins the max, leaves the exponent
            update = (f"{B}m_i, l_i, acc = _softmax_update(m_i, l_i, acc, s, v, {'qk_scale' if folded else '1.0'}, "
                      f"{'s_add' if run_add else '0.0'}, DOT_PRECISION, {folded}, {run_add})\n")
        else:
            update = f"{B}acc = _sigmoid_update(acc, s, v, sigmoid_bias, Q, DOT_PRECISION)\n"
        return f'''{head}{tile}{B}qk = {_dot("q", "kT")}
{B}if HAS_D2:
{B}    qk = {_dot_acc("q2", "kT2", "qk")}
{score_block}{masked}{update}{B}visited += 1
'''

    mode = "plain" if runs else "tested"
    if _split_loop(spec, spec.fwd_range, cls):
        loops = kv_loop(mode, "full") + kv_loop(mode, "partial")
    elif _split_extras(spec.fwd_range, table, visit_if):
        loops = kv_loop(mode, bounds=("0", "bx_n"), tested=False) + kv_loop(mode, bounds=("bx_n", "n_tiles"))
    else:
        loops = kv_loop(mode)
    if runs:
        loops = _runs.search(spec, "kv", "BLOCK_N", I1) + kv_loop("run") + loops
    src = f'''
{kernel_def(name, spec.lowering.signature("fwd"))}    """Forward ({spec.normalizer}): one program per (query tile, batch*head), fp32 accumulation, exp2."""
    # under a causal mask the last query tiles see the most keys: start them first, across the
    # heads of a section, so the short ones fill the tail of the grid
    # ``prog``, not ``tile``: the loops' ``tile`` may be int64 (a bound read from an int64 tensor),
    # and a name assigned before a loop is loop-carried, its type fixed by the first assignment
    prog, pid_bh = _program_tile(SECTION)
    pid_m = tl.num_programs(0) - 1 - prog
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
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
    dv_ok = offs_dv < HEAD_DV
    q_ptrs = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    offs_n0 = tl.arange(0, BLOCK_N)
    kT_offs = offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    v_offs = offs_n0[:, None] * stride_vn + offs_dv[None, :] * stride_vd
{_second_q_rows(I1)}{KV_DESCRIPTORS}    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
        u = tl.load(U + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                    mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), other=0.0)
        w_base = W + b.to(tl.int64) * stride_wb + (h // W_GROUP).to(tl.int64) * stride_wh
        if W_TMA:  # W's [BLOCK_N, R] tiles like K and V (columns past RANK read as zeros)
            w_desc = tl.make_tensor_descriptor(w_base, shape=[LKV, RANK], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_R])
        if UPCAST:
            u = u.to(tl.float32)
{pre1}{_indent(plan, I1)}
{init}    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    visited = 0
{loops}{finish}    o_ptrs = Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m[:, None] < LQ) & dv_ok[None, :])
{store_lse}    if COUNT_VISITS:
        tl.store(VISITS + pid_bh.to(tl.int64) * tl.num_programs(0) + pid_m, visited)
        tl.store(VISITS + (tl.num_programs(1) + pid_bh).to(tl.int64) * tl.num_programs(0) + pid_m, {"n_run" if runs else "0"})
'''
    return src


def preprocess(spec: KernelSpec) -> str:
    return f'''
{kernel_def(f"{spec.name}_bwd_delta", spec.lowering.signature("bwd_delta"))}    """delta = rowsum(dO * O) over the value head dim, the softmax backward's correction term."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < LQ) & (offs_dv[None, :] < HEAD_DV)
    o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od, mask=ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + offs_m[:, None].to(tl.int64) * stride_dm + offs_dv[None, :] * stride_dd, mask=ok, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)
'''


def _dq_adds(spec: KernelSpec, em: ExprEmitter, B: str) -> str:
    """The dK/dV kernel's dQ stage (``DQ_ATOMIC``, compiled out otherwise): the dQ kernel's work for
    this (key tile, query tile) pair, ``dQ += dS·K`` (and ``dU += dS·W`` of a low-rank bias, the
    learnable tensors' gradients: ``grads.dkdv_grad_adds``), added with float32 atomic adds into
    the query head's rows, so the backward runs five matrix products per pair instead of seven
    (FlashAttention-2's shape). dQ is added unscaled; the runtime scales and casts it once. The adds
    are relaxed (no ordering: the sums are read only after the kernel), as the Hopper backward's.
    ``DQ_TMA``: the dQ tile goes in one TMA reduce-add (``cp.reduce.async.bulk.tensor``, through the
    tensor descriptor ``dq_desc``; FlashAttention-3's way) instead of one atomic per element."""
    I = B + I1
    return f'''{B}if DQ_ATOMIC:
{I}dsq = tl.trans(dsT.to(k.dtype))  # dK's operand too (q and k share a dtype): one conversion
{I}dq_rows = dqa_base + offs_m[:, None].to(tl.int64) * HEAD_D
{I}if DQ_TMA:  # the tile in one bulk reduce-add (rows past LQ and columns past HEAD_D fall outside)
{I}    dq_desc.atomic_add([h, q_lo, 0], tl.reshape({_dot("dsq", "k")}, [1, BLOCK_M, BLOCK_D]))
{I}else:
{I}    tl.atomic_add(dq_rows + offs_d[None, :], {_dot("dsq", "k")}, mask=(offs_m[:, None] < LQ) & d_ok[None, :],
{I}                  sem="relaxed")
{I}if HAS_D2:
{I}    tl.atomic_add(dq_rows + offs_d2[None, :], {_dot("dsq", "k2")},
{I}                  mask=(offs_m[:, None] < LQ) & d2_ok[None, :], sem="relaxed")
{I}if HAS_BIAS:
{I}    tl.atomic_add(DU + (bh.to(tl.int64) * LQ + offs_m[:, None]) * RANK + offs_r[None, :],
{I}                  {_dot("tl.trans(dsT.to(w.dtype))", "w")},
{I}                  mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), sem="relaxed")
{dkdv_grad_adds(spec, em, I)}'''


def dkdv(spec: KernelSpec, table: bool) -> str:
    """dK/dV (and dW of a low-rank bias): one program per (key tile, batch*kv head); with
    ``DQ_ATOMIC`` also dQ (``_dq_adds``)."""
    env = {"b": ("b", 0), "kv": ("kv_idx", 0), "kv_lo": ("kv_lo", 0), "kv_hi": ("kv_hi", 0),
           "kv_max": ("kv_max", 0), "q_max": ("q_max", 0), "h": ("h", 1),
           "q": ("q_idx", 2), "q_lo": ("q_lo", 2), "q_hi": ("q_hi", 2), "score": ("score", 2), DIST: (DIST, 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "col": 0})
    plan = (_table_plan_lines("", "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h", "pid_n") if table
            else _plan_lines(em, spec.bwd_range, 1, "BLOCK_M", "q_max", False))
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I2)
    runs = spec.lowering.bwd_runs
    check, visit_if, Bg = "", "", I3
    cls = _tile_class(spec, spec.bwd_range, em, table)
    if cls is not None:
        full, nonempty = cls
        check = em.take(2, I3) + f"{I3}is_partial = is_partial & (({full} == 0) | (q_lo + BLOCK_M > LQ))\n"
        visit_if = f"{I3}if {nonempty}:\n"
        Bg = I4

    def q_loop(mode: str, part: str = "both", bounds: tuple | None = None, tested: bool = True) -> str:
        """The loop over query tiles: a constant-run loop ("run": full tiles, no mask) or the general
        one, whole or split into its full and its partial tiles (``part``); ``bounds`` and
        ``tested`` as in the forward's ``kv_loop``."""
        run = mode == "run"
        B = I3 if run or not tested else Bg
        head = _loop_head(spec, run, runs, table, spec.bwd_range, "q", I2, part, bounds)
        score = _score_lines(spec, em, B, 2, "qkT", _dot("w", "tl.trans(u)"), backward=True, inner="q", mode=mode)
        mask = "" if run or part == "full" else _bwd_mask(spec, em, B, 2, part)
        ds = _bwd_dscore(spec, B, "pT", "dpT", "dsT", "col", raw=bool(spec.grad_loads))
        dq_adds = _dq_adds(spec, em, B)
        if _softmax(spec):
            stats = f'''{B}lse = _lse_log2(tl.load(Lse + bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0))
{B}delta = tl.load(Delta + bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
'''
        else:
            stats = ""
        em.forget(2)
        return f'''{head}            q_lo = tile * BLOCK_M
            q_hi = q_lo + BLOCK_M - 1
            offs_m = q_lo + offs_m0
            q_idx = offs_m[None, :]
{"" if run else check + (visit_if if tested else "")}{B}if EVEN_Q:
{B}    q = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q_offs)
{B}    do = tl.load(do_base + q_lo.to(tl.int64) * stride_dom + do_offs)
{B}else:
{B}    q = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q_offs, mask=(offs_m[:, None] < LQ) & d_ok[None, :], other=0.0)
{B}    do = tl.load(do_base + q_lo.to(tl.int64) * stride_dom + do_offs, mask=(offs_m[:, None] < LQ) & dv_ok[None, :], other=0.0)
{B}if HAS_D2:
{B}    if EVEN_Q:
{B}        q2 = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q2_offs)
{B}    else:
{B}        q2 = tl.load(q_base + q_lo.to(tl.int64) * stride_qm + q2_offs, mask=(offs_m[:, None] < LQ) & d2_ok[None, :], other=0.0)
{B}if UPCAST:
{B}    q = q.to(tl.float32)
{B}    do = do.to(tl.float32)
{B}    if HAS_D2:
{B}        q2 = q2.to(tl.float32)
{B}if HAS_BIAS:
{B}    u = tl.load(U + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
{B}                mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), other=0.0)
{B}    if UPCAST:
{B}        u = u.to(tl.float32)
{stats}{B}qkT = {_dot("k", "tl.trans(q)")}
{B}if HAS_D2:
{B}    qkT = {_dot_acc("k2", "tl.trans(q2)", "qkT")}
{score}{mask}{_probs(spec, B, "pT", "lse[None, :]")}{B}dv += {_dot("pT.to(do.dtype)", "do")}
{B}dpT = {_dot("v", "tl.trans(do)")}
{ds}{B}dk += {_dot("dsT.to(q.dtype)", "q")}
{B}if HAS_D2:
{B}    dk2 += {_dot("dsT.to(q2.dtype)", "q2")}
{B}if HAS_BIAS:
{B}    dw += {_dot("dsT.to(u.dtype)", "u")}
{dq_adds}'''

    mode = "plain" if runs else "tested"
    if _split_backward(spec, spec.bwd_range, cls, runs):
        loops = q_loop(mode, "full") + q_loop(mode, "partial")
    elif _split_extras(spec.bwd_range, table, visit_if):
        loops = q_loop(mode, bounds=("0", "bx_n"), tested=False) + q_loop(mode, bounds=("bx_n", "n_tiles"))
    else:
        loops = q_loop(mode)
    if runs:
        loops = _runs.search(spec, "q", "BLOCK_M", I2) + q_loop("run") + loops
    src = f'''
{kernel_def(f"{spec.name}_bwd_dkdv", spec.lowering.signature("bwd_dkdv"))}    pid_n, pid_bh = _program_tile(SECTION)  # the first key tiles see the most queries
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
    dv_ok = offs_dv < HEAD_DV
    kv_idx = offs_n[:, None]
    kv_lo = pid_n * BLOCK_N
    kv_hi = tl.minimum(kv_lo + BLOCK_N, LKV) - 1
    kv_max = LKV - 1
    q_max = LQ - 1
{pre0}
    kv_ok = (offs_n[:, None] < LKV) & d_ok[None, :]
    v_ok = (offs_n[:, None] < LKV) & dv_ok[None, :]
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :] * stride_vd, mask=v_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    offs_m0 = tl.arange(0, BLOCK_M)
    q_offs = offs_m0[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_offs = offs_m0[:, None] * stride_dom + offs_dv[None, :] * stride_dod
{SECOND_PART.format(I=I1)}        k2 = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None].to(tl.int64) * stride_kn + offs_d2[None, :] * stride_kd,
                     mask=(offs_n[:, None] < LKV) & d2_ok[None, :], other=0.0)
        if UPCAST:
            k2 = k2.to(tl.float32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], ACC_DTYPE)
        q2_offs = offs_m0[:, None] * stride_qm + offs_d2[None, :] * stride_qd
    if DQ_TMA:  # this batch's float32 dQ as [HQ, LQ, HEAD_D] (DQ_ATOMIC's buffer, contiguous)
        dq_desc = tl.make_tensor_descriptor(DQA + b.to(tl.int64) * HQ * LQ * HEAD_D, shape=[HQ, LQ, HEAD_D],
                                            strides=[LQ * HEAD_D, HEAD_D, 1], block_shape=[1, BLOCK_M, BLOCK_D])
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * HQ + h
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh
        if DQ_ATOMIC:  # this query head's rows of the float32 dQ (contiguous [B, HQ, LQ, HEAD_D])
            dqa_base = DQA + bh.to(tl.int64) * LQ * HEAD_D
        if HAS_BIAS:
            w = tl.load(W + b.to(tl.int64) * stride_wb + (h // W_GROUP).to(tl.int64) * stride_wh + offs_n[:, None].to(tl.int64) * stride_wn + offs_r[None, :] * stride_wr,
                        mask=(offs_n[:, None] < LKV) & (offs_r[None, :] < RANK), other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dw = tl.zeros([BLOCK_N, BLOCK_R], ACC_DTYPE)
{pre1}{_indent(plan, I2)}{loops}        if HAS_BIAS:
            dw_ptrs = DW + (bh.to(tl.int64) * LKV + offs_n[:, None]) * RANK + offs_r[None, :]
            tl.store(dw_ptrs, dw, mask=(offs_n[:, None] < LKV) & (offs_r[None, :] < RANK))
    dk = dk * sm_scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=kv_ok)
    if HAS_D2:
        dk2 = dk2 * sm_scale
        tl.store(DK + b.to(tl.int64) * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d2[None, :] * stride_dkd,
                 dk2.to(DK.dtype.element_ty), mask=(offs_n[:, None] < LKV) & d2_ok[None, :])
    tl.store(DV + b.to(tl.int64) * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=v_ok)
'''
    return src


def dq(spec: KernelSpec, table: bool) -> str:
    """dQ (and dU of a low-rank bias, and gradients of learnable captured tensors); with
    ``DELTA_HERE`` also the softmax's delta = rowsum(dO * O) of its rows, stored for the dK/dV kernel
    (then launched after it), in place of the delta kernel's launch."""
    dq_rng = spec.dq_range or spec.fwd_range  # box plans may give dQ tiles of its own
    env = {"b": ("b", 0), "h": ("h", 0), "q": ("q_idx", 1), "q_lo": ("q_lo", 1), "q_hi": ("q_hi", 1),
           "kv_max": ("kv_max", 1), "q_max": ("q_max", 1), "kv": ("kv_idx", 2), "kv_lo": ("kv_lo", 2),
           "kv_hi": ("kv_hi", 2), "score": ("score", 2), DIST: (DIST, 2)}
    em = ExprEmitter(env, 3, prefix="v")
    _hoist_loads(spec, em, {"program": 0, "row": 1})
    plan = (_table_plan_lines("", "b.to(tl.int64) * tbl_stride_b + h.to(tl.int64) * tbl_stride_h", "pid_m") if table
            else _plan_lines(em, dq_rng, 1, "BLOCK_N", "kv_max", False))
    runs = spec.lowering.dq_runs
    check, visit_if, Bg = "", "", I2
    cls = _tile_class(spec, dq_rng, em, table)
    if cls is not None:
        full, nonempty = cls
        # a tile straddling the end of the keys is never full: its padding keys must be masked
        check = em.take(2, I2) + f"{I2}is_partial = is_partial & (({full} == 0) | (kv_lo + BLOCK_N > LKV))\n"
        visit_if = f"{I2}if {nonempty}:\n"
        Bg = I3
    grads = {}

    def kv_loop(mode: str, part: str = "both", bounds: tuple | None = None, tested: bool = True) -> str:
        """The loop over key tiles: a constant-run loop ("run": full tiles, no mask) or the general
        one, whole or split into its full and its partial tiles (``part``); ``bounds`` and
        ``tested`` as in the forward's."""
        run = mode == "run"
        B = I2 if run or not tested else Bg
        head = _loop_head(spec, run, runs, table, dq_rng, "kv", I1, part, bounds)
        score = _score_lines(spec, em, B, 2, "qk", _dot("u", "wT"), backward=True, mode=mode)
        mask = "" if run or part == "full" else _bwd_mask(spec, em, B, 2, part)
        ds = _bwd_dscore(spec, B, "p", "dp", "ds", "row", raw=bool(spec.grad_loads))
        grads[mode] = _grad_load_code(spec, em, B, mode)
        em.forget(2)
        tile = _kv_tile(B, "" if run else check + (visit_if if tested else ""), "vT", "vT_offs",
                        "(offs_n[None, :] < LKV) & dv_ok[:, None]")
        return f'''{head}{tile}{B}qk = {_dot("q", "kT")}
{B}if HAS_D2:
{B}    qk = {_dot_acc("q2", "kT2", "qk")}
{score}{mask}{_probs(spec, B, "p", "lse[:, None]")}{B}dp = {_dot("do", "vT")}
{ds}{grads[mode][1]}{B}dq += {_dot("ds.to(kT.dtype)", "tl.trans(kT)")}
{B}if HAS_D2:
{B}    dq2 += {_dot("ds.to(kT2.dtype)", "tl.trans(kT2)")}
{B}if HAS_BIAS:
{B}    du += {_dot("ds.to(wT.dtype)", "tl.trans(wT)")}
'''

    mode = "plain" if runs else "tested"
    if _split_backward(spec, dq_rng, cls, runs):
        loops = kv_loop(mode, "full") + kv_loop(mode, "partial")
    elif _split_extras(dq_rng, table, visit_if):
        loops = kv_loop(mode, bounds=("0", "bx_n"), tested=False) + kv_loop(mode, bounds=("bx_n", "n_tiles"))
    else:
        loops = kv_loop(mode)
    g_init, _, g_final = grads[mode]
    if runs:
        run_loop = kv_loop("run")
        r_init, _, r_final = grads["run"]
        loops = _runs.search(spec, "kv", "BLOCK_N", I1) + r_init + run_loop + r_final + loops
    pre0 = em.take(0, I1)
    pre1 = em.take(1, I1)
    if _softmax(spec):
        stats = '''    lse = _lse_log2(tl.load(Lse + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0))
    if DELTA_HERE:  # rowsum(dO * O) of this program's rows (the delta kernel's), kept for the dK/dV kernel
        o = tl.load(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :] * stride_od, mask=(offs_m[:, None] < LQ) & dv_ok[None, :], other=0.0)
        delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
        tl.store(Delta + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)
    else:
        delta = tl.load(Delta + pid_bh.to(tl.int64) * LQ + offs_m, mask=offs_m < LQ, other=0.0)
'''
    else:
        stats = ""
    src = f'''
{kernel_def(f"{spec.name}_bwd_dq", spec.lowering.signature("bwd_dq"))}    prog, pid_bh = _program_tile(SECTION)  # not ``tile``: see the forward
    pid_m = tl.num_programs(0) - 1 - prog  # longest query tiles first, as in the forward
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
{pre0}
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (may differ from the query/key one)
    dv_ok = offs_dv < HEAD_DV
    q_idx = offs_m[:, None]
    q_lo = pid_m * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, LQ) - 1
    q_max = LQ - 1
    kv_max = LKV - 1
    q_ok = (offs_m[:, None] < LQ) & d_ok[None, :]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :] * stride_dod, mask=(offs_m[:, None] < LQ) & dv_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
{stats}    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hk.to(tl.int64) * stride_vh
    offs_n0 = tl.arange(0, BLOCK_N)
    kT_offs = offs_n0[None, :] * stride_kn + offs_d[:, None] * stride_kd
    vT_offs = offs_n0[None, :] * stride_vn + offs_dv[:, None] * stride_vd
{_second_q_rows(I1)}    if HAS_BIAS:
        offs_r = tl.arange(0, BLOCK_R)
        u = tl.load(U + b.to(tl.int64) * stride_ub + h.to(tl.int64) * stride_uh + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :] * stride_ur,
                    mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK), other=0.0)
        w_base = W + b.to(tl.int64) * stride_wb + (h // W_GROUP).to(tl.int64) * stride_wh
        if UPCAST:
            u = u.to(tl.float32)
        du = tl.zeros([BLOCK_M, BLOCK_R], ACC_DTYPE)
{pre1}{_indent(plan, I1)}
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC_DTYPE)
    if HAS_D2:
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], ACC_DTYPE)
{g_init}{loops}    dq = dq * sm_scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=q_ok)
    if HAS_D2:
        dq2 = dq2 * sm_scale
        tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d2[None, :] * stride_dqd,
                 dq2.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < LQ) & d2_ok[None, :])
    if HAS_BIAS:
        du_ptrs = DU + (pid_bh.to(tl.int64) * LQ + offs_m[:, None]) * RANK + offs_r[None, :]
        tl.store(du_ptrs, du, mask=(offs_m[:, None] < LQ) & (offs_r[None, :] < RANK))
{g_final}'''
    return src
