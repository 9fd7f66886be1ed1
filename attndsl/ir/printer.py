"""Readable printing of IR expressions and the stable structural hash (the cache key)."""
from __future__ import annotations

import hashlib

from .graph import topo_order
from .nodes import Node

_INFIX = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "floordiv": "//", "mod": "%",
          "lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!=",
          "and": "&", "or": "|", "xor": "^"}


def _leaf(n: Node) -> str:
    if n.op == "const":
        return n.attr[2]
    if n.op == "var":
        return n.attr
    raise AssertionError(n.op)


def expr_str(n: Node) -> str:
    """One-line infix form (shared sub-expressions are repeated)."""
    if n.op in ("const", "var"):
        return _leaf(n)
    a = [expr_str(x) for x in n.args]
    if n.op in _INFIX:
        return f"({a[0]} {_INFIX[n.op]} {a[1]})"
    if n.op == "neg":
        return f"-{a[0]}"
    if n.op == "not":
        return f"~{a[0]}"
    if n.op == "load":
        return f"buf{n.attr[0]}[{', '.join(a)}]"
    return f"{n.op}({', '.join(a)})"


def listing(roots: dict[str, Node]) -> str:
    """SSA listing of several named roots; each shared node is printed once."""
    order = topo_order(list(roots.values()))
    names: dict[Node, str] = {}
    lines = []
    for i, n in enumerate(order):
        if n.op in ("const", "var"):
            names[n] = _leaf(n)
            continue
        a = [names[x] for x in n.args]
        if n.op in _INFIX:
            rhs = f"{a[0]} {_INFIX[n.op]} {a[1]}"
        elif n.op == "load":
            rhs = f"buf{n.attr[0]}[{', '.join(a)}]   # {n.attr[3]}"
        else:
            rhs = f"{n.op}({', '.join(a)})"
        names[n] = f"%{len(lines)}"
        lines.append(f"  {names[n]}: {n.dtype} = {rhs}")
    for k, r in roots.items():
        lines.append(f"  {k} = {names[r]}")
    return "\n".join(lines)


def _canon(n: Node, memo: dict) -> str:
    s = memo.get(n)
    if s is None:
        if n.op in ("const", "var"):
            s = f"{n.op}:{n.dtype}:{n.attr!r}"
        else:
            s = f"{n.op}:{n.dtype}:{n.attr!r}(" + ",".join(_canon(a, memo) for a in n.args) + ")"
        memo[n] = s
    return s


def structural_hash(*parts) -> str:
    """Stable hash of nodes (and plain hashable values): the same IR hashes alike in every process."""
    memo: dict = {}
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, Node):
            h.update(_canon(p, memo).encode())
        else:
            h.update(repr(p).encode())
        h.update(b"|")
    return h.hexdigest()[:24]
