"""An independent fuzzer: random patterns from every DSL construct, random calls, three oracles.

:mod:`attndsl.testing.strategies` draws patterns shaped like the ones block analysis was written
for. This module draws them without that knowledge: typed random expression trees (integer,
boolean and floating nodes) over ``b, h, q_idx, kv_idx`` (and ``score``) from the whole
traceable subset — ``+ - * / // %``, comparisons, ``& | ~``, ``torch.where``, ``.clamp``,
``.abs()``, ``torch.minimum/maximum``, ``exp/log/tanh/sigmoid``, ``.float()``, indexing captured
integer, boolean and floating tensors (floating ones possibly learnable) — including large
integer multipliers and constants past ``2**31`` — and random calls around them: ``Lq != Lkv``,
lengths off tile multiples, float32/float16/bfloat16, GQA/MQA, sinks, a low-rank bias
(``bias_factors``), the sigmoid normaliser and non-contiguous inputs.

Divisors are nonzero by construction (a nonzero constant, ``e.abs() + k`` with ``k >= 1``, or a
captured table of positive entries), and captured tensors are indexed by ``e % n`` or
``e.clamp(0, n - 1)``, so every drawn case is a valid call. Integers reach floats only through
``% m`` or ``.clamp``, so scores stay in a range where float32 rounding of the conversion is
exact.

:func:`cases` is the hypothesis strategy; :func:`check_case` runs one case against
:func:`attndsl.reference.attention` (forward and gradients, via
:func:`~attndsl.testing.assert_matches_reference`) and, when the case is expressible there,
against FlexAttention's eager forward (``flex_attention`` uncompiled on CPU float64 with a block
mask from ``create_block_mask(..., device="cpu")``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from hypothesis import strategies as st

__all__ = ["FuzzCase", "cases", "check_case", "masks", "score_mods"]

#: multipliers and constants that overflow int32 arithmetic at small lengths
_BIG = (100000007, 2654435761, 1 << 31, 3000000019)


@dataclass(frozen=True)
class _E:
    """A drawn expression: its text and ``fn(s, b, h, q, kv)`` on tensors."""

    text: str
    fn: Callable


@dataclass
class _Ctx:
    max_len: int
    max_heads: int
    captured: dict = field(default_factory=dict)  # name -> tensor
    learnable: bool = False

    def tensor(self, draw, kind: str) -> tuple[str, torch.Tensor, int]:
        """A captured tensor of ``kind`` (int64/int32 values, bool, positive ints, float)."""
        n = draw(st.integers(1, self.max_len + 8))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        if kind == "float":
            t = torch.randn(self.max_heads, n, generator=g)
            if self.learnable:
                t.requires_grad_(True)
        elif kind == "bool":
            t = torch.rand(n, generator=g) < 0.6
        elif kind == "positive":
            t = torch.randint(1, 9, (n,), generator=g, dtype=torch.int32)
        else:
            dt = torch.int64 if kind == "int64" else torch.int32
            t = torch.randint(-50, 50, (n,), generator=g, dtype=dt)
            if dt == torch.int64 and draw(st.booleans()):
                t = t + (1 << 34)  # values far past int32, differences small
        name = f"{kind}{len(self.captured)}"
        self.captured[name] = t
        return name, t, n


def _leaf_int(draw, cx: _Ctx) -> _E:
    v = draw(st.sampled_from(["q", "kv", "q", "kv", "b", "h", "c"]))
    if v == "c":  # built from an index, so every value is a tensor (or a traced value)
        c = draw(st.integers(-8, cx.max_len))
        return _E(str(c), lambda s, b, h, q, kv: q * 0 + c)
    return _E(v, {"q": lambda s, b, h, q, kv: q, "kv": lambda s, b, h, q, kv: kv,
                  "b": lambda s, b, h, q, kv: b, "h": lambda s, b, h, q, kv: h}[v])


def _index(draw, cx: _Ctx, e: _E, n: int) -> _E:
    """An in-range index of a length-``n`` table from ``e``."""
    f = e.fn
    if draw(st.booleans()):
        return _E(f"({e.text}) % {n}", lambda s, b, h, q, kv: f(s, b, h, q, kv) % n)
    return _E(f"({e.text}).clamp(0, {n - 1})", lambda s, b, h, q, kv: _t(f(s, b, h, q, kv)).clamp(0, n - 1))


def _t(x):
    return x  # every drawn value is already a tensor (or, traced, a symbolic value)


def _int(draw, cx: _Ctx, depth: int) -> _E:
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        return _leaf_int(draw, cx)
    kind = draw(st.sampled_from(["add", "sub", "mul", "big", "floordiv", "mod", "divexpr", "abs", "clamp", "minmax",
                                 "where", "table", "neg"]))
    a = _int(draw, cx, depth - 1)
    fa = a.fn
    if kind in ("add", "sub", "mul"):
        c = _int(draw, cx, depth - 1) if kind != "mul" else _leaf_int(draw, cx)  # products stay inside int64
        fc, sym = c.fn, {"add": "+", "sub": "-", "mul": "*"}[kind]
        op = {"add": lambda x, y: x + y, "sub": lambda x, y: x - y, "mul": lambda x, y: x * y}[kind]
        return _E(f"({a.text}) {sym} ({c.text})", lambda s, b, h, q, kv: op(fa(s, b, h, q, kv), fc(s, b, h, q, kv)))
    if kind == "big":  # a large multiplier or offset of a leaf
        leaf, m = _leaf_int(draw, cx), draw(st.sampled_from(_BIG))
        fl = leaf.fn
        if draw(st.booleans()):
            return _E(f"({leaf.text}) * {m}", lambda s, b, h, q, kv: fl(s, b, h, q, kv) * m)
        return _E(f"({leaf.text}) - {m}", lambda s, b, h, q, kv: fl(s, b, h, q, kv) - m)
    if kind in ("floordiv", "mod"):
        c = draw(st.sampled_from([-7, -3, -1, 2, 3, 5, 16, 100003]))
        if kind == "floordiv":
            return _E(f"({a.text}) // {c}", lambda s, b, h, q, kv: fa(s, b, h, q, kv) // c)
        return _E(f"({a.text}) % {c}", lambda s, b, h, q, kv: fa(s, b, h, q, kv) % c)
    if kind == "divexpr":  # a divisor that is an expression, never zero
        if draw(st.booleans()):
            d = _int(draw, cx, depth - 1)
            fd, k = d.fn, draw(st.integers(1, 3))
            sign = draw(st.sampled_from([1, -1]))
            dt, dfn = f"{'-' if sign < 0 else ''}(({d.text}).abs() + {k})", \
                (lambda s, b, h, q, kv: sign * (_t(fd(s, b, h, q, kv)).abs() + k))
        else:
            name, t, n = cx.tensor(draw, "positive")
            ix = _index(draw, cx, _leaf_int(draw, cx), n)
            fi = ix.fn
            dt, dfn = f"{name}[{ix.text}]", (lambda s, b, h, q, kv: t[_t(fi(s, b, h, q, kv))])
        if draw(st.booleans()):
            return _E(f"({a.text}) // {dt}", lambda s, b, h, q, kv: fa(s, b, h, q, kv) // dfn(s, b, h, q, kv))
        return _E(f"({a.text}) % {dt}", lambda s, b, h, q, kv: fa(s, b, h, q, kv) % dfn(s, b, h, q, kv))
    if kind == "abs":
        return _E(f"({a.text}).abs()", lambda s, b, h, q, kv: _t(fa(s, b, h, q, kv)).abs())
    if kind == "neg":
        return _E(f"-({a.text})", lambda s, b, h, q, kv: -fa(s, b, h, q, kv))
    if kind == "clamp":
        lo = draw(st.integers(-8, cx.max_len))
        hi = lo + draw(st.integers(0, cx.max_len))
        return _E(f"({a.text}).clamp({lo}, {hi})", lambda s, b, h, q, kv: _t(fa(s, b, h, q, kv)).clamp(lo, hi))
    if kind == "minmax":
        c = _int(draw, cx, depth - 1)
        fc = c.fn
        f = draw(st.sampled_from(["minimum", "maximum"]))
        op = getattr(torch, f)
        return _E(f"torch.{f}({a.text}, {c.text})",
                  lambda s, b, h, q, kv: op(_t(fa(s, b, h, q, kv)), _t(fc(s, b, h, q, kv))))
    if kind == "where":
        cond, c = _bool(draw, cx, depth - 1), _int(draw, cx, depth - 1)
        fb, fc = cond.fn, c.fn
        return _E(f"torch.where({cond.text}, {a.text}, {c.text})",
                  lambda s, b, h, q, kv: torch.where(_t(fb(s, b, h, q, kv)), _t(fa(s, b, h, q, kv)),
                                                     _t(fc(s, b, h, q, kv))))
    if kind == "table":
        name, t, n = cx.tensor(draw, draw(st.sampled_from(["int64", "int32"])))
        ix = _index(draw, cx, a, n)
        fi = ix.fn
        return _E(f"{name}[{ix.text}]", lambda s, b, h, q, kv: t[_t(fi(s, b, h, q, kv))])
    raise AssertionError(kind)


def _bool(draw, cx: _Ctx, depth: int) -> _E:
    kind = draw(st.sampled_from(["cmp", "cmp", "cmp", "and", "or", "not", "table"] if depth > 0 else ["cmp", "table"]))
    if kind == "cmp":
        a, c = _int(draw, cx, max(depth - 1, 0)), _int(draw, cx, max(depth - 1, 0))
        fa, fc = a.fn, c.fn
        sym = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        op = {"<": lambda x, y: x < y, "<=": lambda x, y: x <= y, ">": lambda x, y: x > y,
              ">=": lambda x, y: x >= y, "==": lambda x, y: x == y, "!=": lambda x, y: x != y}[sym]
        return _E(f"({a.text}) {sym} ({c.text})",
                  lambda s, b, h, q, kv: op(_t(fa(s, b, h, q, kv)), _t(fc(s, b, h, q, kv))))
    if kind == "table":
        name, t, n = cx.tensor(draw, "bool")
        ix = _index(draw, cx, _int(draw, cx, max(depth - 1, 0)), n)
        fi = ix.fn
        return _E(f"{name}[{ix.text}]", lambda s, b, h, q, kv: t[_t(fi(s, b, h, q, kv))])
    a = _bool(draw, cx, depth - 1)
    fa = a.fn
    if kind == "not":
        return _E(f"~({a.text})", lambda s, b, h, q, kv: ~_t(fa(s, b, h, q, kv)))
    c = _bool(draw, cx, depth - 1)
    fc = c.fn
    if kind == "and":
        return _E(f"({a.text}) & ({c.text})", lambda s, b, h, q, kv: _t(fa(s, b, h, q, kv)) & _t(fc(s, b, h, q, kv)))
    return _E(f"({a.text}) | ({c.text})", lambda s, b, h, q, kv: _t(fa(s, b, h, q, kv)) | _t(fc(s, b, h, q, kv)))


def _float(draw, cx: _Ctx, depth: int) -> _E:
    """A floating expression of moderate size (|value| within a few units for |score| so)."""
    if depth <= 0 or draw(st.integers(0, 3)) == 0:
        kind = draw(st.sampled_from(["score", "score", "int", "const", "table"]))
        if kind == "score":
            return _E("s", lambda s, b, h, q, kv: s)
        if kind == "const":
            c = draw(st.sampled_from([-1.5, -0.25, 0.5, 1.0, 2.0]))
            return _E(str(c), lambda s, b, h, q, kv: (q * 0).float() + c)
        if kind == "int":  # an integer brought to floats, bounded first
            a = _int(draw, cx, draw(st.integers(0, 2)))
            fa = a.fn
            m, c = draw(st.sampled_from([3, 7, 17, 64])), draw(st.sampled_from([0.05, -0.1, 0.25]))
            if draw(st.booleans()):
                return _E(f"(({a.text}) % {m}).float() * {c}",
                          lambda s, b, h, q, kv: (_t(fa(s, b, h, q, kv)) % m).float() * c)
            return _E(f"(({a.text}).clamp(-{m}, {m}) / {m}) * {c * 4}",
                      lambda s, b, h, q, kv: (_t(fa(s, b, h, q, kv)).clamp(-m, m) / m) * (c * 4))
        name, t, n = cx.tensor(draw, "float")
        ix = _index(draw, cx, _int(draw, cx, 1), n)
        fi = ix.fn
        return _E(f"{name}[h, {ix.text}]", lambda s, b, h, q, kv: t[_t(h), _t(fi(s, b, h, q, kv))])
    kind = draw(st.sampled_from(["add", "sub", "mul", "div", "tanh", "sigmoid", "exp", "log", "clamp", "abs",
                                 "minmax", "where"]))
    a = _float(draw, cx, depth - 1)
    fa = a.fn
    if kind in ("add", "sub", "mul", "div", "minmax"):
        c = _float(draw, cx, depth - 1)
        fc = c.fn
        if kind == "add":
            return _E(f"({a.text}) + ({c.text})", lambda s, b, h, q, kv: fa(s, b, h, q, kv) + fc(s, b, h, q, kv))
        if kind == "sub":
            return _E(f"({a.text}) - ({c.text})", lambda s, b, h, q, kv: fa(s, b, h, q, kv) - fc(s, b, h, q, kv))
        if kind == "mul":  # by a bounded factor
            return _E(f"({a.text}) * torch.tanh({c.text})",
                      lambda s, b, h, q, kv: fa(s, b, h, q, kv) * torch.tanh(_t(fc(s, b, h, q, kv))))
        if kind == "div":
            return _E(f"({a.text}) / (({c.text}).abs() + 1)",
                      lambda s, b, h, q, kv: fa(s, b, h, q, kv) / (_t(fc(s, b, h, q, kv)).abs() + 1))
        f = draw(st.sampled_from(["minimum", "maximum"]))
        op = getattr(torch, f)
        return _E(f"torch.{f}({a.text}, {c.text})",
                  lambda s, b, h, q, kv: op(_t(fa(s, b, h, q, kv)), _t(fc(s, b, h, q, kv))))
    if kind == "tanh":
        c = draw(st.sampled_from([1.0, 5.0]))
        return _E(f"{c} * torch.tanh(({a.text}) / {c})", lambda s, b, h, q, kv: c * torch.tanh(_t(fa(s, b, h, q, kv)) / c))
    if kind == "sigmoid":
        return _E(f"2 * torch.sigmoid({a.text})", lambda s, b, h, q, kv: 2 * torch.sigmoid(_t(fa(s, b, h, q, kv))))
    if kind == "exp":
        return _E(f"torch.exp(-({a.text}).abs())", lambda s, b, h, q, kv: torch.exp(-_t(fa(s, b, h, q, kv)).abs()))
    if kind == "log":
        return _E(f"torch.log(({a.text}).abs() + 1)", lambda s, b, h, q, kv: torch.log(_t(fa(s, b, h, q, kv)).abs() + 1))
    if kind == "clamp":
        c = draw(st.sampled_from([0.5, 2.0, 4.0]))
        return _E(f"({a.text}).clamp(-{c}, {c})", lambda s, b, h, q, kv: _t(fa(s, b, h, q, kv)).clamp(-c, c))
    if kind == "abs":
        return _E(f"({a.text}).abs()", lambda s, b, h, q, kv: _t(fa(s, b, h, q, kv)).abs())
    cond, c = _bool(draw, cx, 1), _float(draw, cx, depth - 1)
    fb, fc = cond.fn, c.fn
    return _E(f"torch.where({cond.text}, {a.text}, {c.text})",
              lambda s, b, h, q, kv: torch.where(_t(fb(s, b, h, q, kv)), _t(fa(s, b, h, q, kv)), _t(fc(s, b, h, q, kv))))


def _as_mask(e: _E) -> Callable:
    f = e.fn

    def mask_mod(b, h, q_idx, kv_idx):
        return f(None, b, h, q_idx, kv_idx)

    mask_mod.__name__ = mask_mod.__qualname__ = f"mask[{e.text}]"
    return mask_mod


def _as_score(e: _E) -> Callable:
    f = e.fn

    def score_mod(score, b, h, q_idx, kv_idx):
        return f(score, b, h, q_idx, kv_idx)

    score_mod.__name__ = score_mod.__qualname__ = f"score_mod[{e.text}]"
    return score_mod


@dataclass(repr=False)
class FuzzCase:
    """One drawn call: pattern, shapes and options. ``repr`` spells all of it out."""

    mask_mod: Optional[Callable]
    score_mod: Optional[Callable]
    captured: dict
    shape: tuple  # (B, Hq, Hkv, Lq, Lkv, D)
    dtype: torch.dtype
    normalizer: str = "softmax"
    sinks: bool = False
    bias_rank: int = 0
    transposed: bool = False
    seed: int = 0

    def __repr__(self):
        parts = [f"shape={self.shape}", f"dtype={self.dtype}", f"mask={getattr(self.mask_mod, '__name__', None)}",
                 f"score={getattr(self.score_mod, '__name__', None)}"]
        if self.captured:
            parts.append("captured=" + ", ".join(f"{k}{tuple(t.shape)}{'*' if t.requires_grad else ''}"
                                                 for k, t in self.captured.items()))
        for k in ("normalizer", "sinks", "bias_rank", "transposed", "seed"):
            parts.append(f"{k}={getattr(self, k)}")
        return "FuzzCase(" + ", ".join(parts) + ")"

    @property
    def flex_comparable(self) -> bool:
        """FlexAttention has no sinks, low-rank bias or sigmoid normaliser."""
        return self.normalizer == "softmax" and not self.sinks and not self.bias_rank


def masks(max_len: int = 96, max_heads: int = 4, max_depth: int = 3) -> st.SearchStrategy[Callable]:
    """Random ``mask_mod`` functions from the whole traceable subset (see the module docstring)."""
    @st.composite
    def draw_mask(draw):
        return _as_mask(_bool(draw, _Ctx(max_len, max_heads), draw(st.integers(0, max_depth))))
    return draw_mask()


def score_mods(max_len: int = 96, max_heads: int = 4, max_depth: int = 3,
               learnable: bool = False) -> st.SearchStrategy[Callable]:
    """Random ``score_mod`` functions (``learnable``: captured float tables require grad)."""
    @st.composite
    def draw_score(draw):
        return _as_score(_float(draw, _Ctx(max_len, max_heads, learnable=learnable), draw(st.integers(1, max_depth))))
    return draw_score()


@st.composite
def cases(draw, max_len: int = 80, max_heads: int = 4, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Random :class:`FuzzCase`: a pattern and a call it is valid for."""
    B = draw(st.integers(1, 2))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 1, 2]))
    Hq = min(Hq, max_heads)
    Hkv = Hkv if Hq % Hkv == 0 else 1
    Lq, Lkv = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    D = draw(st.sampled_from([16, 32]))
    cx = _Ctx(max(Lq, Lkv), Hq, learnable=draw(st.booleans()))
    which = draw(st.sampled_from(["mask", "score", "both", "both"]))
    mask = _as_mask(_bool(draw, cx, draw(st.integers(0, 3)))) if which in ("mask", "both") else None
    score = _as_score(_float(draw, cx, draw(st.integers(1, 3)))) if which in ("score", "both") else None
    normalizer = draw(st.sampled_from(["softmax"] * 5 + ["sigmoid"]))
    return FuzzCase(mask, score, dict(cx.captured), (B, Hq, Hkv, Lq, Lkv, D), draw(st.sampled_from(dtypes)),
                    normalizer, sinks=normalizer == "softmax" and draw(st.integers(0, 4)) == 0,
                    bias_rank=draw(st.sampled_from([0, 0, 0, 2])), transposed=draw(st.booleans()),
                    seed=draw(st.integers(0, 2**31 - 1)))


