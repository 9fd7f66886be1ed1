"""Assemble one generated module per KernelSpec: helpers plus every kernel the spec needs."""
from __future__ import annotations

from attndsl.spec import KernelSpec

from . import kernels, table as _table, tilebounds as _tilebounds
from .prelude import module_header

#: Bump when generated code changes meaning; old cache entries are then ignored.
CODEGEN_VERSION = 5


def kernel_names(spec: KernelSpec) -> dict[str, str]:
    n = spec.name
    names = {"fwd": f"{n}_fwd", "delta": f"{n}_bwd_delta", "dkdv": f"{n}_bwd_dkdv", "dq": f"{n}_bwd_dq"}
    if spec.data_dependent:
        names.update(table=f"{n}_table", table_t=f"{n}_table_t")
    return names


def render(spec: KernelSpec) -> str:
    table = spec.data_dependent
    parts = [module_header(spec, CODEGEN_VERSION, spec.key, "  (dense, no modifiers)"),
             kernels.forward(spec, table), kernels.preprocess(spec), kernels.dkdv(spec, table), kernels.dq(spec, table)]
    if table:
        parts += [_table.block_table(spec, False), _table.block_table(spec, True), _tilebounds.render(spec)]
    return "\n".join(parts)
