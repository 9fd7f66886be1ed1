"""CPU tests of the benchmark harness, its results format and table generator, and the CLI: the pure
parts, no GPU, no compiler core (the results table is tested on a synthetic fixture,
``tests/fixtures/bench_results_synthetic.json``: no figure in it was measured).

The GPU paths (do_bench, compiled FlexAttention, peak memory, the attndsl kernels) are not
exercised here; the harness's own pipeline is run end to end on the CPU with the
FlexAttention stand-in (``--device cpu --ours flex``), which needs neither.
"""
import json
import math
import sys
import textwrap

import pytest
import torch

from attndsl import cli
from benchmarks import cases as C
from benchmarks import block as Bk
from benchmarks import harness as Hn
from benchmarks import measures as M


# ---------------------------------------------------------------- density

def _brute_density(mask_mod, L, b=0, h=0):
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    return torch.broadcast_to(mask_mod(b, h, q, k), (L, L)).sum().item() / (L * L)


@pytest.mark.parametrize("L,chunk", [(1, 7), (100, 7), (256, 2048), (257, 64)])
def test_density_causal_exact(L, chunk):
    d = Hn.mask_density(lambda b, h, q, k: q >= k, L, chunk=chunk)
    assert d == pytest.approx((L + 1) / (2 * L), abs=0)


def test_density_dense_and_rectangular():
    assert Hn.mask_density(None, 123) == 1.0
    # Lq != Lkv: keys < 10 only
    assert Hn.mask_density(lambda b, h, q, k: k < 10, 30, 40, chunk=7) == pytest.approx(10 / 40)


@pytest.mark.parametrize("name", ["causal", "sliding_window_1024", "document_causal", "prefix_lm_2048",
                                  "alibi_causal", "softcap_causal"])
def test_density_matches_brute_force_for_cases(name):
    L = 3000  # > window and prefix, several chunks
    inst = C.get_case(name).build(L=L, H=4, device="cpu", seed=0)
    d = Hn.mask_density(inst.mask_mod, L, chunk=512)
    assert d == pytest.approx(_brute_density(inst.mask_mod, L), rel=1e-12)


def test_density_sliding_window_closed_form():
    L, W = 5000, 1024
    inst = C.get_case("sliding_window_1024").build(L=L, H=1, device="cpu")
    pairs = sum(min(q + 1, W) for q in range(L))
    assert Hn.mask_density(inst.mask_mod, L, chunk=999) == pytest.approx(pairs / L**2, abs=0)


def test_density_per_head_mask():
    mm = lambda b, h, q, k: (q >= k) if h == 0 else (k < 0)  # noqa: E731
    d = Hn.mask_density(mm, 64, B=1, H=2, uses_bh=True)
    assert d == pytest.approx(0.5 * (65 / 128))


# ---------------------------------------------------------------- formulas

def test_flops_tflops_ratio():
    f = Hn.attention_flops(1, 16, 16384, 16384, 128, density=0.5)
    assert f == 4 * 16 * 16384 * 16384 * 128 * 0.5
    assert Hn.attention_flops(1, 16, 16384, 16384, 128, 0.5, fwd_bwd=True) == f * Hn.FWD_BWD_FLOP_FACTOR
    assert Hn.FWD_BWD_FLOP_FACTOR == 2.5  # shared/bench/README.md
    # a value head dim apart from D: QKᵀ over D, PV over Dv
    assert Hn.attention_flops(1, 16, 4096, 4096, 192, Dv=128) == 2 * 16 * 4096 * 4096 * (192 + 128)
    assert Hn.attention_flops(1, 16, 4096, 4096, 128, Dv=128) == Hn.attention_flops(1, 16, 4096, 4096, 128)
    # 1 TFLOP in 1 ms = 1000 TFLOP/s
    assert Hn.tflops(1e12, 1.0) == pytest.approx(1000.0)
    assert Hn.tflops(f, 2.72) == pytest.approx(f / 2.72e-3 / 1e12)
    assert Hn.tflops(f, None) is None and Hn.tflops(f, 0.0) is None
    assert Hn.ratio(4.52, 2.26) == pytest.approx(2.0)
    assert Hn.ratio(None, 1.0) is None and Hn.ratio(1.0, None) is None and Hn.ratio(1.0, 0.0) is None


def test_rel_error_and_lse_error():
    b = torch.ones(4, 4)
    assert Hn.rel_error(b, b) == 0.0
    assert Hn.rel_error(b * 1.01, b) == pytest.approx(0.01, rel=1e-6)
    assert Hn.rel_error(b, torch.zeros(4, 4)) == math.inf
    assert Hn.rel_error(torch.zeros(2), torch.zeros(2)) == 0.0
    lse = torch.tensor([1.0, -math.inf, 2.0])
    err, mism = Hn.lse_error(torch.tensor([1.001, -math.inf, 2.0]), lse)
    assert err == pytest.approx(1e-3, rel=1e-3) and mism == 0
    assert Hn.lse_error(torch.tensor([1.0, 0.0, 2.0]), lse)[1] == 1


def test_dense_reference_against_naive_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 33, 8) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25])
    mask = lambda b, h, qi, ki: qi >= ki  # noqa: E731
    score = lambda s, b, h, qi, ki: s - slopes[h] * (qi - ki)  # noqa: E731
    out, lse = Hn.dense_reference(q, k, v, mask_mod=mask, score_mod=score)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(8)
    i = torch.arange(33)
    s = s - slopes.double().view(1, 2, 1, 1) * (i[:, None] - i[None, :])
    s = s.masked_fill(~(i[:, None] >= i[None, :]), -math.inf)
    assert torch.allclose(lse, torch.logsumexp(s, -1))
    assert torch.allclose(out, torch.softmax(s, -1) @ v.double())
    # fully masked rows: out 0, lse -inf, no NaN
    out, lse = Hn.dense_reference(q, k, v, mask_mod=lambda b, h, qi, ki: ki < 0)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    # GQA: 2 query heads share one kv head
    out, _ = Hn.dense_reference(q, k[:, :1], v[:, :1])
    ref, _ = Hn.dense_reference(q, k[:, :1].expand(1, 2, 33, 8), v[:, :1].expand(1, 2, 33, 8))
    assert torch.allclose(out, ref)


# ---------------------------------------------------------------- cases

