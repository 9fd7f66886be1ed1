"""Graph views of the IR (networkx) and the dependency facts passes and codegen ask for.

The passes walk the DAG directly (``topo_order``, ``free_vars``, ``substitute``): they need no
graph algorithm beyond a traversal. ``to_networkx`` is a view for analysis and debugging, so
networkx is imported only there and is not a hard dependency (torch installs it anyway)."""
from __future__ import annotations

from .nodes import Node


def to_networkx(roots):
    """The IR reachable from ``roots`` as a ``networkx.DiGraph``; edges point from an operand to
    its user. Needs networkx installed (``pip install attndsl[graph]``)."""
    import networkx as nx

    g = nx.DiGraph()
    stack = list(roots)
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        g.add_node(n)
        for a in n.args:
            g.add_edge(a, n)
            stack.append(a)
    return g


def topo_order(roots) -> list[Node]:
    """Operands before users; ties broken by first appearance so listings are stable."""
    order, seen = [], set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for a in n.args:
            visit(a)
        order.append(n)

    for r in roots:
        visit(r)
    return order


def free_vars(n: Node, memo: dict | None = None) -> frozenset:
    """Names of the variables an expression depends on."""
    memo = {} if memo is None else memo
    r = memo.get(n)
    if r is None:
        if n.op == "var":
            r = frozenset([n.attr])
        else:
            r = frozenset().union(*(free_vars(a, memo) for a in n.args)) if n.args else frozenset()
        memo[n] = r
    return r


def loads(roots) -> list[Node]:
    return [n for n in topo_order(roots) if n.op == "load"]


def substitute(n: Node, mapping: dict, memo: dict | None = None) -> Node:
    """Replace nodes (usually variables) by others, rebuilding users."""
    from .nodes import _make

    memo = {} if memo is None else memo
    if n in mapping:
        return mapping[n]
    r = memo.get(n)
    if r is None:
        if not n.args:
            r = n
        else:
            args = tuple(substitute(a, mapping, memo) for a in n.args)
            r = n if all(x is y for x, y in zip(args, n.args)) else _make(n.op, args, n.dtype, n.attr)
        memo[n] = r
    return r
