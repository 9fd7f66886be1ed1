"""What a pattern's functions reach: one walk over their closure cells, the globals their code
names, their defaults, and the functions, containers, composed patterns (``attndsl.mask``) and
modules found there, collecting the tensors held and a structural key of everything else.

Two users: the pattern cache (``runtime/patterns.py``: the key finds a traced pattern again, the
tensors are bound per call) and the capture (``dsl/capture.py``: the devices of the tensors a
pattern holds decide where its trace's indices live, :func:`held_tensors`).
"""
from __future__ import annotations

import functools
import types

import torch

#: names whose presence in a pattern's code makes the key include captured tensors' full shapes
#: (the trace may bake a size into the IR: ``kv_idx % t.shape[0]``)
_SHAPE_NAMES = frozenset({"shape", "size", "numel", "len", "nelement", "dim", "ndim", "ndimension"})
_CONST_TYPES = frozenset({int, float, bool, str, bytes, complex, type(None), type(Ellipsis), torch.dtype, torch.device,
                          torch.layout, torch.memory_format})


class Uncacheable(Exception):
    """The walk met something it cannot key: trace this call afresh."""


@functools.lru_cache(maxsize=4096)
def code_info(code: types.CodeType) -> tuple[tuple[str, ...], bool]:
    """(names the code and its nested code objects look up, whether any reads a shape)."""
    names: list[str] = []
    stack = [code]
    while stack:
        c = stack.pop()
        names.extend(c.co_names)
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    uniq = tuple(dict.fromkeys(names))
    return uniq, bool(_SHAPE_NAMES.intersection(uniq))


class Walk:
    """One walk over a pattern's reachable Python state: ``key`` parts and the tensors in order.

    ``strict`` (the pattern cache's walk): an object it cannot key raises :class:`Uncacheable`.
    Otherwise (``held_tensors``) such an object is an opaque part: its ``fn`` is walked when it is
    a callable with one (a wrapper of a pattern function), nothing else of it."""

    __slots__ = ("parts", "tensors", "seen", "shapes", "path", "paths", "strict")

    def __init__(self, track: bool = False, strict: bool = True):
        self.strict = strict
        self.parts: list = []
        self.tensors: list[torch.Tensor] = []
        self.seen: dict[int, int] = {}
        self.shapes = False
        # with ``track``: the path from the roots to each tensor (``follow`` walks it again)
        self.path: list | None = [] if track else None
        self.paths: list[tuple] = []

    def sub(self, step: tuple, x, names) -> None:
        if self.path is None:
            self.value(x, names)
        else:
            self.path.append(step)
            self.value(x, names)
            self.path.pop()

    def value(self, x, names: tuple[str, ...]) -> None:
        parts = self.parts
        t = type(x)
        if t in _CONST_TYPES:
            # typed: 1, 1.0 and True are equal in Python but trace differently; float.hex tells
            # -0.0 from 0.0 and keys nan
            parts.append((t, x.hex() if t is float else x))
            return
        if isinstance(x, torch.Tensor):
            parts.append(("T", x.dtype, x.dim(), x.requires_grad, x.device.type, len(self.tensors)))
            self.tensors.append(x)
            if self.path is not None:
                self.paths.append(tuple(self.path))
            return
        i = self.seen.get(id(x))
        if i is not None:  # cycles and shared objects (a recursive function, one tensor twice)
            parts.append(("seen", i))
            return
        self.seen[id(x)] = len(parts)
        if t is types.FunctionType:
            if getattr(x, "__attndsl_leaf__", False):  # a library function: keyed by identity
                parts.append(("builtin", x))
            else:
                self.function(x)
        elif t in (tuple, list):
            parts.append((t, len(x)))
            for i, y in enumerate(x):
                self.sub(("item", i), y, names)
        elif t is dict:
            parts.append((dict, len(x)))
            for k, y in x.items():
                self.value(k, names)
                self.sub(("item", k), y, names)
        elif t is functools.partial:
            parts.append(("partial", len(x.args), tuple(sorted(x.keywords))))
            self.sub(("attr", "func"), x.func, names)
            for i, y in enumerate(x.args):
                self.sub(("arg", i), y, names)
            for k, y in x.keywords.items():
                self.sub(("kw", k), y, names)
        elif t is types.MethodType:  # a bound method: its function, and the object's attributes it names
            parts.append(("method",))
            self.sub(("attr", "__func__"), x.__func__, names)
            self.sub(("attr", "__self__"), x.__self__, code_info(x.__func__.__code__)[0]
                     if isinstance(x.__func__, types.FunctionType) else names)
        elif isinstance(x, types.ModuleType):
            parts.append(("module", x.__name__))
        elif isinstance(x, type):
            parts.append(("type", x))
        elif is_composed(x):  # attndsl.mask / score_mod objects: their function and name
            parts.append(("composed", t, x.__name__))
            self.sub(("attr", "fn"), x.fn, names)
        elif isinstance(x, (types.BuiltinFunctionType, types.MethodWrapperType)) or _is_torch_callable(x):
            parts.append(("builtin", x))  # torch.where, math.exp, ...: hashable, keyed by identity
        elif _value_key(t) is not None:  # an immutable value object (a Layout): keyed by its value
            parts.append(("value", t, x.__attndsl_key__()))
        elif isinstance(x, torch.nn.Module):
            # a module the pattern reads attributes of (``self.slopes[h]``): the attributes its code names
            parts.append(("nn", t))
            d = x.__dict__
            for n in names:
                if n in x._parameters or n in x._buffers or n in x._modules or n in d:
                    parts.append(n)
                    self.sub(("attr", n), getattr(x, n), names)
        elif self.strict:
            raise Uncacheable(f"{t.__module__}.{t.__qualname__} object")
        else:
            parts.append(("opaque", t))
            inner = getattr(x, "fn", None) if callable(x) else None
            if inner is not None and inner is not x:
                self.sub(("attr", "fn"), inner, names)

    def function(self, fn) -> None:
        code = fn.__code__
        names, shapes = code_info(code)
        self.shapes |= shapes
        self.parts.append(("fn", code))
        cells = fn.__closure__ or ()
        for i, c in enumerate(cells):
            try:
                v = c.cell_contents
            except ValueError:  # a cell not yet assigned (a function defined before its helper)
                self.parts.append(("empty-cell",))
                continue
            self.sub(("cell", i), v, names)
        g = fn.__globals__
        for n in names:
            if n in g:
                self.parts.append(n)
                self.sub(("global", n), g[n], names)
        if fn.__defaults__:
            self.sub(("attr", "__defaults__"), fn.__defaults__, names)
        if fn.__kwdefaults__:
            self.sub(("attr", "__kwdefaults__"), fn.__kwdefaults__, names)