def test_cases_registry_and_definitions():
    assert C.DEFAULT_CASES == ["dense", "causal", "sliding_window_1024", "document_causal",
                               "prefix_lm_2048", "alibi_causal", "softcap_causal"]
    assert set(C.DEFAULT_CASES) <= set(C.CASES)
    assert C.get_case("dense").build(L=8, H=1, device="cpu").mask_mod is None
    assert C.get_case("dense").build(L=8, H=1, device="cpu").sdpa == "dense"
    assert C.get_case("causal").build(L=8, H=1, device="cpu").sdpa == "causal"
    for n in ("sliding_window_1024", "document_causal", "prefix_lm_2048", "alibi_causal"):
        assert C.get_case(n).build(L=8, H=1, device="cpu").sdpa is None
    with pytest.raises(KeyError):
        C.get_case("nope")
    with pytest.raises(ValueError):
        C.register_case(C.Case("causal", "dup", lambda **_: C.CaseInstance()))


def test_document_ids_like_flex_anchors():
    doc = C.document_ids(16384, "cpu", seed=3)
    assert doc.shape == (16384,) and doc[0] == 0
    assert torch.all(doc[1:] >= doc[:-1]) and int(doc[-1]) <= 15  # <= 16 documents
    assert torch.equal(doc, C.document_ids(16384, "cpu", seed=3))  # reproducible
    inst = C.get_case("document_causal").build(L=64, H=1, device="cpu", seed=0)
    q, k = torch.tensor([5]), torch.tensor([6])
    assert not bool(inst.mask_mod(0, 0, q, k))  # causal part


def test_alibi_and_softcap_score_mods():
    inst = C.get_case("alibi_causal").build(L=16, H=16, device="cpu")
    s = torch.zeros(())
    assert float(inst.score_mod(s, 0, 0, torch.tensor(5), torch.tensor(3))) == pytest.approx(-2 * 2**-0.5)
    slopes = C.alibi_slopes_anchor(16, "cpu")
    assert torch.allclose(slopes, torch.exp2(-8.0 * torch.arange(1, 17) / 16))
    sc = C.get_case("softcap_causal").build(L=16, H=1, device="cpu").score_mod
    assert float(sc(torch.tensor(1e4), 0, 0, 0, 0)) == pytest.approx(30.0)


def test_resolve_cases_and_jobs():
    assert Hn.resolve_cases(None) == C.DEFAULT_CASES
    assert Hn.resolve_cases(None, quick=True) == C.QUICK_CASES
    assert Hn.resolve_cases("causal,dense") == ["causal", "dense"]
    assert Hn.resolve_cases("*causal") == [n for n in C.CASES if n.endswith("causal")]
    assert Hn.resolve_cases("all") == list(C.CASES)
    with pytest.raises(ValueError, match="unknown benchmark case"):
        Hn.resolve_cases("causal,bogus")
    cfg = Hn.BenchConfig(cases=["causal", "dense"], Ls=[4096, 16384], Ds=[64, 128])
    assert cfg.jobs()[:3] == [("causal", 4096, 64), ("dense", 4096, 64), ("causal", 4096, 128)]
    assert len(cfg.jobs()) == 8


def test_fixed_length_case_runs_once_per_D():
    name = "_test_fixed_L"
    C.register_case(C.Case(name, "fixed", lambda **_: C.CaseInstance(), fixed_L=1024), replace=True)
    try:
        cfg = Hn.BenchConfig(cases=[name], Ls=[4096, 16384], Ds=[64])
        assert cfg.jobs() == [(name, 1024, 64)]
    finally:
        del C.CASES[name]


# ---------------------------------------------------------------- argument parsing

