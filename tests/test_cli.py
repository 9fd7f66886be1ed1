"""The command line on a user's own pattern file: bench (no GPU here: its exit code, and the
timing procedure as a CPU dry run), check (a pass and a shrunk failure), show --source, tile maps
drawn with matplotlib, and one-line errors with exit code 2 for bad arguments."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attndsl
from attndsl import cli

ROOT = Path(__file__).resolve().parents[1]

PATTERNS = textwrap.dedent("""
    import torch
    import attndsl

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def sliding_window(window):
        def sliding_window_mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return sliding_window_mask

    def softcap(cap):
        def softcap_score(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        return softcap_score

    def window_and_cap(window, cap):
        return {"mask_mod": sliding_window(window), "score_mod": softcap(cap)}

    def pair(window, cap):
        return softcap(cap), sliding_window(window)

    def with_layout(n):
        lay = attndsl.Layout((n,))
        return lay, sliding_window(4)

    # exp(100 s) overflows float32 for s > 0.89, where float64 does not: not a pattern to ship
    def overflow(score, b, h, q_idx, kv_idx):
        return torch.exp(score * 100.0)

    def documents(n, size, device="cpu"):
        ids = torch.arange(n, device=device) // size
        def same_document(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (q_idx >= kv_idx)
        return same_document

    def variadic(*args):
        return args[0]

    mask_mod = causal
""")


@pytest.fixture
def pat(tmp_path):
    f = tmp_path / "my_patterns.py"
    f.write_text(PATTERNS)
    return str(f)


def _one_error_line(err: str, prog: str = "attndsl", word: str = "error") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(prog) and word in lines[0] and "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------ patterns

def test_pattern_parts_accepts_the_documented_shapes(pat):
    m, s = cli.load_parts(f"{pat}:window_and_cap(4, 20.0)")
    assert m(0, 0, 5, 2) and not m(0, 0, 5, 0) and float(s(torch.tensor(40.0), 0, 0, 0, 0)) == pytest.approx(20 * float(torch.tanh(torch.tensor(2.0))))
    m2, s2 = cli.load_parts(f"{pat}:pair(4, 20.0)")  # any order
    assert m2.__name__ == "sliding_window_mask" and s2.__name__ == "softcap_score"
    m3, s3 = cli.load_parts(f"{pat}:with_layout(16)")  # a Layout in the tuple is skipped
    assert m3.__name__ == "sliding_window_mask" and s3 is None
    assert cli.load_parts(f"{pat}:softcap(3.0)")[0] is None
    assert cli.load_parts(pat)[0].__name__ == "causal"  # the module-level mask_mod
    m4, s4 = cli.load_parts(f"{pat}:sliding_window(4)", f"{pat}:softcap(3.0)")
    assert m4 is not None and s4 is not None
    # torch's and FlexAttention's shapes: a BlockMask's mask_mod
    bm = type("BlockMask", (), {"mask_mod": staticmethod(m4)})()
    assert cli.pattern_parts(bm) == (m4, None)


@pytest.mark.parametrize("expr,match", [
    ("variadic", "cannot tell whether"),
    ("{'mask': 1}", "expected NAME"),
])
def test_pattern_parts_refuses_what_it_cannot_classify(pat, expr, match):
    with pytest.raises(cli.CLIError, match=match):
        cli.load_parts(f"{pat}:{expr}")


def test_pattern_parts_refusals():
    def m(b, h, q, kv):
        return q >= kv
    with pytest.raises(cli.CLIError, match="two mask_mods"):
        cli.pattern_parts((m, m))
    with pytest.raises(cli.CLIError, match="keys 'mask_mod' and/or 'score_mod'"):
        cli.pattern_parts({"mask": m})
    with pytest.raises(cli.CLIError, match="no mask_mod or score_mod"):
        cli.pattern_parts((None, 3))
    with pytest.raises(cli.CLIError, match="expected a mask_mod"):
        cli.pattern_parts(3)


# ------------------------------------------------------------------------------------ bench

def test_bench_without_a_gpu_says_so_and_exits_3(pat, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", f"{pat}:sliding_window(128)", "--L", "1024"]) == 3
    line = _one_error_line(capsys.readouterr().err, "attndsl bench:", "no CUDA device")
    assert "no CUDA device" in line and "--device cpu" in line


def test_bench_dry_run_on_cpu_writes_rows_table_and_plot(pat, tmp_path, capsys):
    """The timing procedure end to end on the CPU (interpreter, eager Flex): every (pass, api)
    row with the shared keys, Flex timed where it runs (no CPU backward), SDPA absent for a
    score modifier, JSON, markdown and a bar chart."""
    from attndsl.bench import ROW_KEYS
    out_json, out_png = tmp_path / "rows.json", tmp_path / "bars.png"
    rc = cli.main(["bench", f"{pat}:window_and_cap(8, 20.0)", "--device", "cpu", "--quick", "--H", "2",
                   "--Hkv", "1", "--L", "32", "--D", "16", "--json", str(out_json), "--markdown", "--plot",
                   str(out_png), "--quiet", "--name", "mine"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| case | shape |" in out and "| mine |" in out and "CPU interpreter dry run" in out
    rows = json.loads(out_json.read_text())
    assert [(r["pass"], r["api"]) for r in rows] == [("fwd", "attention"), ("fwd", "compiled"),
                                                      ("fwd+bwd", "attention"), ("fwd+bwd", "compiled")]
    for r in rows:
        assert set(ROW_KEYS) <= set(r)
        assert (r["case"], r["B"], r["Hq"], r["Hkv"], r["Lq"], r["Lkv"], r["D"], r["dtype"]) == \
            ("mine", 1, 2, 1, 32, 32, 16, "bf16")
        assert r["ours_ms"] > 0 and r["host_us"] > 0 and r["sdpa_ms"] is None and r["peak_mib"] is None
        assert r["torch"] == torch.__version__ and r["device"] == "cpu"
        assert (r["flex_ms"] is not None) == (r["pass"] == "fwd")  # FlexAttention has no CPU backward
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_dry_run_of_a_data_dependent_mask_times_its_table(pat, tmp_path):
    """A mask that reads a captured tensor: Flex's block mask and our block table are timed apart
    (the table only on the compiled rows), SDPA does not apply."""
    out_json = tmp_path / "rows.json"
    assert cli.main(["bench", f"{pat}:documents(32, 8)", "--device", "cpu", "--quick", "--H", "1", "--L", "32",
                     "--D", "16", "--pass", "fwd", "--json", str(out_json), "--quiet"]) == 0
    rows = json.loads(out_json.read_text())
    assert [r["api"] for r in rows] == ["attention", "compiled"]
    att, comp = rows
    assert att["table_ms"] is None and comp["table_ms"] > 0
    assert att["flex_block_mask_ms"] > 0 and att["flex_ms"] > 0 and att["sdpa_ms"] is None
    assert att["Dv"] == 16 and att["status"] == "ok" and att["flex_host_us"] > 0 and att["sdpa_host_us"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_on_a_gpu(pat, tmp_path, capsys):
    """On a GPU: compiled Flex and SDPA next to ours, peak memory, every row well-formed."""
    from attndsl.bench import ROW_KEYS
    out_json = tmp_path / "rows.json"
    assert cli.main(["bench", f"{pat}:causal", "--L", "2048", "--H", "8", "--Hkv", "2", "--D", "64", "--quick",
                     "--json", str(out_json), "--markdown", "--quiet"]) == 0
    rows = json.loads(out_json.read_text())
    assert len(rows) == 4
    for r in rows:
        assert set(ROW_KEYS) <= set(r) and r["device"] == "cuda"
        assert r["ours_ms"] > 0 and r["flex_ms"] > 0 and r["sdpa_ms"] > 0 and r["peak_mib"] > 0
        assert r["flex_block_mask_ms"] > 0 and r["host_us"] > 0
    assert "| case |" in capsys.readouterr().out
    out_json2 = tmp_path / "docs.json"
    assert cli.main(["bench", f"{pat}:documents(4096, 512, device='cuda')", "--L", "4096", "--H", "4", "--quick",
                     "--json", str(out_json2), "--quiet"]) == 0
    rows = json.loads(out_json2.read_text())
    assert all(r["sdpa_ms"] is None and r["flex_ms"] > 0 for r in rows)
    assert [r["table_ms"] is not None for r in rows] == [False, True, False, True]


def test_sdpa_applies_to_causal_masks_only():
    from attndsl.bench import _is_causal
    spec = lambda m: attndsl.compile(mask_mod=m).spec  # noqa: E731
    assert _is_causal(spec(lambda b, h, q, kv: kv <= q), 100, 100, "cpu")
    assert _is_causal(spec(lambda b, h, q, kv: (q - kv) >= 0), 70, 130, "cpu")
    # a window wider than the sequence looks causal at this length only
    assert _is_causal(spec(lambda b, h, q, kv: (q >= kv) & (q - kv < 64)), 64, 64, "cpu")
    assert not _is_causal(spec(lambda b, h, q, kv: (q >= kv) & (q - kv < 64)), 65, 65, "cpu")
    assert not _is_causal(spec(lambda b, h, q, kv: (q >= kv) & (h == 0)), 16, 16, "cpu")
    assert not _is_causal(spec(lambda b, h, q, kv: q > kv), 16, 16, "cpu")


def test_bench_refuses_to_time_a_pattern_that_fails_its_check(pat, capsys):
    rc = cli.main(["bench", f"{pat}:overflow", "--device", "cpu", "--quick", "--H", "1", "--L", "16",
                   "--D", "16", "--pass", "fwd", "--quiet"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "check failed, nothing timed" in err and "float64 reference" in err and "non-finite" in err


def test_bench_shape_errors_are_one_line(pat, capsys):
    assert cli.main(["bench", f"{pat}:causal", "--H", "3", "--Hkv", "2", "--device", "cpu"]) == 2
    assert "multiple of Hkv" in _one_error_line(capsys.readouterr().err)
    na = ROOT / "patterns" / "neighborhood.py"
    assert cli.main(["bench", f"{na}:neighborhood_1d(32, 3)", "--L", "64", "--device", "cpu", "--quiet"]) == 2
    assert "layout of 32 tokens" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["bench", "--cases", "causal", "--quick"]) == 2
    assert "python -m benchmarks" in _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------------ check

def test_check_passes_a_correct_pattern(pat, capsys):
    rc = cli.main(["check", f"{pat}:sliding_window(5)", "--score", f"{pat}:softcap(10.0)", "--max-examples", "3",
                   "--max-len", "24", "--max-heads", "2", "--seed", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.startswith("attndsl check: PASS: 3 examples match the float64 reference (forward and gradients")


def test_check_prints_the_minimal_failing_example(pat, capsys):
    rc = cli.main(["check", f"{pat}:overflow", "--max-examples", "3", "--max-len", "16", "--max-heads", "1",
                   "--dtypes", "fp32", "--no-grads", "--seed", "0"])
    out = capsys.readouterr().out
    assert rc == 1
    assert out.startswith("attndsl check: FAIL after")
    assert "matches_reference(" in out and "shape=Shape(B=1, Hq=1, Hkv=1," in out  # shrunk to one head
    assert "non-finite element(s) where the reference is finite" in out and "score_mod=overflow" in out


def test_check_api_returns_the_example():
    from attndsl.check import check_pattern
    res = check_pattern(score_mod=lambda s, b, h, q, kv: s * 0.5, max_examples=2, max_len=16, max_heads=1,
                        dtypes=(torch.float32,), grads=False, seed=1)
    assert res.passed and res.examples == 2 and res.example is None
    with pytest.raises(ValueError, match="mask_mod and/or a score_mod"):
        check_pattern()


# ------------------------------------------------------------------------------------ show

def test_show_source_prints_the_generated_triton(pat, capsys):
    assert cli.main(["show", f"{pat}:sliding_window(16)", "--source"]) == 0
    out = capsys.readouterr().out
    assert "@triton.jit" in out and "def attn_fwd" in out
    assert out.strip() == attndsl.compile(mask_mod=cli.load_pattern(f"{pat}:sliding_window(16)")).source.strip()


def test_explain_names_the_source_file():
    from attndsl.runtime.cache import source_path
    attn = attndsl.compile(mask_mod=lambda b, h, q, kv: q >= kv)
    text = attn.explain()
    assert "runtime.cache.source_path(spec)" not in text
    assert str(source_path(attn.spec)) in text and "@triton.jit functions" in text and "attn_fwd" in text


# ------------------------------------------------------------------------------------ tile maps

def test_tile_map_figure_has_axes_legend_and_title():
    from attndsl.tilemap import FULL, PARTIAL, draw_tile_map, tile_map
    attn = attndsl.compile(mask_mod=lambda b, h, q, kv: (q >= kv) & (q - kv < 40), block_m=16, block_n=16)
    tmap = tile_map(attn, 128)
    assert (tmap == FULL).any() and (tmap == PARTIAL).any()
    fig = draw_tile_map(tmap, title="window 40: L=128")
    ax = fig.axes[0]
    assert "key tile" in ax.get_xlabel() and "query tile" in ax.get_ylabel()
    assert ax.get_title() == "window 40: L=128"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["full (mask skipped)", "partial (mask evaluated)", "skipped (never visited)"]
    img = ax.get_images()[0].get_array()
    assert img.shape == (8, 8) and (img == tmap.numpy()).all()
    # integer tile indices on both axes, within the map
    for ticks, n in ((ax.get_xticks(), 8), (ax.get_yticks(), 8)):
        inside = [t for t in ticks if -0.5 <= t <= n - 0.5]
        assert inside and all(float(t).is_integer() for t in inside)


def test_tilemap_cli_writes_a_png(tmp_path, capsys):
    out = tmp_path / "sw.png"
    sw = ROOT / "patterns" / "sliding_window.py"
    assert cli.main(["tilemap", f"{sw}:sliding_window(64)", "--out", str(out), "--length", "512"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "8 query tiles x 8 key tiles" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("argv,match", [
    (["tilemap", "{pat}:causal", "--out", "{tmp}/m.png", "--length", "-5"], "--length: expected a positive integer, got -5"),
    (["tilemap", "{pat}:causal", "--out", "{tmp}/no/such/dir/m.png", "--length", "64"], "does not exist"),
    (["tilemap", "{pat}:causal", "--out", "{tmp}", "--length", "64"], "is a directory"),
    (["tilemap", "{pat}:causal", "--out", "{tmp}/m.xyz", "--length", "64"], "not supported"),
    (["tilemap", "{tmp}/absent.py:causal", "--out", "{tmp}/m.png", "--length", "64"], "no such file"),
    (["tilemap", "{pat}:sliding_window(4", "--out", "{tmp}/m.png", "--length", "64"], "cannot parse"),
    (["tilemap", "{pat}:sliding_window(x)", "--out", "{tmp}/m.png", "--length", "64"], "Python literals"),
    (["tilemap", "{pat}:softcap(2.0)", "--out", "{tmp}/m.png", "--length", "64"], "has no mask_mod"),
    (["show", "{pat}:causal", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["show", "{pat}:nothing_here"], "no attribute 'nothing_here'"),
    (["bench", "{pat}:causal", "--L", "0"], "--L: expected a positive integer, got 0"),
    (["bench", "{pat}:causal", "--json", "{tmp}/no/such/dir/r.json"], "does not exist"),
    (["bench", "{pat}:causal", "--dtype", "fp8"], "invalid choice"),
    (["bench", "{tmp}/absent.py:causal"], "no such file"),
    (["bench", "--L", "64"], "name a pattern"),
    (["check", "{pat}:causal", "--dtypes", "fp8"], "comma-separated list"),
    (["check", "{pat}:causal", "--max-examples", "-1"], "positive integer"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_end_in_one_error_line_and_exit_2(pat, tmp_path, capsys, argv, match):
    argv = [a.format(pat=pat, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == 2
    assert match in _one_error_line(capsys.readouterr().err)


def test_python_dash_m_attndsl_help():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "attndsl", "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "usage: attndsl" in r.stdout and "bench" in r.stdout and "check" in r.stdout
