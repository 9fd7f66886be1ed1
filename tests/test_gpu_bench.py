"""GPU smoke test of the benchmark harness: the CUDA paths the CPU tests cannot reach.

Small shapes, one process (``--no-isolate``): ours (one-shot and compiled), compiled FlexAttention
and SDPA are checked and timed with ``do_bench``; host time and peak memory are taken; a tiny
transformer block is compiled with ``torch.compile`` (``fullgraph=True`` where it works) with each
attention inside. Run before a full benchmark run to catch a harness error in a minute:
``python -m pytest -q -m gpu tests/test_gpu_bench.py``.
"""
import json

import pytest
import torch

from benchmarks import cases as C
from benchmarks import harness as Hn
from benchmarks import results as R

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _rows(capsys):
    return [json.loads(ln) for ln in capsys.readouterr().out.splitlines() if ln.startswith('{"case"')]


def test_harness_on_the_gpu_writes_checked_rows(tmp_path, capsys):
    argv = ["--L", "1024", "--D", "64", "--H", "4", "--Hkv", "2", "--cases", "causal,document_causal", "--bwd",
            "--no-isolate", "--results-dir", str(tmp_path), "--commit", "gputest"]
    assert Hn.main(argv) == 0
    res = _rows(capsys)
    assert [r["status"] for r in res] == ["ok", "ok"] and [r["bwd_status"] for r in res] == ["ok", "ok"]
    rows = R.load_results(next(tmp_path.glob("*.json")))
    assert len(rows) == 8
    for r in rows:
        assert R.validate_row(r) == [] and r["status"] == "ok", r
        assert r["ours_ms"] > 0 and r["flex_ms"] > 0 and r["host_us"] > 0 and r["flex_host_us"] > 0
        assert r["peak_mib"] > 0 and r["gpu"] == torch.cuda.get_device_name() and r["commit"] == "gputest"
    causal = [r for r in rows if r["case"] == "causal"]
    assert all(r["sdpa_ms"] > 0 and r["sdpa_host_us"] > 0 for r in causal)
    docs = [r for r in rows if r["case"] == "document_causal"]
    assert all(r["table"] == "device_table" and r["flex_block_mask_ms"] > 0 for r in docs)
    assert all(r["table_ms"] > 0 for r in docs if r["api"] == "compiled")


def test_compiled_transformer_block_on_the_gpu(tmp_path, capsys):
    name = "_gpu_tiny_block"
    C.register_case(C.Case(name, "tiny compiled block", C._model_causal, runner="block",
                           shape=dict(B=2, H=2, Hkv=2, L=256, D=64), family="model"), replace=True)
    try:
        argv = ["--cases", name, "--bwd", "--no-isolate", "--results-dir", str(tmp_path)]
        Hn.main(argv)
        (res,) = _rows(capsys)
        assert res["status"] == "ok", res
        for who in ("ours", "flex", "sdpa"):
            assert res[f"{who}_ms"] > 0 and res[f"{who}_fwd_bwd_ms"] > 0, who
            assert isinstance(res[f"{who}_fullgraph"], bool), who
        assert res["sdpa_fullgraph"] is True and res["flex_fullgraph"] is True
        rows = R.load_results(next(tmp_path.glob("*.json")))
        assert {(r["pass"], r["api"]) for r in rows} == {(p, a) for p in R.PASSES for a in R.APIS}
        assert all(isinstance(r["fullgraph"], bool) or r["status"] != "ok" for r in rows)
    finally:
        del C.CASES[name]
