"""Generated kernels whose plan reads an int64 captured tensor compile for sm_90 (no GPU needed).

Triton's CPU interpreter does not enforce that a loop-carried variable keeps its type; the GPU
compiler does. A key-padding mask ``kv_idx < lengths[b]`` over an int64 ``lengths`` makes the visit
plan's tile indices int64, which once clashed with an int32 ``tile`` assigned before the loop
(``CompilationError: Loop-carried variable tile has initial type int32 but is re-assigned to int64``).
"""
import pytest

from attndsl.testing import sm90

_SCRIPT = r"""
import torch
import attndsl
from attndsl.runtime import cache
from attndsl.testing.sm90 import compile_kernels

lengths = torch.tensor([100, 37], dtype=torch.int64)
doc = torch.tensor([0] * 50 + [1] * 78, dtype=torch.int64)


def key_padding(b, h, q_idx, kv_idx):
    return kv_idx < lengths[b]


def document(b, h, q_idx, kv_idx):  # data-dependent: block-table kernels too
    return (doc[q_idx] == doc[kv_idx]) & (kv_idx < lengths[b])


PTR = {"int64": "*i64", "int32": "*i32", "float32": "*fp32", "bool": "*i1"}
BF16 = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
INT_PTRS = {"VISITS", "TBL_FULL", "TBL_PART", "TBL_CNT"}
CONSTS = dict(HEAD_D=64, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, HEAD_DV=64, BLOCK_DV=64, HAS_D2=False,
              BLOCK_D2=16, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=64, BLOCK_C=64)
SCALAR = {"int": "i32", "float": "fp32"}
jobs = []
for fn, kinds in ((key_padding, ("fwd", "bwd_dkdv", "bwd_dq")), (document, ("fwd", "bwd_dkdv", "bwd_dq", "table", "table_t"))):
    attn = attndsl.compile(mask_mod=fn, block_m=64, block_n=64)
    assert attn.spec.data_dependent == (fn is document)
    mod = cache.load(attn.spec, False)
    dtypes = {f"buf{b.slot}": b.torch_dtype for b in attn.spec.buffers}
    for kind in kinds:
        k = getattr(mod, f"{attn.spec.name}_{kind}")
        sig, cx = {}, {}
        for p in attn.spec.lowering.signature(kind):  # the kernel's signature, from the spec
            if p.kind == "constexpr":
                sig[p.name], cx[p.name] = "constexpr", CONSTS.get(p.name, False)
            elif p.kind == "tensor":
                sig[p.name] = (PTR[dtypes[p.name]] if p.name in dtypes else "*bf16" if p.name in BF16
                               else "*i32" if p.name in INT_PTRS else "*fp32")
            else:
                sig[p.name] = SCALAR[p.kind]
        jobs.append((f"{fn.__name__}:{kind}", k, sig, cx, dict(num_warps=4, num_stages=2)))
print("compiled", " ".join(compile_kernels(jobs)))
"""


@pytest.mark.compile_ahead("_SCRIPT")
def test_int64_plan_kernels_compile_for_sm90(tmp_path):
    """fwd, dK/dV, dQ of a key-padding mask over int64 lengths, and the same plus both block-table
    kernels of a document mask over int64 ids, compile for sm_90. In a fresh process: real compiles
    must not follow interpreted kernels in one process."""
    out = sm90.run_compile_script(_SCRIPT, tmp_path)
    for k in ("key_padding:fwd", "key_padding:bwd_dkdv", "key_padding:bwd_dq", "document:table", "document:table_t"):
        assert k in out
