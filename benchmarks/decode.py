"""Decoding benchmark: ``attndsl.serving.decode`` against SDPA and FlexAttention's decoding path.

    python -m benchmarks.decode [--quick] [--sweep] [--json PATH] [--no-flex] [--budget-s 330]
    python -m benchmarks.decode --device cpu      # a dry run of every code path at tiny sizes

Cases (bf16, 32 query heads over 8 KV heads, D=128, one new token unless said):

* ``plain``: B in {1, 16, 64} x cache {4K, 32K, 128K} (cases over 15 GiB of K/V are skipped),
  contiguous ``[B, Hkv, L, D]`` and paged (page 128 and 16, pages in a random order); SDPA
  (contiguous, ``enable_gqa``) and FlexAttention (``torch.compile(flex_attention, dynamic=False)``;
  contiguous, and paged through ``PagedAttention``'s converted BlockMask with page 128, its block
  size) as anchors;
* ``window4096``: a 4096-token sliding window over a 32K cache (B=8): only the window is needed;
* ``dsa2048``: DSA top-2048 decode over a 128K cache (B=8): only the selected rows are needed.

Every case is checked before it is timed (ours vs SDPA or Flex, or vs a torch gather of the selected
rows for DSA; relative error under 2e-2). Reported per row: GPU time of plain calls and of CUDA-graph
replays (``do_bench``, median), host time per call (a loop without syncs), the K/V bytes the pattern
needs, the achieved bandwidth (bytes ÷ time) and its fraction of a device-to-device copy's bandwidth
measured in the same run (bytes read + written ÷ time). Rows follow the results format
(``shared/bench/README.md``); written to ``$OUT/decode.json`` (or ``--json``) after every case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HQ, HKV, D = 32, 8, 128
WARMUP_MS, REP_MS = 50, 200
TOL = 2e-2
MAX_BYTES = 60 * 2**30  # pools, a contiguous copy and Flex's copy live at once: 4x the K/V bytes


def _bench(fn):
    if not torch.cuda.is_available():  # the CPU dry run: a few wall-clock calls
        fn()
        t = time.perf_counter()
        for _ in range(2):
            fn()
        return (time.perf_counter() - t) / 2 * 1e3
    from triton.testing import do_bench
    return do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")


def _graph_ms(fn):
    """Median time of a CUDA-graph replay of ``fn`` (captured after a warm call)."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return _bench(g.replay)


