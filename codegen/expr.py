"""IR expressions → Triton statements, placed at the loop level where their inputs exist.

A kernel has *stages* (program, outer tile, inner tile...). Each variable becomes available at
one stage; a node is emitted at the latest stage among its inputs, so sub-expressions that do
not depend on the inner index are computed once per outer tile (hoisting) and those that depend
on neither once per program. Shared nodes are emitted once.
"""
from __future__ import annotations

from attndsl import ir
import attndsl.ir.coords  # noqa: F401  (ir.coords.coord_expr)
from attndsl.ir import BOOL, FLOAT, INT, Node
from attndsl.passes.int_width import INT32, MAX_EXTENT, wide

_INFIX = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
          "eq": "==", "ne": "!=", "and": "&", "or": "|", "xor": "^", "bitand": "&", "bitor": "|", "bitxor": "^"}
_FUNC = {"exp": "tl.exp", "exp2": "tl.exp2", "log": "tl.log", "log2": "tl.log2", "sqrt": "tl.sqrt",
         "sigmoid": "tl.sigmoid", "floor": "tl.floor", "abs": "tl.abs", "minimum": "tl.minimum",
         "maximum": "tl.maximum", "where": "tl.where", "tanh": "_tanh", "erf": "tl.erf"}
NONNEG_VARS = {"b", "h", "q", "kv", "q_lo", "q_hi", "kv_lo", "kv_hi", "q_max", "kv_max"}


def nonneg(n: Node, memo=None) -> bool:
    """A cheap proof that an integer expression is never negative (so C and floor division agree)."""
    memo = {} if memo is None else memo
    r = memo.get(n)
    if r is None:
        op = n.op
        if op == "const":
            r = n.attr[1] >= 0
        elif op == "var":
            r = n.attr in NONNEG_VARS
        elif op in ("add", "mul", "floordiv", "minimum", "where"):
            args = n.args[1:] if op == "where" else n.args
            r = all(nonneg(a, memo) for a in args)
            if op == "floordiv":
                r = r and n.args[1].op == "const"
        elif op == "maximum":
            r = any(nonneg(a, memo) for a in n.args)
        elif op in ("abs", "mod"):
            r = op == "abs" or (n.args[1].op == "const" and n.args[1].attr[1] > 0)
        elif op in ("bit_length", "coord"):
            r = op == "bit_length" or n.attr[3] > 0 or (n.attr[2] == 0 and nonneg(n.args[0], memo))
        elif op in ("shl", "shr"):
            r = nonneg(n.args[0], memo)
        else:
            r = False
        memo[n] = r
    return r


def clamped_offset(p: str, idx: list[str], wide: bool = True) -> str:
    """Element offset into captured tensor ``p`` at index codes ``idx``, each clamped into the
    tensor (padded rows and columns never address outside it); "0" for no index. ``wide=False``:
    in 32 bits, for a tensor whose offsets are known to stay under 2**31."""
    cast = ".to(tl.int64)" if wide else ""
    return " + ".join(f"tl.minimum(tl.maximum({i}, 0), {p}_size{d} - 1){cast} * {p}_stride{d}"
                      for d, i in enumerate(idx)) or "0"


def literal(n: Node) -> str:
    v = n.attr[1]
    if n.dtype == INT and not INT32[0] <= v <= INT32[1]:
        return f"tl.full((), {v}, tl.int64)"  # a bare literal past int32 is a Triton error
    if n.dtype == FLOAT:
        if v != v:
            return 'float("nan")'
        if v in (float("inf"), float("-inf")):
            return f'float("{v}")'
        return repr(float(v))
    return repr(v)


