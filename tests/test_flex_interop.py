"""FlexAttention interop (issue 26 part 2): block_mask=, enable_gqa=, return_aux=, kernel_options=,
and the drop-ins ``attndsl.flex_attention`` / ``attndsl.create_block_mask``, against eager torch
flex_attention on CPU."""
import sys
import warnings

import pytest
import torch
from torch.nn.attention import flex_attention as F

import attndsl
import attndsl.reference

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def window(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx).abs() < 6


def softcap(score, b, h, q_idx, kv_idx):
    return 20 * torch.tanh(score / 20)


def qkv(Hq=2, Hkv=2, L=32, D=16, dtype=torch.float32, grad=False):
    return (torch.randn(1, Hq, L, D, dtype=dtype, requires_grad=grad),
            torch.randn(1, Hkv, L, D, dtype=dtype, requires_grad=grad),
            torch.randn(1, Hkv, L, D, dtype=dtype, requires_grad=grad))


def close(a, b, tol=1e-5):
    return float((a.detach().double() - b.detach().double()).abs().max()) < tol


@pytest.mark.parametrize("mask", [causal, window])
def test_torch_block_mask_and_score_mod_match_torch(mask):
    q, k, v = qkv(grad=True)
    bm = F.create_block_mask(mask, None, None, 32, 32, device="cpu")
    got = attndsl.flex_attention(q, k, v, score_mod=softcap, block_mask=bm)
    # torch's flex_attention has no CPU backward: gradients against the reference
    want = F.flex_attention(q.detach(), k.detach(), v.detach(), score_mod=softcap, block_mask=bm)
    assert close(got, want)
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _ = attndsl.reference.attention(q64, k64, v64, mask_mod=mask, score_mod=softcap)
    g2 = torch.autograd.grad(ref.sum(), (q64, k64, v64))
    assert all(close(a, b, 1e-4) for a, b in zip(g1, g2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_return_aux_and_return_lse(dtype):
    q, k, v = qkv(dtype=dtype)
    bm = F.create_block_mask(causal, 1, 1, 32, 32, device="cpu")
    try:
        out, aux = attndsl.flex_attention(q, k, v, block_mask=bm, return_aux=F.AuxRequest(lse=True))
    except TypeError as e:
        if dtype == torch.float64 and "supported" in str(e):
            pytest.skip("float64 inputs are not supported on this branch (issue 26 part 3)")
        raise
    want, waux = F.flex_attention(q, k, v, block_mask=bm, return_aux=F.AuxRequest(lse=True))
    assert isinstance(aux, F.AuxOutput) and aux.max_scores is None
    assert close(out, want, 1e-4) and close(aux.lse, waux.lse, 1e-4)
    out2, lse = attndsl.flex_attention(q, k, v, block_mask=bm, return_lse=True)
    assert close(out2, out) and close(lse, aux.lse)
    with pytest.raises(ValueError, match="Cannot specify both"):
        attndsl.flex_attention(q, k, v, return_lse=True, return_aux=F.AuxRequest(lse=True))
    with pytest.raises(NotImplementedError, match="max_scores"):
        attndsl.flex_attention(q, k, v, return_aux=F.AuxRequest(max_scores=True))


def test_noop_block_mask_means_no_mask():
    q, k, v = qkv()
    bm = F.create_block_mask(F.noop_mask, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    before = dict(sys.modules["attndsl.flexcompat"].PATH_COUNTS)
    assert close(attndsl.attention(q, k, v, block_mask=bm), attndsl.attention(q, k, v))
    assert sys.modules["attndsl.flexcompat"].PATH_COUNTS["mask_mod"] == before["mask_mod"] + 1  # every block listed


def test_create_block_mask_is_light_and_accepted_everywhere():
    bm = attndsl.create_block_mask(causal, None, None, 32, 32, device="cpu")
    assert isinstance(bm, attndsl.PatternMask) and bm.shape == (1, 1, 32, 32) and bm.mask_mod is causal
    assert not any(isinstance(x, torch.Tensor) for x in vars(bm).values())  # nothing materialised
    big = attndsl.create_block_mask(causal, 1, 1, 1 << 20, 1 << 20)  # O(1): no L² work or memory
    assert big.seq_lengths == (1 << 20, 1 << 20)
    q, k, v = qkv()
    want = F.flex_attention(q, k, v, block_mask=F.create_block_mask(causal, None, None, 32, 32, device="cpu"))
    assert close(attndsl.flex_attention(q, k, v, block_mask=bm), want)
    assert close(attndsl.attention(q, k, v, block_mask=bm), want)
    with pytest.raises(ValueError, match="lengths"):
        attndsl.attention(*qkv(L=48), block_mask=bm)
    with pytest.raises(ValueError, match="not both"):
        attndsl.attention(q, k, v, block_mask=bm, mask_mod=causal)


def test_enable_gqa_like_flex():
    q, k, v = qkv(Hq=4, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attndsl.flex_attention(q, k, v)  # Flex's default refuses differing heads: so does the drop-in
    with pytest.raises(ValueError, match="enable_gqa=True"):
        attndsl.attention(q, k, v, enable_gqa=False)
    got = attndsl.flex_attention(q, k, v, score_mod=softcap, enable_gqa=True)
    assert close(got, F.flex_attention(q, k, v, score_mod=softcap, enable_gqa=True))
    assert close(attndsl.attention(q, k, v, score_mod=softcap), got)  # attndsl's own default accepts GQA


def test_kernel_options():
    q, k, v = qkv()
    got = attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16, "PRESCALE_QK": False})
    assert close(got, F.flex_attention(q, k, v))
    with pytest.raises(ValueError, match="unknown option"):
        attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_MM": 16})
    with pytest.raises(ValueError, match="positive int"):
        attndsl.flex_attention(q, k, v, kernel_options={"BLOCK_M": 0})


def test_signature_matches_torch():
    import inspect
    ours = inspect.signature(attndsl.flex_attention)
    theirs = inspect.signature(F.flex_attention)
    assert list(ours.parameters) == list(theirs.parameters)
    assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()]


@pytest.mark.parametrize("kind", ["torch", "attndsl"])
def test_flex_drop_in_under_torch_compile(kind):
    import torch._dynamo
    torch._dynamo.reset()
    make = F.create_block_mask if kind == "torch" else attndsl.create_block_mask
    bm = make(causal, None, None, 32, 32, device="cpu")
    q, k, v = qkv()
    f = torch.compile(lambda q, k, v, bm: attndsl.flex_attention(q, k, v, score_mod=softcap, block_mask=bm,
                                                                 return_aux=F.AuxRequest(lse=True)),
                      fullgraph=True, backend="aot_eager")
    out, aux = f(q, k, v, bm)
    want, waux = F.flex_attention(q, k, v, score_mod=softcap, block_mask=F.create_block_mask(
        causal, None, None, 32, 32, device="cpu"), return_aux=F.AuxRequest(lse=True))
    assert close(out, want) and close(aux.lse, waux.lse)


# ---------------------------------------------------------------------------------------------
# torch BlockMasks whose block tensors say more than their mask_mod (from_kv_blocks, VSA).
# torch's eager flex_attention (the CPU oracle above) reads only the mask_mod, so these are
# checked against a dense mask built from the block tensors: key visible iff its block is listed
# for (b, h, q block) and (the block is full or mask_mod holds), as FlexAttention's kernels do.
# ---------------------------------------------------------------------------------------------
FLEX = sys.modules["attndsl.flexcompat"]


def lists(sel):
    """(counts [.., nq] int32, indices [.., nq, nk] int32) of a boolean block selection."""
    nk = sel.shape[-1]
    ar = torch.arange(nk)
    idx = torch.sort(torch.where(sel, ar, ar + nk), dim=-1).values
    return sel.sum(-1, dtype=torch.int32), torch.where(idx >= nk, 0, idx).to(torch.int32)


def dense_of(part, full, mask_mod, B, H, L, S, qb, kb):
    """The [B, H, L, S] visibility FlexAttention gives a BlockMask (listed AND (full OR mask_mod))."""
    up = lambda s: s.repeat_interleave(qb, 2)[:, :, :L].repeat_interleave(kb, 3)[..., :S].expand(B, H, L, S)
    m = torch.ones(B, H, L, S, dtype=torch.bool) if mask_mod is None else torch.as_tensor(mask_mod(
        torch.arange(B).view(B, 1, 1, 1), torch.arange(H).view(1, H, 1, 1), torch.arange(L).view(1, 1, L, 1),
        torch.arange(S).view(1, 1, 1, S))).expand(B, H, L, S)
    return (up(part) & m) | up(full)


def check_against_dense(bm, dense, B=1, Hq=2, Hkv=2, L=64, D=16, score_mod=None, grads=True):
    q, k, v = (torch.randn(B, h, L, D, requires_grad=True) for h in (Hq, Hkv, Hkv))
    out, lse = attndsl.attention(q, k, v, block_mask=bm, score_mod=score_mod, return_lse=True)
    seen = dense.expand(B, Hq, L, L)

    def dense_mask(b, h, q_idx, kv_idx):
        return seen[b, h, q_idx, kv_idx]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = attndsl.reference.attention(q64, k64, v64, mask_mod=dense_mask, score_mod=score_mod)
    assert close(out, ref, 1e-4) and close(lse, ref_lse, 1e-4)
    if grads:
        g1 = torch.autograd.grad(out.sum() + lse.clamp(min=-1e4).sum(), (q, k, v))
        g2 = torch.autograd.grad(ref.sum() + ref_lse.clamp(min=-1e4).sum(), (q64, k64, v64))
        assert all(close(a, b, 1e-4) for a, b in zip(g1, g2))
    return out


@pytest.mark.parametrize("Bm,Hm,B", [(1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 1, 2)])
def test_from_kv_blocks_random_noop(Bm, Hm, B):
    sel = torch.rand(Bm, Hm, 4, 4) < 0.5
    sel[..., 0] = True
    sel[..., 0, 3] = False  # not every block: the mask_mod (none) alone would say more
    cnt, idx = lists(sel)
    bm = F.BlockMask.from_kv_blocks(cnt, idx, BLOCK_SIZE=16)
    before = dict(FLEX.PATH_COUNTS)
    check_against_dense(bm, dense_of(sel, torch.zeros_like(sel), None, Bm, Hm, 64, 64, 16, 16), B=B)
    assert FLEX.PATH_COUNTS["selection"] == before["selection"] + 1
    q, k, v = (torch.randn(B, 2, 64, 16) for _ in range(3))
    for _ in range(2):  # checked once; the selection (and its block tables) kept with the verdict
        attndsl.attention(q, k, v, block_mask=bm)
    assert FLEX.PATH_COUNTS["checks"] == before["checks"] + 1
    assert FLEX.PATH_COUNTS["selection"] == before["selection"] + 3
    q, k, v = qkv(L=64)
    # and torch's own eager CPU path reads only the mask_mod: the block tensors must change the answer
    if Bm == 1:
        assert not close(attndsl.attention(q, k, v, block_mask=bm), F.flex_attention(q, k, v, block_mask=bm))


@pytest.mark.parametrize("Hm", [1, 4])
def test_from_kv_blocks_gqa_full_blocks_disagreeing_with_mask_mod(Hm):
    # partial and full blocks, causal mask_mod: the full blocks above the diagonal must be seen whole
    sel = torch.rand(1, Hm, 4, 4) < 0.6
    sel[..., 0] = True
    full = sel & (torch.rand(1, Hm, 4, 4) < 0.5)
    full[..., 0, 3] = True  # a full block the causal mask_mod would empty
    sel |= full
    part = sel & ~full
    bm = F.BlockMask.from_kv_blocks(*lists(part), *lists(full), BLOCK_SIZE=16, mask_mod=causal)
    before = dict(FLEX.PATH_COUNTS)
    check_against_dense(bm, dense_of(part, full, causal, 1, Hm, 64, 64, 16, 16), Hq=4, Hkv=2,
                        score_mod=softcap)
    assert FLEX.PATH_COUNTS["split"] == before["split"] + 1


def test_from_kv_blocks_full_blocks_agreeing_take_one_selection():
    # the causal blocks of torch's create_block_mask, with one extra partial block below the diagonal
    # removed: not what the mask_mod implies (no fast path), but full blocks agree (one selection)
    base = F.create_block_mask(causal, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    part = torch.eye(4, dtype=torch.bool).view(1, 1, 4, 4)
    full = torch.tril(torch.ones(4, 4, dtype=torch.bool), -1).view(1, 1, 4, 4)
    full[..., 3, 1] = False
    bm = F.BlockMask.from_kv_blocks(*lists(part), *lists(full), BLOCK_SIZE=16, mask_mod=causal)
    assert base.kv_num_blocks.sum() == bm.kv_num_blocks.sum()
    before = dict(FLEX.PATH_COUNTS)
    check_against_dense(bm, dense_of(part, full, causal, 1, 1, 64, 64, 16, 16))
    assert FLEX.PATH_COUNTS["selection"] == before["selection"] + 1
    assert FLEX.PATH_COUNTS["split"] == before["split"]


def test_vsa_block_mask():
    from attn_gym.masks import create_vsa_block_mask, generate_vsa_mask_mod
    tile, n_tiles, L = 16, 4, 64
    topk = torch.stack([torch.randperm(n_tiles)[:2] for _ in range(2 * n_tiles)]).view(1, 2, n_tiles, 2)
    sizes = torch.tensor([16, 16, 9, 16])  # a padded tile: partial blocks with a padding mask_mod
    for vbs in (None, sizes):
        bm = create_vsa_block_mask(topk, tile, n_tiles, variable_block_sizes=vbs)
        # VSA's element-level mask_mod says what the block mask means
        dense = F.create_mask(generate_vsa_mask_mod(topk, tile, vbs), 1, 2, L, L, device="cpu")
        check_against_dense(bm, dense)


@pytest.mark.parametrize("name", ["causal", "window", "document"])
def test_create_block_mask_takes_the_fast_path_once_checked(name):
    docs = torch.tensor([0] * 20 + [1] * 30 + [2] * 14)

    def document(b, h, q_idx, kv_idx):
        return (docs[q_idx] == docs[kv_idx]) & (q_idx >= kv_idx)
    mask = {"causal": causal, "window": window, "document": document}[name]
    bm = F.create_block_mask(mask, None, None, 64, 64, device="cpu", BLOCK_SIZE=16)
    q, k, v = qkv(L=64)
    want = F.flex_attention(q, k, v, block_mask=bm)
    before = dict(FLEX.PATH_COUNTS)
    for _ in range(3):
        assert close(attndsl.attention(q, k, v, block_mask=bm), want)
    assert FLEX.PATH_COUNTS["mask_mod"] == before["mask_mod"] + 3
    assert FLEX.PATH_COUNTS["checks"] == before["checks"] + 1  # one host check per BlockMask
    # an in-place change of the block tensors is seen: checked again, now a selection
    bm.kv_num_blocks[..., -1] = 0
    bm.full_kv_num_blocks[..., -1] = 0
    out = attndsl.attention(q, k, v, block_mask=bm)
    assert FLEX.PATH_COUNTS["checks"] == before["checks"] + 2
    assert FLEX.PATH_COUNTS["mask_mod"] == before["mask_mod"] + 3
    assert close(out[:, :, :48], want[:, :, :48]) and float(out[:, :, 48:].abs().max()) == 0.0


def test_block_mask_block_size_must_be_a_power_of_two():
    bm = F.BlockMask.from_kv_blocks(*lists(torch.ones(1, 1, 3, 3, dtype=torch.bool)), BLOCK_SIZE=(24, 24),
                                    seq_lengths=(64, 64))
    with pytest.raises(ValueError, match="power of two"):
        attndsl.attention(*qkv(L=64), block_mask=bm)


def test_from_kv_blocks_under_torch_compile():
    import torch._dynamo
    torch._dynamo.reset()
    sel = torch.rand(1, 2, 4, 4) < 0.5
    sel[..., 0] = True
    full = sel & (torch.rand(1, 2, 4, 4) < 0.5)
    part = sel & ~full
    bm = F.BlockMask.from_kv_blocks(*lists(part), *lists(full), BLOCK_SIZE=16, mask_mod=causal)
    q, k, v = qkv(L=64)
    f = torch.compile(lambda q, k, v, bm: attndsl.flex_attention(q, k, v, score_mod=softcap, block_mask=bm),
                      fullgraph=True, backend="aot_eager")
    assert close(f(q, k, v, bm), attndsl.attention(q, k, v, score_mod=softcap, block_mask=bm))
    seen = dense_of(part, full, causal, 1, 2, 64, 64, 16, 16)
    ref, _ = attndsl.reference.attention(*(t.double() for t in (q, k, v)), score_mod=softcap,
                                         mask_mod=lambda b, h, i, j: seen[b, h, i, j])
    assert close(f(q, k, v, bm), ref, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("Hm", [1, 4])
def test_from_kv_blocks_against_compiled_flex_on_gpu(Hm):
    """FlexAttention's compiled kernel is the oracle of what a BlockMask means (full blocks skip the
    mask_mod); attndsl must agree, forward and gradients, eagerly and in a CUDA graph."""
    torch.manual_seed(0)
    dev, L, nb = "cuda", 512, 4
    sel = torch.rand(2, Hm, nb, nb, device=dev) < 0.6
    sel[..., 0] = True
    full = sel & (torch.rand(2, Hm, nb, nb, device=dev) < 0.5)
    full[..., 0, 3] = True  # a full block the causal mask_mod would empty
    part = sel & ~full

    def lists_dev(s):
        c, i = lists(s.cpu())
        return c.to(dev), i.to(dev)
    bm = F.BlockMask.from_kv_blocks(*lists_dev(part), *lists_dev(full), BLOCK_SIZE=128, mask_mod=causal)
    q = torch.randn(2, 4, L, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, L, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    flex = torch.compile(F.flex_attention)
    want = flex(q, k, v, block_mask=bm, enable_gqa=True)
    got = attndsl.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    assert close(got, want, 2e-2)
    g1 = torch.autograd.grad(got.float().sum(), (q, k, v))
    g2 = torch.autograd.grad(want.float().sum(), (q, k, v))
    assert all(close(a, b, 5e-2) for a, b in zip(g1, g2))
    with torch.no_grad():
        graph, static = torch.cuda.CUDAGraph(), None
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            attndsl.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)  # warm-up
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            static = attndsl.flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
        graph.replay()
        torch.cuda.synchronize()
        assert close(static, want, 2e-2)


def test_from_kv_blocks_split_path_in_float64_with_sinks():
    full = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    full[..., 0, 2] = True  # full above the diagonal: seen whole, the causal mask_mod skipped
    part = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    bm = F.BlockMask.from_kv_blocks(*lists(part), *lists(full), BLOCK_SIZE=16, mask_mod=causal)
    q, k, v = qkv(L=64, dtype=torch.float64)
    sinks = torch.randn(2, dtype=torch.float64)
    before = dict(FLEX.PATH_COUNTS)
    out, lse = attndsl.attention(q, k, v, block_mask=bm, sinks=sinks, return_lse=True)
    assert FLEX.PATH_COUNTS["split"] == before["split"] + 1
    assert out.dtype == torch.float64
    seen = dense_of(part, full, causal, 1, 1, 64, 64, 16, 16)
    # the sinks join the softmax once
    ref, ref_lse = attndsl.reference.attention(q, k, v, mask_mod=lambda b, h, i, j: seen[b, 0, i, j], sinks=sinks)
    assert close(out, ref, 1e-10) and close(lse, ref_lse, 1e-10)
