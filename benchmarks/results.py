"""The results format: ``benchmarks/results/<gpu>-<yyyy-mm-dd>.json``, a JSON list of rows.

One row per case x pass (``fwd`` | ``fwd+bwd``) x api (``attention``: the one-shot
``attndsl.attention(q, k, v, mask_mod=..., score_mod=...)`` as model code calls it, every call
paying its own host work; ``compiled``: ``attndsl.compile(...)`` with its block tables built once).
Every row has at least the keys of :data:`REQUIRED`; times are medians of
``triton.testing.do_bench`` in ms, ``host_us`` is the host time of one call (a loop of calls
without syncs, ``time.perf_counter`` ÷ the count), ``null`` where a figure does not apply or was
not taken. Extra keys: ``status``/``error`` (a row that is not ``ok`` carries no times),
``flex_over_ours``/``sdpa_over_ours`` (anchor ms ÷ ours ms), ``tflops``, ``density``, ``table_ms``
(our block-table build, compiled rows), ``flex_block_mask_ms`` (``create_block_mask``),
``fullgraph`` (the transformer-block case), checks, notes.

Pure functions: no GPU, no attndsl import (unit-tested on the CPU).
"""
from __future__ import annotations

import datetime
import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

#: keys every row has (shared/bench/README.md)
REQUIRED = ("case", "B", "Hq", "Hkv", "Lq", "Lkv", "D", "dtype", "pass", "api", "ours_ms", "flex_ms", "sdpa_ms",
            "host_us", "flex_host_us", "sdpa_host_us", "peak_mib", "gpu", "torch", "triton", "commit")
PASSES = ("fwd", "fwd+bwd")
APIS = ("attention", "compiled")
#: what makes a row unique inside one results file (a later run replaces an earlier one)
ROW_KEY = ("case", "B", "Hq", "Hkv", "Lq", "Lkv", "D", "Dv", "dtype", "pass", "api")
#: the harness's prefix of each api's fields in a per-case result
API_PREFIX = {"attention": "att", "compiled": "ours"}
FWD_BWD_FLOP_FACTOR = 2.5


def _r(x, nd=4):
    return None if x is None else round(float(x), nd)


def _ratio(anchor, ours):
    if anchor is None or ours is None or not (ours > 0) or not (anchor > 0):
        return None
    return round(anchor / ours, 3)


def _tflops(B, H, Lq, Lkv, D, Dv, density, ms, fwd_bwd):
    if ms is None or not (ms > 0) or density is None:
        return None
    f = 2.0 * B * H * Lq * Lkv * (D + (Dv or D)) * density * (FWD_BWD_FLOP_FACTOR if fwd_bwd else 1.0)
    return round(f / (ms * 1e-3) / 1e12, 1)


def _row_status(res: Dict[str, Any], pass_: str, api: str):
    """(status, error) of one row from a per-case result of the harness."""
    st = res.get("status")
    if st != "ok":
        return st or "error", res.get("check_detail") or res.get("error")
    if pass_ == "fwd+bwd":
        bst = res.get("bwd_status")
        if bst not in (None, "ok"):
            return bst, res.get("bwd_error")
        if bst is None:
            return "not run", None
    if api == "attention":
        key = "att_bwd_status" if pass_ == "fwd+bwd" else "att_status"
        ast = res.get(key) or res.get("att_status")
        if ast not in ("ok", None):
            return ast, res.get("att_bwd_error" if pass_ == "fwd+bwd" and res.get("att_bwd_error") else "att_error")
        if ast is None:
            return "not run", res.get("att_error")
    return "ok", None


def rows_from_result(res: Dict[str, Any], meta: Optional[Dict[str, Any]] = None,
                     bwd: Optional[bool] = None) -> List[Dict[str, Any]]:
    """The result rows of one harness case: fwd (and fwd+bwd when it was asked for) x both apis."""
    meta = meta or {}
    bwd = bool(res.get("bwd")) if bwd is None else bwd
    L = res.get("L")
    base: Dict[str, Any] = dict(
        case=res.get("case"), family=res.get("family"), B=res.get("B"), Hq=res.get("H"), Hkv=res.get("Hkv"),
        Lq=L, Lkv=L, D=res.get("D"), dtype=res.get("dtype"))
    if res.get("Dv") is not None:
        base["Dv"] = res["Dv"]
    out = []
    for pass_ in PASSES if bwd else PASSES[:1]:
        sfx = "_fwd_bwd" if pass_ == "fwd+bwd" else ""
        for api in APIS:
            pre = API_PREFIX[api]
            status, error = _row_status(res, pass_, api)
            ok = status == "ok"

            def get(key, ok=ok):
                return res.get(key) if ok else None
            row = dict(base, **{"pass": pass_}, api=api)
            row["ours_ms"] = get(f"{pre}{sfx}_ms")
            row["flex_ms"] = get(f"flex{sfx}_ms")
            row["sdpa_ms"] = get(f"sdpa{sfx}_ms")
            row["host_us"] = get(f"{pre}{sfx}_host_us")
            row["flex_host_us"] = get(f"flex{sfx}_host_us")
            row["sdpa_host_us"] = get(f"sdpa{sfx}_host_us")
            row["peak_mib"] = get(f"{pre}{sfx}_peak_mib")
            row["flex_peak_mib"] = get(f"flex{sfx}_peak_mib")
            row["sdpa_peak_mib"] = get(f"sdpa{sfx}_peak_mib")
            row["flex_over_ours"] = _ratio(row["flex_ms"], row["ours_ms"])
            row["sdpa_over_ours"] = _ratio(row["sdpa_ms"], row["ours_ms"])
            row["density"] = res.get("density")
            if res.get("d_model") is None:  # attention FLOPs (not for a whole block)
                row["tflops"] = _tflops(row["B"] or 0, row["Hq"] or 0, L or 0, L or 0, row["D"] or 0, res.get("Dv"),
                                        res.get("density"), row["ours_ms"], pass_ == "fwd+bwd")
            else:
                row["d_model"] = res["d_model"]
                row["fullgraph"] = res.get(f"{pre}_fullgraph")
                row["flex_fullgraph"] = res.get("flex_fullgraph")
                if res.get(f"{pre}_fullgraph_error"):
                    row["fullgraph_error"] = res[f"{pre}_fullgraph_error"]
            # block tables: the compiled row reuses one built once (timed apart); the one-shot call
            # pays its own inside ours_ms
            row["table"] = res.get("ours_table")
            row["table_ms"] = res.get("ours_table_ms") if api == "compiled" else None
            row["flex_block_mask_ms"] = res.get("flex_block_mask_ms")
            row["status"] = status
            if error:
                row["error"] = str(error)[:500]
            for k in ("check_rel_err_flex", "check_rel_err_sdpa", "check_rel_err_att", "ref_rel_err", "ref_L",
                      "grad_rel_err_dq", "grad_rel_err_dk", "grad_rel_err_dv", "grad_rel_err_att",
                      "flex_bwd_error", "notes", "att_dropped_kwargs", "wall_s"):
                if res.get(k) is not None:
                    row[k] = res[k]
            for k in ("gpu", "torch", "triton", "cuda", "commit", "command"):
                row[k] = meta.get(k)
            row["date"] = (meta.get("started") or "")[:10] or None
            row["started"] = meta.get("started")  # the run's start (UTC, ISO): orders files of one date
            out.append(row)
    return out


