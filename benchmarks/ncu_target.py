"""One call of one attention implementation between cudaProfilerStart/Stop, for Nsight Compute to read
(three warm-up calls first, outside the profiled range):

    ncu --clock-control none --target-processes all --profile-from-start off \
        --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \
        python benchmarks/ncu_target.py {sdpa|cudnn|flash|triton|gluon} {dense|causal} [fwd|bwd] [h16|gpt2|vit]

h16: B=1, H=16, L=4096, D=128; gpt2: B=8, H=12, L=2048, D=64; vit: B=32, H=12, L=197, D=64 (bf16).
"triton" is attndsl's portable kernels, "gluon" its Hopper kernels (ATTNDSL_HOPPER=1, ATTNDSL_HOPPER_BWD=1).
"""
import math, os, sys, torch
which, mask_name, pas = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else "fwd")
if which == "gluon":
    os.environ["ATTNDSL_HOPPER"] = "1"
    os.environ["ATTNDSL_HOPPER_BWD"] = "1"
import attndsl
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa
shape = sys.argv[4] if len(sys.argv) > 4 else "h16"
B, H, L, D = {"h16": (1, 16, 4096, 128), "gpt2": (8, 12, 2048, 64), "vit": (32, 12, 197, 64)}[shape]
torch.manual_seed(0)
q, k, v, do = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
causal = mask_name == "causal"
def cm(b, h, qi, ki): return qi >= ki
if which == "sdpa":
    f = lambda: sdpa(q, k, v, is_causal=causal)
elif which in ("cudnn", "flash"):
    be = SDPBackend.CUDNN_ATTENTION if which == "cudnn" else SDPBackend.FLASH_ATTENTION
    def f():
        with sdpa_kernel(be):
            return sdpa(q, k, v, is_causal=causal)
else:
    comp = attndsl.compile(mask_mod=cm if causal else None)
    f = lambda: comp(q, k, v)
for _ in range(3):
    o = f()
    if pas == "bwd":
        torch.autograd.grad(o, (q, k, v), do)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
o = f()
if pas == "bwd":
    torch.autograd.grad(o, (q, k, v), do)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
