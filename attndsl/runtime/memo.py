"""The launch memo: a kernel launch whose every decision but the call's own tensors was taken once
for its call key (tiles, grid, constants, argument specialisation, the key-fixed arguments).

A runner keys its calls by what fixes those decisions (dtypes, shapes, strides, 16-byte alignment;
``Runner.call_key``). The first call of a key decides, fills the kernel's arguments by name
(``marshal.fill``), launches and keeps a :class:`Memo`: the prepared launch and the argument list
with the key-fixed values in place. A later call of the key only puts its own values (tensors,
scale) into their slots and relaunches (``Memo.args``): no dict walk, no specialisation. The dense
kernels' signatures lead with a call's own values (``passes/lower.py``), so there the arguments are
one list, ``[*own values, *the memoised rest]``.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import triton

#: memoised launches kept per runner before the memo starts over (one per kernel and call key)
MEMO_SIZE = 256
#: check every memoised launch against a fresh computation of its grid, constants and arguments
#: (``Runner._launch``); the test suite turns it on. Modules bind it at import: a test patches the
#: module whose launches it means (``launch.VERIFY_MEMO``, ``sparse.VERIFY_MEMO``, ...)
VERIFY_MEMO = os.environ.get("ATTNDSL_VERIFY_MEMO", "0") == "1"
#: call plans kept per holder (a compiled pattern, the torch.library ops) before the map starts over
MAX_PLANS = 256


class Plans(dict):
    """``call key -> plan`` of one holder (a compiled pattern's call plans, ``attndsl.api``; the
    ops' prepared launches, ``runtime/op.py``; a token selector's, ``selectors/sparse.py``), for the
    runners in ``runners``: a holder whose runners are replaced (a copy with runners of its own,
    ``attndsl.autotune`` installing entries) starts a map of its own."""

    def __init__(self, runners: dict):
        super().__init__()
        self.runners = runners


def plan_key(tensors, query, key, value, scale, return_lse, sinks=None, bias_factors=None) -> tuple | None:
    """What the input checks of a call (no sigmoid bias or tables) depend on, and what fixes its
    launches: each tensor's shape, strides, dtype, device and 16-byte alignment (inputs, captured
    tensors, sinks, low-rank factors), the scale's sign, ``return_lse``. None: a call the checks
    must see every time (tensors of other types, a scale that is not a finite Python number,
    ``bias_factors`` that are not a pair of tensors)."""
    if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(value) is not torch.Tensor:
        return None
    if scale is not None and (type(scale) not in (float, int) or not math.isfinite(scale)):
        return None
    # size(), not .shape: the same torch.Size at two thirds of the host time
    got = (query.size(), query.stride(), query.dtype, query.device, query.data_ptr() & 15,
           key.size(), key.stride(), key.dtype, key.device, key.data_ptr() & 15,
           value.size(), value.stride(), value.dtype, value.device, value.data_ptr() & 15,
           scale is None or scale > 0, return_lse)
    if tensors:
        got += tuple([x for t in tensors for x in (t.size(), t.stride(), t.dtype, t.device, t.data_ptr() & 15)])
    if sinks is None and bias_factors is None:  # the common call
        return (*got, None)
    extra = (sinks,) if bias_factors is None else (sinks, *bias_factors) if type(bias_factors) is tuple else ()
    if len(extra) not in (1, 3):
        return None
    for t in extra:
        if t is None:
            got += (None,)
        elif type(t) in _PLAIN_TENSORS:
            got += (t.size(), t.stride(), t.dtype, t.device, t.data_ptr() & 15)
        else:
            return None
    return got


#: tensor types whose metadata a plan key may stand for (sinks and factors are often parameters)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def tensor_key(t) -> tuple:
    """What of a tensor fixes a launch's arguments and their specialisation, but its address."""
    return (t.dtype, t.size(), t.stride(), t.data_ptr() & 15)  # size(): .shape at 2/3 of the time