def validate_row(row: Dict[str, Any]) -> List[str]:
    """What is wrong with a row (empty when it is well-formed)."""
    problems = [f"missing {k!r}" for k in REQUIRED if k not in row]
    if row.get("pass") not in PASSES:
        problems.append(f"pass {row.get('pass')!r} not in {PASSES}")
    if row.get("api") not in APIS:
        problems.append(f"api {row.get('api')!r} not in {APIS}")
    for k in ("ours_ms", "flex_ms", "sdpa_ms", "host_us", "flex_host_us", "sdpa_host_us", "peak_mib"):
        x = row.get(k)
        if x is not None and not (isinstance(x, (int, float)) and x >= 0):
            problems.append(f"{k} = {x!r} is not a non-negative number or null")
    for k in ("B", "Hq", "Hkv", "Lq", "Lkv", "D"):
        x = row.get(k)
        if not (isinstance(x, int) and x > 0):
            problems.append(f"{k} = {x!r} is not a positive integer")
    return problems


def gpu_slug(gpu: Optional[str]) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3' (file-name safe)."""
    s = re.sub(r"^nvidia\s+", "", str(gpu or "unknown").strip(), flags=re.I).lower()
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown"


def results_filename(gpu: Optional[str], date: Optional[str] = None) -> str:
    """``<gpu>-<yyyy-mm-dd>.json`` (date: today in UTC when not given)."""
    date = date or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return f"{gpu_slug(gpu)}-{date[:10]}.json"


def _key(row):
    return tuple(row.get(k) for k in ROW_KEY)


def merge_rows(old: Sequence[Dict[str, Any]], new: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``old`` with every row that ``new`` measures again replaced (in place), then the rest of ``new``."""
    new_by_key = {_key(r): r for r in new}
    out, seen = [], set()
    for r in old:
        k = _key(r)
        if k in new_by_key:
            if k not in seen:
                out.append(new_by_key[k])
                seen.add(k)
        else:
            out.append(r)
    out += [r for r in new if _key(r) not in seen]
    return out


def write_results(rows: Sequence[Dict[str, Any]], directory, gpu: Optional[str] = None,
                  date: Optional[str] = None) -> Path:
    """Write (merge into) ``directory/<gpu>-<date>.json``; atomic. Returns the path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / results_filename(gpu, date)
    old: List[Dict[str, Any]] = []
    if path.exists():
        try:
            old = load_results(path)
        except (OSError, ValueError):
            old = []
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merge_rows(old, rows), indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def load_results(path) -> List[Dict[str, Any]]:
    rows = json.loads(Path(path).read_text())
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a JSON list of rows (objects)")
    return rows


_DATE = re.compile(r"(\d{4}-\d{2}-\d{2})\.json$")


def _last_started(path: Path) -> str:
    """The latest ``started`` of a results file's rows ("" where none has one or it does not read)."""
    try:
        return max((str(r.get("started") or "") for r in load_results(path)), default="")
    except (OSError, ValueError):
        return ""


def newest_results(directory) -> Optional[Path]:
    """The newest ``<gpu>-<yyyy-mm-dd>.json`` in a folder: latest date in the name, then the latest
    run start its rows record (``started``; files of one date, other GPUs), then the latest
    modification time (which a fresh clone does not keep), then the name (None when there is none)."""
    d = Path(directory)
    files = [p for p in d.glob("*.json") if _DATE.search(p.name)] if d.is_dir() else []
    if not files:
        return None
    return max(files, key=lambda p: (_DATE.search(p.name).group(1), _last_started(p), p.stat().st_mtime, p.name))


def all_rows(results: Iterable[Dict[str, Any]], meta: Optional[Dict[str, Any]], bwd: bool) -> List[Dict[str, Any]]:
    """Rows of many per-case results, in order."""
    out: List[Dict[str, Any]] = []
    for res in results:
        out += rows_from_result(res, meta, bwd)
    return out
