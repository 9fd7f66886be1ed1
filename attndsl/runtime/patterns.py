"""The pattern cache: ``attndsl.attention`` traces and analyses a pattern once, not per call.

A pattern (``mask_mod``/``score_mod``) is found again by its *structure*: the code objects of the
functions, the Python constants they read (closure cells, the globals their code names, defaults;
ints, floats, bools, strings, ``None``, dtypes, tuples/lists/dicts of those, nested functions
recursively) and, for each tensor they read, its dtype, rank and ``requires_grad`` (its shape
too when the code reads a shape). Never the tensor's values: captured tensors are *bound per call*
(the walk that computes the key also collects the tensors the function holds now), so a closure
cell or a global rebound to another tensor is what the kernels read, and an in-place change is
seen. A fresh closure from the same factory with the same constants (``sliding_window(256)`` made
inside ``forward``) finds the same entry.

What the walk does not understand (an arbitrary object in a closure, a tensor the pattern builds
itself or reaches through an attribute) makes the pattern uncacheable: that call traces it again
(correct, slower; logged at DEBUG on the ``attndsl`` logger).
"""
from __future__ import annotations

import collections
import functools
import logging
import types

import torch

log = logging.getLogger("attndsl")

#: patterns kept (least recently used dropped first)
MAX_PATTERNS = 256
#: names whose presence in a pattern's code makes the key include captured tensors' full shapes
#: (the trace may bake a size into the IR: ``kv_idx % t.shape[0]``)
_SHAPE_NAMES = frozenset({"shape", "size", "numel", "len", "nelement", "dim", "ndim", "ndimension"})
_CONST_TYPES = frozenset({int, float, bool, str, bytes, complex, type(None), type(Ellipsis), torch.dtype, torch.device,
                          torch.layout, torch.memory_format})


class Uncacheable(Exception):
    """The walk met something it cannot key: trace this call afresh."""


@functools.lru_cache(maxsize=4096)
def _code_info(code: types.CodeType) -> tuple[tuple[str, ...], bool]:
    """(names the code and its nested code objects look up, whether any reads a shape)."""
    names: list[str] = []
    stack = [code]
    while stack:
        c = stack.pop()
        names.extend(c.co_names)
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    uniq = tuple(dict.fromkeys(names))
    return uniq, bool(_SHAPE_NAMES.intersection(uniq))


class _Walk:
    """One walk over a pattern's reachable Python state: ``key`` parts and the tensors in order."""

    __slots__ = ("parts", "tensors", "seen", "shapes", "path", "paths")

    def __init__(self, track: bool = False):
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
            self.sub(("attr", "__self__"), x.__self__, _code_info(x.__func__.__code__)[0]
                     if isinstance(x.__func__, types.FunctionType) else names)
        elif isinstance(x, types.ModuleType):
            parts.append(("module", x.__name__))
        elif isinstance(x, type):
            parts.append(("type", x))
        elif _is_composed(x):  # attndsl.mask / score_mod objects: their function and name
            parts.append(("composed", t, x.__name__))
            self.sub(("attr", "fn"), x.fn, names)
        elif isinstance(x, (types.BuiltinFunctionType, types.MethodWrapperType)) or _is_torch_callable(x):
            parts.append(("builtin", x))  # torch.where, math.exp, ...: hashable, keyed by identity
        elif isinstance(x, torch.nn.Module):
            # a module the pattern reads attributes of (``self.slopes[h]``): the attributes its code names
            parts.append(("nn", t))
            d = x.__dict__
            for n in names:
                if n in x._parameters or n in x._buffers or n in x._modules or n in d:
                    parts.append(n)
                    self.sub(("attr", n), getattr(x, n), names)
        else:
            raise Uncacheable(f"{t.__module__}.{t.__qualname__} object")

    def function(self, fn) -> None:
        code = fn.__code__
        names, shapes = _code_info(code)
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


def _is_composed(x) -> bool:
    from ..dsl.compose import Mask, ScoreMod
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


def _walk(mask_mod, score_mod, track: bool = False) -> _Walk:
    w = _Walk(track)
    for i, fn in enumerate((mask_mod, score_mod)):
        if fn is None:
            w.parts.append(None)
        elif isinstance(fn, (types.FunctionType, types.MethodType, functools.partial)) or _is_composed(fn):
            w.sub(("item", i), fn, ())
        else:  # a callable object: its state is opaque
            raise Uncacheable(f"{type(fn).__name__} object as a pattern")
    if w.shapes:  # the trace may have read a size: key on every captured tensor's shape
        w.parts.append(tuple(tuple(t.shape) for t in w.tensors))
    return w