def _host_us(fn, calls=200):
    if not torch.cuda.is_available():
        calls = 2
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t) / calls * 1e6
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return dt


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def copy_gbps(dev, nbytes=2**30):
    """Device-to-device copy bandwidth, bytes read + written per second (GB/s)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e6


class Setup:
    """One cache: a paged pool (pages shuffled) and the same logical content contiguous."""

    def __init__(self, B, L, page_size, dev, dtype, gen, contiguous=True):
        from attndsl.serving import PagedKVCache
        self.B, self.L, self.page_size = B, L, page_size
        pages = B * (L // page_size)
        self.cache = PagedKVCache(pages, page_size, HKV, D, max_batch=B, max_seq_len=L, dtype=dtype, device=dev)
        self.cache.k_pool.normal_(generator=gen)
        self.cache.v_pool.normal_(generator=gen)
        perm = torch.randperm(pages, generator=torch.Generator().manual_seed(0)).to(torch.int32)
        self.cache.page_table.copy_(perm.view(B, -1).to(dev))
        self.cache.seq_lens.fill_(L)
        self.k = self.v = None
        if contiguous:
            pt = self.cache.page_table.to(torch.int64)
            self.k = self.cache.k_pool[pt].reshape(B, L, HKV, D).transpose(1, 2).contiguous()
            self.v = self.cache.v_pool[pt].reshape(B, L, HKV, D).transpose(1, 2).contiguous()

    def flex_paged(self):
        """FlexAttention's paged layout ``[1, Hkv, pages * page, D]`` with the same content, and its
        ``PagedAttention`` (page table and physical-to-logical map)."""
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        c, dev = self.cache, self.cache.k_pool.device
        n_pages = c.k_pool.shape[0]
        pa = PagedAttention(n_pages, self.page_size, self.B, device=dev)
        for b in range(self.B):
            pa.reserve(torch.tensor(b, device=dev), torch.tensor(self.L, device=dev))
        fk = c.k_pool.permute(2, 0, 1, 3).reshape(1, HKV, n_pages * self.page_size, D)
        fv = c.v_pool.permute(2, 0, 1, 3).reshape(1, HKV, n_pages * self.page_size, D)
        # flex's physical page of logical page p of sequence b holds ours: permute our pages to its table
        src = c.page_table.to(torch.int64)[:, : self.L // self.page_size].reshape(-1)
        dst = pa.page_table[:, : self.L // self.page_size].reshape(-1)
        order = torch.arange(n_pages, device=dev)
        order[dst] = src
        fk = fk.view(HKV, n_pages, self.page_size, D)[:, order].reshape(1, HKV, -1, D).contiguous()
        fv = fv.view(HKV, n_pages, self.page_size, D)[:, order].reshape(1, HKV, -1, D).contiguous()
        return pa, fk, fv


def _meta(dev):
    import triton
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except Exception:  # noqa: BLE001
        commit = None
    return dict(gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                triton=triton.__version__, commit=commit)


def run(args):
    import attndsl  # noqa: F401
    from attndsl.patterns import sliding_window
    from attndsl.serving import decode
    dev = args.device
    cpu = dev == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    esize = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=dev).manual_seed(0)
    meta = _meta(dev)
    rows = []
    out_path = Path(args.json or os.path.join(os.environ.get("OUT", "."), "decode.json"))
    t_start = time.time()
    copy = copy_gbps(dev, 2**20 if cpu else 2**30)
    print(f"device-to-device copy: {copy:.0f} GB/s (read + write)", flush=True)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = flex_attention if cpu else torch.compile(flex_attention, dynamic=False)

    def emit(row):
        row.update(meta)
        row["copy_gbps"] = round(copy, 1)
        if row.get("ours_ms"):
            row["ours_gbps"] = round(row["bytes"] / row["ours_ms"] / 1e6, 1)
            row["frac_of_copy"] = round(row["ours_gbps"] / copy, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(rows, indent=1))

    def over_budget():
        return time.time() - t_start > args.budget_s

    def time_ours(fn, row):
        row["ours_ms"] = round(_bench(fn), 4)
        row["host_us"] = round(_host_us(fn), 1)
        if not cpu:
            try:
                row["ours_graph_ms"] = round(_graph_ms(fn), 4)
            except Exception as e:  # noqa: BLE001
                row["ours_graph_error"] = f"{type(e).__name__}: {e}"[:300]

    def case_base(B, L, nbytes, **extra):
        return dict(B=B, Hq=HQ, Hkv=HKV, Lq=1, Lkv=L, D=D, dtype=str(dtype).replace("torch.", ""),
                    **{"pass": "fwd"}, bytes=nbytes, **extra)

    def setup(B, L):
        """A full cache of B sequences of L tokens (paged, page 128; and contiguous) and one query token each."""
        st = Setup(B, L, 16 if cpu else 128, dev, dtype, gen)
        qq = torch.randn(B, HQ, 1, D, generator=gen, device=dev, dtype=torch.float32).to(dtype)
        return st, qq, st.cache.seq_lens

    def checked(row, fn, ref):
        """Check ours against ``ref`` on the benchmark inputs, then time it; False (row emitted) on a mismatch."""
        row["rel_err"] = round(_rel(fn(), ref), 5)
        if row["rel_err"] > TOL:
            emit(dict(row, failed="check"))
            return False
        time_ours(fn, row)
        return True

    def flex_row(row, fn, ref_out=None):
        if flex is None:
            return
        try:
            o = fn()
            if ref_out is not None:
                row["flex_rel_err"] = round(_rel(o, ref_out), 5)
            row["flex_ms"] = round(_bench(fn), 4)
            if not cpu:
                try:
                    row["flex_graph_ms"] = round(_graph_ms(fn), 4)
                except Exception as e:  # noqa: BLE001
                    row["flex_graph_error"] = f"{type(e).__name__}: {e}"[:300]
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = f"{type(e).__name__}: {e}"[:300]

    Bs = [1, 16, 64] if not args.quick else [1, 8, 64]
    Ls = [4096, 32768, 131072] if not args.quick else [32768]
    if cpu:
        Bs, Ls = [2], [256]
    if args.quick and not cpu:
        plan = [(8, 32768), (64, 4096), (1, 131072)]
    else:
        plan = [(B, L) for L in Ls for B in Bs]
    scale = D ** -0.5
    # -- plain decode -------------------------------------------------------------------------
    for B, L in plan:
        nbytes = B * HKV * L * 2 * D * esize
        base = case_base(B, L, nbytes)
        if 4 * nbytes > MAX_BYTES or over_budget():
            emit(dict(base, case="plain", skipped="too large" if 4 * nbytes > MAX_BYTES else "budget"))
            continue
        try:
            s, q, lens = setup(B, L)
            sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, s.k, s.v, enable_gqa=True)  # noqa: E731
            ref = sdpa()
            # contiguous
            row = dict(base, case="plain", layout="contiguous", api="decode")
            fn = lambda: decode(q, s.k, s.v, seq_lens=lens)  # noqa: E731
            if not checked(row, fn, ref):
                continue
            row["sdpa_ms"] = round(_bench(sdpa), 4)
            if flex is not None:
                lens_c = lens

                def length_mask(b, h, q_idx, kv_idx):
                    return kv_idx < lens_c[b]
                bm = create_block_mask(length_mask, B, None, 1, L, device=dev)
                flex_row(row, lambda: flex(q, s.k, s.v, block_mask=bm, enable_gqa=True), ref)
            emit(row)
            # paged, page 128 (one page lookup per tile) and 16 (per row)
            for ps in ([16] if cpu else [128, 16]):
                sp = s if ps == s.page_size else Setup(B, L, ps, dev, dtype, gen, contiguous=False)
                if sp is not s:
                    # same content as the contiguous cache: copy it into the new pool's pages
                    pt = sp.cache.page_table.to(torch.int64)
                    sp.cache.k_pool[pt] = s.k.transpose(1, 2).reshape(B, -1, ps, HKV, D)
                    sp.cache.v_pool[pt] = s.v.transpose(1, 2).reshape(B, -1, ps, HKV, D)
                row = dict(base, case="plain", layout=f"paged{ps}", api="decode", page_size=ps)
                fn = lambda: sp.cache.decode(q)  # noqa: E731
                if not checked(row, fn, ref):
                    continue
                if flex is not None and ps == s.page_size:
                    pa, fk, fv = s.flex_paged()
                    logical = create_block_mask(length_mask, B, None, 1, L, BLOCK_SIZE=ps, device=dev)
                    bm_p = pa.convert_logical_block_mask(logical, kv_len=lens.to(torch.int64))
                    flex_row(row, lambda: flex(q, fk, fv, block_mask=bm_p, enable_gqa=True), ref)
                    del fk, fv
                emit(row)
                del sp
            del s
        except Exception as e:  # noqa: BLE001
            emit(dict(base, case="plain", error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
        if not cpu:
            torch.cuda.empty_cache()
    # -- a 4096 window over 32K ------------------------------------------------------------------
    B, L, W = (2, 256, 64) if cpu else (8, 32768, 4096)
    base = case_base(B, L, B * HKV * W * 2 * D * esize, window=W)
    if not over_budget():
        try:
            s, q, lens = setup(B, L)
            win = sliding_window(W)
            ref = torch.nn.functional.scaled_dot_product_attention(q, s.k[:, :, L - W:], s.v[:, :, L - W:],
                                                                   enable_gqa=True)
            offs = (lens - 1).to(torch.int64)

            def window_flex(b, h, q_idx, kv_idx):
                return win(b, h, q_idx + offs[b], kv_idx) & (kv_idx < lens[b])
            for layout in ("contiguous", "paged"):
                row = dict(base, case="window4096", layout=layout, api="decode")
                if layout == "contiguous":
                    fn = lambda: decode(q, s.k, s.v, seq_lens=lens, mask_mod=win)  # noqa: E731
                else:
                    fn = lambda: s.cache.decode(q, mask_mod=win)  # noqa: E731
                if not checked(row, fn, ref):
                    continue
                if flex is not None:
                    if layout == "contiguous":
                        bm = create_block_mask(window_flex, B, None, 1, L, device=dev)
                        flex_row(row, lambda: flex(q, s.k, s.v, block_mask=bm, enable_gqa=True), ref)
                    else:
                        pa, fk, fv = s.flex_paged()
                        logical = create_block_mask(window_flex, B, None, 1, L, BLOCK_SIZE=s.page_size, device=dev)
                        bm_p = pa.convert_logical_block_mask(logical, kv_len=lens.to(torch.int64))
                        flex_row(row, lambda: flex(q, fk, fv, block_mask=bm_p, enable_gqa=True), ref)
                emit(row)
            del s
        except Exception as e:  # noqa: BLE001
            emit(dict(base, case="window4096", error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
    # -- DSA top-2048 over 128K ------------------------------------------------------------------
    B, L, K = (2, 256, 32) if cpu else (8, 131072, 2048)
    base = case_base(B, L, B * HKV * K * 2 * D * esize, topk=K)
    if not over_budget():
        try:
            s, q, lens = setup(B, L)
            idx = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b))[:K].sort().values
                               for b in range(B)]).to(torch.int32).view(B, 1, 1, K).to(dev)
            sel = idx.view(B, 1, K, 1).expand(B, HKV, K, D).to(torch.int64)
            ref = torch.nn.functional.scaled_dot_product_attention(q, s.k.gather(2, sel), s.v.gather(2, sel),
                                                                   enable_gqa=True)
            for layout in ("contiguous", "paged"):
                row = dict(base, case="dsa2048", layout=layout, api="decode")
                if layout == "contiguous":
                    fn = lambda: decode(q, s.k, s.v, seq_lens=lens, indices=idx)  # noqa: E731
                else:
                    fn = lambda: s.cache.decode(q, indices=idx)  # noqa: E731
                if not checked(row, fn, ref):
                    continue
                # the aim: within 1.5x of reading the selected rows at the copy's read bandwidth
                row["copy_floor_ms"] = round(base["bytes"] / (copy / 2) / 1e6, 4)
                emit(row)
            del s
        except Exception as e:  # noqa: BLE001
            emit(dict(base, case="dsa2048", error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
    # -- tile sweep of the headline case (--sweep) --------------------------------------------------
    if args.sweep and not over_budget():
        B, L = (2, 256) if cpu else (8, 32768)
        try:
            s, q, lens = setup(B, L)
            ref = torch.nn.functional.scaled_dot_product_attention(q, s.k, s.v, enable_gqa=True)
            combos = [dict(BLOCK_N=bn, num_warps=nw, num_stages=ns) for bn, nw, ns in
                      ((32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2),
                       (128, 8, 3))]
            for ko in combos:
                for splits in (None, "x2"):
                    if over_budget():
                        break
                    ns_arg = None
                    if splits == "x2":  # twice the heuristic's split count
                        from attndsl.serving.decoding import num_splits_for
                        ns_arg = 2 * num_splits_for(B * HKV, L // ko["BLOCK_N"], torch.device(dev), cpu)
                    for layout in ("contiguous", "paged128"):
                        row = dict(case_base(B, L, B * HKV * L * 2 * D * esize), case="sweep", layout=layout,
                                   api="decode", kernel_options=ko, num_splits=ns_arg or "auto")
                        if layout == "contiguous":
                            fn = lambda: decode(q, s.k, s.v, seq_lens=lens, kernel_options=ko,  # noqa: E731
                                                num_splits=ns_arg)
                        else:
                            fn = lambda: s.cache.decode(q, kernel_options=ko, num_splits=ns_arg)  # noqa: E731
                        try:
                            if checked(row, fn, ref):
                                emit(row)
                        except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                            emit(dict(row, error=f"{type(e).__name__}: {e}"[:300]))
            del s
        except Exception as e:  # noqa: BLE001
            emit(dict(case="sweep", error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
    print(f"wrote {len(rows)} rows to {out_path} in {time.time() - t_start:.0f} s")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="B=8 at 32K, B=64 at 4K, B=1 at 128K, window, DSA")
    p.add_argument("--json", default=None)
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", action="store_true", help="also time tile options of the B=8, 32K case")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this long")
    args = p.parse_args(argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
