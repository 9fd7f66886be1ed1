"""Dense evaluation of IR with torch tensors (broadcasting), with torch's own semantics.

This is what the float64 reference runs: the same IR the kernels are generated from,
evaluated on index grids, so a kernel bug cannot hide behind a shared misunderstanding
of the user's function.
"""
from __future__ import annotations

import torch

from .coords import coord_value
from .graph import topo_order
from .intmath import bit_length_value
from .nodes import BOOL, FLOAT, INT, Node


def _floordiv(a, b):
    if a.is_floating_point() or b.is_floating_point():
        return torch.floor(a / b)
    return torch.div(a, b, rounding_mode="floor")


_BIN = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "truediv": torch.true_divide,
    "floordiv": _floordiv, "mod": torch.remainder, "minimum": torch.minimum, "maximum": torch.maximum,
    "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge, "eq": torch.eq, "ne": torch.ne,
    "and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor,
    "shl": torch.bitwise_left_shift, "shr": torch.bitwise_right_shift,
}
_UN = {
    "neg": torch.neg, "abs": torch.abs, "not": torch.logical_not, "exp": torch.exp, "exp2": torch.exp2,
    "log": torch.log, "log2": torch.log2, "sqrt": torch.sqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "floor": torch.floor,
}


def evaluate(roots, env: dict, tensors, float_dtype=torch.float64, device=None):
    """Evaluate IR roots. ``env`` maps variable names to tensors (broadcastable);
    ``tensors`` are the captured buffers by slot. Returns a list like ``roots``."""
    vals: dict[Node, torch.Tensor] = {}

    def conv(x, dtype):
        if dtype == FLOAT:
            return x.to(float_dtype)
        if dtype == INT:
            return x.to(torch.int64)
        return x.to(torch.bool)

    for n in topo_order(roots):
        if n.op == "const":
            v = n.attr[1]
            dt = float_dtype if n.dtype == FLOAT else torch.int64 if n.dtype == INT else torch.bool
            r = torch.tensor(v, dtype=dt, device=device)
        elif n.op == "var":
            r = env[n.attr]
        elif n.op == "load":
            t = tensors[n.attr[0]]
            idx = [vals[a].to(torch.int64) for a in n.args]
            for d, ix in enumerate(idx):
                if ix.numel() and (int(ix.min()) < 0 or int(ix.max()) >= t.shape[d]):
                    raise IndexError(
                        f"pattern indexes captured tensor #{n.attr[0]} (shape {tuple(t.shape)}) out of range "
                        f"in dimension {d}: indices span [{int(ix.min())}, {int(ix.max())}]")
            if idx:
                idx = torch.broadcast_tensors(*idx)
                r = t[tuple(i.to(t.device) for i in idx)]
            else:
                r = t.reshape(())
            r = conv(r.to(device) if device is not None else r, n.dtype)
        elif n.op == "where":
            c, a, b = (vals[x] for x in n.args)
            r = torch.where(c, a, b)
        elif n.op == "to_float":
            # an integer becomes a float32 (torch's .float(), the kernels' scores): round as they do
            r = vals[n.args[0]].to(torch.float32).to(float_dtype)
        elif n.op == "to_int":
            r = vals[n.args[0]].trunc().to(torch.int64) if vals[n.args[0]].is_floating_point() else vals[n.args[0]].to(torch.int64)
        elif n.op == "coord":
            r = coord_value(n.attr, vals[n.args[0]])
        elif n.op == "bit_length":
            r = bit_length_value(vals[n.args[0]].to(torch.int64))
        elif n.op in _BIN:
            r = _BIN[n.op](vals[n.args[0]], vals[n.args[1]])
        elif n.op in _UN:
            r = _UN[n.op](vals[n.args[0]])
        else:
            raise NotImplementedError(n.op)
        if n.op not in ("var",):
            r = conv(r, n.dtype)
        vals[n] = r
    return [vals[r] for r in roots]
