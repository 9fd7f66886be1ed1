"""Emitters of the attention steps the dense kernels share: tile loads (K, V, the second head-dim
part, the low-rank factors), scores in the normaliser's units (score_mod, additive biases, folded
scales, tile-uniform loads), the partial tile's mask, probabilities and ∂L/∂score. The arithmetic
itself lives once as ``@triton.jit`` helpers in ``codegen/prelude.py``; these write the calls."""
from __future__ import annotations

from attndsl import ir
from attndsl.spec import KernelSpec

from . import runs as _runs
from .expr import ExprEmitter
from .plan import _indent

I1, I2, I3, I4 = (" " * n for n in (4, 8, 12, 16))


def _dot(a: str, b: str) -> str:
    return f"tl.dot({a}, {b}, input_precision=DOT_PRECISION)"


def _kv_tile(B: str, tests: str, v: str, v_offs: str, v_mask: str, tma: bool = False) -> str:
    """A key tile of the forward or dQ loop: its indices, Kᵀ (and its second part ``kT2``, see
    ``SECOND_PART``), V (as ``v``: ``v`` or ``vT``) and the low-rank factor's Wᵀ. ``tests`` (the tile's classification, ``if nonempty:``) sits between the
    indices and the loads. ``tma``: K, V and Wᵀ may come through the tensor descriptors of
    ``KV_DESCRIPTORS`` and the forward's ``w_desc`` (the forward)."""
    first = f"{B}if EVEN_KV:\n"
    w_ptrs = ("wT = tl.load(w_base + offs_n[None, :].to(tl.int64) * stride_wn + offs_r[:, None] * stride_wr,",
              "             mask=(offs_n[None, :] < LKV) & (offs_r[:, None] < RANK), other=0.0)")
    w_load = _indent(w_ptrs, B + I1)
    if tma:
        w_load = (f"{B}    if W_TMA:\n{B}        wT = w_desc.load([kv_lo.to(tl.int32), 0]).T\n"
                  f"{B}    else:\n{_indent(w_ptrs, B + I2)}")
        # descriptor offsets are 32-bit (a captured int64 scalar can make the tile index int64)
        first = (f"{B}if KV_TMA:\n{B}    kT = k_desc.load([kv_lo.to(tl.int32), 0]).T\n"
                 f"{B}    if HAS_D2:\n{B}        kT2 = k2_desc.load([kv_lo.to(tl.int32), BLOCK_D]).T\n"
                 f"{B}    {v} = v_desc.load([kv_lo.to(tl.int32), 0])\n{B}elif EVEN_KV:\n")
    return f'''{I2}kv_lo = tile * BLOCK_N
{I2}kv_hi = kv_lo + BLOCK_N - 1
{I2}offs_n = kv_lo + offs_n0
{I2}kv_idx = offs_n[None, :]
{tests}{first}{B}    kT = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT_offs)
{B}    if HAS_D2:
{B}        kT2 = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT2_offs)
{B}    {v} = tl.load(v_base + kv_lo.to(tl.int64) * stride_vn + {v_offs})
{B}else:
{B}    kT = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT_offs, mask=(offs_n[None, :] < LKV) & d_ok[:, None], other=0.0)
{B}    if HAS_D2:
{B}        kT2 = tl.load(k_base + kv_lo.to(tl.int64) * stride_kn + kT2_offs, mask=(offs_n[None, :] < LKV) & d2_ok[:, None], other=0.0)
{B}    {v} = tl.load(v_base + kv_lo.to(tl.int64) * stride_vn + {v_offs}, mask={v_mask}, other=0.0)
{B}if UPCAST:
{B}    kT = kT.to(tl.float32)
{B}    {v} = {v}.to(tl.float32)
{B}    if HAS_D2:
{B}        kT2 = kT2.to(tl.float32)
{B}if HAS_BIAS:
{w_load}{B}    if UPCAST:
{B}        wT = wT.to(tl.float32)
'''