def test_harness_arguments_defaults_and_quick(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    p = Hn.build_parser()
    cfg = Hn.config_from_args(p.parse_args([]))
    assert (cfg.Ls, cfg.Ds, cfg.B, cfg.H, cfg.hkv, cfg.dtype, cfg.bwd) == ([16384], [128], 1, 16, 16, "bf16", False)
    assert cfg.cases == C.DEFAULT_CASES and cfg.json_path is None and cfg.isolate
    cfg = Hn.config_from_args(p.parse_args(["--quick"]))
    assert cfg.Ls == [4096] and cfg.cases == C.QUICK_CASES
    cfg = Hn.config_from_args(p.parse_args(["--quick", "--L", "8192", "--cases", "dense"]))
    assert cfg.Ls == [8192] and cfg.cases == ["dense"]
    cfg = Hn.config_from_args(p.parse_args(["--L", "4096,16384", "--D", "64,128", "--H", "8", "--Hkv", "2",
                                            "--dtype", "fp16", "--bwd"]))
    assert cfg.Ls == [4096, 16384] and cfg.Ds == [64, 128] and cfg.hkv == 2 and cfg.bwd and cfg.dtype == "fp16"
    with pytest.raises(SystemExit):
        p.parse_args(["--L", "abc"])
    with pytest.raises(ValueError):
        Hn.config_from_args(p.parse_args(["--H", "16", "--Hkv", "3"]))


def test_json_path_from_OUT(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    cfg = Hn.config_from_args(Hn.build_parser().parse_args([]))
    assert cfg.json_path == str(tmp_path / "bench.json") and cfg.md_path == str(tmp_path / "bench.md")


# ---------------------------------------------------------------- markdown

def _ok_row(**kw):
    r = dict(case="causal", L=16384, B=1, H=16, Hkv=16, D=128, dtype="bf16", bwd=False, status="ok",
             density=0.50003, ours_ms=1.5, flex_ms=2.72, sdpa_ms=1.96, flex_over_ours=1.813,
             sdpa_over_ours=1.307, ours_tflops=366.5, flex_tflops=202.1, ours_table="closed_form",
             flex_block_mask_ms=2.6, ours_peak_mib=200.0, flex_peak_mib=210.0, ours_compile_s=0.5,
             ours_first_call_s=1.0, flex_compile_s=9.5, check_rel_err_flex=3.1e-3, ref_rel_err=2e-4, ref_L=256)
    r.update(kw)
    return r


def test_markdown_report():
    meta = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", cuda="12.8", ours="attndsl",
                dtype="bf16", B=1, H=16, Hkv=16, L=[16384], D=[128], protocol=True)
    rows = [_ok_row(),
            _ok_row(case="document_causal", ours_table="device_table", ours_table_ms=0.0312, sdpa_ms=None,
                    sdpa_over_ours=None),
            dict(case="alibi_causal", L=16384, D=128, status="failed", check_detail="rel err vs flex 0.3 >= 0.02"),
            dict(case="softcap_causal", L=16384, D=128, status="error", phase="ours.compile",
                 error="TraceError: x | y\nline 2"),
            dict(case="dense", L=16384, D=128, status="skipped", error="time budget exhausted")]
    md = Hn.markdown_report(rows, meta)
    lines = md.splitlines()
    assert lines[0].startswith("GPU: NVIDIA H100 80GB HBM3 · torch 2.11.0 · triton 3.6.0")
    table = [ln for ln in lines if ln.startswith("|")]
    assert len(table) == 2 + len(rows)
    ncol = table[0].count(" | ") + 1
    for ln in table[2:]:  # same column count everywhere (escaped pipes do not count)
        assert ln.replace("\\|", "").count(" | ") + 1 == ncol
    causal = table[2]
    assert "| 1.500 | 2.720 | 1.960 | 1.81× | 1.31× | 366.5 | 202.1 | closed form | 2.600 |" in causal
    assert "200 / 210" in causal and "1.5 / 9.5" in causal and "ok 3.1e-03, ref 2.0e-04 @L=256" in causal
    assert "0.031 (built once, reused)" in table[3]
    assert "**FAILED** rel err vs flex 0.3" in table[4]
    assert "**ERROR** (ours.compile) TraceError: x \\| y line 2" in table[5]
    assert "skipped: time budget" in table[6]
    assert "Forward+backward" not in md


def test_markdown_report_bwd_table_and_non_protocol_banner():
    row = _ok_row(bwd=True, bwd_status="ok", ours_fwd_bwd_ms=5.0, flex_fwd_bwd_ms=9.97, sdpa_fwd_bwd_ms=7.41,
                  flex_over_ours_fwd_bwd=1.994, sdpa_over_ours_fwd_bwd=1.482, ours_fwd_bwd_tflops=1.0,
                  grad_rel_err_dq=1e-3, grad_rel_err_dk=2e-3, grad_rel_err_dv=3e-3)
    bad = _ok_row(case="softcap_causal", bwd=True, bwd_status="failed", bwd_error="dk rel err 0.5")
    md = Hn.markdown_report([row, bad], dict(gpu="cpu", protocol=False, protocol_note="device=cpu dry run"))
    assert "**Not a protocol figure** (device=cpu dry run)" in md
    assert "Forward+backward" in md
    assert "| causal | 16384 | 128 | 5.000 | 9.970 | 7.410 | 1.99× | 1.48× |" in md
    assert "ok 1.0e-03/2.0e-03/3.0e-03" in md and "**FAILED** dk rel err 0.5" in md


# ---------------------------------------------------------------- end to end on the CPU (stand-in)

def test_harness_dry_run_cpu_in_process(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--ours", "flex", "--L", "128", "--D", "16", "--H", "2", "--dtype", "fp32",
            "--ref-L", "64", "--cases", "dense,causal,document_causal,alibi_causal", "--no-isolate",
            "--json", str(out)]
    rc = Hn.main(argv)
    assert rc == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert "meta" in rows[0] and rows[0]["meta"]["protocol"] is False
    results = rows[1:]
    assert [r["case"] for r in results] == ["dense", "causal", "document_causal", "alibi_causal"]
    for r in results:
        assert r["status"] == "ok", r
        assert r["check_rel_err_flex"] < 1e-6 and r["ref_rel_err"] < 1e-5
        assert r["ours_ms"] > 0 and r["flex_ms"] > 0 and r["flex_over_ours"] > 0
    assert results[0]["sdpa_ms"] > 0 and results[1]["sdpa_ms"] > 0 and "sdpa_ms" not in results[2]
    assert results[1]["density"] == pytest.approx(129 / 256, abs=1e-6)
    assert results[2]["ours_table"] == "device_table" and results[2]["ours_table_ms"] > 0
    saved = json.loads(out.read_text())
    assert saved["complete"] and len(saved["results"]) == 4
    md_lines = (tmp_path / "bench.md").read_text().splitlines()
    assert sum(ln.startswith("|") for ln in md_lines) == 2 + 4
    assert "| case | L | D | density |" in stdout


def test_failing_case_is_reported_not_timed_and_next_runs(tmp_path, capsys, monkeypatch):
    """A wrong implementation fails its check (not timed); an exception is caught; the run goes on."""
    real = Hn.load_ours

    def broken(kind, flex_fn):
        ours = real("flex", flex_fn)
        good_compile = ours.compile

        def compile_(mask_mod=None, score_mod=None, **kw):
            if score_mod is not None:
                raise RuntimeError("boom in compile")
            attn = good_compile(mask_mod=mask_mod, score_mod=score_mod)
            if mask_mod is None:
                return attn

            def wrong(q, k, v, **kw2):  # ignores the mask and returns something else
                res = attn(q, k, v, **kw2)
                return (res[0] * 2, res[1]) if isinstance(res, tuple) else res * 2
            wrong.build_block_tables = attn.build_block_tables
            return wrong
        ours.compile = compile_
        return ours

    monkeypatch.setattr(Hn, "load_ours", broken)
    argv = ["--device", "cpu", "--ours", "flex", "--L", "64", "--D", "16", "--H", "2", "--dtype", "fp32",
            "--ref-L", "64", "--cases", "causal,alibi_causal,dense", "--no-isolate", "--json",
            str(tmp_path / "b.json")]
    assert Hn.main(argv) == 1
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][1:]
    causal, alibi, dense = rows
    assert causal["status"] == "failed" and "rel err vs flex" in causal["check_detail"]
    assert "ours_ms" not in causal and "flex_ms" not in causal
    assert alibi["status"] == "error" and alibi["phase"] == "ours.compile" and "boom" in alibi["error"]
    assert "traceback" not in alibi  # printed to stderr, kept in the JSON file
    assert dense["status"] == "ok" and dense["ours_ms"] > 0
    saved = json.loads((tmp_path / "b.json").read_text())["results"]
    assert "boom" in saved[1]["traceback"]


def test_flex_backward_failure_still_times_ours(tmp_path, capsys, monkeypatch):
    """Flex's backward failing to compile (radial attention on an H100: shared memory) is recorded;
    our forward+backward is still checked for finiteness and timed."""
    import torch.nn.attention.flex_attention as fa
    real = fa.flex_attention

    class _NoBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("No valid triton configs. out of resource: shared memory")

    def flex_without_backward(*a, **kw):
        out = real(*a, **kw)
        return _NoBackward.apply(out) if isinstance(out, torch.Tensor) else out

    monkeypatch.setattr(fa, "flex_attention", flex_without_backward)
    argv = ["--device", "cpu", "--L", "64", "--D", "16", "--H", "1", "--dtype", "fp32", "--ref-L", "64",
            "--cases", "causal", "--bwd", "--no-isolate", "--json", str(tmp_path / "b.json")]
    Hn.main(argv)
    out = capsys.readouterr().out
    (row,) = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")][1:]
    assert row["bwd_status"] == "ok" and row["flex_bwd_error"]  # (on the CPU Flex has no backward at all)
    assert row["ours_fwd_bwd_ms"] > 0 and "flex_fwd_bwd_ms" not in row
    assert "Flex's backward failed" in out


