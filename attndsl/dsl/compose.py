"""The native DSL surface: decorated masks and score modifiers that compose.

``@attndsl.mask`` functions combine with ``& | ~``; ``@attndsl.score_mod`` functions chain with
``>>`` (left first). Composed patterns stay plain callables, so they work with tensors too (for
example with FlexAttention), and they fuse into one kernel when traced.
"""
from __future__ import annotations

import functools


class Mask:
    def __init__(self, fn, name=None):
        self.fn = fn
        self.__name__ = name or getattr(fn, "__name__", "mask")
        functools.update_wrapper(self, fn, updated=()) if hasattr(fn, "__code__") else None

    def __call__(self, b, h, q_idx, kv_idx):
        return self.fn(b, h, q_idx, kv_idx)

    def __and__(self, other):
        return and_masks(self, other)

    def __or__(self, other):
        return or_masks(self, other)

    def __invert__(self):
        return not_mask(self)

    def __repr__(self):
        return f"Mask({self.__name__})"


class ScoreMod:
    def __init__(self, fn, name=None):
        self.fn = fn
        self.__name__ = name or getattr(fn, "__name__", "score_mod")
        functools.update_wrapper(self, fn, updated=()) if hasattr(fn, "__code__") else None

    def __call__(self, score, b, h, q_idx, kv_idx):
        return self.fn(score, b, h, q_idx, kv_idx)

    def __rshift__(self, other):
        return chain(self, other)

    def __repr__(self):
        return f"ScoreMod({self.__name__})"


def mask(fn) -> Mask:
    """Decorator: ``@attndsl.mask def local(b, h, q, kv): ...`` gives a composable mask."""
    return fn if isinstance(fn, Mask) else Mask(fn)


def score_mod(fn) -> ScoreMod:
    """Decorator: a composable score modifier (``a >> b`` applies ``a`` then ``b``)."""
    return fn if isinstance(fn, ScoreMod) else ScoreMod(fn)


def and_masks(*masks) -> Mask:
    if not masks:
        raise ValueError("and_masks needs at least one mask")

    def both(b, h, q, kv):
        r = masks[0](b, h, q, kv)
        for m in masks[1:]:
            r = r & m(b, h, q, kv)
        return r

    return Mask(both, "(" + " & ".join(getattr(m, "__name__", "?") for m in masks) + ")")


def or_masks(*masks) -> Mask:
    if not masks:
        raise ValueError("or_masks needs at least one mask")

    def either(b, h, q, kv):
        r = masks[0](b, h, q, kv)
        for m in masks[1:]:
            r = r | m(b, h, q, kv)
        return r

    return Mask(either, "(" + " | ".join(getattr(m, "__name__", "?") for m in masks) + ")")


def not_mask(m) -> Mask:
    return Mask(lambda b, h, q, kv: ~m(b, h, q, kv), f"~{getattr(m, '__name__', '?')}")


def chain(*mods) -> ScoreMod:
    """Apply score modifiers left to right."""
    if not mods:
        raise ValueError("chain needs at least one score modifier")

    def chained(score, b, h, q, kv):
        for m in mods:
            score = m(score, b, h, q, kv)
        return score

    return ScoreMod(chained, " >> ".join(getattr(m, "__name__", "?") for m in mods))