KV_DESCRIPTORS = f"""{I1}if KV_TMA:
{I1}    # K and V tiles through the tensor memory accelerator (Hopper and later): no per-element
{I1}    # address arithmetic or masks; rows past LKV and columns past HEAD_D (HEAD_DV) read as zeros. The
{I1}    # backward kernels keep pointer loads (no gain measured there: BENCHMARKS.md)
{I1}    k_desc = tl.make_tensor_descriptor(k_base, shape=[LKV, HEAD_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D])
{I1}    v_desc = tl.make_tensor_descriptor(v_base, shape=[LKV, HEAD_DV], strides=[stride_vn, 1], block_shape=[BLOCK_N, BLOCK_DV])
{I1}    if HAS_D2:
{I1}        k2_desc = tl.make_tensor_descriptor(k_base, shape=[LKV, HEAD_D], strides=[stride_kn, 1], block_shape=[BLOCK_N, BLOCK_D2])
"""


#: the query/key head dim's second part (columns BLOCK_D..HEAD_D, ``runtime.config.split_head_dim``):
#: a head dim like 192 runs as 128 + 64, every product over it as two, where one 256-wide tile would
#: multiply a quarter zeros. Its index vector and mask; the kernels add their tiles of it.
SECOND_PART = """{I}if HAS_D2:  # the query/key head dim's second part, columns BLOCK_D..HEAD_D (192 = 128 + 64)
{I}    offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
{I}    d2_ok = offs_d2 < HEAD_D
"""


def _dot_acc(a: str, b: str, acc: str) -> str:
    """``acc + a·b`` as one matrix multiply-accumulate."""
    return f"tl.dot({a}, {b}, {acc}, input_precision=DOT_PRECISION)"


def _second_q_rows(I: str) -> str:
    """The forward's and dQ's query tile, second part (``q2``), and the offsets of Kᵀ's (``kT2``)."""
    return (SECOND_PART.format(I=I) + f"""{I}    q2 = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm + offs_d2[None, :] * stride_qd,
{I}                 mask=(offs_m[:, None] < LQ) & d2_ok[None, :], other=0.0)
{I}    if UPCAST:
{I}        q2 = q2.to(tl.float32)
{I}    kT2_offs = offs_n0[None, :] * stride_kn + offs_d2[:, None] * stride_kd
""")


# -------------------------------------------------------------------------------------------
def _softmax(spec: KernelSpec) -> bool:
    return spec.normalizer == "softmax"


def _uniform_loads(spec: KernelSpec, em: ExprEmitter, ind: str, stage: int, inner: str, mode: str, qk: str) -> str:
    """Per tile-uniform load, by loop ``mode``: "tested" binds ``uni{j}`` (one entry for the whole
    tile) and the value, a splat of one scalar load when uniform, else the per-element index
    arithmetic and gather; "run" binds its constant run's scalar (``codegen/runs.py``); "plain"
    (the loop beside a run loop) leaves it a per-element load."""
    code = em.take(stage, ind)
    if mode == "run":
        _runs.bind(spec, em, inner, stage)
    if mode != "tested":
        return code
    for ld, j in _runs.loads(spec, inner).items():
        ul = spec.uniform_loads[j]
        los = [em.emit(x, stage) for x in ul.lo]
        his = [em.emit(x, stage) for x in ul.hi]
        cond = " & ".join(f"({lo} == {hi})" for lo, hi, v in zip(los, his, ul.varying) if v)
        code += em.take(stage, ind) + f"{ind}uni{j} = {cond}\n"
        name, body = em.branch(stage, ind + I1, lambda: em.emit(ld, stage))
        em.names[ld] = (name, stage)
        em.uniform_index[ld] = los
        code += (f"{ind}if uni{j}:\n{ind}{I1}{name} = tl.zeros_like({qk}) + {em.clamped_load(ld, los)}\n"
                 f"{ind}else:\n{body}")
    return code


