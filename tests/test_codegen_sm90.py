"""Generated kernels whose plan reads an int64 captured tensor compile for sm_90 (no GPU needed).

Triton's CPU interpreter does not enforce that a loop-carried variable keeps its type; the GPU
compiler does. A key-padding mask ``kv_idx < lengths[b]`` over an int64 ``lengths`` makes the visit
plan's tile indices int64, which once clashed with an int32 ``tile`` assigned before the loop
(``CompilationError: Loop-carried variable tile has initial type int32 but is re-assigned to int64``).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = r"""
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import attndsl
from attndsl.runtime import cache

lengths = torch.tensor([100, 37], dtype=torch.int64)
doc = torch.tensor([0] * 50 + [1] * 78, dtype=torch.int64)


def key_padding(b, h, q_idx, kv_idx):
    return kv_idx < lengths[b]


def document(b, h, q_idx, kv_idx):  # data-dependent: block-table kernels too
    return (doc[q_idx] == doc[kv_idx]) & (kv_idx < lengths[b])


PTR = {"int64": "*i64", "int32": "*i32", "float32": "*fp32", "bool": "*i1"}
BF16 = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"}
INT_PTRS = {"VISITS", "TBL_FULL", "TBL_PART", "TBL_CNT"}
INT_ARGS = {"HQ", "HKV", "GROUP", "LQ", "LKV", "SECTION", "W_GROUP", "RANK", "TH"}
CONSTS = dict(HEAD_D=64, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, HEAD_DV=64, BLOCK_DV=64, HAS_D2=False,
              BLOCK_D2=16, UPCAST=False, DOT_PRECISION="tf32", BLOCK_R=64, BLOCK_C=64)
done = []
for fn, kinds in ((key_padding, ("fwd", "dkdv", "dq")), (document, ("fwd", "dkdv", "dq", "table", "table_t"))):
    attn = attndsl.compile(mask_mod=fn, block_m=64, block_n=64)
    assert attn.spec.data_dependent == (fn is document)
    mod = cache.load(attn.spec, False)
    bufs = {f"buf{b.slot}": b for b in attn.spec.buffers}
    names = attndsl.codegen.kernel_names(attn.spec)
    for kind in kinds:
        k = getattr(mod, names[kind])
        sig, cx = {}, {}
        for name, p in zip(k.arg_names, k.params):
            if p.is_constexpr:
                sig[name], cx[name] = "constexpr", CONSTS.get(name, False)
            elif name in bufs:
                sig[name] = PTR[bufs[name].torch_dtype]
            elif name[0].isupper() and name not in INT_ARGS:
                sig[name] = "*bf16" if name in BF16 else "*i32" if name in INT_PTRS else "*fp32"
            elif name in ("sm_scale", "sigmoid_bias"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        triton.compile(ASTSource(k, sig, cx), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
        done.append(f"{fn.__name__}:{kind}")
print("compiled", " ".join(done))
"""


def test_int64_plan_kernels_compile_for_sm90(tmp_path):
    """fwd, dK/dV, dQ of a key-padding mask over int64 lengths, and the same plus both block-table
    kernels of a document mask over int64 ids, compile for sm_90. In a fresh process: real compiles
    must not follow interpreted kernels in one process."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, ATTNDSL_CACHE_DIR=str(tmp_path),
               PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    out = r.stderr + r.stdout
    if r.returncode and "ptxas" in out.lower() and "not found" in out.lower():
        pytest.skip("no CUDA toolchain")
    assert r.returncode == 0 and "compiled" in r.stdout, out[-4000:]
    for k in ("key_padding:fwd", "key_padding:dkdv", "key_padding:dq", "document:table", "document:table_t"):
        assert k in r.stdout
