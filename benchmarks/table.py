"""The table at the top of BENCHMARKS.md, generated from the newest results file.

``python -m benchmarks.table`` reads the newest ``benchmarks/results/<gpu>-<yyyy-mm-dd>.json``
(or ``--results FILE``) and rewrites the part of ``BENCHMARKS.md`` between the markers
``<!-- table:start -->`` and ``<!-- table:end -->``; ``--print`` writes the table to stdout
instead. With no results file, the section says that no table was generated at this commit
(no figure is ever made up here).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from . import results as _results

START, END = "<!-- table:start -->", "<!-- table:end -->"
#: the order of pattern families in the table (others follow, alphabetically)
FAMILY_ORDER = ("model", "dense/causal", "mask", "score mod", "locality", "selector", "learnable")
COLUMNS = ("pattern", "B·Hq/Hkv", "L", "D", "pass", "api", "ours ms", "Flex ÷ ours", "SDPA ÷ ours",
           "host µs ours / Flex / SDPA", "peak MiB ours / Flex / SDPA", "table ms ours / Flex", "status")

NOT_GENERATED = (
    "No results file in the current format exists at this commit, so no table has been generated: "
    "the figures below (\"What to expect\") are the latest measured ones, each with its date and commit. "
    "To generate it on a GPU: `python -m benchmarks --cases full --bwd --budget-s 480`, then "
    "`python -m benchmarks.table`.")


def _num(x, digits=3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if digits == 3 and isinstance(x, (int, float)) and abs(x) >= 100:
        digits = 1
    return f"{x:.{digits}f}"


def _ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def _triple(a, b, c, digits=0) -> str:
    if a is None and b is None and c is None:
        return "—"
    return " / ".join(_num(x, digits) for x in (a, b, c))


def _esc(s, limit=80) -> str:
    s = " ".join(str(s).split()).replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _table_cell(r: Dict[str, Any]) -> str:
    if r.get("api") == "attention":
        ours = "in each call" if r.get("table") == "device_table" else (
            "closed form" if r.get("table") == "closed_form" else "—")
    else:
        ours = (_num(r.get("table_ms")) if r.get("table") == "device_table" else
                "closed form" if r.get("table") == "closed_form" else "—")
    flex = r.get("flex_block_mask_ms")
    return ours if flex is None else f"{ours} / {_num(flex)}"


def _status_cell(r: Dict[str, Any]) -> str:
    st = r.get("status") or "ok"
    extra = []
    if r.get("fullgraph") is not None:
        extra.append("fullgraph" if r["fullgraph"] else "graph break (fullgraph=False)")
    if st == "ok":
        return "ok" + (f" ({', '.join(extra)})" if extra else "")
    return f"**{st}**" + (": " + _esc(r.get("error")) if r.get("error") else "")


def _dims(r) -> str:
    D, Dv = r.get("D"), r.get("Dv")
    return str(D) if Dv in (None, D) else f"{D}/{Dv}"


def _order(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    def fam(r):
        f = r.get("family") or "other"
        return (FAMILY_ORDER.index(f), "") if f in FAMILY_ORDER else (len(FAMILY_ORDER), f)
    first_seen = {}
    for i, r in enumerate(rows):
        first_seen.setdefault(r.get("case"), i)
    return sorted(rows, key=lambda r: (fam(r), first_seen[r.get("case")], r.get("Lq") or 0, r.get("D") or 0,
                                       _results.PASSES.index(r["pass"]) if r.get("pass") in _results.PASSES else 9,
                                       _results.APIS.index(r["api"]) if r.get("api") in _results.APIS else 9))


def _distinct(rows, key) -> str:
    vals = sorted({str(r.get(key)) for r in rows if r.get(key) is not None})
    return ", ".join(vals) if vals else "?"


SUMMARY_COLUMNS = ("pattern", "B·Hq/Hkv", "L", "D", "fwd ms", "Flex ÷ ours", "SDPA ÷ ours", "fwd+bwd ms",
                   "Flex ÷ ours", "SDPA ÷ ours", "host µs ours / SDPA")


def _summary_cells(r: Optional[Dict[str, Any]]) -> List[str]:
    if r is None:
        return ["—", "—", "—"]
    if (r.get("status") or "ok") != "ok":
        return [f"**{r.get('status')}**", "—", "—"]
    return [_num(r.get("ours_ms")), _ratio(_results._ratio(r.get("flex_ms"), r.get("ours_ms"))),
            _ratio(_results._ratio(r.get("sdpa_ms"), r.get("ours_ms")))]


def render_summary(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per case: the one-shot ``attndsl.attention`` call (what model code runs), forward and
    forward+backward, against FlexAttention and SDPA."""
    by_case: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in _order(rows):
        if r.get("api") != "attention":
            continue
        key = (r.get("case"), r.get("B"), r.get("Hq"), r.get("Hkv"), r.get("Lq"), r.get("Lkv"), r.get("D"), r.get("Dv"))
        by_case.setdefault(key, {})[r.get("pass")] = r
    out = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    for (case, B, Hq, Hkv, Lq, Lkv, D, Dv), passes in by_case.items():
        f, fb = passes.get("fwd"), passes.get("fwd+bwd")
        heads = f"{B}·{Hq}" + (f"/{Hkv}" if Hkv != Hq else "")
        ok = f is not None and (f.get("status") or "ok") == "ok" and f.get("host_us") is not None
        host = f"{_num(f.get('host_us'), 0)} / {_num(f.get('sdpa_host_us'), 0)}" if ok else "—"
        out.append("| " + " | ".join([_esc(case, 40), heads, str(Lq) if Lq == Lkv else f"{Lq}/{Lkv}",
                                      str(D) if Dv in (None, D) else f"{D}/{Dv}", *_summary_cells(f),
                                      *_summary_cells(fb), host]) + " |")
    return "\n".join(out)


