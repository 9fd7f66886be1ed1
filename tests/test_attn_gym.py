"""Every attn-gym (0.0.17) mask and score mod runs unchanged through ``attndsl.attention``.

Each case builds the pattern with attn-gym's own factory and compares, on small random inputs:

* ``attndsl.attention`` (Triton, in the CPU interpreter) with the float64 oracle
  ``attndsl.reference`` — output, logsumexp, and gradients of q, k, v and of learnable captured
  tensors (``attndsl.testing.assert_matches_reference``);
* eager FlexAttention (``torch.nn.attention.flex_attention``, uncompiled, CPU, float64) with the
  same oracle, so the oracle reads the pattern as FlexAttention does: the output of the public
  call, and the gradients through ``math_attention``, the vmap implementation that the eager call
  runs (torch refuses ``flex_attention``'s backward on CPU, so its autograd is taken directly);
* ``attndsl.attention`` with FlexAttention's output directly.

``test_every_attn_gym_pattern_has_a_case`` fails when attn-gym exports a factory this file does
not exercise.
"""
from __future__ import annotations

import random

import pytest
import torch

import attndsl
from attndsl.testing import assert_matches_reference

attn_gym = pytest.importorskip("attn_gym")
pytest.importorskip("attn_gym.masks")
from attn_gym import masks as M  # noqa: E402
from attn_gym import mods as S  # noqa: E402
from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: E402

B, H, D = 1, 2, 16


def _offsets(total, n_docs, seed, dev):
    from attn_gym.masks.document_mask import length_to_offsets

    rnd = random.Random(seed)
    lengths = [1] * n_docs
    for _ in range(total - n_docs):
        lengths[rnd.randrange(n_docs)] += 1
    return length_to_offsets(lengths, dev)


def _doc_mask(dev):
    return M.generate_doc_mask_mod(M.causal_mask, _offsets(64, 4, 0, dev))


def _shared_prefix(dev):
    # documents 0 and 2 are prompts; 1 continues 0, 3 continues 2
    return M.generate_shared_prefix_mask_mod(_offsets(64, 4, 1, dev),
                                             torch.tensor([0, 0, 2, 2], dtype=torch.int32, device=dev))


def _global_sliding(dev):
    is_global = torch.zeros(64, dtype=torch.bool)
    is_global[[0, 21, 40]] = True
    return M.generate_global_sliding_window(4, is_global.to(dev))


def _flamingo(dev):
    intervals = torch.tensor([[0, 20], [10, 40], [30, 48]], dtype=torch.int32, device=dev)
    return M.generate_vision_cross_attention_mask_mod(intervals, image_token_length=8)


def _jetspec_tree(dev):
    parents = [-1, 0, 1, 1, 3, 3, 0, 6, 6, 2, 9, 9, 4, 4, 12, 7]
    return M.generate_jetspec_tree_causal_mask_mod(8, M.build_tree_ancestor_matrix(parents, device=dev))


def _vsa(sizes, dev):
    g = torch.Generator().manual_seed(5)
    topk = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(B * H * 4)]).view(B, H, 4, 2)
    vbs = torch.tensor([16, 16, 11, 7], dtype=torch.int32) if sizes else None
    return M.generate_vsa_mask_mod(topk.to(torch.int32).to(dev), 16, None if vbs is None else vbs.to(dev))


def _graphormer_spatial(dev):
    g = torch.Generator().manual_seed(6)
    adjacency = torch.rand(B, 64, 64, generator=g) < 0.05
    adjacency = adjacency | adjacency.transpose(1, 2)
    dist = S.shortest_path_distances(adjacency.to(dev), max_distance=5)
    table = torch.randn(H, 7, generator=g).to(dev).requires_grad_(True)
    return S.generate_graphormer_spatial_bias(table, dist)


