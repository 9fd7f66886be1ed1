"""Decoding benchmark: ``attndsl.serving.decode`` against SDPA and FlexAttention's decoding path.

    python -m benchmarks.decode [--quick] [--cases plain,window4096,dsa2048] [--json PATH] [--no-flex] [--budget-s 330]
    python -m benchmarks.decode --sweep           # tile/split candidates of the missed aims -> TUNING lines
    python -m benchmarks.decode --summarize decode.json   # the sweep table of a run's JSON rows
    python -m benchmarks.decode --host-cpu        # host time per call, kernel launches stubbed (no GPU)
    python -m benchmarks.decode --device cpu      # a dry run of every code path at tiny sizes

Cases (bf16, 32 query heads over 8 KV heads, D=128, one new token unless said):

* ``plain``: B in {1, 16, 64} x cache {4K, 32K, 128K} (cases over 15 GiB of K/V are skipped),
  contiguous ``[B, Hkv, L, D]`` and paged (page 128 and 16, pages in a random order; pools stored
  token-major, vLLM's ``NHD``, and head-major, ``HND``: layouts ``paged<size>_hnd``); SDPA
  (contiguous, ``enable_gqa``) and FlexAttention (``torch.compile(flex_attention, dynamic=False)``;
  contiguous, and paged through ``PagedAttention``'s converted BlockMask with page 128, its block
  size) as anchors;
* ``window4096``: a 4096-token sliding window over a 32K cache (B=8): only the window is needed;
* ``dsa2048``: DSA top-2048 decode over a 128K cache (B=8): only the selected rows are needed.

Every case is checked before it is timed (ours vs SDPA or Flex, or vs a torch gather of the selected
rows for DSA; relative error under 2e-2). Reported per row: GPU time of plain calls and of CUDA-graph
replays (``do_bench``, median; ``*_graph_ms`` one call per graph, ``*_step_ms`` per call of a
graph of :data:`STEPS` calls, as a serving step replays one graph over its layers), host time per
call (a loop without syncs), the K/V bytes the pattern needs, the achieved bandwidth (bytes ÷ time) and its fraction of a device-to-device copy's bandwidth
measured in the same run (bytes read + written ÷ time), and the speed-ups over Flex (``*_vs_flex``).
Contiguous plain, window and DSA rows also time the other merge of split partials
(``decoding.FUSED_MERGE``: by default the split kernel merges, ``twokernel_*`` columns time the merge
kernel; ``fused_merge`` in ``kernel_options``), so one run decides the default. Rows follow the results format
(``shared/bench/README.md``); written to ``$OUT/decode.json`` (or ``--json``) after every case.

``--sweep`` times, from CUDA-graph replays, the candidates of ``SWEEP_TILES`` x ``SWEEP_PER_SM`` on
the cases whose aims the first run missed (a 4096 window over 32K; B=64 at 4K; pages of 16) and
prints per ``attndsl.serving.decoding.TUNING`` key the current entry's times and the best
candidate's as a line to paste into the table.
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


#: decode calls per graph of the ``*_step_ms`` columns (a serving step replays one graph over many layers)
STEPS = 10


def _graph_ms(fn, calls=1):
    """Median time of a CUDA-graph replay of ``fn`` (captured after a warm call); with ``calls`` > 1
    the graph holds that many consecutive calls and the time is per call: the replay's own launch
    and the timer's events, about 13 us on an H100, are then shared as in a serving step, where
    one graph replays every layer's decode."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    return _bench(g.replay) / calls


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

    def __init__(self, B, L, page_size, dev, dtype, gen, contiguous=True, shuffle=True, layout="NHD"):
        from attndsl.serving import PagedKVCache
        self.B, self.L, self.page_size = B, L, page_size
        pages = B * (L // page_size)
        self.cache = PagedKVCache(pages, page_size, HKV, D, max_batch=B, max_seq_len=L, dtype=dtype, device=dev,
                                  layout=layout)
        self.cache.k_pool.normal_(generator=gen)
        self.cache.v_pool.normal_(generator=gen)
        perm = (torch.randperm(pages, generator=torch.Generator().manual_seed(0)) if shuffle
                else torch.arange(pages)).to(torch.int32)
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
    from attndsl.serving.decoding import FUSED_MERGE
    other = {"kernel_options": {"fused_merge": int(not FUSED_MERGE)}}  # the other merge path, timed beside
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
        if row.get("ours_step_ms"):
            row["step_frac_of_copy"] = round(row["bytes"] / row["ours_step_ms"] / 1e6 / copy, 3)
        for t in ("", "graph_", "step_"):  # speed-ups over Flex (the window aim: >= 3x)
            for who in ("ours", "twokernel", "fusedmerge"):
                mine, theirs = row.get(f"{who}_{t}ms"), row.get(f"flex_{t}ms")
                if mine and theirs:
                    row[f"{who}_{t}vs_flex"] = round(theirs / mine, 2)
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
                row["ours_step_ms"] = round(_graph_ms(fn, STEPS), 4)
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

    def ours(layout, s, q, lens, **kw):
        """Our decode call on the contiguous cache or through the paged cache of setup ``s``."""
        if layout == "contiguous":
            return lambda: decode(q, s.k, s.v, seq_lens=lens, **kw)
        return lambda: s.cache.decode(q, **kw)

    def checked(row, fn, ref, alt=None):
        """Check ours against ``ref`` on the benchmark inputs, then time it; False (row emitted) on a mismatch.
        ``alt``: the same call with the other merge (``fused_merge`` flipped), checked and timed into the
        ``twokernel_*`` (or, when the merge kernel is the default, ``fusedmerge_*``) columns."""
        row["rel_err"] = round(_rel(fn(), ref), 5)
        if row["rel_err"] > TOL:
            emit(dict(row, failed="check"))
            return False
        row["fused_merge"] = FUSED_MERGE
        time_ours(fn, row)
        if alt is not None:
            other = "twokernel" if FUSED_MERGE else "fusedmerge"
            row[f"{other}_rel_err"] = round(_rel(alt(), ref), 5)
            t = {}
            time_ours(alt, t)
            row.update({f"{other}_{k.removeprefix('ours_')}": v for k, v in t.items()})
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
                    row["flex_step_ms"] = round(_graph_ms(fn, STEPS), 4)
                except Exception as e:  # noqa: BLE001
                    row["flex_graph_error"] = f"{type(e).__name__}: {e}"[:300]
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = f"{type(e).__name__}: {e}"[:300]

    if args.sweep:
        return sweep(args, dev, dtype, esize, gen, copy, emit, over_budget)
    Bs = [1, 16, 64] if not args.quick else [1, 8, 64]
    Ls = [4096, 32768, 131072] if not args.quick else [32768]
    if cpu:
        Bs, Ls = [2], [256]
    if args.quick and not cpu:
        plan = [(8, 32768), (64, 4096), (1, 131072)]
    else:
        plan = [(B, L) for L in Ls for B in Bs]
    scale = D ** -0.5
    cases = set(args.cases.split(",")) if args.cases else {"plain", "window4096", "dsa2048"}
    unknown = cases - {"plain", "window4096", "dsa2048"}
    if unknown:
        raise SystemExit(f"--cases: unknown {sorted(unknown)}; expected plain, window4096, dsa2048")
    # -- plain decode -------------------------------------------------------------------------
    for B, L in (plan if "plain" in cases else []):
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
            if not checked(row, fn, ref, lambda: decode(q, s.k, s.v, seq_lens=lens, **other)):
                continue
            row["sdpa_ms"] = round(_bench(sdpa), 4)
            if flex is not None:
                lens_c = lens

                def length_mask(b, h, q_idx, kv_idx):
                    return kv_idx < lens_c[b]
                bm = create_block_mask(length_mask, B, None, 1, L, device=dev)
                flex_row(row, lambda: flex(q, s.k, s.v, block_mask=bm, enable_gqa=True), ref)
            emit(row)
            # paged, page 128 (one page lookup per tile) and 16 (per row), pools token-major (vLLM's
            # NHD) and head-major (HND: a page of one head is one contiguous block)
            for ps, lay in ([(16, "NHD"), (16, "HND")] if cpu else [(128, "NHD"), (16, "NHD"), (128, "HND"),
                                                                   (16, "HND")]):
                same = ps == s.page_size and lay == "NHD"
                sp = s if same else Setup(B, L, ps, dev, dtype, gen, contiguous=False, layout=lay)
                if sp is not s:
                    # same content as the contiguous cache: copy it into the new pool's pages
                    pt = sp.cache.page_table.to(torch.int64)
                    sp.cache.k_pool[pt] = s.k.transpose(1, 2).reshape(B, -1, ps, HKV, D)
                    sp.cache.v_pool[pt] = s.v.transpose(1, 2).reshape(B, -1, ps, HKV, D)
                row = dict(base, case="plain", layout=f"paged{ps}" + ("_hnd" if lay == "HND" else ""), api="decode",
                           page_size=ps, kv_layout=lay)
                fn = lambda: sp.cache.decode(q)  # noqa: E731
                if not checked(row, fn, ref):
                    continue
                if flex is not None and same:
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
    if "window4096" in cases and not over_budget():
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
                if not checked(row, ours(layout, s, q, lens, mask_mod=win), ref,
                               ours(layout, s, q, lens, mask_mod=win, **other)):
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
    if "dsa2048" in cases and not over_budget():
        try:
            s, q, lens = setup(B, L)
            idx = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b))[:K].sort().values
                               for b in range(B)]).to(torch.int32).view(B, 1, 1, K).to(dev)
            sel = idx.view(B, 1, K, 1).expand(B, HKV, K, D).to(torch.int64)
            ref = torch.nn.functional.scaled_dot_product_attention(q, s.k.gather(2, sel), s.v.gather(2, sel),
                                                                   enable_gqa=True)
            for layout in ("contiguous", "paged"):
                row = dict(base, case="dsa2048", layout=layout, api="decode")
                if not checked(row, ours(layout, s, q, lens, indices=idx), ref,
                               ours(layout, s, q, lens, indices=idx, **other)):
                    continue
                # the aim: within 1.5x of reading the selected rows at the copy's read bandwidth
                row["copy_floor_ms"] = round(base["bytes"] / (copy / 2) / 1e6, 4)
                emit(row)
            del s
        except Exception as e:  # noqa: BLE001
            emit(dict(base, case="dsa2048", error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
    print(f"wrote {len(rows)} rows to {out_path} in {time.time() - t_start:.0f} s")
    return rows


#: the tile candidates ``--sweep`` times: (BLOCK_N, num_warps, num_stages); pages of 16 also try BLOCK_N 16
#: (one page per tile: one scalar page lookup)
SWEEP_TILES = ((32, 4, 3), (32, 4, 4), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 8, 2),
               (128, 8, 3))
SWEEP_SMALL_PAGE_TILES = ((16, 4, 4), (16, 4, 6), (16, 2, 4))
#: split policies (programs per SM the split heuristic counts) by regime; each candidate also runs with
#: the rotated start (``rotate``) for the current and the default tiles
SWEEP_PER_SM = {"short": (1, 2, 4, 8), "many": (2, 8), "long": (2, 4)}


def _page_size(layout: str) -> int:
    """The page size of a sweep layout name (``paged16``, ``paged128_hnd``, ``paged16_inorder``; 0: contiguous)."""
    return int(layout[5:].split("_")[0]) if layout.startswith("paged") else 0


def sweep_cases(cpu: bool):
    """``(name, regime, B, L, window or None, layouts)``: the cases whose aims the first GPU run missed."""
    if cpu:
        return [("window", "short", 2, 256, 64, ("contiguous", "paged16")),
                ("many", "many", 4, 128, None, ("contiguous", "contiguous_pad", "paged16", "paged16_inorder",
                                                "paged16_hnd"))]
    return [("window4096", "short", 8, 32768, 4096, ("contiguous", "paged128", "paged16")),
            ("B64_4K", "many", 64, 4096, None, ("contiguous", "contiguous_pad", "paged128", "paged16",
                                                          "paged16_inorder", "paged16_hnd")),
            ("B8_32K", "long", 8, 32768, None, ("contiguous", "paged128", "paged16", "paged128_hnd")),
            ("B1_128K", "long", 1, 131072, None, ("contiguous", "paged128", "paged16", "paged128_hnd"))]


def sweep(args, dev, dtype, esize, gen, copy, emit, over_budget):
    """Time the tile and split candidates of the cases that missed their aims (CUDA-graph replays,
    each checked first) and print, per TUNING key, the best candidate against the current entry."""
    from attndsl.patterns import sliding_window
    from attndsl.serving import decode
    from attndsl.serving.decoding import decode_layout, tuning_row
    global WARMUP_MS, REP_MS
    WARMUP_MS, REP_MS = 25, 100  # some 230 candidates: shorter timing runs (medians of graph replays)
    cpu = dev == "cpu"
    gpu = None if cpu else torch.cuda.get_device_name(dev)
    rows = []
    wanted = set(args.sweep_cases.split(",")) if args.sweep_cases else None
    for name, regime, B, L, W, layouts in sweep_cases(cpu):
        if wanted is not None and name not in wanted:
            continue
        if over_budget():
            break
        nbytes = B * HKV * (W or L) * 2 * D * esize
        try:
            st = Setup(B, L, 16 if cpu else 128, dev, dtype, gen)
            q = torch.randn(B, HQ, 1, D, generator=gen, device=dev, dtype=torch.float32).to(dtype)
            lens = st.cache.seq_lens
            lo = L - W if W else 0
            ref = torch.nn.functional.scaled_dot_product_attention(q, st.k[:, :, lo:], st.v[:, :, lo:],
                                                                   enable_gqa=True)
            pat = dict(mask_mod=sliding_window(W)) if W else {}
            for layout in layouts:
                inorder = layout.endswith("_inorder")  # pages in allocation order, not shuffled
                hnd = layout.endswith("_hnd")  # head-major pools
                ps = _page_size(layout)
                kk, vv = st.k, st.v
                if layout == "contiguous_pad":
                    # the same cache with each (sequence, head) region one 64-row tile longer: do
                    # programs that start in lockstep at 1 MiB-aligned regions contend for the same
                    # DRAM channels (paged pages, shuffled, were faster than contiguous at B=64, 4K)?
                    kk = torch.zeros(B, HKV, L + 64, D, device=dev, dtype=dtype)[:, :, :L].copy_(st.k)
                    vv = torch.zeros(B, HKV, L + 64, D, device=dev, dtype=dtype)[:, :, :L].copy_(st.v)
                if ps and (ps != st.page_size or inorder or hnd):
                    sp = Setup(B, L, ps, dev, dtype, gen, contiguous=False, shuffle=not inorder,
                               layout="HND" if hnd else "NHD")
                    pt = sp.cache.page_table.to(torch.int64)
                    sp.cache.k_pool[pt] = st.k.transpose(1, 2).reshape(B, -1, ps, HKV, D)
                    sp.cache.v_pool[pt] = st.v.transpose(1, 2).reshape(B, -1, ps, HKV, D)
                else:
                    sp = st
                probe = inorder or hnd or layout == "contiguous_pad"  # layouts, not TUNING keys
                key = (regime, layout if probe else decode_layout(ps))
                current = tuning_row((regime, decode_layout(ps)), gpu)
                tiles = SWEEP_TILES + (SWEEP_SMALL_PAGE_TILES if 0 < ps < 64 else ())
                cands = [(*t, p, 0) for t in tiles for p in SWEEP_PER_SM[regime]]
                # the rotated start with the current entry's tiles and the default tiles, every split policy
                cands += [(*t[:3], p, 1) for t in {current[:3], (64, 4, 3)} for p in SWEEP_PER_SM[regime]]
                if probe:  # a probe of the layout, not of the tiles
                    cands = [c for c in cands if c[:3] == current[:3]]
                if cpu:  # the dry run: a few candidates (the interpreter ignores warps and stages)
                    cands = cands[:: max(1, len(cands) // 3)]
                if current not in cands:
                    cands.insert(0, current)
                for bn, nw, ns, per_sm, rot in cands:
                    if over_budget():
                        break
                    ko = dict(BLOCK_N=bn, num_warps=nw, num_stages=ns, per_sm=per_sm, rotate=rot)
                    if ps:
                        fn = lambda: sp.cache.decode(q, kernel_options=ko, **pat)  # noqa: E731
                    else:
                        fn = lambda: decode(q, kk, vv, seq_lens=lens, kernel_options=ko, **pat)  # noqa: E731
                    row = dict(B=B, Hq=HQ, Hkv=HKV, Lq=1, Lkv=L, D=D, dtype=str(dtype).replace("torch.", ""),
                               bytes=nbytes, case="sweep", sweep_case=name, layout=layout, tuning_key=list(key),
                               config=[bn, nw, ns, per_sm, rot], current=(bn, nw, ns, per_sm, rot) == current,
                               window=W)
                    try:
                        row["rel_err"] = round(_rel(fn(), ref), 5)
                        if row["rel_err"] > TOL:
                            emit(dict(row, failed="check"))
                            continue
                        row["ours_ms"] = round(_bench(fn) if cpu else _graph_ms(fn), 4)
                    except Exception as e:  # noqa: BLE001  (e.g. out of shared memory)
                        emit(dict(row, error=f"{type(e).__name__}: {e}"[:300]))
                        continue
                    emit(row)
                    rows.append(row)
                del sp
            del st
        except Exception as e:  # noqa: BLE001
            emit(dict(case="sweep", sweep_case=name, error=f"{type(e).__name__}: {e}"[:500]))
            traceback.print_exc()
        if not cpu:
            torch.cuda.empty_cache()
    print(sweep_table(rows, gpu))
    return rows


def sweep_table(rows, gpu: str | None = None) -> str:
    """Per TUNING key: each case's time with the current entry (``tuning_row`` of the GPU named
    ``gpu``), and the candidate with the lowest sum of time ratios over the key's cases (all cases
    measured) as a line to paste into TUNING (an H100) or ``TUNING_BY_GPU[gpu]`` (another GPU)."""
    from attndsl.serving.decoding import TUNING, TUNING_BY_GPU, decode_layout, tuning_row
    tuning = {**TUNING, **TUNING_BY_GPU.get(gpu, {})}
    table = "TUNING" if gpu is None or "H100" in gpu else f"TUNING_BY_GPU[{gpu!r}]"
    by_key: dict = {}
    for r in rows:
        by_key.setdefault(tuple(r["tuning_key"]), []).append(r)
    lines = ["", "decode sweep (CUDA-graph replay, ms; frac = achieved / copy bandwidth)"]
    for key, rs in by_key.items():
        cases = sorted({(r["sweep_case"], r["layout"]) for r in rs})
        if key in tuning:
            cur = tuple(tuning[key])
        else:  # a probe's layout name: the current row of its page size
            cur = tuple(tuning_row((key[0], decode_layout(_page_size(key[1]))), gpu))
        t = {(r["sweep_case"], r["layout"], tuple(r["config"])): r for r in rs}
        lines.append(f"{key}: current {cur}")
        best, best_score = None, None
        for cfg in sorted({tuple(r["config"]) for r in rs}):
            if not all((c, lay, cfg) in t for c, lay in cases):
                continue
            base = [t.get((c, lay, cur)) for c, lay in cases]
            score = sum(t[(c, lay, cfg)]["ours_ms"] / (b["ours_ms"] if b else 1.0) for (c, lay), b in zip(cases, base))
            if best_score is None or score < best_score:
                best, best_score = cfg, score
        for c, lay in cases:
            cur_r, best_r = t.get((c, lay, cur)), t.get((c, lay, best)) if best else None
            fmt = lambda r: "-" if r is None else f"{r['ours_ms']:.4f} ms ({r.get('frac_of_copy', 0):.2f})"  # noqa: E731
            lines.append(f"    {c:<12} {lay:<11} current {fmt(cur_r):<22} best {fmt(best_r)}")
        if best is not None and key in tuning:
            lines.append(f"    {table}[{key!r}] = {best!r}")
    return "\n".join(lines)


def host_cpu(calls: int = 1000) -> dict:
    """Host time per decode call (µs) with the kernel launches stubbed, on CPU tensors of the benchmark's
    head configuration (B=8, 32/8 heads, D=128, cache 1024): the Python and torch work of a call."""
    import attndsl  # noqa: F401
    from attndsl.patterns import sliding_window
    from attndsl.runtime.scope import NO_CONTEXT
    from attndsl.serving import PagedKVCache, decoding
    if hasattr(decoding, "_start"):  # the launch of a plan's first call and of its memoised ones
        decoding._start = lambda *a, **k: (lambda args: None)
    else:  # before the launch memo (older internals)
        decoding._launch = lambda *a, **k: None
    decoding.launch_scope = lambda *a: NO_CONTEXT
    B, L = 8, 1024
    q = torch.randn(B, HQ, 1, D)
    k, v = torch.randn(B, HKV, L, D), torch.randn(B, HKV, L, D)
    lens = torch.full((B,), L, dtype=torch.int32)
    c = PagedKVCache(B * L // 16, 16, HKV, D, max_batch=B, max_seq_len=L, dtype=torch.float32)
    c.seq_lens.fill_(L)
    idx = torch.randint(0, L, (B, 1, 1, 64), dtype=torch.int32)
    win = sliding_window(256)
    cases = {"plain": lambda: decoding.decode(q, k, v, seq_lens=lens),
             "window": lambda: decoding.decode(q, k, v, seq_lens=lens, mask_mod=win),
             "paged16": lambda: c.decode(q), "dsa": lambda: decoding.decode(q, k, v, seq_lens=lens, indices=idx)}
    got = {}
    with torch.no_grad():
        for name, f in cases.items():
            f()
            best = min(_timed(f, calls) for _ in range(5))
            got[name] = round(best, 1)
    return got


def _timed(f, calls):
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="B=8 at 32K, B=64 at 4K, B=1 at 128K, window, DSA")
    p.add_argument("--json", default=None)
    p.add_argument("--cases", default=None, help="a comma-separated subset of plain,window4096,dsa2048 (default: all)")
    p.add_argument("--no-flex", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sweep", action="store_true",
                   help="only time the tile/split candidates of the cases that missed their aims (prints TUNING lines)")
    p.add_argument("--sweep-cases", default=None,
                   help="with --sweep: a comma-separated subset of window4096,B64_4K,B8_32K,B1_128K")
    p.add_argument("--summarize", default=None, metavar="JSON",
                   help="print the sweep table of a --sweep run's JSON rows (e.g. one stopped by a timeout)")
    p.add_argument("--host-cpu", action="store_true",
                   help="only the host time per call with kernel launches stubbed (CPU tensors)")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new cases after this long")
    args = p.parse_args(argv)
    if args.summarize:
        rows = [r for r in json.loads(Path(args.summarize).read_text()) if r.get("case") == "sweep" and "ours_ms" in r]
        gpu = next((r["gpu"] for r in rows if r.get("gpu") not in (None, "cpu")), None)
        print(sweep_table(rows, gpu))
        return 0
    if args.host_cpu:
        print(json.dumps(dict(case="host_cpu", unit="us per call", **host_cpu())))
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
