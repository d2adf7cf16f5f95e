"""Throughput of the data-cleaning pipeline: documents/s and MB/s per step and for the whole run.

    python bench/bench_clean_data.py --docs 6000 --files 4 --workers 2 [--recipe web] [--out /tmp/bench]

Generates a web-like corpus with planted duplicates, runs the recipe with the local executor and
prints, per step, the time datatrove measured inside that step summed over tasks (so per-step rates
are per core) and the whole run's wall-clock throughput. Results also go to <out>/bench.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LoadSampler  # noqa: E402
from datapipe import run_pipeline, validate_config  # noqa: E402
from datapipe.synthetic import eval_set, web_corpus  # noqa: E402


def make_corpus(root: Path, docs: int, files: int, seed: int) -> tuple[int, int]:
    root.mkdir(parents=True)
    evals = eval_set()
    (root / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    # the planted-case mix of the tests, scaled: ~60% unique documents
    unit = 245
    rows: list[dict] = []
    for k in range(max(1, round(docs / unit))):
        for r in web_corpus(seed=seed + k, eval_rows=evals):
            rows.append(dict(r, id=f"{k}-{r['id']}"))
    rows = rows[:docs]
    (root / "raw").mkdir()
    for i in range(files):
        (root / "raw" / f"part{i:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[i::files]))
    return len(rows), sum(len(r["text"].encode()) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=6000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--recipe", default="web", choices=["web", "code"])
    parser.add_argument("--out", default=None, help="a new or empty folder (default: a fresh temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        # Never delete what this run did not create.
        raise SystemExit(f"error: {args.out} is not empty; give a new --out")
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_clean_data-"))
    n_docs, n_bytes = make_corpus(root, args.docs, args.files, args.seed)
    cfg = validate_config({
        "recipe": args.recipe, "input": {"path": str(root / "raw")}, "output": {"path": str(root / "out")},
        "executor": {"kind": "local", "workers": args.workers},
        "step_params": {"decontaminate": {"eval_files": [str(root / "evals.jsonl")]}} if args.recipe == "web" else {},
    })
    start = time.perf_counter()
    with LoadSampler() as load:
        report = run_pipeline(cfg)
    wall = time.perf_counter() - start
    load = load.summary()

    table = Table(title=f"{args.recipe} recipe: {n_docs:,} docs, {n_bytes / 1e6:.1f} MB, {args.files} files, "
                        f"{args.workers} workers, {os.cpu_count()} CPUs, load (1 min) {load['load1_median']:.1f} "
                        f"(max {load['load1_max']:.1f})")
    for col in ("step", "docs in", "docs out", "core-s", "docs/s/core", "MB/s/core"):
        table.add_column(col, justify="left" if col == "step" else "right")
    rows = []
    for s in report["steps"]:
        sec = s["seconds"]
        rate = s["docs_in"] / sec if sec else float("inf")
        mbs = s["bytes_in"] / 1e6 / sec if sec else float("inf")
        rows.append({"step": s["step"], "docs_in": s["docs_in"], "docs_out": s["docs_out"], "core_seconds": sec,
                     "docs_per_s_per_core": round(rate, 1), "mb_per_s_per_core": round(mbs, 3)})
        table.add_row(s["step"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{sec:.2f}", f"{rate:,.0f}",
                      f"{mbs:.2f}")
    whole = {"wall_seconds": round(wall, 2), "docs_per_s": round(n_docs / wall, 1),
             "mb_per_s": round(n_bytes / 1e6 / wall, 3), "docs_in": n_docs, "docs_out": report["output"]["docs"]}
    table.add_row("[b]whole run (wall)[/b]", f"{n_docs:,}", f"{report['output']['docs']:,}", f"{wall:.2f}",
                  f"{whole['docs_per_s']:,.0f}", f"{whole['mb_per_s']:.2f}")
    Console().print(table)
    (root / "bench.json").write_text(json.dumps({"args": vars(args), "steps": rows, "whole": whole, "load": load}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
