"""Assemble one generated module per KernelSpec: helpers plus every kernel the spec needs."""
from __future__ import annotations

from attndsl.ir import listing
from attndsl.spec import KernelSpec

from . import kernels
from .prelude import HEADER

#: Bump when generated code changes meaning; old cache entries are then ignored.
CODEGEN_VERSION = 3


def kernel_names(spec: KernelSpec) -> dict[str, str]:
    n = spec.name
    names = {"fwd": f"{n}_fwd", "delta": f"{n}_bwd_delta", "dkdv": f"{n}_bwd_dkdv", "dq": f"{n}_bwd_dq"}
    if spec.data_dependent:
        names.update(table=f"{n}_table", table_t=f"{n}_table_t")
    return names


def render(spec: KernelSpec) -> str:
    roots = {}
    if spec.mask is not None:
        roots["mask"] = spec.mask
    if spec.score is not None:
        roots["score_mod"] = spec.score
    ir_text = listing(roots) if roots else "  (dense, no modifiers)"
    table = spec.data_dependent
    parts = [HEADER.format(version=CODEGEN_VERSION, key=spec.key, ir=ir_text.replace('"""', "'''")),
             kernels.forward(spec, table), kernels.preprocess(spec), kernels.dkdv(spec, table), kernels.dq(spec, table)]
    if table:
        parts += [kernels.block_table(spec, False), kernels.block_table(spec, True)]
    return "\n".join(parts)