def _inputs(case: FuzzCase):
    B, Hq, Hkv, Lq, Lkv, D = case.shape
    g = torch.Generator().manual_seed(case.seed)

    def make(H, L):
        if case.transposed:  # [B, L, H, D] memory viewed as [B, H, L, D]: not contiguous
            return torch.randn(B, L, H, D, generator=g).to(case.dtype).transpose(1, 2)
        return torch.randn(B, H, L, D, generator=g).to(case.dtype)

    q, k, v = make(Hq, Lq), make(Hkv, Lkv), make(Hkv, Lkv)
    extra = {}
    if case.sinks:
        extra["sinks"] = torch.randn(Hq, generator=g)
    if case.bias_rank:
        R = case.bias_rank
        extra["bias_factors"] = (torch.randn(B, Hq, Lq, R, generator=g).to(case.dtype) * 0.5,
                                 torch.randn(1, 1, Lkv, R, generator=g).to(case.dtype) * 0.5)
    if case.normalizer != "softmax":
        extra["normalizer"] = case.normalizer
    return q, k, v, extra


def check_case(case: FuzzCase, flex: bool = True) -> None:
    """Run ``case`` through :func:`attndsl.attention` against the float64 reference (forward and
    gradients of q, k, v, sinks, bias factors and learnable captured tensors) and, when
    comparable, check the reference's forward against FlexAttention's eager forward (float64)."""
    from .assertions import assert_matches_reference
    q, k, v, extra = _inputs(case)
    assert_matches_reference(q, k, v, mask_mod=case.mask_mod, score_mod=case.score_mod, msg=repr(case), **extra)
    if flex and case.flex_comparable:
        check_flex(case, q, k, v)


def check_flex(case: FuzzCase, q, k, v) -> None:
    """The reference's forward equals FlexAttention's eager forward (both float64, CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from .. import reference
    B, Hq, Hkv, Lq, Lkv, D = case.shape
    q, k, v = (t.detach().double() for t in (q, k, v))
    block_mask = None
    if case.mask_mod is not None:
        block_mask = create_block_mask(case.mask_mod, B, Hq, Lq, Lkv, device="cpu")
    with torch.no_grad():
        want = flex_attention(q, k, v, score_mod=case.score_mod, block_mask=block_mask, enable_gqa=Hq != Hkv)
        ref, _ = reference.attention(q, k, v, mask_mod=case.mask_mod, score_mod=case.score_mod)
    err = (want - ref).abs().max().item() if want.numel() else 0.0
    assert err <= 1e-6 * max(1.0, ref.abs().max().item()), f"reference and FlexAttention differ by {err}: {case!r}"