class ExprEmitter:
    """Emits IR nodes as Triton assignments into per-stage line lists.

    ``env`` maps variable names to (code, stage). ``buffers`` maps a buffer slot to the names of
    its pointer, sizes and strides in the kernel signature.
    """

    def __init__(self, env: dict[str, tuple[str, int]], n_stages: int, prefix: str = "t"):
        self.env = env
        self.lines: list[list[str]] = [[] for _ in range(n_stages)]
        self.names: dict[Node, tuple[str, int]] = {}
        self.prefix = prefix
        self.count = 0
        self.nn: dict = {}
        self.uniform_index: dict = {}  # tile-uniform load -> its per-tile index codes (lo == hi)
        self.i64: set = set()  # integer nodes whose emitted value is int64 (passes/int_width.py)

    def block(self, stage: int, indent: str) -> str:
        return "".join(indent + line + "\n" for line in self.lines[stage])

    def take(self, stage: int, indent: str) -> str:
        """Return and clear the lines of a stage (for code that must sit inside a branch)."""
        out = self.block(stage, indent)
        self.lines[stage] = []
        return out

    def branch(self, stage: int, indent: str, emit):
        """Run ``emit()`` for the body of an ``if`` branch: returns its result and the branch's
        lines of ``stage``. Names bound there are forgotten afterwards (Triton drops a name bound
        in one branch only), so later uses emit their own copy."""
        before = set(self.names)
        r = emit()
        body = self.take(stage, indent)
        for n in [n for n, (_, st) in self.names.items() if n not in before and st == stage]:
            del self.names[n]
        return r, body

    def forget(self, stage: int) -> None:
        """Forget the names bound at ``stage`` or deeper: they were bound inside one loop's body, so
        a second loop over the same stage (a constant-run loop beside the general one) emits its own."""
        for n in [n for n, (_, st) in self.names.items() if st >= stage]:
            del self.names[n]
        self.uniform_index.clear()

    def emit(self, n: Node, min_stage: int = 0) -> str:
        """The code naming ``n`` (emitting its definition if needed)."""
        return self._emit(n, min_stage)[0]

    def emit_bound(self, n: Node, min_stage: int = 0) -> str:
        """The code of a visit-plan bound (a position the plan clamps into ``[0, t_max]``), always
        int32: a bound computed in int64 (``lengths[b] - 1`` over an int32 or int64 tensor) is first
        clamped into ``[-1, MAX_EXTENT]``, which changes no clamped result, so loop indices keep
        their type."""
        code = self._emit(n, min_stage)[0]
        if n.dtype == INT and self.is64(n):
            return f"tl.minimum(tl.maximum({code}, -1), {MAX_EXTENT}).to(tl.int32)"
        return code

    def _emit(self, n: Node, min_stage: int):
        if n.op == "const":
            return literal(n), 0
        if n.op == "var":
            if n.attr not in self.env:
                raise KeyError(f"variable '{n.attr}' is not available in this kernel")
            return self.env[n.attr]
        hit = self.names.get(n)
        if hit is not None:
            return hit
        if n.op == "coord":  # layout coordinate: expanded into div/mod of the index
            r = self.names[n] = self._emit(ir.coords.coord_expr(n.attr, n.args[0]), min_stage)
            return r
        if n.op == "load":
            return self._emit_load(n, min_stage)
        parts = [self._emit(a, min_stage) for a in n.args]
        stage = max([min_stage] + [s for _, s in parts])
        code = self._int_width(n, [c for c, _ in parts])
        name = f"{self.prefix}{self.count}"
        self.count += 1
        self.lines[stage].append(f"{name} = {code}")
        self.names[n] = (name, stage)
        return name, stage

    def is64(self, n: Node) -> bool:
        """Whether the emitted value of integer node ``n`` is int64."""
        return n in self.i64 or (n.op == "const" and n.dtype == INT and not INT32[0] <= n.attr[1] <= INT32[1])

    def _int_width(self, n: Node, a: list[str]) -> str:
        """Code for ``n`` with torch's int64 semantics: a node that can leave int32 (``wide``) is
        computed from int64 operands; one that cannot, but reads an int64 operand (a value of an
        int64 tensor), is brought back to int32 so the kernel's integer types stay int32."""
        ints = [i for i, x in enumerate(n.args) if x.dtype == INT and not (n.op in ("shl", "shr") and i == 1)]
        if n.dtype == INT and wide(n):
            a = [f"({c}).to(tl.int64)" if i in ints and not self.is64(n.args[i]) and n.args[i].op != "const" else c
                 for i, c in enumerate(a)]
            self.i64.add(n)
            if n.op == "bit_length":  # the prelude's _bit_length covers 32 bits: split the high word
                return f"tl.where(tl.abs({a[0]}) >> 32 > 0, 32 + _bit_length(tl.abs({a[0]}) >> 32), _bit_length({a[0]}))"
            return self._expr(n, a)
        code = self._expr(n, a)
        if n.dtype == INT and any(self.is64(n.args[i]) for i in ints):
            return f"({code}).to(tl.int32)"
        return code

    def _expr(self, n: Node, a: list[str]) -> str:
        op = n.op
        if op in _INFIX:
            return f"{a[0]} {_INFIX[op]} {a[1]}"
        if op == "neg":
            return f"-{a[0]}"
        if op == "not":
            return f"{a[0]} == 0"
        if op in ("floordiv", "mod"):
            x, y = n.args
            if n.dtype == FLOAT:
                return f"tl.floor({a[0]} / {a[1]})" if op == "floordiv" else f"{a[0]} - tl.floor({a[0]} / {a[1]}) * {a[1]}"
            if y.op == "const" and y.attr[1] > 0:
                if nonneg(x, self.nn):
                    return f"{a[0]} {'//' if op == 'floordiv' else '%'} {a[1]}"
                # floor semantics whatever the backend's integer division rounds to
                mod = f"(({a[0]}) % {a[1]} + {a[1]}) % {a[1]}"
                return mod if op == "mod" else f"(({a[0]}) - {mod}) // {a[1]}"
            return f"_floor{'div' if op == 'floordiv' else 'mod'}({a[0]}, {a[1]})"
        if op in ("shl", "shr"):
            return f"{a[0]} {'<<' if op == 'shl' else '>>'} {a[1]}"
        if op == "bit_length":
            return f"_bit_length({a[0]})"
        if op == "to_float":
            return f"({a[0]}).to(ACC_DTYPE)"
        if op == "to_int":
            return f"({a[0]}).to(tl.int{64 if n in self.i64 else 32})"
        if op == "load":
            return self._load(n, a)
        if op in _FUNC:
            return f"{_FUNC[op]}({', '.join(a)})"
        raise NotImplementedError(f"codegen has no rule for IR op '{op}'")

    def _fresh(self) -> str:
        name = f"{self.prefix}{self.count}"
        self.count += 1
        return name

    def _emit_load(self, n: Node, min_stage: int):
        """A captured-tensor load. Each dimension's address term is emitted at the stage of its
        index, so e.g. the row part of ``bias[h, q, kv]`` is computed once per query tile."""
        slot, kind, ndim, tdt = n.attr
        p = f"buf{slot}"
        stage, terms, bounds = min_stage, [], []
        for d, a in enumerate(n.args):
            code, st = self._emit(a, min_stage)
            st = max(st, min_stage)
            name = self._fresh()
            if a.op == "var" and a.attr in ("q", "kv"):
                # a plain index: guard it with a load mask, which keeps Triton's contiguity
                # analysis (and so coalesced, vectorised loads) intact
                self.lines[st].append(f"{name} = ({code}).to(tl.int64) * {p}_stride{d}")
                bounds.append(f"({code} < {p}_size{d})")
            else:
                # any other index is clamped into the tensor: never an out-of-bounds read
                lo = code if nonneg(a, self.nn) else f"tl.maximum({code}, 0)"
                self.lines[st].append(f"{name} = tl.minimum({lo}, {p}_size{d} - 1).to(tl.int64) * {p}_stride{d}")
            terms.append(name)
            stage = max(stage, st)
        ptr = f"{p} + {' + '.join(terms)}" if terms else p
        if bounds:
            val = f"tl.load({ptr}, mask={' & '.join(bounds)}, other=0)"
        elif stage == len(self.lines) - 1 and stage > 0:
            val = f"_gather({ptr})"  # an address per element (see module._gather)
        else:
            val = f"tl.load({ptr})"
        val = _load_value(val, kind, tdt)
        if kind == INT and _is_int64(tdt):
            self.i64.add(n)
        name = self._fresh()
        self.lines[stage].append(f"{name} = {val}")
        self.names[n] = (name, stage)
        return name, stage

    def clamped_load(self, n: Node, idx: list[str]) -> str:
        """The value of load ``n`` at index codes ``idx``, each clamped into the tensor (e.g. one
        scalar per tile for a tile-uniform load)."""
        return self._load(n, idx)

    def _load(self, n: Node, idx: list[str]) -> str:
        slot, kind, ndim, tdt = n.attr
        p = f"buf{slot}"
        if ndim == 0:
            off = ""
        else:
            # clamp into the tensor so padded rows/columns never read out of bounds
            off = " + " + clamped_offset(p, idx)
        return _load_value(f"tl.load({p}{off})", kind, tdt)


def _is_int64(tdt: str) -> bool:
    return str(tdt).replace("torch.", "") in ("int64", "uint64")


def _load_value(val: str, kind: str, tdt: str) -> str:
    """A loaded element as the IR types it: ACC_DTYPE (float32, or float64 on CPU), a boolean, or an
    integer of its tensor's width (int64 stays int64; 8- and 16-bit integers become int32, so
    arithmetic on them does not wrap where torch's int64 would not)."""
    if kind == FLOAT:
        return f"{val}.to(ACC_DTYPE)"
    if kind == BOOL:
        return f"{val} != 0"
    if not _is_int64(tdt) and str(tdt).replace("torch.", "") != "int32":
        return f"{val}.to(tl.int32)"
    return val