def is_leaf(x) -> bool:
    """Does the walk key ``x`` without looking inside it (a constant, a tensor, a module, a type, a
    value object, a library function marked ``__attndsl_leaf__``, a builtin or torch callable:
    ``Walk.value``'s branches that descend nowhere)? Such
    an object's key part is fixed by its identity (a tensor's: by its keyed attributes besides)."""
    t = type(x)
    if t in _CONST_TYPES or isinstance(x, (torch.Tensor, types.ModuleType, type)) or _value_key(t) is not None:
        return True
    if t is types.FunctionType and getattr(x, "__attndsl_leaf__", False):
        return True
    if t in (types.FunctionType, tuple, list, dict, functools.partial, types.MethodType) or is_composed(x):
        return False
    return isinstance(x, (types.BuiltinFunctionType, types.MethodWrapperType)) or _is_torch_callable(x)


def _value_key(t: type):
    """The ``__attndsl_key__`` of type ``t``: immutable value objects a pattern may hold (a
    :class:`~attndsl.Layout`) define it to return a hashable tuple of constants that fixes
    everything a trace reads of them; None for other types."""
    return getattr(t, "__attndsl_key__", None)


def is_composed(x) -> bool:
    """An ``attndsl.mask``/``score_mod`` composition (walked through its ``fn``)."""
    from .compose import Mask, ScoreMod
    return isinstance(x, (Mask, ScoreMod))


def _is_torch_callable(x) -> bool:
    # torch functions (C builtins, overload packets, ...) are process-wide constants
    return getattr(type(x), "__module__", "").startswith("torch") and callable(x) and _hashable(x)


def _hashable(x) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def held_tensors(fn) -> list[torch.Tensor]:
    """The tensors ``fn`` holds (closure cells, defaults, the globals its code names, through nested
    functions, composed patterns, containers, partials, bound methods and module attributes its code
    names), in walk order; objects the walk cannot key are skipped (their ``fn`` followed)."""
    w = Walk(strict=False)
    w.value(fn, ())
    return w.tensors