def arg_classes(args) -> tuple:
    """The launch arguments as Triton tells them apart when it specialises a kernel (and stricter):
    tensors by dtype and 16-byte alignment, integers by ``== 1``, divisibility by 16 and width."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, bool) or a is None:
            out.append(a)
        elif isinstance(a, int):
            out.append(("i", a == 1, a % 16 == 0, -2**31 <= a < 2**31))
        elif isinstance(a, float):
            out.append("f")
        else:
            out.append(a)
    return tuple(out)


@dataclass
class Memo:
    """A launch whose every decision but the call's own values was taken once for its call key."""

    launch: object  # args -> None
    template: list  # the kernel's arguments in signature order, as the memoising call filled them (own slots: None)
    slots: tuple  # (names, positions): where each of a call's own values goes in ``template``
    check: tuple | None  # (grid, constants, arg_classes) when the runner verifies its memo
    allocator: bool  # needs Triton's scratch allocator set (device-side descriptors, not Direct)
    #: the tiles launched (``TileConfig``): a block-table call takes the table of these tiles
    cfg: object = None
    #: ``arg_classes`` of the block-table arguments the memo was made with (None: no tables)
    table_classes: tuple | None = None
    #: ``template`` after the call's own values, when they lead it in order; else None
    rest: list | None = None

    def __post_init__(self):
        # the memoising call's own tensors are not kept: a memo made during a CUDA-graph warm-up or
        # capture would otherwise hold memory of the graph's pool (every later call brings its own)
        own = set(self.slots[1])
        self.template = [None if i in own else a for i, a in enumerate(self.template)]
        if self.slots[1] == tuple(range(len(self.slots[1]))):
            self.rest = self.template[len(self.slots[1]):]

    def args(self, own: dict) -> list:
        """The launch's arguments for a call whose own values (by name, in the memoising call's
        order: ``slots``) are ``own``."""
        if self.rest is not None:
            return [*own.values(), *self.rest]
        args = self.template.copy()
        for i, a in zip(self.slots[1], own.values()):
            args[i] = a
        return args

    def between(self, lead: tuple, tail: tuple = ()) -> list | None:
        """The memoised arguments between a call's leading own values (named ``lead``) and its
        trailing ones (``tail``: a block table's, which end the dense kernels' runtime arguments),
        when those are exactly this memo's own slots; else None."""
        names, pos = self.slots
        n, m = len(lead), len(self.template)
        if names != (*lead, *tail) or pos != (*range(n), *range(m - len(tail), m)):
            return None
        return self.template[n:m - len(tail)]

    def verify(self, kernel: str, own: dict, fresh: list) -> None:
        """Under the runner's verification: this call's ``own`` values land where the memo puts them,
        and the memo's other arguments are those a fresh fill gives (``fresh``). Raises
        AssertionError naming the first that differs."""
        if tuple(own) != self.slots[0]:
            raise AssertionError(f"launch memo of {kernel}: memoised for the values {self.slots[0]}, "
                                 f"this call has {tuple(own)}")
        for i, (a, b) in enumerate(zip(self.args(own), fresh, strict=True)):
            if a is not b and (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a != b):
                raise AssertionError(f"launch memo of {kernel}: a call key was memoised with argument {i} = "
                                     f"{a!r}, this call needs {b!r}")


def own_slots(kernel: str, params, own: dict) -> tuple:
    """(names, positions) of a call's own values in ``kernel``'s runtime parameters; a name that is
    no parameter raises TypeError naming it."""
    index = {p.name: i for i, p in enumerate(p for p in params if p.kind != "constexpr")}
    unknown = [n for n in own if n not in index]
    if unknown:
        raise TypeError(f"{kernel}: no parameter for {unknown}")
    return tuple(own), tuple(index[n] for n in own)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Global scratch for kernels that build tensor descriptors on the device."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


try:  # Triton's allocator context variable, looked up once (the forward's launch path uses it)
    from triton.runtime._allocation import _NULL_ALLOCATOR, _allocator
except ImportError:
    _allocator = None


@contextlib.contextmanager
def descriptor_scratch():
    """Give Triton a scratch allocator for the launch unless the caller set one."""
    if _allocator is None:  # a Triton that keeps the allocator elsewhere: set ours for the thread
        triton.set_allocator(_scratch)
        yield
        return
    if _allocator.get() is not _NULL_ALLOCATOR:
        yield
        return
    token = _allocator.set(_scratch)
    try:
        yield
    finally:
        _allocator.reset(token)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function: microseconds a call)."""
    return -(-a // b)
