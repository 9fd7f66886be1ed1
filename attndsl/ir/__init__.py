"""The IR: a typed expression DAG with structural hashing and a readable printer."""
from .nodes import (BOOL, FLOAT, INT, INDEX_VARS, SCORE, Buffer, Node, buffer_of, coerce, const, coord,
                    const_value, is_const, load, node, var)
from .printer import expr_str, listing, structural_hash
from .graph import free_vars, loads, substitute, to_networkx, topo_order