def render_table(rows: Sequence[Dict[str, Any]], source: Optional[str] = None) -> str:
    """The markdown of the results: header line, the summary (one-shot call), the full table, legend."""
    if not rows:
        return "The results file holds no rows."
    out = [f"GPU: {_distinct(rows, 'gpu')} · torch {_distinct(rows, 'torch')} · triton {_distinct(rows, 'triton')}"
           f" · CUDA {_distinct(rows, 'cuda')} · dtype {_distinct(rows, 'dtype')} · commit {_distinct(rows, 'commit')}"
           f" · measured {_distinct(rows, 'date')}"]
    cmds = sorted({r.get("command") for r in rows if r.get("command")})
    if cmds:
        out.append("")
        out.append("Command: " + "; ".join(f"`{c}`" for c in cmds)
                   + (f" → `{source}`" if source else ""))
    out.append("")
    out.append("**At a glance**: the one-shot `attndsl.attention` call, as model code makes it (ms per call, "
               "ratios anchor ÷ ours: above 1, attndsl is faster).")
    out.append("")
    out.append(render_summary(rows))
    out.append("")
    out.append("**Every row**: both ways of calling attndsl, forward and forward+backward.")
    out.append("")
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    family = None
    for r in _order(rows):
        f = r.get("family") or "other"
        if f != family:
            family = f
            out.append(f"| **{_esc(f)}** |" + " |" * (len(COLUMNS) - 1))
        heads = f"{r.get('B')}·{r.get('Hq')}" + (f"/{r.get('Hkv')}" if r.get("Hkv") != r.get("Hq") else "")
        out.append("| " + " | ".join([
            _esc(r.get("case"), 40), heads, str(r.get("Lq")) if r.get("Lq") == r.get("Lkv") else
            f"{r.get('Lq')}/{r.get('Lkv')}", _dims(r), str(r.get("pass")), str(r.get("api")),
            _num(r.get("ours_ms")), _ratio(r.get("flex_over_ours", _results._ratio(r.get("flex_ms"), r.get("ours_ms")))),
            _ratio(r.get("sdpa_over_ours", _results._ratio(r.get("sdpa_ms"), r.get("ours_ms")))),
            _triple(r.get("host_us"), r.get("flex_host_us"), r.get("sdpa_host_us")),
            _triple(r.get("peak_mib"), r.get("flex_peak_mib"), r.get("sdpa_peak_mib")),
            _table_cell(r), _status_cell(r)]) + " |")
    out.append("")
    out.append("api `attention`: `attndsl.attention(q, k, v, mask_mod=..., score_mod=...)` called as model code "
               "calls it, every call paying its own host work (and building its own block table); api "
               "`compiled`: `attndsl.compile(...)` once, block tables built once and reused. Flex ÷ ours and "
               "SDPA ÷ ours are the anchor's median time divided by ours (above 1: ours is faster); "
               "FlexAttention is `torch.compile(flex_attention)` with its block mask built once, SDPA is "
               "`F.scaled_dot_product_attention` where it serves the pattern (— where it does not). Host µs: "
               "one call's host time (a loop without syncs). Table ms: our block-table build / Flex's "
               "`create_block_mask`, timed apart from the calls. Model rows use their own shapes; "
               "`transformer_block_gpt2` times a whole `torch.compile`d block (ms per block).")
    return "\n".join(out)


