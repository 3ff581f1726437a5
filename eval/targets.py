"""Issue 5's GPU targets, checked against measured benchmark results.

``python -m pinsearch.eval.targets DIR`` reads every ``pinsearch bench ... --json`` file in
DIR (the unpacked results of ``eval/h100.sh``, or runs of one's own), tells each kind by its
fields and prints one line per target: ``pass``, ``FAIL`` or ``open`` (a lower bound still
short of it, or a figure missing), with the measured figure. The thresholds are the issue's,
set for one H100: a result from a machine without CUDA is marked as such, not judged.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the issue's numbers
EMBED_MIN_IMAGES_PER_S = {"effnet_lite0": 8000.0, "clip-vit-b-32": 8000.0}
EMBED_MIN_RATIO = {"convnext_base": 0.9}  # end to end over the bare forward, same batch
EXACT_MAX_VS_RAW = 1.2  # pinsearch over raw FAISS on the same index
EXACT_MIN_16BIT_SPEEDUP, EXACT_MIN_AGREEMENT = 3.0, 0.99
QUERY_MAX_P50_MS, QUERY_MAX_P99_MS = 5.0, 20.0
STUDY_MIN_SPEEDUP, STUDY_MAX_F1_GAP = 10.0, 0.01


@dataclass
class Check:
    """One target: what it is, the figure measured, and whether it is met."""

    source: str  # the result file
    target: str
    measured: str
    state: str  # pass, FAIL or open

    def line(self) -> str:
        return f"{self.state:4}  {self.target}: {self.measured}  [{self.source}]"


def _state(ok: bool | None) -> str:
    return "open" if ok is None else ("pass" if ok else "FAIL")


def _embed(result: dict[str, Any], src: str) -> list[Check]:
    out = []
    for row in result["rows"]:
        name = row.get("backbone")
        if name not in EMBED_MIN_IMAGES_PER_S and name not in EMBED_MIN_RATIO:
            continue
        if "error" in row:
            out.append(Check(src, f"embed {name}", row["error"], "FAIL"))
            continue
        rate, whole, ratio = (
            row["steady_images_per_s"],
            row["end_to_end_images_per_s"],
            row["ratio"],
        )
        how = f"{row['decode']} decoding, batch {row['batch_size']}, {row['images']} files"
        if name in EMBED_MIN_IMAGES_PER_S:
            goal = EMBED_MIN_IMAGES_PER_S[name]
            measured = f"{rate:,.0f} img/s steady ({whole:,.0f} whole run; {how})"
            out.append(
                Check(src, f"embed {name} >= {goal:,.0f} img/s", measured, _state(rate >= goal))
            )
        if name in EMBED_MIN_RATIO:
            goal = EMBED_MIN_RATIO[name]
            measured = (
                f"{ratio:.3f} ({rate:,.0f} vs bare forward "
                f"{row['forward_images_per_s']:,.0f} img/s; {how})"
            )
            out.append(
                Check(
                    src,
                    f"embed {name} >= {goal:.0%} of the bare forward",
                    measured,
                    _state(ratio >= goal),
                )
            )
    return out


def _exact(result: dict[str, Any], src: str) -> list[Check]:
    rows = {r["path"]: r for r in result["rows"] if "error" not in r}
    size = f"{result['queries']:,} queries over {result['n']:,} x {result['dim']}"
    out = []
    ours = rows.get("pinsearch Flat")
    if ours is not None:
        out.append(
            Check(
                src,
                f"exact: pinsearch within {EXACT_MAX_VS_RAW}x of raw FAISS",
                f"{ours['vs_raw']}x ({ours['seconds']} s; {size})",
                _state(ours["vs_raw"] <= EXACT_MAX_VS_RAW),
            )
        )
    half = [r for name, r in rows.items() if "16" in name]  # float16 / bfloat16 paths
    if half:
        good = [r for r in half if r["agreement"] >= EXACT_MIN_AGREEMENT] or half
        best = min(good, key=lambda r: r["vs_raw"])
        speedup = 1 / best["vs_raw"] if best["vs_raw"] else float("inf")
        ok = speedup >= EXACT_MIN_16BIT_SPEEDUP and best["agreement"] >= EXACT_MIN_AGREEMENT
        out.append(
            Check(
                src,
                f"exact: a 16-bit path >= {EXACT_MIN_16BIT_SPEEDUP}x faster, "
                f"agreement >= {EXACT_MIN_AGREEMENT}",
                f"{best['path']}: {speedup:.2f}x, agreement {best['agreement']} ({size})",
                _state(ok),
            )
        )
    return out


def _query(result: dict[str, Any], src: str) -> list[Check]:
    p50, p99 = result["pinsearch_p50_ms"], result["pinsearch_p99_ms"]
    ok = p50 < QUERY_MAX_P50_MS and p99 < QUERY_MAX_P99_MS
    measured = (
        f"p50 {p50} ms, p99 {p99} ms over {result['n']:,} pins x {result['dim']} "
        f"({result['factory']}; raw FAISS p50 {result['faiss_p50_ms']} ms)"
    )
    target = f"query with metadata: p50 < {QUERY_MAX_P50_MS:g} ms, p99 < {QUERY_MAX_P99_MS:g} ms"
    return [Check(src, target, measured, _state(ok))]


def _study(result: dict[str, Any], src: str) -> list[Check]:
    out = []
    total = result.get("total")
    if total is None and len(result["rows"]) == 1:  # one head: its row is the whole grid
        row = result["rows"][0]
        total = {
            "speedup": row.get("speedup"),
            "pinsearch_s": row["pinsearch_s"],
            "sklearn_s": row.get("sklearn_s") or row.get("sklearn_at_least_s"),
            "speedup_is_lower_bound": row.get("speedup_is_lower_bound"),
        }
    size = f"{result['n']:,} x {result['dim']}, heads {[r['head'] for r in result['rows']]}"
    if total is not None and total.get("speedup") is not None:
        speedup, low = total["speedup"], bool(total.get("speedup_is_lower_bound"))
        ok = True if speedup >= STUDY_MIN_SPEEDUP else (None if low else False)
        bound = "at least " if low else ""
        out.append(
            Check(
                src,
                f"study: grid >= {STUDY_MIN_SPEEDUP:g}x faster than scikit-learn",
                f"{bound}{speedup}x ({total['pinsearch_s']} s vs {bound}"
                f"{total['sklearn_s']} s; {size}; run {result['status']})",
                _state(ok),
            )
        )
    for row in result["rows"]:
        gap = row.get("f1_gap")
        source = f" (from {row['sklearn_f1_from']})" if row.get("sklearn_f1_from") else ""
        measured = f"{row['head']}: {row['pinsearch_macro_f1']} vs {row.get('sklearn_macro_f1')}"
        ok = None if gap is None else gap <= STUDY_MAX_F1_GAP
        target = f"study: macro-F1 within {STUDY_MAX_F1_GAP} of scikit-learn"
        out.append(Check(src, target, measured + source, _state(ok)))
    return out


def check_result(result: dict[str, Any], source: str = "") -> list[Check]:
    """The targets one ``bench --json`` result bears on (none for kinds without a target,
    such as ``bench index``)."""
    rows = result.get("rows") or []
    if "pinsearch_p50_ms" in result:
        checks = _query(result, source)
    elif "steady_images_per_s" in result:  # one backbone: bench embed without a table
        checks = _embed({"rows": [result]}, source)
    elif rows and "backbone" in rows[0]:
        checks = _embed(result, source)
    elif rows and "path" in rows[0]:
        checks = _exact(result, source)
    elif rows and "pinsearch_s" in rows[0] and "data_sha256" in result and "fits" not in result:
        checks = _study(result, source)
    else:
        return []
    if not (result.get("machine") or {}).get("cuda"):
        for c in checks:  # the thresholds are set for a GPU: say so instead of judging
            c.state, c.measured = "cpu", c.measured + " (no CUDA: not judged)"
    return checks


def check_folder(folder: Path) -> list[Check]:
    """:func:`check_result` for every JSON file under ``folder`` (files that are not
    benchmark results, or not finished JSON, are skipped)."""
    checks: list[Check] = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict):
            checks += check_result(result, str(path.relative_to(folder)))
    return checks


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pinsearch.eval.targets RESULTS_DIR", file=sys.stderr)
        return 2
    if not Path(args[0]).is_dir():
        print(f"{args[0]}: not a folder of benchmark results", file=sys.stderr)
        return 2
    checks = check_folder(Path(args[0]))
    for c in checks:
        print(c.line())
    if not checks:
        print(f"no benchmark results with a target under {args[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
