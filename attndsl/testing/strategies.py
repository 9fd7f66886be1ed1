"""Hypothesis strategies for property-testing attention patterns.

Everything here draws *small* problems: the CPU runs attndsl's kernels through Triton's
interpreter, where one forward+backward at ``L≈64..100, D=32, H≤4`` takes about a second.

* :func:`shapes` — ``Shape(B, Hq, Hkv, Lq, Lkv, D)``: ragged lengths (not multiples of any
  tile, ``Lq != Lkv`` allowed), GQA/MQA head ratios.
* :func:`dtypes` — float32, float16, bfloat16.
* :func:`masks` / :func:`score_mods` — random expression trees over ``b, h, q_idx, kv_idx``
  (and ``score``), returned as plain Python closures that use only the torch operations the
  tracer supports, so the same function runs traced (attndsl), on real tensors (the
  reference, FlexAttention) and in hypothesis' failure reports (``__name__`` spells out the
  expression, e.g. ``mask[((q - kv) < 5) & ~(kv < 3)]``).
* :func:`patterns` — the ready-made patterns of ``patterns/`` with random parameters, as
  :class:`PatternCase` ``(name, mask_mod, score_mod)``.

**Captured tensors.** Some generated patterns capture tensors (document ids, per-head
slopes/windows, bias tables). They are created when the value is drawn, on the ``device``
given to the strategy (default ``"cpu"``), from values hypothesis drew, so a failing example
replays exactly. They are sized for ``max_len`` and ``max_heads``: draw shapes with the same
(or smaller) ``max_len``/``max_heads`` so indices stay in range.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from hypothesis import strategies as st

__all__ = [
    "Shape", "shapes", "dtypes", "masks", "score_mods", "patterns", "PatternCase",
    "MASK_PATTERNS", "SCORE_PATTERNS", "LAYOUT_PATTERNS", "lengths",
]


# ---------------------------------------------------------------------------------------------
# shapes and dtypes


class Shape(NamedTuple):
    """Problem size: ``q [B, Hq, Lq, D]``, ``k [B, Hkv, Lkv, D]``, ``v [B, Hkv, Lkv, Dv]``
    (``Hq % Hkv == 0``; ``Dv`` None: the value head dim is ``D``)."""

    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lkv: int
    D: int
    Dv: Optional[int] = None

    @property
    def dv(self) -> int:
        """The value head dim."""
        return self.D if self.Dv is None else self.Dv

    @property
    def q_shape(self) -> tuple:
        return (self.B, self.Hq, self.Lq, self.D)

    @property
    def kv_shape(self) -> tuple:
        return (self.B, self.Hkv, self.Lkv, self.D)

    @property
    def v_shape(self) -> tuple:
        return (self.B, self.Hkv, self.Lkv, self.dv)


def lengths(max_len: int = 96, min_len: int = 1) -> st.SearchStrategy[int]:
    """Sequence lengths in ``[min_len, max_len]``, often just around tile boundaries (16k±1)."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    edges = sorted({n for m in range(16, max_len + 2, 16) for n in (m - 1, m, m + 1) if min_len <= n <= max_len}
                   | {min_len, max_len})
    return st.one_of(st.integers(min_len, max_len), st.sampled_from(edges))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def shapes(max_len: int = 96, max_batch: int = 2, max_heads: int = 4,
           head_dims: Sequence[int] = (16, 32, 64), *, min_len: int = 1,
           same_len: Optional[bool] = None, value_head_dims: Optional[Sequence[int]] = None
           ) -> st.SearchStrategy[Shape]:
    """Random :class:`Shape`.

    Lengths are drawn from :func:`lengths` (``1..max_len``, with extra weight just around
    multiples of 16, so partial tiles are common). ``same_len=None`` draws ``Lq == Lkv`` about
    half the time and independent lengths otherwise; ``True``/``False`` forces either.
    ``Hq`` is ``1..max_heads`` and ``Hkv`` a divisor of it (MHA, GQA and MQA). ``value_head_dims``
    (default None: ``Dv == D``) draws the value head dim independently, as MLA-style layers use.
    """
    if max_heads < 1 or max_batch < 1:
        raise ValueError("max_heads and max_batch must be >= 1")
    head_dims = tuple(head_dims)

    @st.composite
    def _shape(draw):
        B = draw(st.integers(1, max_batch))
        Hq = draw(st.integers(1, max_heads))
        Hkv = draw(st.sampled_from(_divisors(Hq)[::-1]))  # shrinks towards Hkv == Hq (plain MHA)
        Lq = draw(lengths(max_len, min_len))
        same = draw(st.booleans()) if same_len is None else same_len
        Lkv = Lq if same else draw(lengths(max_len, min_len))
        D = draw(st.sampled_from(head_dims))
        Dv = draw(st.sampled_from(tuple(value_head_dims))) if value_head_dims else None
        return Shape(B, Hq, Hkv, Lq, Lkv, D, Dv)

    return _shape()


