"""Input validation: every mistake is reported before any kernel is launched."""
from __future__ import annotations

import collections
import math
import numbers
import os

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
#: devices the kernels run on: CUDA (compiled) and CPU (Triton's interpreter)
_DEVICES = ("cpu", "cuda")
#: tile sizes a kernel takes: powers of two (``tl.arange`` needs them), at least 16 (``tl.dot``)
TILE_SIZES = (16, 32, 64, 128, 256)
#: smaller powers of two run in Triton's interpreter only (exact visit plans in tests); a GPU
#: launch needs 16 or more (``check_gpu_tiles``)
INTERPRETER_TILE_SIZES = (1, 2, 4, 8) + TILE_SIZES


def check_inputs(query, key, value, scale=None, *, float64: bool = True):
    """``float64=False``: a path with no float64 kernels (the token selectors) refuses float64."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D], got rank {t.dim()} ({tuple(t.shape)})")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.dtype == torch.float64 and not float64:
            raise TypeError(f"{name} has dtype float64, which index selectors (indices=) do not support; use "
                            "float32, float16 or bfloat16")
        if t.dtype == torch.float64 and t.device.type != "cpu":
            raise TypeError(f"{name} has dtype float64 on {t.device}: float64 runs only on CPU tensors (through "
                            "Triton's interpreter, e.g. for torch.autograd.gradcheck); on the GPU use float32, "
                            "float16 or bfloat16")
        if t.dtype not in _FLOATS and t.dtype != torch.float64:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32 "
                            "(and float64 on CPU)")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    if query.device.type not in _DEVICES:
        raise ValueError(f"the inputs are on the {query.device.type!r} device; attndsl runs kernels on 'cuda' "
                         "tensors, or on 'cpu' tensors through Triton's interpreter")
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lkv, Dk = key.shape
    if tuple(value.shape[:3]) != (Bk, Hkv, Lkv):
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, heads and length")
    if Bk != B:
        raise ValueError(f"batch sizes differ: query has {B}, key/value have {Bk}")
    if Dk != D:
        raise ValueError(f"head dims differ: query has {D}, key has {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA/MQA")
    if not 16 <= D <= 256:
        raise ValueError(f"head dim {D} is outside the supported range 16..256")
    if not 16 <= value.shape[3] <= 256:
        raise ValueError(f"value head dim {value.shape[3]} is outside the supported range 16..256")
    check_scale(scale)


def check_scale(scale) -> None:
    """None, or a finite real number: Python or NumPy (``np.float32``), never a bool."""
    if scale is None:
        return
    if isinstance(scale, (bool, torch.Tensor)) or not isinstance(scale, numbers.Real):
        what = f"{scale!r}" if isinstance(scale, bool) else type(scale).__name__
        raise TypeError(f"scale must be a real number (a Python or NumPy float or int), got {what}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")


def check_gpu_tiles(block_m=None, block_n=None) -> None:
    """Tile sizes under 16 run only in the interpreter: refuse them for a GPU launch."""
    for name, x in (("block_m", block_m), ("block_n", block_n)):
        if x is not None and int(x) < 16:
            raise ValueError(f"{name}={x} runs only in the CPU interpreter; GPU kernels take a power of two "
                             f"from 16 to 256 ({', '.join(map(str, TILE_SIZES))})")


def check_tiles(block_m=None, block_n=None, num_warps=None, num_stages=None) -> None:
    """The tuning overrides of ``attndsl.compile``, refused before any kernel is built: tile sizes
    are powers of two from 16 to 256, warps a power of two from 1 to 32, stages at least 1."""
    for name, x in (("block_m", block_m), ("block_n", block_n)):
        if x is None:
            continue
        if isinstance(x, bool) or not isinstance(x, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(x).__name__}")
        if int(x) not in INTERPRETER_TILE_SIZES:
            raise ValueError(f"{name}={x} is not a tile size the kernels take: use a power of two from 16 to 256 "
                             f"({', '.join(map(str, TILE_SIZES))}; 1 to 8 run in the CPU interpreter only)")
    if num_warps is not None:
        if isinstance(num_warps, bool) or not isinstance(num_warps, numbers.Integral) \
                or int(num_warps) not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"num_warps={num_warps!r}: use a power of two from 1 to 32")
    if num_stages is not None:
        if isinstance(num_stages, bool) or not isinstance(num_stages, numbers.Integral) or int(num_stages) < 1:
            raise ValueError(f"num_stages={num_stages!r}: use an int of at least 1")


def call_shape(query, key) -> tuple:
    """(B, Hq, Lq, Lkv): the domain of the pattern's index variables for one call."""
    return (query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def check_captured(tensors, device):
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"the pattern captures a tensor (#{i}, shape {tuple(t.shape)}) on {t.device}, "
                             f"but the inputs are on {device}; move it with .to({str(device)!r})")


