"""A DeepSeek-Sparse-Attention layer end to end: indexer → top-k → sparse attention → backward.

    python examples/dsa_layer.py [--L 96] [--topk 32]

The layer follows DeepSeek-V3.2's layout in miniature: H query heads share one key/value head
(MQA, as MLA is in its absorbed form) and one token selection; a lightning indexer with a few
small heads scores the causal past, ``I[t, s] = Σ_j w[t, j]·ReLU(q_I[t, j]·k_I[s])``, and each
query attends to its top-k keys. Everything runs through attndsl's generated kernels (on a CPU
through Triton's interpreter, in a few seconds), and the script checks the layer's output and
every parameter gradient against the same layer with the float64 gathering oracle in place of
the kernels; it exits non-zero on a mismatch. As in DSA, the indexer is trained by its own
objective, so the attention loss does not differentiate through the selection.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import attndsl
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import attndsl
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attndsl.reference  # noqa: E402
from attndsl.patterns.dsa import causal, dsa_indexer  # noqa: E402


class DSALayer(nn.Module):
    def __init__(self, dim=64, heads=4, head_dim=32, idx_heads=2, idx_dim=16, topk=32):
        super().__init__()
        self.h, self.d, self.hi, self.di = heads, head_dim, idx_heads, idx_dim
        self.wq = nn.Linear(dim, heads * head_dim, bias=False)
        self.wkv = nn.Linear(dim, 2 * head_dim, bias=False)          # one shared key/value head
        self.wo = nn.Linear(heads * head_dim, dim, bias=False)
        self.wq_i = nn.Linear(dim, idx_heads * idx_dim, bias=False)   # the lightning indexer
        self.wk_i = nn.Linear(dim, idx_dim, bias=False)
        self.w_i = nn.Linear(dim, idx_heads, bias=False)
        self.indexer = dsa_indexer(topk=topk)

    def select(self, x):
        B, L, _ = x.shape
        with torch.no_grad():
            q_i = self.wq_i(x).view(B, L, self.hi, self.di).transpose(1, 2)      # [B, HI, L, DI] (a view)
            k_i = self.wk_i(x).view(B, 1, L, self.di)
            w = (self.w_i(x) * (self.hi * self.di) ** -0.5).transpose(1, 2)      # [B, HI, L]
            return self.indexer(q_i, k_i, w)                                      # [B, 1, L, topk]

    def forward(self, x, indices, attend=None):
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.h, self.d).transpose(1, 2)
        k, v = self.wkv(x).view(B, L, 2, 1, self.d).permute(2, 0, 3, 1, 4)
        if attend is None:
            o = attndsl.attention(q, k, v, mask_mod=causal, indices=indices)
        else:
            o = attend(q, k, v, indices)
        return self.wo(o.transpose(1, 2).reshape(B, L, self.h * self.d))


def oracle(q, k, v, indices):
    out, _ = attndsl.reference.sparse_attention(q.double(), k.double(), v.double(), indices, mask_mod=causal)
    return out.to(q.dtype)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--L", type=int, default=96)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    layer = DSALayer(topk=a.topk).to(a.device)
    x = torch.randn(1, a.L, 64, device=a.device)
    print(f"device={a.device} L={a.L} heads={layer.h} (1 kv head) topk={a.topk} indexer heads={layer.hi}")

    t0 = time.time()
    idx = layer.select(x)
    t1 = time.time()
    out = layer(x, idx)
    loss = out.pow(2).mean()
    loss.backward()
    t2 = time.time()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    print(f"  indexer + top-k {t1 - t0:.2f}s, attention fwd+bwd {t2 - t1:.2f}s; "
          f"{int((idx >= 0).sum())} of {idx.numel()} slots used (early queries have fewer causal keys)")

    # the indexer picked the best causal keys: compare by score value against a dense computation
    with torch.no_grad():
        q_i = layer.wq_i(x).view(1, a.L, layer.hi, layer.di).transpose(1, 2).double()
        k_i = layer.wk_i(x).double()
        w = (layer.w_i(x) * (layer.hi * layer.di) ** -0.5).transpose(1, 2).double()
        dense = ((q_i @ k_i.transpose(-1, -2)).clamp(min=0) * w[..., None]).sum(1)
        dense = dense.masked_fill(torch.ones(a.L, a.L, dtype=torch.bool, device=a.device).triu(1), float("-inf"))
        picked = torch.gather(dense, -1, idx[:, 0].clamp(min=0).long()).masked_fill(idx[:, 0] < 0, float("-inf"))
        kk = min(a.topk, a.L)
        best = dense.topk(kk, -1).values
        got = picked.sort(-1, descending=True).values[..., :kk]
        fin = torch.isfinite(best)
        sel_ok = torch.equal(torch.isfinite(got), fin) and torch.allclose(got[fin], best[fin], rtol=1e-4, atol=1e-4)

    layer.zero_grad()
    ref_out = layer(x, idx, attend=oracle)
    ref_out.pow(2).mean().backward()
    failures = [] if sel_ok else ["indexer top-k"]
    print(f"  {'indexer top-k vs dense scores':<34} {'ok' if sel_ok else 'MISMATCH'}")
    params = dict(layer.named_parameters())
    for name, got_t, want_t in [("layer output", out, ref_out)] + \
            [(f"grad {n}", g, params[n].grad) for n, g in grads.items()]:
        err = (got_t.double() - want_t.double()).abs().max().item()
        ok = err <= 1e-4 * max(1.0, want_t.double().abs().max().item())
        print(f"  {name:<34} max abs error {err:.2e}  {'ok' if ok else 'MISMATCH'}")
        if not ok:
            failures.append(name)

    # one optimiser step through the sparse kernels
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for n, p_ in params.items():
        p_.grad = grads.get(n)
    opt.step()
    new_loss = layer(x, layer.select(x)).pow(2).mean().item()
    print(f"  loss {loss.item():.5f} -> {new_loss:.5f} after one SGD step")
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