def dtypes(include: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16)
           ) -> st.SearchStrategy[torch.dtype]:
    """Input dtypes (float32 first, so failures shrink towards it)."""
    return st.sampled_from(tuple(include))


# ---------------------------------------------------------------------------------------------
# expression trees
#
# A node is (text, fn): ``fn(b, h, q, kv)`` for boolean/index expressions, ``fn(s, b, h, q, kv)``
# for score expressions. Only operators and torch functions from the traceable subset are used:
# + - * / // %, comparisons, & | ~, .abs(), .clamp(), .float(), torch.where, torch.tanh,
# torch.sigmoid, torch.exp2, torch.log, torch.minimum/maximum, and indexing captured tensors
# by index expressions.


@dataclass(frozen=True)
class _Node:
    text: str
    fn: Callable
    captured: tuple = ()  # (name, description) of captured tensors, for the repr


def _consts(max_len: int) -> st.SearchStrategy[int]:
    """Offsets for comparisons: small, anywhere in range, or next to a tile edge."""
    edges = [m + d for m in (16, 32, 64) if m <= max_len for d in (-1, 0, 1)]
    return st.one_of(st.integers(-4, 8), st.integers(-max_len, max_len),
                     st.sampled_from(edges or [1]))


_CMP = {"<": lambda a, c: a < c, "<=": lambda a, c: a <= c, ">": lambda a, c: a > c,
        ">=": lambda a, c: a >= c, "==": lambda a, c: a == c, "!=": lambda a, c: a != c}


def _seeded(seed: int, shape, device, kind: str = "randn", **kw) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        t = torch.randn(*shape, generator=g, **kw)
    elif kind == "rand":
        t = torch.rand(*shape, generator=g, **kw)
    else:
        raise ValueError(kind)
    return t.to(device)


