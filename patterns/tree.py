"""Tree attention for speculative decoding.

A speculative step verifies ``n`` draft tokens at once. The drafts form a tree: draft ``i`` continues
the sequence through its parent ``parents[i]`` (``-1``: the prefix's last token). Draft ``i`` sits at
position ``prefix_len + i`` and sees the whole prefix plus its own ancestors (itself included),
never a sibling branch (SpecInfer, Miao et al., 2023, arXiv:2305.09781; Medusa, Cai et al., 2024,
arXiv:2401.10774). Prefix rows, if a call has any, are causal.

With :func:`attndsl.serving.decode` the drafts are the call's ``Lq`` query rows, appended to the cache
first, so the default ``q_offsets = seq_lens - Lq`` is ``prefix_len``::

    mask = tree_mask(parents, prefix_lens)          # prefix_lens: [B] int tensor, cache length before the drafts
    out = decode(q_drafts, k_cache, v_cache, seq_lens=prefix_lens + n, mask_mod=mask, ...)

Pass ``prefix_len`` as a tensor: a Python int is a compile-time constant of the pattern, so every new
value would trace it again.
"""
from __future__ import annotations

import torch


def tree_ancestors(parents: torch.Tensor) -> torch.Tensor:
    """``anc [..., n, n]`` bool: ``anc[i, j]`` when draft ``j`` is draft ``i`` or one of its ancestors.

    ``parents [..., n]`` int, ``parents[i] < i`` (``-1`` for a child of the prefix). Device ops only (no
    host sync): reachability by repeated squaring of the parent relation."""
    if parents.dim() < 1:
        raise ValueError(f"parents must be [..., n], got shape {tuple(parents.shape)}")
    n = parents.shape[-1]
    idx = torch.arange(n, device=parents.device)
    p = parents.to(torch.int64)
    step = (p[..., :, None] == idx) & (p[..., :, None] >= 0)  # step[i, j]: j is i's parent
    reach = step | torch.eye(n, dtype=torch.bool, device=parents.device)
    for _ in range(max(1, (n - 1).bit_length())):
        reach = reach | ((reach.to(torch.float32) @ reach.to(torch.float32)) > 0)
    return reach


def tree_mask(tree: torch.Tensor, prefix_len):
    """Mask of a draft tree after a prefix of ``prefix_len`` tokens.

    Args:
        tree (Tensor): parent indices ``[n]`` or ``[B, n]`` (int, ``-1`` = child of the prefix), or a
            bool visibility mask ``[n, n]`` / ``[B, n, n]`` (``tree[i, j]``: draft ``i`` sees draft ``j``;
            it should hold on the diagonal and only for ``j <= i``).
        prefix_len (int | Tensor): prefix length, or ``[B]`` int per sequence (recommended).

    Returns:
        ``mask_mod(b, h, q_idx, kv_idx)``: prefix rows causal; draft ``i`` (position ``prefix + i``)
        sees positions ``< prefix`` and the drafts ``j`` with ``tree[i, j]``.
    """
    if tree.dtype == torch.bool:
        if tree.dim() not in (2, 3) or tree.shape[-1] != tree.shape[-2]:
            raise ValueError(f"a bool tree mask must be [n, n] or [B, n, n], got shape {tuple(tree.shape)}")
        anc = tree
    else:
        if tree.dim() not in (1, 2) or tree.dtype.is_floating_point:
            raise ValueError(f"parents must be an int tensor [n] or [B, n], got {tree.dtype} {tuple(tree.shape)}")
        anc = tree_ancestors(tree)
    anc = (anc[None] if anc.dim() == 2 else anc).to(torch.uint8)
    n = anc.shape[-1]
    batched = anc.shape[0] > 1
    per_seq = isinstance(prefix_len, torch.Tensor)
    if per_seq and prefix_len.dim() != 1:
        raise ValueError(f"prefix_len must be an int or a [B] tensor, got shape {tuple(prefix_len.shape)}")

    def tree_attention_mask(b, h, q_idx, kv_idx):
        start = prefix_len[b] if per_seq else prefix_len
        i = q_idx - start
        j = kv_idx - start
        row = b if batched else 0
        seen = anc[row, i.clamp(0, n - 1), j.clamp(0, n - 1)] != 0
        draft = (i >= 0) & ((j < 0) | ((j >= 0) & (kv_idx <= q_idx) & seen))
        return draft | ((i < 0) & (kv_idx <= q_idx))

    return tree_attention_mask