def check_extras(query, key, *, normalizer, return_lse, sinks, bias_factors, sigmoid_bias):
    """Validate the keywords of issue #6 (sinks, low-rank bias, sigmoid) before any launch."""
    B, Hq, Lq, _ = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    if normalizer == "sigmoid":
        if return_lse:
            raise ValueError("return_lse=True is not available with normalizer='sigmoid' (there is no row normaliser)")
        if sinks is not None:
            raise ValueError("sinks join the softmax denominator; they have no meaning with normalizer='sigmoid'")
    elif sigmoid_bias is not None:
        raise ValueError("sigmoid_bias is only used with normalizer='sigmoid'")
    if sigmoid_bias is not None:
        _check_sigmoid_bias(sigmoid_bias)
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor):
            raise TypeError(f"sinks must be a tensor of shape [{Hq}], got {type(sinks).__name__}")
        if sinks.dim() != 1 or sinks.shape[0] != Hq:
            raise ValueError(f"sinks must have shape [Hq] = [{Hq}], got {tuple(sinks.shape)}")
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks must be floating, got {sinks.dtype}")
        if sinks.device != query.device:
            raise ValueError(f"sinks are on {sinks.device}, the inputs on {query.device}")
        check_sink_values(sinks)
    if bias_factors is not None:
        try:
            u, w = bias_factors
        except (TypeError, ValueError):
            raise TypeError("bias_factors must be a pair (u, w)") from None
        for n, t in (("u", u), ("w", w)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"bias_factors {n} must be a 4-D tensor [B, H, L, R], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"bias_factors {n} must be floating, got {t.dtype}")
            if t.device != query.device:
                raise ValueError(f"bias_factors {n} is on {t.device}, the inputs on {query.device}")
        if u.dtype != w.dtype:
            raise TypeError(f"bias_factors u and w must share a dtype, got {u.dtype} and {w.dtype}")
        if u.shape[3] != w.shape[3]:
            raise ValueError(f"bias_factors ranks disagree: u has R={u.shape[3]}, w has R={w.shape[3]}")
        if not 1 <= u.shape[3] <= 256:
            raise ValueError(f"bias_factors rank {u.shape[3]} is outside 1..256")
        if u.shape[0] not in (1, B) or w.shape[0] not in (1, B):
            raise ValueError(f"bias_factors batch dims must be 1 or {B}: u {tuple(u.shape)}, w {tuple(w.shape)}")
        if u.shape[1] not in (1, Hq):
            raise ValueError(f"bias_factors u heads must be 1 or Hq={Hq}, got {u.shape[1]}")
        if w.shape[1] not in (1, Hq, Hkv):
            raise ValueError(f"bias_factors w heads must be 1, Hq={Hq} or Hkv={Hkv}, got {w.shape[1]}")
        if u.shape[2] != Lq:
            raise ValueError(f"bias_factors u length {u.shape[2]} differs from the query length {Lq}")
        if w.shape[2] != Lkv:
            raise ValueError(f"bias_factors w length {w.shape[2]} differs from the key length {Lkv}")


#: sinks tensors whose values were checked, by address, dtype, shape, strides and version counter
#: (the tensors are held, so an address is not reused while it is remembered)
_SINKS_CHECKED: collections.OrderedDict = collections.OrderedDict()
_SINKS_MEMO_SIZE = 64


def check_sink_values(sinks) -> None:
    """Each sink logit is finite, or ``-inf`` meaning "no sink" for that head (it adds
    ``exp(-inf) = 0`` to the denominator). ``+inf`` would take the whole softmax mass and NaN
    poisons it: both are refused (one reduction and a sync, once per version of the sinks tensor:
    a model's sinks parameter is checked again after each optimizer step, not on every layer's
    call; skipped under ``torch.compile`` and, like the other value checks, with
    ``ATTNDSL_CHECK_INDICES=0``)."""
    if compiling() or sinks.numel() == 0 or not default_check():
        return
    try:
        key = (sinks.data_ptr(), sinks.dtype, sinks.shape, sinks.stride(), sinks._version)
    except RuntimeError:  # inference tensors: no version counter, check every call
        key = None
    if key is not None and key in _SINKS_CHECKED:
        _SINKS_CHECKED.move_to_end(key)
        return
    bad = torch.isnan(sinks) | torch.isposinf(sinks)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"sinks[{i}] is {float(sinks[i])}: sink logits must be finite, or -inf for a head "
                         "with no sink")
    if key is not None:
        _SINKS_CHECKED[key] = sinks
        if len(_SINKS_CHECKED) > _SINKS_MEMO_SIZE:
            _SINKS_CHECKED.popitem(last=False)