def _doc_ids(draw, max_len: int, device) -> tuple[torch.Tensor, list[int]]:
    lens = draw(st.lists(st.one_of(st.integers(1, max(1, max_len // 2)), st.integers(0, max_len)),
                         min_size=1, max_size=8))
    total = sum(lens)
    if total < max_len:
        lens = lens + [max_len - total]
    ids = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32),
                                  torch.tensor(lens, dtype=torch.int64))
    return ids.to(device), lens


@st.composite
def _mask_atom(draw, max_len: int, max_heads: int, device, data_dependent: bool) -> _Node:
    kinds = ["diff", "shifted", "one_index", "same_chunk", "diff_mod", "band", "head", "affine",
             "strided", "batch"]
    if data_dependent:
        kinds += ["same_doc", "keep", "head_window"]
    kind = draw(st.sampled_from(kinds))
    if kind == "diff":
        op, c = draw(st.sampled_from(list(_CMP))), draw(_consts(max_len))
        f = _CMP[op]
        return _Node(f"(q - kv) {op} {c}", lambda b, h, q, kv: f(q - kv, c))
    if kind == "shifted":
        c = draw(_consts(max_len))
        return _Node(f"q >= kv + {c}", lambda b, h, q, kv: q >= kv + c)
    if kind == "one_index":
        which, op, c = draw(st.sampled_from(["q", "kv"])), draw(st.sampled_from(["<", ">="])), draw(st.integers(0, max_len))
        f = _CMP[op]
        if which == "q":
            return _Node(f"q {op} {c}", lambda b, h, q, kv: f(q, c))
        return _Node(f"kv {op} {c}", lambda b, h, q, kv: f(kv, c))
    if kind == "same_chunk":
        c = draw(st.one_of(st.integers(1, 8), st.integers(1, max_len)))
        return _Node(f"(q // {c}) == (kv // {c})", lambda b, h, q, kv: (q // c) == (kv // c))
    if kind == "diff_mod":
        c = draw(st.integers(2, 8))
        r = draw(st.integers(0, c - 1))
        return _Node(f"((q - kv) % {c}) == {r}", lambda b, h, q, kv: ((q - kv) % c) == r)
    if kind == "band":
        c = draw(st.one_of(st.integers(0, 8), st.integers(0, max_len)))
        return _Node(f"(q - kv).abs() <= {c}", lambda b, h, q, kv: (q - kv).abs() <= c)
    if kind == "head":
        c = draw(st.integers(0, max_heads))
        if draw(st.booleans()):
            return _Node(f"h < {c}", lambda b, h, q, kv: h < c)
        return _Node("(h % 2) == 0", lambda b, h, q, kv: (h % 2) == 0)
    if kind == "batch":
        return _Node("b == 0", lambda b, h, q, kv: b == 0)
    if kind == "affine":
        a1 = draw(st.sampled_from([1, 2, -1, 3]))
        a2 = draw(st.sampled_from([1, -1, 2, -2]))
        c = draw(st.integers(-2 * max_len, 3 * max_len))
        return _Node(f"({a1} * q + {a2} * kv) < {c}", lambda b, h, q, kv: (a1 * q + a2 * kv) < c)
    if kind == "strided":
        c = draw(st.integers(2, 8))
        r = draw(st.integers(1, c))
        return _Node(f"(kv % {c}) < {r}", lambda b, h, q, kv: (kv % c) < r)
    if kind == "same_doc":
        ids, lens = _doc_ids(draw, max_len, device)
        causal = draw(st.booleans())
        if causal:
            return _Node("ids[q] >= ids[kv]", lambda b, h, q, kv: ids[q] >= ids[kv],
                         (("ids", f"docs{lens}"),))
        return _Node("ids[q] == ids[kv]", lambda b, h, q, kv: ids[q] == ids[kv], (("ids", f"docs{lens}"),))
    if kind == "keep":
        seed = draw(st.integers(0, 2**31 - 1))
        p = draw(st.sampled_from([0.1, 0.5, 0.9]))
        keep = _seeded(seed, (max_len,), "cpu", "rand") < p
        keep = keep.to(device)
        return _Node("keep[kv]", lambda b, h, q, kv: keep[kv], (("keep", f"rand(seed={seed}) < {p}"),))
    if kind == "head_window":
        win_list = draw(st.lists(st.integers(0, max_len), min_size=max_heads, max_size=max_heads))
        win = torch.tensor(win_list, dtype=torch.int32).to(device)
        return _Node("(q - kv) < win[h]", lambda b, h, q, kv: (q - kv) < win[h], (("win", str(win_list)),))
    raise AssertionError(kind)


def _mask_tree(max_len, max_heads, device, data_dependent, depth):
    atom = _mask_atom(max_len, max_heads, device, data_dependent)
    if depth <= 0:
        return atom

    @st.composite
    def tree(draw):
        kind = draw(st.sampled_from(["atom", "and", "or", "not", "where"]))
        sub = _mask_tree(max_len, max_heads, device, data_dependent, depth - 1)
        if kind == "atom":
            return draw(atom)
        if kind == "not":
            a = draw(sub)
            return _Node(f"~({a.text})", lambda b, h, q, kv: ~a.fn(b, h, q, kv), a.captured)
        a, c = draw(sub), draw(sub)
        if kind == "and":
            return _Node(f"({a.text}) & ({c.text})", lambda b, h, q, kv: a.fn(b, h, q, kv) & c.fn(b, h, q, kv),
                         a.captured + c.captured)
        if kind == "or":
            return _Node(f"({a.text}) | ({c.text})", lambda b, h, q, kv: a.fn(b, h, q, kv) | c.fn(b, h, q, kv),
                         a.captured + c.captured)
        cond = draw(atom)
        return _Node(f"torch.where({cond.text}, {a.text}, {c.text})",
                     lambda b, h, q, kv: torch.where(cond.fn(b, h, q, kv), a.fn(b, h, q, kv), c.fn(b, h, q, kv)),
                     cond.captured + a.captured + c.captured)

    return tree()


def _describe(prefix: str, node: _Node) -> str:
    text = f"{prefix}[{node.text}]"
    if node.captured:
        seen = dict(node.captured)
        text += " where " + ", ".join(f"{k}={v}" for k, v in seen.items())
    return text


def _finish_mask(node: _Node) -> Callable:
    fn = node.fn

    def mask_mod(b, h, q_idx, kv_idx):
        return fn(b, h, q_idx, kv_idx)

    mask_mod.__name__ = mask_mod.__qualname__ = _describe("mask", node)
    mask_mod.expr = node.text
    return mask_mod


def masks(max_len: int = 128, max_heads: int = 4, *, max_depth: int = 2, data_dependent: bool = True,
          device="cpu") -> st.SearchStrategy[Callable]:
    """Random ``mask_mod(b, h, q_idx, kv_idx)`` functions: expression trees of depth ``<= max_depth``.

    Atoms: ``(q - kv) < c`` (and ``<= > >= == !=``), ``q >= kv + c``, ``kv < c``/``q >= c``,
    ``(q // c) == (kv // c)``, ``((q - kv) % c) == r``, ``(q - kv).abs() <= c``,
    ``(a*q + b*kv) < c``, ``(kv % c) < r``, ``h < c``, ``(h % 2) == 0``, ``b == 0``; with
    ``data_dependent`` also captured tensors: ``ids[q] == ids[kv]`` / ``ids[q] >= ids[kv]``
    (document ids), ``keep[kv]`` (a random boolean vector), ``(q - kv) < win[h]`` (per-head
    windows). Combined with ``&``, ``|``, ``~`` and ``torch.where(atom, m1, m2)``.

    Captured tensors are created on ``device``, sized for ``max_len`` tokens and ``max_heads``
    heads. Masks may hide every key of some (or all) rows; attndsl must then give output 0 and
    logsumexp -inf. The function's ``__name__`` is the expression; ``.expr`` holds it too.
    """
    return _mask_tree(max_len, max_heads, device, data_dependent, max_depth).map(_finish_mask)


@st.composite
def _score_step(draw, inner: _Node, max_len: int, max_heads: int, device, data_dependent: bool) -> _Node:
    e, t = inner.fn, inner.text
    kinds = ["scale", "rel_linear", "softcap", "where", "sigmoid", "exp2_decay", "clamp", "minimum",
             "log_kv", "head_bias"]
    if data_dependent:
        kinds += ["alibi", "rel_table", "pair_bias"]
    kind = draw(st.sampled_from(kinds))
    cap = inner.captured
    if kind == "scale":
        c = draw(st.sampled_from([0.25, 0.5, 1.5, 2.0, -1.0]))
        return _Node(f"({t}) * {c}", lambda s, b, h, q, kv: e(s, b, h, q, kv) * c, cap)
    if kind == "rel_linear":
        c = draw(st.sampled_from([0.01, -0.02, 0.05, 0.1, -0.25]))
        return _Node(f"({t}) + {c} * (q - kv)", lambda s, b, h, q, kv: e(s, b, h, q, kv) + c * (q - kv), cap)
    if kind == "softcap":
        c = draw(st.sampled_from([0.5, 1.0, 2.0, 5.0, 30.0]))
        return _Node(f"{c} * torch.tanh(({t}) / {c})",
                     lambda s, b, h, q, kv: c * torch.tanh(e(s, b, h, q, kv) / c), cap)
    if kind == "where":
        cond = draw(_mask_atom(max_len, max_heads, device, data_dependent))
        c = draw(st.sampled_from([-3.0, -1.0, 0.5, 2.0]))
        if draw(st.booleans()):
            return _Node(f"torch.where({cond.text}, {t}, ({t}) + {c})",
                         lambda s, b, h, q, kv: torch.where(cond.fn(b, h, q, kv), e(s, b, h, q, kv),
                                                            e(s, b, h, q, kv) + c), cap + cond.captured)
        return _Node(f"torch.where({cond.text}, {t}, ({t}) * {c})",
                     lambda s, b, h, q, kv: torch.where(cond.fn(b, h, q, kv), e(s, b, h, q, kv),
                                                        e(s, b, h, q, kv) * c), cap + cond.captured)
    if kind == "sigmoid":
        c = draw(st.sampled_from([1.0, 4.0]))
        return _Node(f"{c} * torch.sigmoid({t})", lambda s, b, h, q, kv: c * torch.sigmoid(e(s, b, h, q, kv)), cap)
    if kind == "exp2_decay":
        c = draw(st.sampled_from([1.0, 4.0, 16.0]))
        return _Node(f"({t}) + torch.exp2(-(q - kv).abs() / {c})",
                     lambda s, b, h, q, kv: e(s, b, h, q, kv) + torch.exp2(-(q - kv).abs() / c), cap)
    if kind == "clamp":
        c = draw(st.sampled_from([0.5, 1.0, 3.0]))
        return _Node(f"({t}).clamp(-{c}, {c})", lambda s, b, h, q, kv: e(s, b, h, q, kv).clamp(-c, c), cap)
    if kind == "minimum":
        c = draw(st.sampled_from([-0.5, 0.0, 1.0]))
        if draw(st.booleans()):
            return _Node(f"torch.minimum({t}, q * 0.0 + {c})",
                         lambda s, b, h, q, kv: torch.minimum(e(s, b, h, q, kv), q * 0.0 + c), cap)
        return _Node(f"torch.maximum({t}, (q - kv) * 0.01)",
                     lambda s, b, h, q, kv: torch.maximum(e(s, b, h, q, kv), (q - kv) * 0.01), cap)
    if kind == "log_kv":
        return _Node(f"({t}) + torch.log((kv + 1).float())",
                     lambda s, b, h, q, kv: e(s, b, h, q, kv) + torch.log((kv + 1).float()), cap)
    if kind == "head_bias":
        c = draw(st.sampled_from([0.5, -0.25]))
        return _Node(f"({t}) + {c} * (h + 1) - b", lambda s, b, h, q, kv: e(s, b, h, q, kv) + c * (h + 1) - b, cap)
    if kind == "alibi":
        sl = draw(st.lists(st.sampled_from([0.0, 0.0625, 0.125, 0.25, 0.5, 1.0]), min_size=max_heads, max_size=max_heads))
        slopes = torch.tensor(sl, dtype=torch.float32).to(device)
        return _Node(f"({t}) - slopes[h] * (q - kv)", lambda s, b, h, q, kv: e(s, b, h, q, kv) - slopes[h] * (q - kv),
                     cap + (("slopes", str(sl)),))
    if kind == "rel_table":
        m = draw(st.integers(1, 16))
        seed = draw(st.integers(0, 2**31 - 1))
        table = _seeded(seed, (max_heads, 2 * m + 1), device)
        return _Node(f"({t}) + table[h, (q - kv).clamp(-{m}, {m}) + {m}]",
                     lambda s, b, h, q, kv: e(s, b, h, q, kv) + table[h, (q - kv).clamp(-m, m) + m],
                     cap + (("table", f"randn({max_heads}, {2 * m + 1}, seed={seed})"),))
    if kind == "pair_bias":
        seed = draw(st.integers(0, 2**31 - 1))
        bias = _seeded(seed, (max_len, max_len), device)
        return _Node(f"({t}) + bias[q, kv]", lambda s, b, h, q, kv: e(s, b, h, q, kv) + bias[q, kv],
                     cap + (("bias", f"randn({max_len}, {max_len}, seed={seed})"),))
    raise AssertionError(kind)


def _score_tree(max_len, max_heads, device, data_dependent, depth):
    @st.composite
    def tree(draw):
        node = _Node("s", lambda s, b, h, q, kv: s)
        steps = draw(st.integers(1, max(1, depth)))
        for _ in range(steps):
            if depth >= 2 and draw(st.integers(0, 4)) == 0:  # occasionally a sum of two branches
                a = draw(_score_step(node, max_len, max_heads, device, data_dependent))
                c = draw(_score_step(node, max_len, max_heads, device, data_dependent))
                node = _Node(f"0.5 * (({a.text}) + ({c.text}))",
                             (lambda fa, fc: lambda s, b, h, q, kv: 0.5 * (fa(s, b, h, q, kv) + fc(s, b, h, q, kv)))(a.fn, c.fn),
                             a.captured + c.captured)
            else:
                node = draw(_score_step(node, max_len, max_heads, device, data_dependent))
        return node

    return tree()


def _finish_score(node: _Node) -> Callable:
    fn = node.fn

    def score_mod(score, b, h, q_idx, kv_idx):
        return fn(score, b, h, q_idx, kv_idx)

    score_mod.__name__ = score_mod.__qualname__ = _describe("score_mod", node)
    score_mod.expr = node.text
    return score_mod


def score_mods(max_len: int = 128, max_heads: int = 4, *, max_depth: int = 2, data_dependent: bool = True,
               device="cpu") -> st.SearchStrategy[Callable]:
    """Random ``score_mod(score, b, h, q_idx, kv_idx)`` functions: 1..``max_depth`` chained steps.

    Steps (``s`` is the score so far): ``s * c``, ``s + c * (q - kv)``, ``c * torch.tanh(s / c)``,
    ``torch.where(cond, s, s + c)`` / ``torch.where(cond, s, s * c)`` (``cond`` a random mask
    atom), ``c * torch.sigmoid(s)``, ``s + torch.exp2(-(q - kv).abs() / c)``, ``s.clamp(-c, c)``,
    ``torch.minimum/maximum``, ``s + torch.log((kv + 1).float())``, ``s + c * (h + 1) - b``;
    with ``data_dependent`` also captured tensors: ``s - slopes[h] * (q - kv)`` (ALiBi-like),
    ``s + table[h, (q - kv).clamp(-m, m) + m]`` and ``s + bias[q, kv]``. With
    ``max_depth >= 2`` a step is sometimes ``0.5 * (step1(s) + step2(s))`` (score used twice).

    Captured tensors are created on ``device``, sized for ``max_len`` and ``max_heads``.
    """
    return _score_tree(max_len, max_heads, device, data_dependent, max_depth).map(_finish_score)


# ---------------------------------------------------------------------------------------------
# the ready-made patterns


@dataclass(frozen=True, repr=False)
class PatternCase:
    """A mask and/or score modifier with a readable name (its repr).

    ``tensors``: the captured tensors by role. ``lengths``: ``None``, or ``(lo, hi)`` when the
    pattern only serves sequence lengths in that range (layout patterns: the sequence must hold
    the whole grid, ``lo = layout.grid_end``, and at most the layout's extra tokens,
    ``hi = len(layout)``); :meth:`fit` adapts a drawn :class:`Shape` to it.
    """

    name: str
    mask_mod: Optional[Callable] = None
    score_mod: Optional[Callable] = None
    tensors: dict = field(default_factory=dict, compare=False)
    lengths: Optional[tuple] = None

    def fit(self, shape: "Shape") -> "Shape":
        """``shape`` with ``Lq`` and ``Lkv`` clamped into :attr:`lengths` (unchanged when None)."""
        if self.lengths is None:
            return shape
        lo, hi = self.lengths
        return shape._replace(Lq=min(max(shape.Lq, lo), hi), Lkv=min(max(shape.Lkv, lo), hi))

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__


def _p():
    from attndsl import patterns  # the project's pattern package (a top-level package next to attndsl)
    return patterns


@st.composite
def _builtin(draw, name: str, max_len: int, max_heads: int, device):
    P = _p()
    if name == "causal":
        return "causal", P.causal, {}
    if name == "causal_bottom_right":
        lq, lkv = draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
        return f"causal_bottom_right({lq}, {lkv})", P.causal_bottom_right(lq, lkv), {}
    if name == "sliding_window":
        causal = draw(st.booleans())
        w = draw(st.one_of(st.integers(1, 16), st.integers(1, max_len)))
        return f"sliding_window({w}, causal={causal})", P.sliding_window(w, causal=causal), {}
    if name == "prefix_lm":
        n = draw(st.integers(0, max_len))
        return f"prefix_lm({n})", P.prefix_lm(n), {}
    if name == "chunked":
        c = draw(st.one_of(st.integers(1, 16), st.integers(1, max_len)))
        causal = draw(st.booleans())
        return f"chunked({c}, causal={causal})", P.chunked(c, causal=causal), {}
    if name == "document":
        ids, lens = _doc_ids(draw, max_len, device)
        causal = draw(st.booleans())
        return f"document(doc_ids_from_lengths({lens}), causal={causal})", P.document(ids, causal=causal), {"doc_ids": ids}
    if name == "alibi":
        if draw(st.booleans()):
            slopes = P.alibi_slopes(max_heads, device=device)
            return f"alibi(alibi_slopes({max_heads}))", P.alibi(slopes), {"slopes": slopes}
        sl = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=max_heads, max_size=max_heads))
        slopes = torch.tensor(sl, dtype=torch.float32).to(device)
        return f"alibi(tensor({sl}))", P.alibi(slopes), {"slopes": slopes}
    if name == "softcap":
        cap = draw(st.sampled_from([0.5, 1.0, 2.0, 5.0, 20.0, 30.0, 50.0]))
        return f"softcap({cap})", P.softcap(cap), {}
    if name == "relative_position_bias":
        m = draw(st.integers(1, 24))
        seed = draw(st.integers(0, 2**31 - 1))
        table = _seeded(seed, (max_heads, 2 * m + 1), device)
        return (f"relative_position_bias(randn({max_heads}, {2 * m + 1}, seed={seed}), {m})",
                P.relative_position_bias(table, m), {"table": table})
    if name == "t5_bucket_bias":
        bidirectional = draw(st.booleans())
        nb = draw(st.sampled_from([4, 8, 16, 32]))
        half = nb // 2 if bidirectional else nb
        md = draw(st.integers(half // 2 + 1, max(half // 2 + 1, 2 * max_len)))
        seed = draw(st.integers(0, 2**31 - 1))
        table = _seeded(seed, (max_heads, nb), device)
        return (f"t5_bucket_bias(randn({max_heads}, {nb}, seed={seed}), {nb}, {md}, bidirectional={bidirectional})",
                P.t5_bucket_bias(table, nb, md, bidirectional=bidirectional), {"table": table})
    if name in LAYOUT_PATTERNS:
        return draw(_layout_pattern(name, max_len))
    raise ValueError(f"unknown pattern {name!r}")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@st.composite
def _grid_and_tile(draw, ndim: int, max_size: int):
    """A grid of ``ndim`` axes with at most ``max_size`` points and a tile that divides it (or None)."""
    max_size = max(max_size, 2)
    if ndim == 1:
        shape = (draw(st.integers(2, max_size)),)
    elif ndim == 2:
        w = draw(st.sampled_from([w for w in (2, 3, 4, 6, 8) if w <= max_size]))
        shape = (draw(st.integers(1, max_size // w)), w)
    else:
        h = draw(st.sampled_from([h for h in (1, 2, 4) if h <= max_size]))
        w = draw(st.sampled_from([w for w in (1, 2, 3, 4) if h * w <= max_size]))
        shape = (draw(st.integers(1, max_size // (h * w))), h, w)
    tile = None
    if ndim > 1 and draw(st.booleans()):
        tile = tuple(draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0])) for n in shape)
    return shape, tile


@st.composite
def _layout_pattern(draw, name: str, max_len: int):
    """Layout patterns (neighborhood, sliding tile, radial) on a grid that, with its extra tokens,
    fits in ``max_len``; the case's ``lengths`` are ``(grid end, len(layout))``."""
    from attndsl.layout import Layout

    budget = draw(st.one_of(st.integers(min(16, max_len), max_len), st.just(max_len)))
    if name == "neighborhood":
        from attndsl.patterns.neighborhood import neighborhood

        nd = draw(st.integers(1, 3))
        prefix = draw(st.integers(0, min(3, budget // 4)))
        suffix = draw(st.integers(0, min(3, budget // 4)))
        shape, tile = draw(_grid_and_tile(nd, budget - prefix - suffix))
        ks, ds, cs = [], [], []
        for n in shape:
            d = draw(st.sampled_from([1, 1, 2])) if n >= 2 else 1
            ks.append(draw(st.integers(1, max(1, n // d))))
            ds.append(d)
            cs.append(draw(st.booleans()))
        extra = draw(st.sampled_from(["global", "isolated"]))
        lay = Layout(shape, tile, prefix=prefix, suffix=suffix)
        mask = neighborhood(lay, tuple(ks), tuple(ds), tuple(cs), extra)
        return (f"neighborhood({lay!r}, kernel_size={tuple(ks)}, dilation={tuple(ds)}, causal={tuple(cs)}, "
                f"extra={extra!r})", mask, {}, (lay.grid_end, len(lay)))
    if name == "sliding_tile":
        from attndsl.patterns.sliding_tile import sliding_tile, sta_layout

        text = draw(st.integers(0, min(4, budget // 4)))
        text_first = draw(st.booleans())
        tile = tuple(draw(st.sampled_from([1, 2, 4])) for _ in range(3))
        vol = tile[0] * tile[1] * tile[2]
        while vol > budget - text:  # shrink the tile until one fits
            tile = tuple(max(1, t // 2) for t in tile)
            vol = tile[0] * tile[1] * tile[2]
        room = (budget - text) // vol
        ch = draw(st.integers(1, max(1, min(3, room))))
        cw = draw(st.integers(1, max(1, min(3, room // ch))))
        ct = draw(st.integers(1, max(1, room // (ch * cw))))
        counts = (ct, ch, cw)
        shape = tuple(c * t for c, t in zip(counts, tile))
        window = tuple(draw(st.integers(1, c)) for c in counts)
        lay = sta_layout(shape, tile, text, text_first)
        return (f"sliding_tile(sta_layout({shape}, {tile}, {text}, text_first={text_first}), {window})",
                sliding_tile(lay, window), {}, (lay.grid_end, len(lay)))
    if name == "radial":
        from attndsl.patterns.radial import radial

        text = draw(st.integers(0, min(3, budget // 4)))
        frames = draw(st.integers(1, max(1, min(8, (budget - text) // 2))))
        n = draw(st.integers(1, max(1, (budget - text) // frames)))
        block = draw(st.sampled_from([1, 2, 4, 8]))
        decay = draw(st.sampled_from([0.5, 1.0, 2.0]))
        model = draw(st.sampled_from(["hunyuan", "wan"]))
        split = draw(st.sampled_from([1, 2, 4, 16, 128]))
        mask = radial(frames, n, block=block, decay=decay, model=model, text_tokens=text, split_threshold=split)
        lay = mask.layout
        return (f"radial({frames}, {n}, block={block}, decay={decay}, model={model!r}, text_tokens={text}, "
                f"split_threshold={split})", mask, {}, (lay.grid_end, len(lay)))
    raise ValueError(f"unknown pattern {name!r}")


#: Layout-based mask patterns (``patterns/neighborhood.py``, ``sliding_tile.py``, ``radial.py``).
LAYOUT_PATTERNS = ("neighborhood", "sliding_tile", "radial")
#: Mask patterns of ``patterns/`` that :func:`patterns` samples.
MASK_PATTERNS = ("causal", "causal_bottom_right", "sliding_window", "prefix_lm", "chunked", "document") + LAYOUT_PATTERNS
#: Score-modifier patterns of ``patterns/`` that :func:`patterns` samples.
SCORE_PATTERNS = ("alibi", "softcap", "relative_position_bias", "t5_bucket_bias")


def patterns(max_len: int = 128, max_heads: int = 4, *, include: Optional[Sequence[str]] = None,
             device="cpu") -> st.SearchStrategy[PatternCase]:
    """The ready-made patterns (``patterns/``) with random parameters, as :class:`PatternCase`.

    Draws one mask pattern and/or one score-modifier pattern from ``include`` (default: all of
    :data:`MASK_PATTERNS` and :data:`SCORE_PATTERNS`); when ``include`` has both kinds, either
    may be left out, never both. Parameters: window/prefix/chunk sizes up to ``max_len``,
    document ids from random document lengths covering ``max_len`` tokens, ALiBi slopes (the
    paper's or random), softcap values, relative-position/T5 bias tables ``[max_heads, ...]``
    from a drawn seed; the layout patterns (NATTEN neighborhood on 1-3-D grids with dilation,
    causal axes and extra tokens, sliding-tile attention, radial attention) on random grids of at
    most ``max_len`` tokens. Layout patterns need sequence lengths that hold their grid: use
    ``case.fit(shape)`` (see :class:`PatternCase`) on a drawn shape before making tensors.
    Captured tensors are created on ``device``.
    """
    names = tuple(include) if include is not None else MASK_PATTERNS + SCORE_PATTERNS
    unknown = set(names) - set(MASK_PATTERNS) - set(SCORE_PATTERNS)
    if unknown or not names:
        raise ValueError(f"unknown pattern names {sorted(unknown)}; known: {MASK_PATTERNS + SCORE_PATTERNS}")
    m_names = [n for n in names if n in MASK_PATTERNS]
    s_names = [n for n in names if n in SCORE_PATTERNS]

    @st.composite
    def case(draw):
        use_m, use_s = bool(m_names), bool(s_names)
        if m_names and s_names:
            which = draw(st.sampled_from(["both", "mask", "score"]))
            use_m, use_s = which in ("both", "mask"), which in ("both", "score")
        parts, tensors, mask_mod, score_mod = [], {}, None, None
        lens = None
        if use_m:
            n, mask_mod, t, *rest = draw(_builtin(draw(st.sampled_from(m_names)), max_len, max_heads, device))
            parts.append(f"mask={n}")
            tensors.update(t)
            lens = rest[0] if rest else None
        if use_s:
            n, score_mod, t = draw(_builtin(draw(st.sampled_from(s_names)), max_len, max_heads, device))
            parts.append(f"score_mod={n}")
            tensors.update(t)
        return PatternCase(", ".join(parts), mask_mod, score_mod, tensors, lens)

    return case()