def score_unit(normalizer: str) -> str:
    """What the kernels multiply scores by. Softmax: log2 e, for exp2. Sigmoid: 1/2, so that scale,
    unit and bias fold into one multiply-add per score, p = σ(2s) = 0.5 + 0.5·tanh(s) (``_sigmoid_probs``;
    1.5–2.4% faster forward on an H100 than a log2 unit and a multiply inside the sigmoid)."""
    return "LOG2E" if normalizer == "softmax" else "0.5"




def plain_score_lines(spec: KernelSpec, ind: str, qk: str, bias: str) -> str:
    """``s``, the scores in the normaliser's units (``score_unit``) with no score_mod: the scaled
    ``qk`` (plus a low-rank bias ``u·wᵀ`` where ``HAS_BIAS``)."""
    unit = score_unit(spec.normalizer)
    return (f"{ind}if HAS_BIAS:\n{ind}    s = ({qk} * sm_scale + {bias}) * {unit}\n"
            f"{ind}else:\n{ind}    s = {qk} * (sm_scale * {unit})\n")


def scores_of(spec: KernelSpec, code: str, qk: str) -> str:
    """``code`` (score_mod's value) times the normaliser's unit, as a whole [rows, keys] tile. A
    score_mod that ignores the score and one of the indices (a constant, or a function of ``q`` or
    ``kv`` alone) has a smaller shape: it is broadcast over ``qk``'s tile, or the softmax's row
    reductions and the product with V would see a scalar or a row."""
    fv = ir.free_vars(spec.score)
    full = ir.SCORE in fv or {"q", "kv"} <= fv
    unit = score_unit(spec.normalizer)
    return f"{code} * {unit}" if full else f"{code} * {unit} + tl.zeros_like({qk})"


def _score_lines(spec, em, ind, stage, qk, bias, backward=False, inner="kv", mode="tested") -> str:
    """score = qk * scale (+ u·wᵀ); s = score_mod(score) in the normaliser's units (``score_unit``).

    For the backward also ∂score_mod/∂score (``dmod``) and ∂score_mod/∂(learnable loads)
    (``gmod{i}``), emitted here, before the masked branch, so every name is in scope. ``inner``
    names the index of the kernel's inner loop (the one its tile-uniform loads vary along);
    ``mode`` says how this loop treats them (:func:`_uniform_loads`)."""
    unit = score_unit(spec.normalizer)
    if spec.score is None:
        return plain_score_lines(spec, ind, qk, bias)
    rest = spec.lowering.additive
    head = ""
    if rest is None:
        head = f"{ind}score = {qk} * sm_scale\n"
        if bias:
            head += f"{ind}if HAS_BIAS:\n{ind}    score += {bias}\n"
    head += _uniform_loads(spec, em, ind, stage, inner, mode, qk)
    if rest is not None:
        tail = f"{ind}s = {qk} * (sm_scale * {unit}) + {em.emit(rest, stage)} * {unit}\n"
        if bias:
            tail += f"{ind}if HAS_BIAS:\n{ind}    s += {bias} * {unit}\n"
    else:
        tail = f"{ind}s = {scores_of(spec, em.emit(spec.score, stage), qk)}\n"
    if backward:
        tail += f"{ind}dmod = {em.emit(spec.dscore, stage)}\n"
        own = _runs.loads(spec, inner) if mode != "plain" else {}
        for i, gl in enumerate(spec.grad_loads):
            tail += f"{ind}gmod{i} = {em.emit(gl.grad, stage)}\n"
            if gl.scope in ("exact", "scatter") and gl.load not in own:
                for a in gl.load.args:
                    em.emit(a, stage)
    return head + em.take(stage, ind) + tail


def _folds_scale(spec: KernelSpec) -> bool:
    """Does the softmax forward scale scores inside its exponent? With no score_mod the running
    max can be taken over the unscaled scores times the scale, and ``p = exp2(qk·c − m)`` is one
    multiply-add per score where ``s = qk·c`` then ``s − m`` were two: on an H100 (bf16, D=128,
    L=16384) the dense forward 4% faster and the causal 3.5% (BENCHMARKS.md). Only for a positive
    scale (``FOLD_SCALE``: the max of qk·c is c·max(qk) only then)."""
    return _softmax(spec) and spec.score is None