def _check_sigmoid_bias(bias):
    """A finite constant: a Python number or a 0-d tensor. A learnable bias belongs in score_mod."""
    if isinstance(bias, torch.Tensor):
        if bias.dim() != 0 or bias.dtype.is_complex:
            raise ValueError(f"sigmoid_bias must be a number or a 0-d tensor, got shape {tuple(bias.shape)}")
        if bias.requires_grad:
            raise ValueError("sigmoid_bias is a constant and gets no gradient; to learn it, add a captured 0-d "
                             "tensor in score_mod (score + b) and pass sigmoid_bias=0.0")
        bias = float(bias)
    elif not isinstance(bias, (int, float)) or isinstance(bias, bool):
        raise TypeError(f"sigmoid_bias must be a number, got {type(bias).__name__}")
    if not math.isfinite(bias):
        raise ValueError(f"sigmoid_bias must be finite, got {bias}")


_DENSE_CHUNK = 1 << 24  # index values evaluated at once when an interval cannot decide
_MAX_DECIDED = 4096  # call shapes remembered as checked (a stream of new lengths starts over)


class IndexRangeCheck:
    """Refuses a call whose pattern would index a captured tensor out of range (the kernels
    would clamp the index and compute silently wrong values; the reference raises).

    Indices of index variables alone are decided once per call shape, by their intervals
    (``passes/index_range.py``) or, when those are loose, by evaluating the index densely.
    Indices computed from captured values (``table[ids[q]]``) are checked on every call, against
    the values' smallest and largest entries (one small reduction and one sync), unless index
    checks are off (``ATTNDSL_CHECK_INDICES=0``, as for selector indices)."""

    def __init__(self, roots):
        from ..passes.index_range import index_bounds
        self.divisors = DivisorCheck(roots)  # (S1: integer semantics, issue 31)
        self.bounds = index_bounds(roots)
        reads = [_reads_values(b) for b in self.bounds]
        self.static = tuple(b for b, r in zip(self.bounds, reads) if not r)
        self.dynamic = tuple(b for b, r in zip(self.bounds, reads) if r)
        self.decided: set = set()  # call shapes (with the captured tensors' shapes) already checked

    def reads_values(self) -> bool:
        """Does any check read captured values (and so run on every call, not once per shape)?"""
        return bool(self.dynamic) or any(self.divisors.reads)

    def __call__(self, tensors, shape, device, dynamic: bool = True):
        """``dynamic=False``: the indices of index variables alone (no sync; see ``runtime/indexcheck.py``)."""
        self.divisors(tensors, shape, device)  # value-dependent divisors too: rare, and never a silent number
        if not self.bounds or 0 in shape:  # an empty call reads no captured tensor
            return
        key = (shape, tuple(tuple(t.shape) for t in tensors))
        if key not in self.decided:
            for b in self.static:
                _check_bound(b, tensors, shape, device, {})
            if len(self.decided) >= _MAX_DECIDED:
                self.decided.clear()
            self.decided.add(key)
        if dynamic and self.dynamic and default_check() and not compiling():
            extremes = _value_extremes(self.dynamic, tensors)
            for b in self.dynamic:
                _check_bound(b, tensors, shape, device, extremes)


_CHECKS_BY_PATTERN: dict = {}