def test_budget_exhausted_skips(capsys):
    argv = ["--device", "cpu", "--ours", "flex", "--L", "64", "--D", "16", "--H", "2", "--dtype", "fp32",
            "--cases", "causal,dense", "--no-isolate", "--budget-s", "0"]
    assert Hn.main(argv) == 1
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][1:]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]


# ---------------------------------------------------------------- CLI

def test_cli_parser():
    p = cli.build_parser()
    ns = p.parse_args(["show", "pat.py:local(128)", "--score", "s.py:softcap(30.0)"])
    assert (ns.command, ns.pattern, ns.score) == ("show", "pat.py:local(128)", "s.py:softcap(30.0)")
    ns = p.parse_args(["show", "--score", "s.py:tanh_cap"])
    assert ns.pattern is None and ns.score == "s.py:tanh_cap"
    assert p.parse_args(["cache"]).clear is False
    assert p.parse_args(["cache", "--clear"]).clear is True
    with pytest.raises(SystemExit):
        p.parse_args([])
    with pytest.raises(SystemExit):
        p.parse_args(["frobnicate"])


def test_cli_bench_points_protocol_cases_to_the_harness(capsys):
    """'attndsl bench' times a user's pattern (tests/test_cli.py); the protocol cases run with
    'python -m benchmarks' from a checkout, and asking the CLI for them says so."""
    assert cli.main(["bench", "--cases", "causal,sliding_window_1024", "--L", "4096", "--bwd", "--quick"]) == 2
    assert "python -m benchmarks" in capsys.readouterr().err


def test_split_spec(tmp_path):
    assert cli.split_spec("a.py") == ("a.py", None)
    assert cli.split_spec("dir/a.py:f") == ("dir/a.py", "f")
    assert cli.split_spec("a.py:sliding_window(256, causal=True)") == ("a.py", "sliding_window(256, causal=True)")
    # a '.py:' inside the arguments does not confuse the split
    assert cli.split_spec("a.py:f('b.py:c')") == ("a.py", "f('b.py:c')")
    d = tmp_path / "x.py"  # a directory named like a file
    d.mkdir()
    (d / "m.py").write_text("")
    assert cli.split_spec(f"{d}/m.py:g") == (f"{d}/m.py", "g")
    for bad in ("a.txt:f", "a.py:", "nopy"):
        with pytest.raises(cli.CLIError):
            cli.split_spec(bad)


@pytest.fixture
def pattern_file(tmp_path):
    f = tmp_path / "my_patterns.py"
    f.write_text(textwrap.dedent("""
        import helper_mod                      # a sibling module: the file's dir is on sys.path
        CALLS = []

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        def sliding_window(window, causal=True, *, scale=1):
            CALLS.append((window, causal, scale))
            def sw(b, h, q_idx, kv_idx):
                return (q_idx - kv_idx < window * scale) & ((q_idx >= kv_idx) | (not causal))
            return sw

        def softcap(cap):
            return lambda s, b, h, q, k: cap * helper_mod.tanh(s / cap)

        class ns:
            def inner(b, h, q, k):
                return q == k

        mask_mod = causal
        NOT_CALLABLE = 3
    """))
    (tmp_path / "helper_mod.py").write_text("import math\ntanh = math.tanh\n")
    return f


def test_loader_functions_and_factories(pattern_file):
    f = str(pattern_file)
    causal = cli.load_pattern(f + ":causal")
    assert causal.__name__ == "causal" and causal(0, 0, 3, 2) and not causal(0, 0, 2, 3)
    sw = cli.load_pattern(f + ":sliding_window(4, causal=False, scale=2)")
    assert sw(0, 0, 7, 0) and not sw(0, 0, 8, 0) and sw(0, 0, 0, 5)
    sw2 = cli.load_pattern(f + ":sliding_window(-1)")  # unary minus is a literal
    assert not sw2(0, 0, 5, 5)
    cap = cli.load_pattern(f + ":softcap(30.0)")
    assert cap(1e4, 0, 0, 0, 0) == pytest.approx(30.0)
    assert cli.load_pattern(f + ":ns.inner")(0, 0, 1, 1)
    assert cli.load_pattern(f, default_attr="mask_mod") is not None


@pytest.mark.parametrize("expr,match", [
    ("sliding_window(__import__('os').getcwd())", "literals"),
    ("sliding_window(len([1]))", "literals"),
    ("sliding_window(*[1])", r"\*args"),
    ("sliding_window(**{'window': 1})", r"\*\*kwargs"),
    ("missing", "no attribute 'missing'"),
    ("NOT_CALLABLE(1)", "not callable"),
    ("causal.__globals__", "dunder"),
    ("(lambda: 1)()", "expected NAME"),
    ("causal(", "cannot parse"),
])
def test_loader_rejects_unsafe_or_wrong(pattern_file, expr, match):
    with pytest.raises(cli.CLIError, match=match):
        cli.load_pattern(f"{pattern_file}:{expr}")


def test_loader_missing_file_and_default(tmp_path, pattern_file):
    with pytest.raises(cli.CLIError, match="no such file"):
        cli.load_pattern(str(tmp_path / "absent.py") + ":f")
    with pytest.raises(cli.CLIError, match="name the function"):
        cli.load_pattern(str(pattern_file))
    assert str(tmp_path) not in sys.path  # sys.path restored after the import


