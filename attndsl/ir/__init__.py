"""The IR: a typed expression DAG with structural hashing and a readable printer."""
from .nodes import (BOOL, FLOAT, INT, INDEX_VARS, SCORE, Buffer, Node, buffer_of, coerce, const, coord,
                    const_value, expr_str, is_const, load, node, var)
from .printer import listing, structural_hash
from .graph import free_vars, loads, substitute, to_networkx, topo_order