#: the folded forward's constants (``_folds_scale``); a scale that is not positive scales scores first
FOLDED_SCALE = '''    if FOLD_SCALE:
        qk_scale = sm_scale * LOG2E
        inv_scale = 1.0 / sm_scale
    else:
        qk_scale = 1.0
        inv_scale = 1.0
'''


def _run_score_lines(spec: KernelSpec, em: ExprEmitter, ind: str, bias: str) -> str:
    """The run loop's folded scores and ``s_add``, the run's scalar bias (``Lowering.run_folds``, ``passes/lower.py``)."""
    head = _uniform_loads(spec, em, ind, 2, "kv", "run", "qk")
    rest = em.emit(spec.lowering.additive, 2)
    return head + em.take(2, ind) + _folded_score_lines(ind, bias, rest)


def _folded_score_lines(ind: str, bias: str, add: str | None = None) -> str:
    """s: the scores in units of 1/scale (see ``_folds_scale``), a low-rank bias divided by the
    scale. ``add``: a scalar bias per tile, kept apart as ``s_add`` in log2 units (``Lowering.run_folds``);
    a scale that is not positive adds it to the scaled scores and leaves ``s_add`` 0."""
    head = f"{ind}s_add = {add} * LOG2E\n" if add else ""
    plus = " + s_add" if add else ""
    return (head
            + f"{ind}if FOLD_SCALE:\n{ind}    s = qk\n{ind}    if HAS_BIAS:\n{ind}        s += {bias} * inv_scale\n"
            + f"{ind}else:\n{ind}    s = qk * (sm_scale * LOG2E){plus}\n"
            + f"{ind}    if HAS_BIAS:\n{ind}        s += {bias} * LOG2E\n"
            + (f"{ind}    s_add = 0.0\n" if add else ""))


def _bwd_mask(spec: KernelSpec, em: ExprEmitter, ind: str, stage: int, part: str = "both") -> str:
    """The mask on a partial tile's scores: under ``if is_partial:`` in a loop over every tile
    (``part`` "both"), unconditional in a loop over the partial tiles only ("partial")."""
    keep, code = "(q_idx < LQ) & (kv_idx < LKV)", ""
    body_ind = ind + I1 if part == "both" else ind
    if spec.mask is not None:
        # emitted inside `if is_partial:`; its names are not in scope after the branch
        m, body = em.branch(stage, body_ind, lambda: em.emit(spec.mask, stage))
        keep = f"({m}) & {keep}"
        code += body
    head = f"{ind}if is_partial:\n" if part == "both" else ""
    return head + code + f"{body_ind}s = tl.where({keep}, s, float(\"-inf\"))\n"


def _bwd_dscore(spec: KernelSpec, ind: str, p: str, dp: str, ds: str, row: str, raw: bool = False) -> str:
    """ds = ∂L/∂score (natural units, before ∂score_mod) from probabilities and dP, then times
    ∂score_mod/∂score; with ``raw`` the first kept as ``ds_raw`` (the chain rule of learnable loads)."""
    first = f"{ds}_raw" if raw and spec.score is not None else ds
    if _softmax(spec):
        delta = "delta[None, :]" if row == "col" else "delta[:, None]"
        lines = f"{ind}{first} = _softmax_dscore({p}, {dp}, {delta})\n"
    else:
        lines = f"{ind}{first} = _sigmoid_dscore({p}, {dp})\n"
    if spec.score is not None:
        lines += f"{ind}{ds} = {first} * dmod\n"
    return lines


def _probs(spec: KernelSpec, ind: str, p: str, lse: str) -> str:
    if _softmax(spec):
        return f"{ind}{p} = _softmax_probs(s, {lse})\n"
    return f"{ind}{p} = _sigmoid_probs(s, sigmoid_bias, Q)\n"
