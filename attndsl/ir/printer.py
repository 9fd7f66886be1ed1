"""The SSA listing of IR roots and the stable structural hash (the cache key); the one-line infix
form of an expression, ``expr_str``, is the nodes' own (``nodes.py``)."""
from __future__ import annotations

import hashlib

from .graph import topo_order
from .nodes import INFIX, Node, leaf_str

def listing(roots: dict[str, Node]) -> str:
    """SSA listing of several named roots; each shared node is printed once."""
    order = topo_order(list(roots.values()))
    names: dict[Node, str] = {}
    lines = []
    for i, n in enumerate(order):
        if n.op in ("const", "var"):
            names[n] = leaf_str(n)
            continue
        a = [names[x] for x in n.args]
        if n.op in INFIX:
            rhs = f"{a[0]} {INFIX[n.op]} {a[1]}"
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