def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    """A factory that raises, and a pattern the tracer rejects: one 'attndsl: error:' line (the
    tracer's names the pattern's file and line), exit code 2, no traceback."""
    f = tmp_path / "bad_patterns.py"
    f.write_text(textwrap.dedent("""
        import torch

        def needs_tensor(slopes):
            return slopes.dim()

        def sine(b, h, q_idx, kv_idx):
            return torch.sin(q_idx.float()) > 0
    """))
    assert cli.main(["show", f"{f}:needs_tensor(3)"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attndsl: error: 'needs_tensor(3)' raised AttributeError") and "literals" in err
    assert "Traceback" not in err
    assert cli.main(["show", f"{f}:sine"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"attndsl: error: {f}:8: 'torch.sin' is not supported") and "Traceback" not in err


def test_show_calls_compile_and_explain(pattern_file, monkeypatch, capsys):
    import types
    calls = {}

    class FakeCompiled:
        def explain(self):
            return "IR: fake"

    def fake_compile(mask_mod=None, score_mod=None):
        calls["mask"], calls["score"] = mask_mod, score_mod
        return FakeCompiled()

    fake = types.ModuleType("attndsl")
    fake.compile = fake_compile
    monkeypatch.setitem(sys.modules, "attndsl", fake)
    f = str(pattern_file)
    assert cli.main(["show", f + ":sliding_window(8)", "--score", f + ":softcap(20.0)"]) == 0
    assert capsys.readouterr().out.strip() == "IR: fake"
    assert calls["mask"](0, 0, 3, 0) and calls["score"](1e4, 0, 0, 0, 0) == pytest.approx(20.0)
    assert cli.main(["show", f]) == 0  # module-level mask_mod
    assert calls["mask"].__name__ == "causal" and calls["score"] is None
    assert cli.main(["show", f + ":missing"]) == 2
    assert "no attribute 'missing'" in capsys.readouterr().err


def test_cache_show_and_clear(tmp_path, monkeypatch, capsys):
    import types
    cache = tmp_path / "cache" / "kernels"
    (cache / "ab").mkdir(parents=True)
    (cache / "ab" / "k.py").write_text("x" * 100)
    (cache / "top.py").write_text("y")
    mod = types.ModuleType("attndsl.runtime.cache")
    mod.cache_dir = lambda: cache
    monkeypatch.setitem(sys.modules, "attndsl.runtime.cache", mod)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(cache) in out and "2 files" in out
    assert cli.main(["cache", "--clear"]) == 0
    assert cache.exists() and list(cache.iterdir()) == []
    assert "removed 2 files" in capsys.readouterr().out
    mod.cache_dir = lambda: tmp_path / "absent"
    assert cli.main(["cache", "--clear"]) == 0
    assert "does not exist" in capsys.readouterr().out
    mod.cache_dir = lambda: __import__("pathlib").Path.home()
    assert cli.main(["cache", "--clear"]) == 2
    assert "refusing" in capsys.readouterr().err


def test_harness_times_a_value_head_dim_apart_from_d(tmp_path, capsys):
    """``--Dv``: v (and the output) have their own head dim; ours runs (CPU interpreter) and is checked
    against Flex and the float64 reference; the tables show ``D/Dv``."""
    argv = ["--device", "cpu", "--L", "64", "--D", "16", "--Dv", "24", "--H", "2", "--dtype", "fp32",
            "--ref-L", "48", "--cases", "causal", "--no-isolate", "--json", str(tmp_path / "bench.json")]
    assert Hn.main(argv) == 0
    stdout = capsys.readouterr().out
    rows = [json.loads(ln) for ln in stdout.splitlines() if ln.startswith("{")]
    assert rows[0]["meta"]["Dv"] == 24
    (r,) = rows[1:]
    assert r["status"] == "ok" and r["Dv"] == 24 and r["check_rel_err_flex"] < 1e-5 and r["ref_rel_err"] < 1e-5
    assert "| causal | 64 | 16/24 |" in stdout and "Dv=24" in stdout


# ---------------------------------------------------------------- results format (issue 30 part 5)

from benchmarks import results as R  # noqa: E402
from benchmarks import table as T  # noqa: E402

FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "bench_results_synthetic.json"


def _case_result(**kw):
    r = dict(case="gpt2_step", family="model", L=2048, B=8, H=12, Hkv=12, D=64, dtype="bf16", bwd=True,
             status="ok", bwd_status="ok", att_status="ok", att_bwd_status="ok", density=0.5,
             ours_table="device_table", ours_table_ms=0.05, flex_block_mask_ms=3.0,
             ours_ms=1.0, att_ms=2.0, flex_ms=1.5, sdpa_ms=0.5, ours_host_us=10.0, att_host_us=20.0,
             flex_host_us=30.0, sdpa_host_us=5.0, ours_peak_mib=100.0, att_peak_mib=101.0,
             ours_fwd_bwd_ms=4.0, att_fwd_bwd_ms=5.0, flex_fwd_bwd_ms=6.0, sdpa_fwd_bwd_ms=2.0,
             ours_fwd_bwd_host_us=40.0, att_fwd_bwd_host_us=50.0)
    r.update(kw)
    return r


META = dict(gpu="NVIDIA H100 80GB HBM3", torch="2.11.0", triton="3.6.0", cuda="13.0", commit="abc1234",
            command="python -m benchmarks --cases full --bwd", started="2026-12-06T08:00:00+00:00")


def test_rows_from_result_format():
    rows = R.rows_from_result(_case_result(), META)
    assert [(r["pass"], r["api"]) for r in rows] == [("fwd", "attention"), ("fwd", "compiled"),
                                                     ("fwd+bwd", "attention"), ("fwd+bwd", "compiled")]
    for r in rows:
        assert R.validate_row(r) == [], r
        assert set(R.REQUIRED) <= set(r)
        assert (r["Hq"], r["Hkv"], r["Lq"], r["Lkv"], r["B"], r["D"]) == (12, 12, 2048, 2048, 8, 64)
        assert (r["gpu"], r["torch"], r["triton"], r["commit"], r["date"]) == (
            "NVIDIA H100 80GB HBM3", "2.11.0", "3.6.0", "abc1234", "2026-12-06")
        assert r["status"] == "ok"
    fa, fc, ba, bc = rows
    assert (fa["ours_ms"], fa["host_us"], fa["peak_mib"]) == (2.0, 20.0, 101.0)  # the one-shot call's own
    assert (fc["ours_ms"], fc["host_us"], fc["peak_mib"]) == (1.0, 10.0, 100.0)
    assert fa["flex_ms"] == fc["flex_ms"] == 1.5 and fa["sdpa_host_us"] == 5.0 and fa["flex_host_us"] == 30.0
    assert fc["flex_over_ours"] == 1.5 and fa["flex_over_ours"] == 0.75 and fc["sdpa_over_ours"] == 0.5
    assert fc["table_ms"] == 0.05 and fa["table_ms"] is None  # the one-shot call builds its table inside
    assert fa["flex_block_mask_ms"] == 3.0
    assert (bc["ours_ms"], bc["host_us"], ba["ours_ms"], bc["flex_ms"]) == (4.0, 40.0, 5.0, 6.0)
    assert fc["tflops"] == pytest.approx(4 * 8 * 12 * 2048 * 2048 * 64 * 0.5 / 1e-3 / 1e12, abs=0.06)
    assert bc["tflops"] == pytest.approx(2.5 * 4 * 8 * 12 * 2048 * 2048 * 64 * 0.5 / 4e-3 / 1e12, abs=0.06)
    # forward only: two rows
    assert len(R.rows_from_result(_case_result(bwd=False), META)) == 2


def test_rows_of_failed_cases_carry_no_times():
    failed = R.rows_from_result(_case_result(status="failed", check_detail="rel err vs flex 0.3"), META)
    assert all(r["status"] == "failed" and r["ours_ms"] is None and r["flex_ms"] is None for r in failed)
    assert all("rel err" in r["error"] for r in failed)
    att_err = R.rows_from_result(_case_result(att_status="error", att_error="TypeError: x",
                                              att_bwd_status=None), META)
    assert [r["status"] for r in att_err] == ["error", "ok", "error", "ok"]
    assert att_err[0]["ours_ms"] is None and att_err[1]["ours_ms"] == 1.0
    bwd_failed = R.rows_from_result(_case_result(bwd_status="failed", bwd_error="dk"), META)
    assert [r["status"] for r in bwd_failed] == ["ok", "ok", "failed", "failed"]
    assert bwd_failed[3]["ours_ms"] is None
    bad = dict(failed[0], api="eager", Lq=0)
    bad.pop("host_us")
    assert len(R.validate_row(bad)) == 3


def test_results_file_name_merge_and_newest(tmp_path):
    assert R.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert R.results_filename("NVIDIA H200", "2026-12-06T08:00:00") == "h200-2026-12-06.json"
    rows = R.rows_from_result(_case_result(), META)
    p = R.write_results(rows, tmp_path, META["gpu"], META["started"])
    assert p.name == "h100-80gb-hbm3-2026-12-06.json" and R.load_results(p) == rows
    # a later run of the same case replaces its rows in place; a new case is appended
    again = R.rows_from_result(_case_result(ours_ms=0.9), META)
    other = R.rows_from_result(_case_result(case="vit_b16"), META)
    R.write_results(again[:2] + other, tmp_path, META["gpu"], META["started"])
    got = R.load_results(p)
    assert len(got) == 8 and got[1]["ours_ms"] == 0.9 and got[3] == rows[3] and got[4]["case"] == "vit_b16"
    (tmp_path / "h100-2026-12-07.json").write_text("[]")
    (tmp_path / "notes.json").write_text("{}")
    assert R.newest_results(tmp_path).name == "h100-2026-12-07.json"
    assert R.newest_results(tmp_path / "absent") is None
    # two GPUs' files of one date: the later run (rows' ``started``) wins, whatever the files' times
    (tmp_path / "h200-2026-12-07.json").write_text(json.dumps([{"started": "2026-12-07T23:50:00+00:00"}]))
    (tmp_path / "h100-2026-12-07.json").write_text(json.dumps([{"started": "2026-12-07T08:00:00+00:00"}]))
    assert R.newest_results(tmp_path).name == "h200-2026-12-07.json"
    assert all(r["started"] == META["started"] for r in rows)
    (tmp_path / "h100-2026-12-07.json").write_text("{}")
    with pytest.raises(ValueError, match="list of rows"):
        R.load_results(tmp_path / "h100-2026-12-07.json")


def test_table_from_fixture():
    rows = R.load_results(FIXTURE)
    assert all(R.validate_row(r) == [] for r in rows)
    md = T.render_table(rows, source="tests/fixtures/bench_results_synthetic.json")
    lines = md.splitlines()
    assert lines[0].startswith("GPU: SYNTHETIC test fixture") and "commit 0000000" in lines[0]
    assert "`python -m benchmarks --cases full --bwd`" in md
    start = lines.index("| " + " | ".join(T.COLUMNS) + " |")
    table = [ln for ln in lines[start:] if ln.startswith("|")]
    ncol = len(T.COLUMNS)
    for ln in table:
        assert ln.replace("\\|", "").count("|") == ncol + 1, ln
    # the summary: one line per case, the one-shot call's forward and forward+backward
    s0 = lines.index("| " + " | ".join(T.SUMMARY_COLUMNS) + " |")
    summary = [ln for ln in lines[s0 + 2:start] if ln.startswith("|")]
    assert [ln.split(" | ")[0][2:] for ln in summary] == ["gpt2_step", "packed_docs_64x32k", "transformer_block_gpt2",
                                                         "causal", "alibi_causal", "radial_16x1024"]
    assert summary[0] == ("| gpt2_step | 8·12 | 2048 | 64 | 2.000 | 0.75× | 0.25× | 5.000 | 1.20× | 0.40× "
                          "| 20 / 5 |")
    assert "| **error** | — | — | **error** |" in summary[1] and "| 2.100 | 1.19× | 0.86× | **failed** |" in summary[3]
    body = [ln for ln in table[2:] if not ln.startswith("| **")]
    assert len(body) == len(rows)
    families = [ln.split("**")[1] for ln in table[2:] if ln.startswith("| **")]
    assert families == ["model", "dense/causal", "score mod", "locality"]  # FAMILY_ORDER
    gpt2 = [ln for ln in body if ln.startswith("| gpt2_step |")]
    assert gpt2[0] == ("| gpt2_step | 8·12 | 2048 | 64 | fwd | attention | 2.000 | 0.75× | 0.25× | 20 / 30 / 5 "
                       "| 101 / 102 / 99 | closed form | ok |")
    assert "| gpt2_step | 8·12 | 2048 | 64 | fwd+bwd | compiled | 4.000 | 1.50× | 0.50× | 40 / 60 / 15 |" in gpt2[3]
    docs = [ln for ln in body if ln.startswith("| packed_docs_64x32k |")]
    assert "| 0.250 / 8.000 |" in docs[1] and "in each call / 8.000" in docs[0]
    assert "**error**: RuntimeError: synthetic" in docs[0]
    block = [ln for ln in body if ln.startswith("| transformer_block_gpt2 |")]
    assert "ok (graph break (fullgraph=False))" in block[0] and "ok (fullgraph)" in block[1]
    assert any("**failed**: dk rel err" in ln for ln in body if ln.startswith("| causal |"))
    assert any("**skipped**: time budget" in ln for ln in body)


def test_table_section_replace_and_main(tmp_path, capsys):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text(f"# Benchmarks\n\n{T.START}\nold\n{T.END}\n\n## Method\n")
    assert T.main(["--results-dir", str(tmp_path / "none"), "--md", str(md)]) == 0
    text = md.read_text()
    assert T.NOT_GENERATED in text and "old" not in text and text.endswith("## Method\n")
    res = tmp_path / "results"
    res.mkdir()
    (res / "synthetic-2000-01-01.json").write_text(FIXTURE.read_text())
    assert T.main(["--results-dir", str(res), "--md", str(md)]) == 0
    text = md.read_text()
    assert text.count(T.START) == 1 and "| gpt2_step | 8·12 |" in text and T.NOT_GENERATED not in text
    assert text.startswith("# Benchmarks\n\n" + T.START + "\nGPU: SYNTHETIC")
    md.write_text("no markers")
    assert T.main(["--results", str(FIXTURE), "--md", str(md)]) == 2
    assert "markers" in capsys.readouterr().err
    assert T.main(["--results", str(tmp_path / "absent.json"), "--print"]) == 2


def test_benchmarks_md_has_the_table_markers():
    root = FIXTURE.parents[2]
    text = (root / "BENCHMARKS.md").read_text()
    assert text.count(T.START) == 1 and text.count(T.END) == 1 and text.index(T.START) < text.index(T.END)
    # the table opens the file: nothing but the title and a short lead before it
    assert text.index(T.START) < 1500


# ---------------------------------------------------------------- the case list

def test_model_cases_and_groups():
    shapes = {n: C.get_case(n).shape for n in C.MODEL_CASES}
    assert shapes == {
        "llama3_8b": dict(B=1, H=32, Hkv=8, L=8192, D=128),
        "gpt2_step": dict(B=8, H=12, Hkv=12, L=2048, D=64),
        "vit_b16": dict(B=32, H=12, Hkv=12, L=197, D=64),
        "packed_docs_64x32k": dict(B=1, H=16, Hkv=16, L=32768, D=128),
        "transformer_block_gpt2": dict(B=8, H=12, Hkv=12, L=2048, D=64)}
    assert C.get_case("transformer_block_gpt2").runner == "block"
    assert C.get_case("vit_b16").build(L=197, H=12, device="cpu").mask_mod is None
    assert C.get_case("gpt2_step").build(L=8, H=1, device="cpu").sdpa == "causal"
    # the model cases share one module-level mask function, as model code does
    assert C.get_case("llama3_8b").build(L=8, H=1, device="cpu").mask_mod is C.causal_mask
    # the protocol cases of shared/bench/README.md, each registered
    assert set(C.PROTOCOL_CASES) >= {"dense", "causal", "sliding_window_1024", "document_causal", "prefix_lm_2048",
                                     "alibi_causal", "softcap_causal", "natten2d_128x128_k13",
                                     "sta3d_16x32x32_tile4x8x8_win3", "radial_16x1024", "dsa_topk2048",
                                     "t5_causal", "sigmoid_causal", "lowrank_r16"}
    assert all(n in C.CASES for g in C.GROUPS.values() for n in g)
    assert C.GROUPS["full"][:len(C.MODEL_CASES)] == C.MODEL_CASES  # models first: a budget cuts the tail
    assert not set(C.GROUPS) & set(C.CASES)
    assert Hn.resolve_cases("models,causal") == C.MODEL_CASES + ["causal"]
    assert Hn.resolve_cases("full") == C.MODEL_CASES + C.PROTOCOL_CASES


def test_packed_documents_and_learnable_cases():
    inst = C.get_case("packed_docs_64x32k").build(L=32768, H=1, device="cpu")
    assert "64 documents" in inst.notes or "documents" in inst.notes
    n_docs = int(inst.notes.split()[0])
    assert 2 <= n_docs <= 64
    t5 = C.get_case("t5_causal").build(L=64, H=4, device="cpu")
    (table,) = t5.leaves
    assert table.shape == (4, 32) and table.requires_grad and t5.score_mod is not None
    sig = C.get_case("sigmoid_causal").build(L=64, H=2, device="cpu")
    assert sig.compile_kwargs == dict(normalizer="sigmoid") and not sig.lse and not sig.flex
    assert sig.ref_kwargs["sigmoid_bias"] == pytest.approx(-math.log(64))
    lr = C.get_case("lowrank_r16").build(L=32, H=2, B=1, device="cpu", dtype=torch.float64)
    u, w = lr.call_kwargs["bias_factors"]
    assert u.shape == w.shape == (1, 2, 32, 16) and u.dtype == torch.float64 and lr.leaves == (u, w)
    # SDPA's form of the bias (extra head dims) is the bias: compare with a dense additive mask
    q, k, v = (torch.randn(1, 2, 32, 16, dtype=torch.float64) for _ in range(3))
    bias = (u @ w.transpose(-1, -2)).detach()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert torch.allclose(lr.sdpa_fn(q, k, v), ref, atol=1e-10)


def test_jobs_and_dims_of_model_and_dsa_cases():
    cfg = Hn.BenchConfig(cases=["gpt2_step", "causal", "dsa_topk2048"], Ls=[4096, 16384], Ds=[128])
    assert cfg.jobs() == [("gpt2_step", 2048, 64), ("causal", 4096, 128), ("dsa_topk2048", 4096, 128),
                          ("causal", 16384, 128), ("dsa_topk2048", 16384, 128)]
    assert cfg.dims("gpt2_step") == (8, 12, 12) and cfg.dims("causal") == (1, 16, 16)
    assert cfg.dims("dsa_topk2048") == (1, 16, 1)  # DSA: one KV head unless --Hkv says otherwise
    cfg.Hkv = 4
    assert cfg.dims("dsa_topk2048") == (1, 16, 4) and cfg.dims("llama3_8b") == (1, 32, 8)


def test_host_calls_bounds():
    assert M.host_calls(None) == M.HOST_MIN_CALLS
    assert M.host_calls(0.01) == M.HOST_MAX_CALLS
    assert M.host_calls(0.5) == 20 and M.host_calls(100.0) == M.HOST_MIN_CALLS == 2


def test_cuda_host_time_is_the_median_loop_with_the_queue_drained_before_each(monkeypatch):
    """HOST_LOOPS loops of n calls, a sync before each loop and none inside one; the median per call."""
    be = Hn.CudaBackend.__new__(Hn.CudaBackend)  # no GPU needed: sync and the clock are stand-ins
    events = []
    be.sync = lambda: events.append("sync")
    durations = iter([3, 1, 2, 50, 2])  # one slow loop (another tenant) moves nothing
    now = [0.0]

    def fn():
        events.append("call")

    starts = []

    def timed():
        if len(starts) % 2 == 0:
            starts.append(now[0])
        else:
            now[0] += next(durations) * 4e-6  # 4 calls per loop: µs per call = the duration
            starts.append(now[0])
        return now[0]

    monkeypatch.setattr(Hn.time, "perf_counter", timed)
    got = be.host_us(fn, 4)
    assert got == pytest.approx(2.0)
    # the warm-up call, then per loop: a sync, 4 calls with no sync between them
    assert events == ["call"] + (["sync"] + ["call"] * 4) * Hn.HOST_LOOPS + ["sync"]


def test_dry_run_writes_both_api_rows(tmp_path, capsys):
    """The stand-in run writes the results file: fwd and fwd+bwd rows for both apis, host times."""
    argv = ["--device", "cpu", "--ours", "flex", "--L", "64", "--D", "16", "--H", "2", "--dtype", "fp32",
            "--ref-L", "64", "--cases", "causal,document_causal", "--no-isolate", "--results-dir", str(tmp_path),
            "--commit", "feedbee"]
    assert Hn.main(argv) == 0
    out = capsys.readouterr().out
    (path,) = tmp_path.glob("*.json")
    assert path.name.endswith(__import__("datetime").datetime.now(__import__("datetime").timezone.utc)
                              .strftime("%Y-%m-%d") + ".json")
    assert f"# results: {path}" in out
    rows = R.load_results(path)
    assert [(r["case"], r["pass"], r["api"]) for r in rows] == [
        ("causal", "fwd", "attention"), ("causal", "fwd", "compiled"),
        ("document_causal", "fwd", "attention"), ("document_causal", "fwd", "compiled")]
    for r in rows:
        assert R.validate_row(r) == [] and r["status"] == "ok" and r["commit"] == "feedbee"
        assert r["ours_ms"] > 0 and r["flex_ms"] > 0 and r["host_us"] > 0 and r["flex_host_us"] > 0
        assert r["command"].startswith("python -m benchmarks --device cpu")
    assert rows[0]["sdpa_ms"] > 0 and rows[0]["sdpa_host_us"] > 0 and rows[2]["sdpa_ms"] is None
    assert rows[3]["table"] == "device_table" and rows[3]["table_ms"] > 0 and rows[2]["table_ms"] is None
    assert rows[0]["check_rel_err_att"] < 1e-6


def test_dry_run_writes_no_results_file_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    cfg = Hn.config_from_args(Hn.build_parser().parse_args(["--device", "cpu"]))
    assert cfg.results_dir is None
    cfg = Hn.config_from_args(Hn.build_parser().parse_args([]))  # a GPU run of attndsl: the repository's folder
    assert cfg.results_dir == str(Hn._repo_root() / "benchmarks" / "results")
    monkeypatch.setenv("OUT", str(tmp_path))
    cfg = Hn.config_from_args(Hn.build_parser().parse_args(["--device", "cpu"]))
    assert cfg.results_dir == str(tmp_path / "benchmarks" / "results")


def test_transformer_block_case_on_cpu(tmp_path, capsys):
    """The block runner end to end on the CPU (eager blocks, no torch.compile there): ours one-shot and
    compiled inside the block, checked against the SDPA block, timed, written as rows."""
    name = "_test_tiny_block"
    C.register_case(C.Case(name, "tiny block", C._model_causal, runner="block",
                           shape=dict(B=1, H=2, Hkv=2, L=32, D=16), family="model"), replace=True)
    try:
        argv = ["--device", "cpu", "--ours", "flex", "--dtype", "fp32", "--cases", name, "--no-isolate",
                "--results-dir", str(tmp_path)]
        assert Hn.main(argv) == 0
        (res,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"case"')]
        assert res["status"] == "ok" and res["d_model"] == 32
        for who in ("att", "ours", "flex", "sdpa"):
            assert res[f"{who}_ms"] > 0 and res[f"{who}_host_us"] > 0, who
            assert res[f"{who}_fullgraph"] is None  # not compiled on the CPU
        assert res["ours_check_rel_err"] < 1e-5 and res["flex_check_rel_err"] < 1e-5
        rows = R.load_results(next(tmp_path.glob("*.json")))
        assert [(r["api"], r["status"]) for r in rows] == [("attention", "ok"), ("compiled", "ok")]
        assert all(r["d_model"] == 32 and "tflops" not in r for r in rows)
    finally:
        del C.CASES[name]


def test_compile_block_falls_back_to_fullgraph_false(monkeypatch):
    calls = []

    def fake_compile(m, fullgraph):
        calls.append(fullgraph)
        return ("compiled", fullgraph)

    def run(c):
        if c[1]:
            raise RuntimeError("Unsupported: graph break in attndsl.attention\nsecond line")

    monkeypatch.setattr(torch, "compile", fake_compile)
    c, fullgraph, err = Bk.compile_block(object(), run)
    assert calls == [True, False] and c == ("compiled", False) and fullgraph is False
    assert err == "RuntimeError: second line"
    calls.clear()
    c, fullgraph, err = Bk.compile_block(object(), lambda c: None)
    assert calls == [True] and fullgraph is True and err is None


def test_table_add_merges_fetched_files(tmp_path):
    res, fetched = tmp_path / "results", tmp_path / "out"
    fetched.mkdir()
    rows = R.load_results(FIXTURE)
    name = "h100-2000-01-01.json"
    (fetched / name).write_text(json.dumps(rows[:4]))
    md = tmp_path / "B.md"
    md.write_text(f"{T.START}\n{T.END}\n")
    assert T.main(["--add", str(fetched / name), "--results-dir", str(res), "--md", str(md)]) == 0
    (fetched / name).write_text(json.dumps([dict(rows[0], ours_ms=9.0)] + rows[4:8]))
    assert T.main(["--add", str(fetched / name), "--results-dir", str(res), "--md", str(md)]) == 0
    merged = R.load_results(res / name)
    assert len(merged) == 8 and merged[0]["ours_ms"] == 9.0 and merged[1] == rows[1]
    assert "| 9.000 |" in md.read_text()


def test_flex_failing_to_compile_is_recorded_and_ours_still_checked_and_timed(tmp_path, capsys, monkeypatch):
    """FlexAttention refusing a pattern (an InductorError on a GPU) is a finding about Flex: ours is
    checked against SDPA and the float64 reference instead, and timed."""
    import torch.nn.attention.flex_attention as fa

    def refusing(*a, **kw):
        raise RuntimeError("InductorError: synthetic refusal")
    monkeypatch.setattr(fa, "flex_attention", refusing)
    argv = ["--device", "cpu", "--L", "64", "--D", "16", "--H", "2", "--dtype", "fp32", "--ref-L", "64",
            "--cases", "causal", "--no-isolate", "--results-dir", str(tmp_path)]
    assert Hn.main(argv) == 0
    (row,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"case"')]
    assert row["status"] == "ok" and "synthetic refusal" in row["flex_error"]
    assert row["check_anchor"] == "sdpa" and row["check_rel_err_sdpa"] < 1e-5 and row["ref_rel_err"] < 1e-5
    assert row["ours_ms"] > 0 and row["att_ms"] > 0 and "flex_ms" not in row
    rows = R.load_results(next(tmp_path.glob("*.json")))
    assert all(r["flex_ms"] is None and r["ours_ms"] > 0 for r in rows)