def _graphormer_edge(dev):
    g = torch.Generator().manual_seed(7)
    adjacency = torch.rand(B, 64, 64, generator=g) < 0.06
    adjacency = adjacency | adjacency.transpose(1, 2)
    edge_types = torch.randint(0, 3, (B, 64, 64), generator=g)
    types, lengths = S.shortest_path_edge_types(adjacency.to(dev), edge_types.to(dev), max_path_len=3)
    table = torch.randn(H, 3, 3, generator=g).to(dev).requires_grad_(True)
    return S.generate_graphormer_edge_bias(table, types, lengths)


def _mla_rope(dev):
    g = torch.Generator().manual_seed(8)
    q_rope = torch.randn(B, H, 64, 4, generator=g)
    k_rope = torch.randn(B, 1, 64, 4, generator=g)
    return S.generate_mla_rope_score_mod(q_rope.to(dev), k_rope.to(dev), num_heads=H, scale=0.5)


# name: (factory(device) -> (mask_mod, score_mod), Lq, Lkv)
CASES = {
    "causal_mask": (lambda d: (M.causal_mask, None), 64, 64),
    "batchify_mask_mod": (lambda d: (M.batchify_mask_mod(M.causal_mask, 16), None), 64, 64),
    "generate_block_diffusion_mask": (lambda d: (M.generate_block_diffusion_mask(32, 8), None), 64, 64),
    "generate_dilated_sliding_window": (lambda d: (M.generate_dilated_sliding_window(8, 2), None), 64, 64),
    "generate_doc_mask_mod": (lambda d: (_doc_mask(d), None), 64, 64),
    "generate_packed_causal_doc_mask_mod": (
        lambda d: (M.generate_packed_causal_doc_mask_mod(_offsets(64, 5, 2, d)), None), 64, 64),
    "generate_vision_cross_attention_mask_mod": (lambda d: (_flamingo(d), None), 48, 24),
    "generate_global_sliding_window": (lambda d: (_global_sliding(d), None), 64, 64),
    "generate_jetspec_tree_causal_mask_mod": (lambda d: (_jetspec_tree(d), None), 16, 24),
    "generate_jetspec_training_mask_mod": (lambda d: (M.generate_jetspec_training_mask_mod(8, 8), None), 48, 56),
    "generate_natten": (lambda d: (M.generate_natten(8, 8, 3, 3), None), 64, 64),
    "generate_tiled_natten": (lambda d: (M.generate_tiled_natten(8, 8, 3, 3, 4, 4), None), 64, 64),
    "generate_morton_natten": (lambda d: (M.generate_morton_natten(8, 8, 3, 3), None), 64, 64),
    "generate_prefix_lm_mask": (lambda d: (M.generate_prefix_lm_mask(10), None), 64, 64),
    "generate_shared_prefix_mask_mod": (lambda d: (_shared_prefix(d), None), 64, 64),
    "generate_sliding_window": (lambda d: (M.generate_sliding_window(8), None), 64, 64),
    "generate_sta_mask_mod_2d": (
        lambda d: (M.generate_sta_mask_mod_2d((8, 4), (4, 2), (2, 2), text_seq_len=16), None), 64, 64),
    "generate_sta_mask_mod_3d": (
        lambda d: (M.generate_sta_mask_mod_3d((2, 4, 8), (2, 2, 4), (1, 2, 2)), None), 64, 64),
    "generate_spatial_head_mask_mod": (
        lambda d: (M.generate_spatial_head_mask_mod(8, 4, 14, 1, False, 4), None), 64, 64),
    "generate_spatial_head_mask_mod[sink]": (
        lambda d: (M.generate_spatial_head_mask_mod(8, 4, 14, 1, True, 4), None), 64, 64),
    "generate_temporal_head_mask_mod": (lambda d: (M.generate_temporal_head_mask_mod(8, 4, 14, 2), None), 64, 64),
    "generate_vsa_mask_mod": (lambda d: (_vsa(False, d), None), 64, 64),
    "generate_vsa_mask_mod[sizes]": (lambda d: (_vsa(True, d), None), 64, 64),
    # score mods
    "generate_activation_score_mod": (lambda d: (None, S.generate_activation_score_mod()), 64, 64),
    "generate_activation_score_mod[sigmoid]": (
        lambda d: (None, S.generate_activation_score_mod(torch.sigmoid, 0.5)), 64, 64),
    "generate_alibi_bias": (lambda d: (M.causal_mask, S.generate_alibi_bias(H)), 64, 64),
    "generate_graphormer_spatial_bias": (lambda d: (None, _graphormer_spatial(d)), 64, 64),
    "generate_graphormer_edge_bias": (lambda d: (None, _graphormer_edge(d)), 64, 64),
    "generate_mla_rope_score_mod": (lambda d: (M.causal_mask, _mla_rope(d)), 64, 64),
    "generate_sandwich_bias": (
        lambda d: (None, S.generate_sandwich_bias(H, 64, d_bar=16, device=d)), 64, 64),
    "generate_tanh_softcap": (lambda d: (None, S.generate_tanh_softcap(2)), 64, 64),
    "generate_tanh_softcap[approx]": (lambda d: (None, S.generate_tanh_softcap(2, approx=True)), 64, 64),
}