def walk(mask_mod, score_mod) -> tuple[tuple, list[torch.Tensor]]:
    """The structural key of a (mask_mod, score_mod) pair and the tensors it reads now, in walk
    order. Raises :class:`Uncacheable` when something reachable cannot be keyed."""
    w = _walk(mask_mod, score_mod)
    return tuple(w.parts), w.tensors


def paths_of(mask_mod, score_mod, traced: list[torch.Tensor]) -> tuple | None:
    """For each traced tensor, the path from ``(mask_mod, score_mod)`` to where it is held (see
    :func:`follow`); None when one is not reachable (or the pattern cannot be walked)."""
    try:
        w = _walk(mask_mod, score_mod, track=True)
    except (Uncacheable, RecursionError):
        return None
    slots = _slots_of(traced, w.tensors)
    return None if slots is None else tuple(w.paths[i] for i in slots)


def follow(roots, path: tuple):
    """The object at ``path`` from ``roots`` (plain attribute and item access: dynamo traces it, so
    under torch.compile the tensor becomes a graph input bound per call)."""
    x = roots
    for kind, a in path:
        if kind == "item":
            x = x[a]
        elif kind == "cell":
            x = x.__closure__[a].cell_contents
        elif kind == "global":
            x = x.__globals__[a]
        elif kind == "attr":
            x = getattr(x, a)
        elif kind == "arg":
            x = x.args[a]
        else:  # "kw"
            x = x.keywords[a]
    return x


class Entry:
    """A cached pattern: its compiled form and, for each of its captured-tensor slots, the index
    of that tensor in the walk's tensor list (``bind`` maps a new walk's tensors to slots)."""

    __slots__ = ("compiled", "slots")

    def __init__(self, compiled, slots: tuple[int, ...]):
        self.compiled, self.slots = compiled, slots

    def bind(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tensors[i] for i in self.slots]


def _slots_of(traced: list[torch.Tensor], walked: list[torch.Tensor]) -> tuple[int, ...] | None:
    """Where each traced tensor sits in the walk (by identity; an alias with the same storage,
    shape, strides and dtype, for tracers that capture a detached view). None: one is missing."""
    by_id = {}
    for i, t in enumerate(walked):
        by_id.setdefault(id(t), i)
    out = []
    for t in traced:
        i = by_id.get(id(t))
        if i is None:
            i = next((j for j, u in enumerate(walked)
                      if u.dtype == t.dtype and u.shape == t.shape and u.stride() == t.stride()
                      and u.device == t.device and u.data_ptr() == t.data_ptr()), None)
            if i is None:
                return None
        out.append(i)
    return tuple(out)


class PatternCache:
    """An LRU map from (pattern key, compile options) to :class:`Entry`."""

    def __init__(self, size: int = MAX_PATTERNS):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = self.uncacheable = 0

    def lookup(self, mask_mod, score_mod, options: tuple, make):
        """``(compiled, tensors)`` for this call: a cached compiled pattern with the tensors the
        functions hold now, or ``make()``'s fresh one (cached when its tensors can be bound)."""
        try:
            key, tensors = walk(mask_mod, score_mod)
            key = (key, options)
            e = self.entries.get(key)  # hashes the key: TypeError when something in it is unhashable
        except (Uncacheable, TypeError, RecursionError) as e:
            self.uncacheable += 1
            log.debug("attndsl: pattern %r/%r not cached (%s); traced for this call", mask_mod, score_mod, e)
            c = make()
            return c, c.tensors
        sized = getattr(e.compiled, "sized", None) if e is not None else None
        if sized and any(tuple(tensors[e.slots[i]].shape) != shape for i, shape in sized.items()):
            e = None  # the IR unrolled a dimension of a tensor whose size differs now: trace again
        if e is not None:
            self.hits += 1
            self.entries.move_to_end(key)
            return e.compiled, e.bind(tensors)
        self.misses += 1
        c = make()
        slots = _slots_of(c.tensors, tensors)
        if slots is None:
            self.uncacheable += 1
            log.debug("attndsl: pattern %r/%r reads a tensor it does not hold in a closure, global or "
                      "default; traced for every call", mask_mod, score_mod)
            return c, c.tensors
        e = self.entries[key] = Entry(c, slots)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        log.debug("attndsl: pattern %r/%r traced and cached (%d cached)", mask_mod, score_mod, len(self.entries))
        return c, e.bind(tensors)

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = self.uncacheable = 0


PATTERNS = PatternCache()
