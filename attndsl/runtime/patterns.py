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

Immutable value objects are keyed by their value where their type says what it is
(``__attndsl_key__``: a :class:`~attndsl.Layout`, which the locality patterns hold), and attndsl's
own helpers marked ``__attndsl_leaf__`` (``tracing``) by identity. What the walk does not
understand (another object in a closure, a tensor the pattern builds itself or reaches through an
attribute) makes the pattern uncacheable: that call traces it again (correct, slower; logged at
DEBUG on the ``attndsl`` logger).

The walk itself is skipped for *flat* patterns (:class:`FlatWalks`): plain functions whose closure
cells, defaults and named globals hold only constants, tensors, modules, types, builtins, value
objects (a ``Layout``), tuples of those and plain functions of the same kind, followed where met
(:func:`_read`), as the factories' closures do (``document(ids)``, ``sliding_window(256)``, an
ALiBi ``score_mod`` over its slopes, ``neighborhood(layout, 13)`` with its coordinate helpers).
Such a function's walk is fixed by what it reads, object by object, so its result is
kept under the identities of those objects and found again by them; each tensor's keyed
attributes (dtype, rank, ``requires_grad``, device type; shape where the code reads one) are
compared on every call.
"""
from __future__ import annotations

import collections
import functools
import logging
import types
import weakref

import torch

from ..dsl.reach import Uncacheable, Walk as _Walk, code_info as _code_info, is_composed as _is_composed, \
    is_leaf as _is_leaf

log = logging.getLogger("attndsl")

#: patterns kept (least recently used dropped first)
MAX_PATTERNS = 256


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
    leaves = _leaves(mask_mod, score_mod)
    if leaves is not None:
        return leaves, []
    w = _walk(mask_mod, score_mod)
    return tuple(w.parts), w.tensors


class _Key(tuple):
    """A walk's key, hashed once: its parts hold code objects, which Python hashes anew each time
    (a kept walk's key is looked up in the cache on every call). Raises TypeError when a part is
    unhashable."""

    def __new__(cls, parts):
        self = super().__new__(cls, parts)
        self.hash = tuple.__hash__(self)
        return self

    def __hash__(self):
        return self.hash


def _walk_kept(flat: FlatWalks, mask_mod, score_mod) -> tuple[tuple, list[torch.Tensor]]:
    """:func:`walk`, through ``flat`` for flat patterns (their walks kept by what they read)."""
    leaves = _leaves(mask_mod, score_mod)
    if leaves is not None:
        return leaves, []
    got = flat.get(mask_mod, score_mod)
    if got is not None:
        return got
    w = _walk(mask_mod, score_mod)
    key = _Key(w.parts)
    flat.put(mask_mod, score_mod, key, w.tensors, w.shapes)
    return key, w.tensors


#: a name the function's globals do not hold (what the walk skips)
_ABSENT = object()


def _read(fn, objects: list, names: tuple, depth: int = 0, met: set | None = None) -> tuple | None:
    """Append to ``objects`` what the plain function ``fn`` reads besides its code, in the walk's
    order (closure cells, then the globals ``names`` (its code's) holds, ``_ABSENT`` for one not
    set, then defaults, then keyword defaults as name, value), and return ``(code, number of
    defaults, number of keyword defaults, what nested objects read)``; None (what was appended
    left in place) when a cell is not yet assigned, or nesting runs past ``_DEPTH``.

    A plain function or a tuple among them (a locality pattern's helper over its ``Layout``, a
    tuple of window sizes) is followed where it is first met, as the walk does (:func:`_follow`):
    what it reads is appended right after it. What such objects hold is fixed by their identities
    and what is read again here (cells, globals, defaults), so the identities of the objects
    appended decide the walk. One pass, no helper call per object: this runs on every one-shot
    call of a pattern found by identity."""
    if met is None:
        met = set()
    nested: list = []
    cells = fn.__closure__
    if cells is not None:
        for c in cells:
            try:
                x = c.cell_contents
            except ValueError:  # a cell not yet assigned
                return None
            objects.append(x)
            if type(x) in _FOLLOWED and not _follow(x, objects, depth, met, nested):
                return None
    if names:
        g = fn.__globals__
        for n in names:
            x = g.get(n, _ABSENT)
            objects.append(x)
            if type(x) in _FOLLOWED and not _follow(x, objects, depth, met, nested):
                return None
    d, kd = fn.__defaults__, fn.__kwdefaults__
    if d:
        for x in d:
            objects.append(x)
            if type(x) in _FOLLOWED and not _follow(x, objects, depth, met, nested):
                return None
    if kd:
        for k, x in kd.items():
            objects += (k, x)
            if type(x) in _FOLLOWED and not _follow(x, objects, depth, met, nested):
                return None
    # with the lengths: the same objects split otherwise between defaults and keyword defaults walk apart
    return fn.__code__, len(d) if d else 0, len(kd) if kd else 0, tuple(nested)


#: how deep :func:`_read` follows nested functions and tuples (deeper: the walk decides)
_DEPTH = 8
#: the types :func:`_read` may follow (plain functions not marked ``__attndsl_leaf__``, tuples)
_FOLLOWED = frozenset({types.FunctionType, tuple})


def _follow(x, objects: list, depth: int, met: set, nested: list) -> bool:
    """Append what ``x`` (a function or tuple just appended to ``objects``) reads, depth first, and
    its result to ``nested``: ``_read``'s for a function, ``(length, nested results)`` for a tuple;
    ``None`` for one met before in this read (the walk keys it as already seen and does not descend
    again). A library function marked ``__attndsl_leaf__`` is not followed. False: too deep, or a
    cell not yet assigned."""
    if type(x) is types.FunctionType and getattr(x, "__attndsl_leaf__", False):
        return True
    if depth >= _DEPTH:
        return False
    if id(x) in met:
        nested.append(None)
        return True
    met.add(id(x))
    if type(x) is tuple:
        sub: list = []
        for y in x:
            objects.append(y)
            if type(y) in _FOLLOWED and not _follow(y, objects, depth + 1, met, sub):
                return False
        nested.append((len(x), tuple(sub)))
        return True
    got = _read(x, objects, _code_info(x.__code__)[0], depth + 1, met)
    if got is None:
        return False
    nested.append(got)
    return True


def _reads(fn, objects: list) -> tuple | None:
    """:func:`_read` of a plain function, and the identity key of what it read (``_read``'s result
    followed by the objects' ids); None (what was appended is then of no use) for anything but a
    plain function whose cells, and those of the functions it holds, are all set."""
    if type(fn) is not types.FunctionType:
        return None
    n = len(objects)
    got = _read(fn, objects, _code_info(fn.__code__)[0])
    return None if got is None else (*got, *map(id, objects[n:]))


def _both_reads(mask_mod, score_mod) -> tuple | None:
    """(identity key, objects in walk order) of a pair of plain functions (or None); None otherwise."""
    if mask_mod is score_mod:  # one object twice: the walk keys the second as already seen
        return None
    objects: list = []
    a = b = None
    if mask_mod is not None and (a := _reads(mask_mod, objects)) is None:
        return None
    if score_mod is not None and (b := _reads(score_mod, objects)) is None:
        return None
    return (a, b), objects


#: ``_Flat.held``'s place of a tensor (held by weak reference in ``_Flat.where``)
_TENSOR = object()


class _Flat:
    """One flat pattern's walk, kept by :class:`FlatWalks`: the objects it read (held, so their
    identities stay theirs; a tensor's place holds ``_TENSOR``, the tensor itself is held by weak
    reference, so the memo keeps none alive), where the tensors sit among them with the attributes
    the walk keyed, and the walk's key."""

    __slots__ = ("held", "where", "key")

    def tensors(self, objects: list) -> list | None:
        """The tensors of ``objects`` (the walk's, by identity) when each still has the attributes
        it was keyed with; else None."""
        out = []
        for i, ref, dtype, dim, grad, dev, shape in self.where:
            t = objects[i]
            # the whole device, stricter than the walk's device type (a miss walks again), and
            # cheaper to ask for than its type
            if (ref() is not t or t.dtype != dtype or t.dim() != dim or t.requires_grad != grad
                    or t.device != dev or (shape is not None and t.shape != shape)):
                return None
            out.append(t)
        return out


def _flat_of(mask_mod, score_mod, walked: list, shapes: bool) -> tuple | None:
    """``(identity key, _Flat)`` of a flat pattern (see the module docstring) whose walk found the
    tensors ``walked`` (the ``_Flat``'s key left unset; its tensors keyed with their shapes where
    ``shapes``); None for a pattern that is not flat, or whose tensors are not the walk's in the
    walk's order."""
    got = _both_reads(mask_mod, score_mod)
    if got is None:
        return None
    ident, objects = got
    # (functions and tuples among them were followed: what they hold is in ``objects`` too)
    if not all(x is _ABSENT or type(x) in _FOLLOWED or _is_leaf(x) for x in objects):
        return None
    where = [i for i, x in enumerate(objects) if isinstance(x, torch.Tensor)]
    if len(where) != len(walked) or any(objects[i] is not t for i, t in zip(where, walked)):
        return None  # not the walk's tensors in the walk's order: leave it to the walk
    f = _Flat()
    f.held = [_TENSOR if isinstance(x, torch.Tensor) else x for x in objects]
    f.where = [(i, weakref.ref(t), t.dtype, t.dim(), t.requires_grad, t.device, t.shape if shapes else None)
               for i, t in zip(where, walked)]
    return ident, f


class FlatWalks:
    """Walk results of flat patterns by the identities of what they read (see the module docstring).
    A pattern that is not flat (it holds a list, a dict, an object...) is walked in full on every
    call."""

    def __init__(self, size: int = MAX_PATTERNS):
        self.size = size
        self.entries: dict = {}

    def get(self, mask_mod, score_mod) -> tuple | None:
        """``(key, tensors)`` as :func:`walk` gives them, when a flat pattern reading these very
        objects was walked before (tensors keyed alike); None otherwise."""
        got = _both_reads(mask_mod, score_mod)
        if got is None:
            return None
        f = self.entries.get(got[0])
        if f is None:
            return None
        tensors = f.tensors(got[1])
        return None if tensors is None else (f.key, tensors)

    def put(self, mask_mod, score_mod, key: tuple, walked: list, shapes: bool) -> None:
        """Keep a full walk's ``key`` and tensors ``walked`` when the pattern is flat."""
        got = _flat_of(mask_mod, score_mod, walked, shapes)
        if got is None:
            return
        ident, f = got
        f.key = key
        if len(self.entries) >= self.size:
            self.entries.clear()
        self.entries[ident] = f

    def clear(self) -> None:
        self.entries.clear()


class _Same:
    """A pattern met again through functions of the same code as earlier lookups' (the pattern
    cache's first try, :meth:`PatternCache.found`): the very functions, or fresh closures of one
    factory (``document(ids)`` made inside ``forward``). Per function given (mask_mod, score_mod)
    its code (held, in ``fns``: the record is keyed by its ``id``), the global names that code reads and
    ``_read``'s lengths; what the functions read (a flat pattern's objects, :class:`_Flat`, tensors
    keyed with their shapes too); the cache entry they found. Functions of the same code reading the
    same objects (closure cells, globals and defaults, each read again per lookup; tensors with the
    attributes they had) are the same pattern, as the walk would key them; a cell or global
    holding another object, or a tensor changed in dtype, rank, ``requires_grad``, device or shape,
    is a miss (the walk decides)."""

    __slots__ = ("fns", "flat", "entry", "bare")

    @staticmethod
    def make(mask_mod, score_mod, entry, walked: list) -> "_Same":
        """The record of a pattern whose lookup found ``entry`` with the tensors ``walked``; one
        with ``flat`` None where the pattern is not flat (plain functions reading only what the walk
        keys by identity): it finds nothing, and spares later lookups the question."""
        s = _Same()
        s.entry = entry
        if mask_mod is None and score_mod is None:
            s.flat, s.fns, s.bare = _Flat(), (), entry.compiled
            s.flat.held, s.flat.where = [], []
            return s
        got = _flat_of(mask_mod, score_mod, walked, True)
        s.flat = None if got is None else got[1]
        fns = []
        for i, fn in enumerate((mask_mod, score_mod)):
            if fn is not None:
                names = _code_info(fn.__code__)[0]
                lengths = _read(fn, [], names)
                # reads nothing (no cells: fixed by the code; no globals named; no defaults)
                empty = not names and fn.__closure__ is None and lengths[1:3] == (0, 0)
                fns.append((i, fn.__code__, names, lengths, empty))
        s.fns = tuple(fns)
        # nothing read but unset globals: no list of objects to compare, nothing to bind
        s.bare = entry.compiled if s.flat is not None and all(h is _ABSENT for h in s.flat.held) else None
        return s

    def found(self, mask_mod, score_mod) -> tuple | None:
        """``(compiled, tensors bound now)`` when these functions still read what they read; else None."""
        flat = self.flat
        if flat is None:
            return None
        objects: list = []
        for i, code, names, lengths, empty in self.fns:
            fn = score_mod if i else mask_mod
            if fn.__code__ is not code:
                return None
            if empty and fn.__defaults__ is None and fn.__kwdefaults__ is None:
                continue
            if _read(fn, objects, names) != lengths:
                return None
        held = flat.held
        if len(objects) != len(held):
            return None
        bare = self.bare
        if bare is not None:  # every object read was an unset global's _ABSENT
            for x in objects:
                if x is not _ABSENT:
                    return None
            return bare, []
        for x, h in zip(objects, held):
            if x is not h and h is not _TENSOR:
                return None
        tensors = flat.tensors(objects) if flat.where else []
        if tensors is None:
            return None
        e = self.entry
        return e.compiled, e.bind(tensors) if e.slots else []


def _leaves(mask_mod, score_mod) -> tuple | None:
    """The walk's key where each function is a *leaf* (or None): a plain function with no closure
    cells or defaults whose code reads no shape and names no global that is set now
    (``q_idx >= kv_idx``): its key part is its code alone, and it holds no tensor. None where one
    is not: the full walk decides. (The full walk of such a pair gives this same key.)"""
    if mask_mod is score_mod:  # one object twice: the walk keys the second as already seen
        return None
    for fn in (mask_mod, score_mod):  # the cheap refusals of both first (a closure score_mod is common)
        if fn is not None and (type(fn) is not types.FunctionType or fn.__closure__ is not None
                               or fn.__defaults__ is not None or fn.__kwdefaults__ is not None):
            return None
    parts = []
    for fn in (mask_mod, score_mod):
        if fn is None:
            parts.append(None)
            continue
        code = fn.__code__
        names, shapes = _code_info(code)
        if shapes:
            return None
        if names:
            g = fn.__globals__
            for n in names:
                if n in g:
                    return None
        parts.append(("fn", code))
    return tuple(parts)


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
    """An LRU map from (pattern key, compile options) to :class:`Entry`, searched first by the
    identities of the pattern's functions where they are flat (:class:`_Same`)."""

    def __init__(self, size: int = MAX_PATTERNS):
        self.size = size
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.hits = self.misses = self.uncacheable = 0
        self.flat = FlatWalks()
        #: (id of mask_mod's code, id of score_mod's code, options) -> [_Same, ...], for functions of
        #: codes met in two walks (the very functions, or closures a factory makes afresh per call)
        self.same: dict = {}
        #: the same key -> the codes (held), for codes met in one walk: a pattern met once is not
        #: recorded
        self.seen: dict = {}

    def found(self, mask_mod, score_mod, options: tuple) -> tuple | None:
        """``(compiled, tensors)`` of an earlier lookup of these very functions that still read
        what they read then (:class:`_Same`); None: :meth:`lookup` decides."""
        if type(mask_mod) not in _PLAIN_OR_NONE or type(score_mod) not in _PLAIN_OR_NONE:
            return None
        recs = self.same.get(_ident(_codes(mask_mod, score_mod), options))
        if recs is None:
            return None
        for s in recs:
            # no functions: nothing to check (a fresh list each time: callers may keep it)
            got = (s.bare, []) if not s.fns else s.found(mask_mod, score_mod)
            if got is not None:
                self.hits += 1
                return got
        return None

    def lookup(self, mask_mod, score_mod, options: tuple, make):
        """``(compiled, tensors)`` for this call: a cached compiled pattern with the tensors the
        functions hold now, or ``make()``'s fresh one (cached when its tensors can be bound)."""
        got = self.found(mask_mod, score_mod, options)
        if got is not None:
            return got
        try:
            key, tensors = _walk_kept(self.flat, mask_mod, score_mod)
            key = (key, options)
            e = self.entries.get(key)  # hashes the key: TypeError when something in it is unhashable
        except (Uncacheable, TypeError, RecursionError) as e:
            self.uncacheable += 1
            log.debug("attndsl: pattern %r/%r not cached (%s); traced for this call", mask_mod, score_mod, e)
            c = make()
            return c, c.tensors
        if e is not None:
            sized = getattr(e.compiled, "sized", None)
            if sized and any(tuple(tensors[e.slots[i]].shape) != shape for i, shape in sized.items()):
                e = None  # the IR unrolled a dimension of a tensor whose size differs now: trace again
            else:
                self.hits += 1
                self.entries.move_to_end(key)
                self._met(mask_mod, score_mod, options, e, tensors)
                return e.compiled, e.bind(tensors) if e.slots else []
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
        self._met(mask_mod, score_mod, options, e, tensors)
        return c, e.bind(tensors)

    def _met(self, mask_mod, score_mod, options: tuple, e: Entry, tensors: list) -> None:
        """Functions that found ``e`` (with the walk's ``tensors``) by a walk: recorded by their
        codes (:class:`_Same`) the second time codes are met; once recorded, each walk of those
        codes (other objects in their cells or globals: ``sliding_window(128)`` beside
        ``sliding_window(4096)``, a rebound global) adds a record, the newest first, up to
        ``SAME_PER_CODE``."""
        if type(mask_mod) not in _PLAIN_OR_NONE or type(score_mod) not in _PLAIN_OR_NONE:
            return
        codes = _codes(mask_mod, score_mod)
        ident = _ident(codes, options)
        recs = self.same.get(ident)
        if recs is not None:
            if recs[0].flat is None:
                return  # not flat: the walk decides every time
            new = _Same.make(mask_mod, score_mod, e, tensors)
            # (a new list, not changed in place: another thread may be reading the old one)
            self.same[ident] = [new] if new.flat is None else [new, *recs[:SAME_PER_CODE - 1]]
            return
        if ident not in self.seen:  # (its codes are held: an id in the key is theirs)
            if len(self.seen) >= 4 * self.size:
                self.seen.clear()
            self.seen[ident] = codes
            return
        self.seen.pop(ident, None)
        if len(self.same) >= self.size:
            self.same.clear()
        self.same[ident] = [_Same.make(mask_mod, score_mod, e, tensors)]

    def clear(self) -> None:
        self.entries.clear()
        self.flat.clear()
        self.same.clear()
        self.seen.clear()
        self.hits = self.misses = self.uncacheable = 0


#: records (:class:`_Same`) kept per pair of codes: patterns of one factory met with that many
#: different held objects in turn are all found without a walk
SAME_PER_CODE = 8
#: the function types :class:`_Same` records (``None``: no function)
_PLAIN_OR_NONE = (types.FunctionType, type(None))


def _codes(mask_mod, score_mod) -> tuple:
    """The code objects of the two functions (None for a missing one)."""
    return (None if mask_mod is None else mask_mod.__code__, None if score_mod is None else score_mod.__code__)


def _ident(codes: tuple, options: tuple) -> tuple:
    """The key of :attr:`PatternCache.same` and ``seen``: the codes' ids and the options."""
    return (None if codes[0] is None else id(codes[0]), None if codes[1] is None else id(codes[1]), options)


PATTERNS = PatternCache()