def index_check_for(spec) -> IndexRangeCheck:
    """The index check of a pattern, shared by every compile of the same IR (``attndsl.attention``
    compiles on every call): its bounds depend on the IR alone, and the call shapes it has
    decided hold for any captured tensors of those shapes."""
    check = _CHECKS_BY_PATTERN.get(spec.key)
    if check is None:
        if len(_CHECKS_BY_PATTERN) >= _MAX_DECIDED:
            _CHECKS_BY_PATTERN.clear()
        check = _CHECKS_BY_PATTERN[spec.key] = IndexRangeCheck([spec.mask, spec.score])
    return check


def _reads_values(b) -> bool:
    from ..ir.graph import loads
    return bool(loads([b.index]))


def default_check() -> bool:
    """Whether value-dependent index checks (selector indices, ``table[ids[q]]``) run by default:
    ``ATTNDSL_CHECK_INDICES=0`` turns them off (they cost a sync per call)."""
    return os.environ.get("ATTNDSL_CHECK_INDICES", "1") not in ("0", "false", "False", "no")


def compiling() -> bool:
    """Inside torch.compile's tracing, where a host sync cannot run."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # older torch
        return False


def _value_extremes(bounds, tensors) -> dict:
    """``{value_min: x, value_max: y}`` for every captured value the indices read, with one sync."""
    slots = sorted({slot for b in bounds for slot, _ in b.values})
    if not slots:
        return {}
    ends = torch.stack([torch.stack(tensors[s].detach().double().aminmax()) for s in slots]).tolist()
    by_slot = dict(zip(slots, ends))
    out = {}
    for b in bounds:
        for slot, name in b.values:
            out[f"{name}_min"], out[f"{name}_max"] = by_slot[slot]
    return out


def _check_bound(b, tensors, shape, device, extremes):
    from ..ir.evaluate import evaluate
    from ..passes.index_range import LAST
    size = tensors[b.slot].shape[b.dim]
    if b.lo is not None and b.hi is not None:
        env = {LAST[v]: torch.tensor(n - 1) for v, n in zip(("b", "h", "q", "kv"), shape)}
        env.update({k: torch.tensor(x, dtype=torch.float64) for k, x in extremes.items()})
        try:
            lo, hi = (int(x) for x in evaluate([b.lo, b.hi], env, tensors))
        except (IndexError, ValueError, OverflowError, RuntimeError):
            lo, hi = -1, size  # undecided: evaluate the index itself
        if 0 <= lo and hi < size:
            return
    _check_densely(b, tensors, shape, device, size)


def _check_densely(b, tensors, shape, device, size):
    """Evaluates the index over every value of the variables it depends on, a chunk at a time
    (over the distances q - kv when it reads along diagonals)."""
    from ..ir.evaluate import evaluate
    from ..passes.index_range import index_vars
    B, Hq, Lq, Lkv = shape
    index = b.on_dist if b.on_dist is not None else b.index
    names = index_vars(b)
    span = {"b": (0, B), "h": (0, Hq), "q": (0, Lq), "kv": (0, Lkv), "dist": (1 - Lkv, Lq)}
    first = names[0] if names else None
    rest = 1
    for v in names[1:]:
        rest *= span[v][1] - span[v][0]
    step = max(1, _DENSE_CHUNK // rest)
    f_lo, f_hi = span[first] if first else (0, 1)
    for start in range(f_lo, f_hi, step):
        env = {}
        for i, v in enumerate(names):
            lo_v, hi_v = (start, min(f_hi, start + step)) if v == first else span[v]
            view = [1] * len(names)
            view[i] = hi_v - lo_v
            env[v] = torch.arange(lo_v, hi_v, device=device).view(view)
        (idx,) = evaluate([index], env, tensors, device=device)
        bad = (idx < 0) | (idx >= size)
        if bool(bad.any()):
            pos = [int(x) for x in bad.nonzero()[0]] if bad.dim() else []
            at = {v: p + (start if v == first else span[v][0]) for v, p in zip(names, pos)}
            if "dist" in at:  # the first pair on that diagonal
                d = at.pop("dist")
                at["q_idx"], at["kv_idx"] = max(d, 0), max(-d, 0)
            where = ", ".join(f"{'q_idx' if v == 'q' else 'kv_idx' if v == 'kv' else v}={x}" for v, x in at.items())
            value = int(idx[tuple(pos)]) if pos else int(idx)
            raise IndexError(
                f"the pattern reads captured tensor #{b.slot} (shape {tuple(tensors[b.slot].shape)}) out of range in "
                f"dimension {b.dim}: its index `{b.text}` is {value}{' at ' + where if where else ''} "
                f"(valid: 0..{size - 1}) for this call (B={B}, Hq={Hq}, Lq={Lq}, Lkv={Lkv}). The kernels would "
                "clamp it and compute wrong values; size the tensor for every (b, h, q_idx, kv_idx) of the call, or "
                "clamp the index in the pattern")


class DivisorCheck:
    """Refuses a call where an integer divisor of the pattern (``q_idx % (kv_idx - 5)``) is zero at
    some position, naming the expression and the position: torch and the reference raise
    ZeroDivisionError there, a kernel would compute a number. Also refuses extents the kernels'
    integer widths are not sized for (``passes/int_width.py``).

    A divisor whose interval over the call (``passes/index_range.py``) excludes zero costs nothing
    more; otherwise it is evaluated densely, once per call shape (every call when it reads
    captured values, unless ``ATTNDSL_CHECK_INDICES=0``)."""

    def __init__(self, roots):
        from ..ir.graph import loads
        from ..passes.index_range import divisor_bounds
        self.bounds = divisor_bounds(roots)
        self.reads = tuple(bool(loads([b.index])) for b in self.bounds)
        self.decided: set = set()

    def __call__(self, tensors, shape, device):
        from ..passes.int_width import check_extents
        check_extents(shape)
        if not self.bounds or 0 in shape:
            return
        key = (shape, tuple(tuple(t.shape) for t in tensors))
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        dynamic = default_check() and not compiling() and not capturing
        if key in self.decided and not (dynamic and any(self.reads)):
            return
        extremes = _value_extremes([b for b, r in zip(self.bounds, self.reads) if r], tensors) if dynamic else {}
        for b, r in zip(self.bounds, self.reads):
            if (r and dynamic) or (not r and key not in self.decided):
                _check_divisor(b, tensors, shape, device, extremes)
        if len(self.decided) >= _MAX_DECIDED:
            self.decided.clear()
        self.decided.add(key)


def _check_divisor(b, tensors, shape, device, extremes):
    from ..ir.evaluate import evaluate
    from ..passes.index_range import LAST, index_vars
    if b.lo is not None and b.hi is not None:
        env = {LAST[v]: torch.tensor(n - 1) for v, n in zip(("b", "h", "q", "kv"), shape)}
        env.update({k: torch.tensor(x, dtype=torch.float64) for k, x in extremes.items()})
        try:
            lo, hi = (float(x) for x in evaluate([b.lo, b.hi], env, tensors))
            if lo > 0 or hi < 0:
                return
        except (IndexError, ValueError, OverflowError, RuntimeError):
            pass  # undecided: evaluate the divisor itself
    B, Hq, Lq, Lkv = shape
    expr = b.on_dist if b.on_dist is not None else b.index
    names = index_vars(b)
    span = {"b": B, "h": Hq, "q": Lq, "kv": Lkv, "dist": Lq + Lkv - 1}
    first = {"dist": 1 - Lkv}
    rows = max(1, _DENSE_CHUNK // max(1, math.prod(span[v] for v in names[1:])))
    for start in range(0, span[names[0]] if names else 1, rows):
        env = {}
        for i, v in enumerate(names):
            n = min(rows, span[v] - start) if i == 0 else span[v]
            env[v] = (torch.arange(n, device=device) + first.get(v, 0) + (start if i == 0 else 0)).view(
                [n if j == i else 1 for j in range(len(names))])
        (d,) = evaluate([expr], env, tensors, device=device)
        zero = d == 0
        if bool(zero.any()):
            pos = [int(x) for x in zero.nonzero()[0]] if zero.dim() else []
            at = {v: p + first.get(v, 0) + (start if i == 0 else 0) for i, (v, p) in enumerate(zip(names, pos))}
            if "dist" in at:  # the first pair on that diagonal
                dist = at.pop("dist")
                at["q"], at["kv"] = max(dist, 0), max(-dist, 0)
            where = ", ".join(f"{'q_idx' if v == 'q' else 'kv_idx' if v == 'kv' else v}={x}" for v, x in at.items())
            raise ZeroDivisionError(
                f"the pattern divides (// or %) by `{b.text}`, which is 0{' at ' + where if where else ''} for this "
                f"call (B={B}, Hq={Hq}, Lq={Lq}, Lkv={Lkv}); torch raises ZeroDivisionError for integer division by "
                "zero, so the kernels refuse it too")
