"""Train a small causal language model with the sequence sharded across ranks (context parallelism).

Every rank holds ``L / P`` tokens of each sequence (zig-zag sharding balances the causal mask);
attention runs as a ring of K/V blocks across the ranks (``attndsl.distributed``) with a learnable
ALiBi slope per head and per-head attention sinks, whose gradients the attention all-reduces.
The other parameters' gradients are partial sums of each rank's tokens and are all-reduced here,
so every rank takes the same optimizer step on the gradient of the whole sequence's loss.

    torchrun --nproc_per_node 2 examples/context_parallel_train.py --device cpu     # gloo, Triton interpreter
    torchrun --nproc_per_node 4 examples/context_parallel_train.py --device cuda --seq-len 16384 --dim 512 --heads 8 --layers 2

``--mask document`` packs random-length documents instead (the balancer picks the sharding).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from attndsl.distributed import ContextParallelAttention, Sharding, balance, shard
from attndsl.patterns import alibi, alibi_slopes, causal, doc_ids_from_lengths, document


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mask_mod, sharding, dtype):
        super().__init__()
        self.heads, self.dtype = heads, dtype
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.slopes = nn.Parameter(alibi_slopes(heads))
        self.sinks = nn.Parameter(torch.zeros(heads))
        # the pattern is written for the whole sequence; the CP object shifts it to each shard
        self.attn = ContextParallelAttention(mask_mod, alibi(self.slopes), sharding=sharding, method="ring")

    def forward(self, x):  # x [B, L/P, dim], this rank's tokens
        B, n, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, n, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        a = self.attn(q.to(self.dtype), k.to(self.dtype), v.to(self.dtype), sinks=self.sinks)
        x = x + self.proj(a.float().transpose(1, 2).reshape(B, n, dim))
        return x + self.mlp(self.norm2(x))

    def cp_reduced(self):
        """Parameters whose gradients the CP attention already all-reduces."""
        return [self.slopes, self.sinks]


class TinyLM(nn.Module):
    def __init__(self, vocab, dim, heads, layers, mask_mod, sharding, dtype):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(sharding.length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mask_mod, sharding, dtype) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, positions):  # tokens/positions [B, L/P]: global positions of the shard
        x = self.emb(tokens) + self.pos(positions)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def batch(gen, B, L, vocab, device):
    """Sequences with a learnable rule: each token is the previous one plus a per-sequence step."""
    start = torch.randint(0, vocab, (B, 1), generator=gen)
    step = torch.randint(1, 4, (B, 1), generator=gen)
    seq = (start + step * torch.arange(L + 1)) % vocab
    return seq[:, :-1].to(device), seq[:, 1:].to(device)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mask", choices=["causal", "document"], default="causal")
    args = ap.parse_args()

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        import os
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        torch.set_num_threads(1)
        device, dtype = torch.device("cpu"), torch.float32
    torch.manual_seed(0)  # the same initial weights on every rank
    L = args.seq_len
    if args.mask == "causal":
        mask_mod, sharding = causal, Sharding.zigzag(L, world)
    else:
        g = torch.Generator().manual_seed(1)
        cuts = sorted(torch.randperm(L - 1, generator=g)[: max(1, L // 32)].add(1).tolist())
        ids = doc_ids_from_lengths([b - a for a, b in zip([0] + cuts, cuts + [L])], device=device)
        mask_mod = document(ids)  # every rank keeps the full [L] ids: patterns index global positions
        sharding = balance(mask_mod, L, world, chunks_per_rank=2, tile=min(128, L // (2 * world)))
    model = TinyLM(args.vocab, args.dim, args.heads, args.layers, mask_mod, sharding, dtype).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    reduced = {id(p) for blk in model.blocks for p in blk.cp_reduced()}
    positions = sharding.positions(rank, device)[None].expand(args.batch, -1)
    gen = torch.Generator().manual_seed(2)  # the same batches on every rank; each keeps its shard
    if rank == 0:
        print(f"{world} ranks ({backend}), L={L}, {L // world} tokens per rank, mask={args.mask}, "
              f"sharding={sharding}", flush=True)
    for step in range(args.steps):
        t0 = time.perf_counter()
        tokens, labels = batch(gen, args.batch, L, args.vocab, "cpu")
        tokens, labels = shard(tokens, sharding, rank, 1).to(device), shard(labels, sharding, rank, 1).to(device)
        logits = model(tokens, positions)
        # this rank's share of the mean loss over all B·L tokens: the ranks' losses sum to it
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="sum") / (args.batch * L)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():
            if p.grad is not None and id(p) not in reduced:
                dist.all_reduce(p.grad)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step}: loss {total.item():.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