def _exported_patterns() -> set:
    names = {n for n in dir(M) if n.startswith("generate_")} | {"causal_mask", "batchify_mask_mod"}
    return names | {n for n in dir(S) if n.startswith("generate_")}


def test_every_attn_gym_pattern_has_a_case():
    covered = {name.split("[")[0] for name in CASES}
    missing = _exported_patterns() - covered
    assert not missing, f"attn-gym patterns without a case: {sorted(missing)}"


def _block_mask(mask_mod, Lq, Lkv, dev):
    return create_block_mask(mask_mod or (lambda b, h, q, kv: q >= 0), B, H, Lq, Lkv, device=dev)


def _flex64_grads(q, k, v, mask_mod, score_mod, do):
    """Gradients of eager FlexAttention's math (``math_attention``, what the uncompiled call runs)."""
    from torch._higher_order_ops.flex_attention import math_attention

    xs = [x.detach().to(torch.float64).requires_grad_(True) for x in (q, k, v)]
    bm = _block_mask(mask_mod, q.shape[2], k.shape[2], q.device)
    out, _, _ = math_attention(*xs, score_mod or (lambda s, b, h, qi, kv: s), bm.as_tuple(), D ** -0.5, {})
    return torch.autograd.grad((out * do).sum(), xs)


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_attn_gym_pattern_matches_reference_and_flex(name, dev):
    """On CPU the kernels run in Triton's interpreter; on CUDA (marked gpu) compiled, float32."""
    factory, Lq, Lkv = CASES[name]
    mask_mod, score_mod = factory(dev)
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    q, k, v = (torch.randn(B, H, L, D, generator=g).to(dev) for L in (Lq, Lkv, Lkv))

    # attndsl (kernels in the interpreter) against the float64 oracle, forward and gradients
    assert_matches_reference(q, k, v, mask_mod=mask_mod, score_mod=score_mod, seed=1, msg=name)

    # eager FlexAttention against the same oracle, forward and gradients
    # (1e-6: captured float32 tables are read as float32 by FlexAttention, as float64 by the oracle)
    x64 = [x.to(torch.float64) for x in (q, k, v)]
    flex = flex_attention(*x64, score_mod=score_mod, block_mask=_block_mask(mask_mod, Lq, Lkv, dev))
    r64 = [x.clone().requires_grad_(True) for x in x64]
    ref, _ = attndsl.reference.attention(*r64, mask_mod=mask_mod, score_mod=score_mod)
    torch.testing.assert_close(flex, ref.detach(), rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: flex vs oracle\n{m}")
    do = torch.randn(flex.shape, generator=g, dtype=torch.float64).to(dev)
    want = torch.autograd.grad((ref * do).sum(), r64)
    got = _flex64_grads(q, k, v, mask_mod, score_mod, do)
    for n, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: flex {n} vs oracle\n{m}")

    # and attndsl's own output against FlexAttention's directly
    ours = attndsl.attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
    torch.testing.assert_close(ours.to(torch.float64), flex, rtol=2e-4, atol=2e-4,
                               msg=lambda m: f"{name}: attndsl vs flex\n{m}")
