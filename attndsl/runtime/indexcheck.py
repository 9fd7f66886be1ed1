"""When the indices a pattern computes from captured values are checked (``table[ids[q_idx]]``).

Indices of the index variables alone are decided once per call shape, from their bounds
(``runtime/checks.py``): no sync. Indices read from captured *values* need the values' extremes,
a reduction and a host sync. A model calls attention in every layer with the same captured tensors,
so by default they are checked once per tensor *version*: the check is remembered by each tensor's
address, dtype, shape, strides and version counter (an in-place change or a new tensor checks
again; the memo holds the tensors, so an address is not reused while it is remembered). Not
checked while a CUDA graph is captured or torch.compile traces (no sync can run there).

``check_indices=True`` checks on every call; ``check_indices=False`` or ``ATTNDSL_CHECK_INDICES=0``
never (an out-of-range index is then clamped by the kernels: wrong values, no fault).
"""
from __future__ import annotations

import collections

import torch

from .checks import _check_bound, _value_extremes, compiling, default_check

_MEMO_SIZE = 64
_CHECKED: collections.OrderedDict = collections.OrderedDict()


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def check_indices_of(check, tensors, shape, device, explicit: bool | None = None) -> None:
    """Refuse a call whose pattern would index a captured tensor out of range (see the module
    docstring for when value-dependent indices are checked). ``check``: the pattern's
    :class:`~attndsl.runtime.checks.IndexRangeCheck`."""
    check(tensors, shape, device, dynamic=False)
    if not check.dynamic or 0 in shape or explicit is False or compiling():
        return
    if explicit is None:
        if not default_check() or _capturing(device):
            return
        slots = sorted({slot for b in check.dynamic for slot, _ in b.values} | {b.slot for b in check.dynamic})
        try:
            key = (id(check), shape, tuple((tensors[s].data_ptr(), tensors[s].dtype, tensors[s].shape,
                                            tensors[s].stride(), tensors[s]._version) for s in slots))
        except RuntimeError:  # inference tensors: no version counter, check every call
            key = None
        if key is not None and key in _CHECKED:
            _CHECKED.move_to_end(key)
            return
    else:
        key = None
    extremes = _value_extremes(check.dynamic, tensors)
    for b in check.dynamic:
        _check_bound(b, tensors, shape, device, extremes)
    if key is not None:
        _CHECKED[key] = (check, tuple(tensors))
        if len(_CHECKED) > _MEMO_SIZE:
            _CHECKED.popitem(last=False)


def clear() -> None:
    """Forget every value check passed (captured-tensor indices, sink logits)."""
    from .checks import _SINKS_CHECKED
    _CHECKED.clear()
    _SINKS_CHECKED.clear()
