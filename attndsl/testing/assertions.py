"""Comparing attndsl (or any attention function) against the float64 oracle."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .strategies import Shape

__all__ = ["assert_matches_reference", "random_qkv", "default_tolerance", "TOLERANCES", "LSE_TOLERANCE", "Mismatch"]

#: Default relative tolerance per input dtype: an element passes when
#: ``|ours - ref| <= atol + rtol * max|ref|`` (max over the whole compared tensor), with
#: ``atol = rtol / 100``. Measured on the CPU interpreter (about 600 random examples: patterns,
#: random expression trees, L up to 128, D 16..64, tiles 16/32), the worst error relative to
#: max|ref| over out/dq/dk/dv was 1.6e-6 (fp32), 1.6e-3 (fp16) and 1.4e-2 (bf16); typical
#: values are 3e-7, 5e-4 and 6e-3. fp16/bf16 errors come from rounding P and dS to the input
#: dtype for the second matmuls and from storing the results; bf16 sits at 8x fp16 (its epsilon
#: ratio). The defaults leave a margin of about 2.5x (fp32: more, for GPU accumulation orders
#: and longer sequences).
TOLERANCES = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}

#: Default relative tolerance of the logsumexp, whatever the input dtype: it is accumulated in
#: fp32 from exact products of the inputs (measured worst 7.5e-7 for all three dtypes).
LSE_TOLERANCE = 2e-5


class Mismatch(AssertionError):
    """Raised by :func:`assert_matches_reference`; the message names the worst element."""


def default_tolerance(dtype: torch.dtype) -> float:
    """The default ``rtol`` for inputs of ``dtype`` (see :data:`TOLERANCES`)."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no default tolerance for {dtype}; pass rtol/atol") from None