def replace_section(md: str, body: str) -> str:
    """``md`` with the text between the table markers replaced by ``body`` (markers kept).
    Raises ValueError when the markers are missing or out of order."""
    i, j = md.find(START), md.find(END)
    if i < 0 or j < 0 or j < i:
        raise ValueError(f"BENCHMARKS.md needs the markers {START} and {END} (in that order)")
    return md[: i + len(START)] + "\n" + body.strip("\n") + "\n" + md[j:]


def section_for(results_path: Optional[Path], root: Optional[Path] = None) -> str:
    if results_path is None:
        return NOT_GENERATED
    rows = _results.load_results(results_path)
    src = str(results_path)
    if root is not None:
        try:
            src = str(Path(results_path).resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return render_table(rows, source=src)


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(prog="python -m benchmarks.table",
                                description="Regenerate the table at the top of BENCHMARKS.md from the newest "
                                            "results file.")
    p.add_argument("--results", default=None, help="a results file (default: the newest in --results-dir)")
    p.add_argument("--results-dir", default=str(root / "benchmarks" / "results"))
    p.add_argument("--md", default=str(root / "BENCHMARKS.md"), help="the file to update (default: BENCHMARKS.md)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the table, change no file")
    p.add_argument("--add", nargs="+", default=[], metavar="FILE",
                   help="results files (e.g. fetched from a GPU run's $OUT) to merge into the same-named file of "
                        "--results-dir first: rows measured again replace the old ones")
    ns = p.parse_args(argv)
    for f in ns.add:
        try:
            rows = _results.load_results(f)
        except (OSError, ValueError) as e:
            print(f"error: {f}: {e}", file=sys.stderr)
            return 2
        dest = Path(ns.results_dir) / Path(f).name
        old = _results.load_results(dest) if dest.is_file() else []
        Path(ns.results_dir).mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(_results.merge_rows(old, rows), indent=1, default=str) + "\n")
        print(f"{dest}: {len(rows)} rows merged from {f}")
    path = Path(ns.results) if ns.results else _results.newest_results(ns.results_dir)
    if ns.results and not path.is_file():
        print(f"error: no such results file: {path}", file=sys.stderr)
        return 2
    try:
        body = section_for(path, root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns.print_only:
        print(body)
        return 0
    md = Path(ns.md)
    try:
        md.write_text(replace_section(md.read_text(), body))
    except (OSError, ValueError) as e:
        print(f"error: {md}: {e}", file=sys.stderr)
        return 2
    print(f"{md}: table {'from ' + str(path) if path else '(no results file: not generated)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
