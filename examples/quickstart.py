"""attndsl quickstart: a sliding-window mask with an ALiBi bias, forward and backward.

    python examples/quickstart.py

Runs in a few seconds on a CPU (the runtime executes the generated Triton kernels in
Triton's interpreter when the tensors are on the CPU) and natively on a CUDA GPU.  It
checks the kernels against attndsl's float64 reference and exits non-zero on a mismatch.
"""

import sys
from pathlib import Path

import torch

try:
    import attndsl
    from attndsl.patterns import alibi, alibi_slopes, causal, sliding_window
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attndsl
    from attndsl.patterns import alibi, alibi_slopes, causal, sliding_window

import attndsl.reference

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
tol = 3e-2 if dtype == torch.float16 else 1e-3
torch.manual_seed(0)

B, H, L, D = 1, 2, 256, 32  # tensors are [B, H, L, D]
WINDOW = 64
print(f"device={device} dtype={dtype} B={B} H={H} L={L} D={D} sliding window {WINDOW} + ALiBi")

q = torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True)
k = torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True)
v = torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True)
slopes = alibi_slopes(H, device=device)  # float32 [H], captured by the score mod

mask_mod = sliding_window(WINDOW)  # query i sees keys i-63 .. i
score_mod = alibi(slopes)          # score + slopes[h] * (kv_idx - q_idx)

failures = []


def report(name, got, want):
    err = (got.double() - want.double()).abs().max().item()
    ok = err <= tol * max(1.0, want.double().abs().max().item())
    print(f"  {name:<28} max abs error {err:.2e}  {'ok' if ok else 'MISMATCH'}")
    if not ok:
        failures.append(name)


# 1. one-shot call; autograd works through it.
out = attndsl.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)

# 2. the float64 oracle: evaluates the same pattern densely, differentiable.
q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
ref_out, ref_lse = attndsl.reference.attention(q64, k64, v64, mask_mod=mask_mod, score_mod=score_mod)

print("forward")
report("out", out, ref_out)

# 3. logsumexp of each row (float32 [B, H, L], natural log), e.g. for merging partial results.
out2, lse = attndsl.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod, return_lse=True)
report("lse", lse, ref_lse)

# 4. backward: compare gradients for the same random output gradient.
grad_out = torch.randn_like(out)
grads = torch.autograd.grad(out, (q, k, v), grad_out)
ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), grad_out.double())
print("backward")
for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
    report(name, g, rg)

# 5. compile once, reuse: the callable is cached and shapes are runtime arguments.
attn = attndsl.compile(mask_mod=causal, score_mod=score_mod)
print("compiled causal + ALiBi")
# GQA: 2 query heads share 1 key/value head (Hq must be a multiple of Hkv).
k1, v1 = k[:, :1].detach(), v[:, :1].detach()
qs = q[:, :, :128].detach()
out_gqa = attn(qs, k1, v1)
ref_gqa, _ = attndsl.reference.attention(qs.double(), k1.double(), v1.double(), mask_mod=causal, score_mod=score_mod)
report("GQA out (Lq=128, Lkv=256)", out_gqa, ref_gqa)

print()
print(attn.explain())  # IR, visit plan, generated Triton source summary

if failures:
    print(f"\nFAILED: {', '.join(failures)}")
    sys.exit(1)
print("\nall checks passed")