def random_qkv(shape: Shape | tuple, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               requires_grad: bool = True, seed: Optional[int] = None,
               std: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lkv, D]``, ``v [B, Hkv, Lkv, Dv]`` with standard-normal entries.

    ``shape`` is a :class:`~attndsl.testing.Shape` (or a tuple ``B, Hq, Hkv, Lq, Lkv, D[, Dv]``).
    Values are drawn in float32 (from a CPU generator seeded with ``seed`` when given, so a
    hypothesis example replays exactly) and then cast, so the three dtypes see the same data.
    The tensors are leaves with ``requires_grad`` as asked.
    """
    shape = Shape(*shape)
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    out = []
    for s in (shape.q_shape, shape.kv_shape, shape.v_shape):
        t = torch.randn(*s, generator=g) * std
        out.append(t.to(device=device, dtype=dtype).requires_grad_(requires_grad))
    return tuple(out)


def _name(f) -> str:
    if f is None:
        return "None"
    return getattr(f, "__name__", None) or repr(f)


def _compare(what: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, context: str,
             summands: Optional[float] = None):
    """``summands``: for a gradient that sums many rows' terms of either sign (the sinks'), the
    largest sum of their magnitudes; the bound scales with it when it exceeds max|ref| (each row's
    rounding adds up, while the terms may cancel in the reference)."""
    got64 = got.detach().to(torch.float64)
    want64 = want.detach().to(torch.float64)
    if got64.shape != want64.shape:
        raise Mismatch(f"{what}: shape {tuple(got64.shape)}, reference {tuple(want64.shape)}\n{context}")
    if torch.isnan(want64).any():
        idx = tuple(torch.isnan(want64).nonzero()[0].tolist())
        raise Mismatch(f"{what}: the float64 reference itself has NaN (first at {idx}); the pattern is not "
                       f"well defined on these inputs\n{context}")
    bad_nan = ~torch.isfinite(got64) & torch.isfinite(want64)
    if bad_nan.any():
        idx = tuple(bad_nan.nonzero()[0].tolist())
        raise Mismatch(f"{what}: {int(bad_nan.sum())} non-finite element(s) where the reference is finite; "
                       f"first at {idx}: got {got64[idx].item()}, reference {want64[idx].item()}\n{context}")
    fin = torch.isfinite(want64)
    if not fin.any():
        return 0.0
    scale = want64[fin].abs().max().item()
    what_scale = "max|ref|"
    if summands is not None and summands > scale:
        scale, what_scale = summands, "sum of |terms|"
    bound = atol + rtol * scale
    err = torch.where(fin, (got64 - want64).abs(), torch.zeros_like(got64))
    worst = err.max().item()
    if worst > bound:
        flat = int(err.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        n_bad = int((err > bound).sum())
        raise Mismatch(
            f"{what}: {n_bad} of {err.numel()} elements differ from the float64 reference by more than "
            f"{bound:.3g} (= {atol:.3g} + {rtol:.3g} * {what_scale} {scale:.3g}); worst at index {idx}: "
            f"got {got64[idx].item():.6g}, reference {want64[idx].item():.6g}, error {worst:.3g} "
            f"({worst / max(scale, 1e-300):.3g} of {what_scale})\n{context}")
    return worst / scale if scale > 0 else worst


def assert_matches_reference(fn_or_compiled, q: torch.Tensor, k: torch.Tensor,
                             v: Optional[torch.Tensor] = None, *, mask_mod=None, score_mod=None, scale=None,
                             normalizer: Optional[str] = None, sigmoid_bias=None, sinks=None, bias_factors=None,
                             grads: bool = True, lse_grad: bool = True, atol: Optional[float] = None,
                             rtol: Optional[float] = None, lse_rtol: Optional[float] = None,
                             seed: Optional[int] = None,
                             msg: str = "") -> dict[str, float]:
    """Check an attention implementation against :func:`attndsl.reference.attention` (float64).

    Called as ``assert_matches_reference(q, k, v, mask_mod=..., ...)`` it tests
    :func:`attndsl.attention`; ``assert_matches_reference(fn_or_compiled, q, k, v, ...)`` tests:

    * an :class:`attndsl.CompiledAttention` (from :func:`attndsl.compile`): called as
      ``fn(q, k, v, scale=scale, return_lse=True, ...)``; its own ``mask_mod``/``score_mod`` and
      normaliser are used for the reference unless others are passed;
    * ``None`` or :func:`attndsl.attention`, or any callable with its signature
      ``fn(q, k, v, mask_mod=..., score_mod=..., scale=..., return_lse=True)`` returning
      ``(out, lse)`` (or only ``out``: then the logsumexp is not checked).

    ``normalizer``, ``sigmoid_bias``, ``sinks`` and ``bias_factors`` are passed on (keywords
    left at None are not passed, so any attention function works). Sigmoid has no logsumexp.

    Compared: the output; the logsumexp (finite entries numerically, and the ``-inf`` entries —
    rows whose every key is masked — must be exactly ``-inf`` in both); with ``grads`` the
    gradients for a fresh random ``dout`` (and, with ``lse_grad``, a random ``dlse`` on the rows
    that are not fully masked) of ``q, k, v``, of ``sinks`` and the two ``bias_factors``, and of
    every captured tensor of the pattern that requires grad (``"dcaptured0"``, ... in capture
    order; a learnable ALiBi slope, a T5 table, a pair bias). ``q, k, v`` and the keyword
    tensors are not modified, nor are the ``.grad`` of captured tensors; their
    ``requires_grad`` does not matter.

    An element passes when ``|ours - ref| <= atol + rtol * max|ref|`` (per compared tensor);
    defaults from :data:`TOLERANCES` by ``q.dtype``, ``atol = rtol / 100``; the logsumexp uses
    ``lse_rtol`` (default :data:`LSE_TOLERANCE`, or ``rtol`` when only that is given). NaN or inf where the
    reference is finite never passes. On failure raises :class:`Mismatch` (an
    ``AssertionError``) naming the tensor, the worst element's index, both values, the pattern
    and the shapes. ``seed`` makes ``dout``/``dlse`` reproducible (default: torch's global RNG).

    Returns the worst relative error per compared tensor (``{"out": ..., "lse": ..., "dq": ...}``),
    for measuring tolerances.
    """
    import attndsl
    from attndsl.api import CompiledAttention
    from attndsl.dsl import trace

    if isinstance(fn_or_compiled, torch.Tensor):  # the (q, k, v) form: attndsl.attention
        if v is not None:
            raise TypeError("assert_matches_reference(q, k, v, ...) or (fn_or_compiled, q, k, v, ...): "
                            "got four tensors")
        fn_or_compiled, q, k, v = None, fn_or_compiled, q, k
    elif v is None:
        raise TypeError("assert_matches_reference needs q, k and v")
    fn = fn_or_compiled if fn_or_compiled is not None else attndsl.attention
    compiled = isinstance(fn, CompiledAttention)
    if compiled:
        ref_mask = mask_mod if (mask_mod is not None or score_mod is not None) else fn.mask_mod
        ref_score = score_mod if (mask_mod is not None or score_mod is not None) else fn.score_mod
        normalizer = fn.spec.normalizer if normalizer is None else normalizer
    else:
        ref_mask, ref_score = mask_mod, score_mod
    normalizer = normalizer or "softmax"
    softmax = normalizer == "softmax"
    dtype = q.dtype
    rtol_given = rtol
    rtol = default_tolerance(dtype) if rtol is None else float(rtol)
    atol = rtol / 100 if atol is None else float(atol)
    if lse_rtol is None:
        lse_rtol = LSE_TOLERANCE if rtol_given is None else rtol

    context = (f"pattern: mask_mod={_name(ref_mask)}, score_mod={_name(ref_score)}, normalizer={normalizer}\n"
               f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, dtype {dtype}, "
               f"device {q.device}, scale {scale}")
    if sinks is not None:
        context += ", with sinks"
    if bias_factors is not None:
        context += f", low-rank bias R={bias_factors[0].shape[-1]}"
    if compiled:
        tiles = getattr(fn, "_tiles", None)
        context += f", compiled with block_m/block_n={tiles}"
    if msg:
        context += f"\n{msg}"

    def leaf(t, dt=None):
        return None if t is None else t.detach().to(dt or t.dtype).clone().requires_grad_(grads)

    # the tensors that get gradients: ours in their own dtype, the reference's in float64
    ours_in = [leaf(t) for t in (q, k, v, sinks, *(bias_factors or (None, None)))]
    ref_in = [leaf(t, torch.float64) for t in (q, k, v, sinks, *(bias_factors or (None, None)))]
    extra = {"sigmoid_bias": sigmoid_bias, "sinks": ours_in[3],
             "bias_factors": None if bias_factors is None else (ours_in[4], ours_in[5])}
    extra = {name: x for name, x in extra.items() if x is not None}
    if compiled:
        res = fn(ours_in[0], ours_in[1], ours_in[2], scale=scale, return_lse=softmax, **extra)
    else:
        if normalizer != "softmax":
            extra["normalizer"] = normalizer
        res = fn(ours_in[0], ours_in[1], ours_in[2], mask_mod=mask_mod, score_mod=score_mod, scale=scale,
                 return_lse=softmax, **extra)
    out, lse = (res if isinstance(res, (tuple, list)) else (res, None))

    ref_out, ref_lse = attndsl.reference.attention(
        ref_in[0], ref_in[1], ref_in[2], mask_mod=ref_mask, score_mod=ref_score, scale=scale,
        normalizer=normalizer, sigmoid_bias=sigmoid_bias, sinks=ref_in[3],
        bias_factors=None if bias_factors is None else (ref_in[4], ref_in[5]))

    errors = {"out": _compare("output", out, ref_out, rtol, atol, context)}
    dead = torch.isneginf(ref_lse) if ref_lse is not None else torch.zeros(out.shape[:-1], dtype=torch.bool)
    if lse is not None and ref_lse is not None:
        lse_d = lse.detach()
        if lse_d.shape != ref_lse.shape:
            raise Mismatch(f"lse: shape {tuple(lse_d.shape)}, reference {tuple(ref_lse.shape)}\n{context}")
        ours_dead = torch.isneginf(lse_d)
        if not torch.equal(ours_dead, dead):
            diff = (ours_dead != dead).nonzero()
            idx = tuple(diff[0].tolist())
            raise Mismatch(f"lse: -inf pattern differs (fully masked rows) at {diff.shape[0]} row(s); first "
                           f"(b, h, q) = {idx}: got {lse_d[idx].item()}, reference {ref_lse[idx].item()}\n{context}")
        errors["lse"] = _compare("lse", torch.where(dead, 0.0, lse_d.to(torch.float64)),
                                 torch.where(dead, 0.0, ref_lse.detach()), lse_rtol, lse_rtol / 100, context)

    if grads:
        g = None
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
        do = torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device)
        ours_t, ours_g = [out], [do.to(out.dtype)]
        ref_loss = (ref_out * do.to(torch.float64)).sum()
        if lse_grad and lse is not None and lse.requires_grad:
            dlse = torch.randn(lse.shape, generator=g, dtype=torch.float32).to(lse.device)
            dlse = torch.where(dead.to(dlse.device), 0.0, dlse)
            ours_t.append(lse)
            ours_g.append(dlse.to(lse.dtype))
            ref_loss = ref_loss + (torch.where(dead, 0.0, ref_lse) * dlse.to(torch.float64)).sum()
        # learnable captured tensors: the same tensor feeds both, so take each side's gradient apart
        captured = [t for t in trace(ref_mask, ref_score).tensors if t.requires_grad]
        names = ["dq", "dk", "dv", "dsinks", "du", "dw"] + [f"dcaptured{i}" for i in range(len(captured))]
        ours_wrt = [x for x in ours_in if x is not None] + captured
        ref_wrt = [x for x in ref_in if x is not None] + captured
        names = [n for n, x in zip(names, ours_in + captured) if x is not None]
        got = torch.autograd.grad(ours_t, ours_wrt, ours_g, allow_unused=True)
        want = torch.autograd.grad(ref_loss, ref_wrt, allow_unused=True)
        for name, x, a, b in zip(names, ours_wrt, got, want):
            if a is None and name in ("dq", "dk", "dv"):
                raise Mismatch(f"{name}: no gradient was produced\n{context}")
            zero = torch.zeros(x.shape, dtype=torch.float64)
            a = zero if a is None else a
            b = zero if b is None else b
            summands = None
            if name == "dsinks" and ref_lse is not None:
                # dsinks[h] = -sum over rows of p_sink * delta: scale by the sum of |terms|
                delta = (ref_out.detach() * do.to(torch.float64)).sum(-1)
                if len(ours_t) > 1:
                    delta = delta - dlse.to(torch.float64)
                p_sink = torch.exp(ref_in[3].detach().view(1, -1, 1) - torch.where(dead, 0.0, ref_lse.detach()))
                terms = torch.where(dead, 0.0, p_sink * delta).abs()
                summands = terms.sum(dim=(0, 2)).max().item()
            errors[name] = _compare(name, a, b, rtol, atol, context, summands)
    return errors
