"""What deduplicating named sources costs next to one input holding the same files (docs/data.md).

    python bench/bench_sources.py [--docs 1500] [--workers 2] [--rounds 5] [--workdir DIR] [--json OUT]

One planted web corpus (datapipe.synthetic.web_corpus: exact and near copies) is split into three
JSONL folders. Contenders, alternating in rounds, each in a child process:
- one_input: `input:` pointing at the parent folder (the three folders read as one);
- sources:   the three folders as `sources:` (source tags, priority rule, per-source counts and
             the overlap matrices).
Both run exact_dedup + minhash_dedup. They must remove the same number of documents per step
(the same groups are found; only which copy is kept may differ), else the bench fails. Prints
docs/s of each, the per-round ratio sources / one_input, and the machine's load.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (
    add_round_args, contender_spreads, emit_result, finish, fmt_spread, load_summary, round_ratio, run_rounds,
    run_worker, work_folder, write_json,
)

NAMES = ("one_input", "sources")
SOURCES = ("web", "books", "wiki")
STEPS = ["exact_dedup", "minhash_dedup"]


def make_corpus(raw: Path, docs: int) -> int:
    from datapipe.synthetic import web_corpus

    # 2/3 unique, 1/6 exact copies, 1/6 near copies (web_corpus plants 5 edit rates)
    rows = web_corpus(seed=11, n_unique=max(10, docs * 2 // 3), n_exact=docs // 6, near_per_rate=max(1, docs // 30),
                      n_foreign=0, n_boilerplate=0, n_repetitive=0)
    for i, name in enumerate(SOURCES):
        folder = raw / name
        folder.mkdir(parents=True)
        # one schema for all sources: the planted rows carry kind-specific fields
        part = [{"id": r["id"], "text": r["text"]} for r in rows[i::len(SOURCES)]]
        (folder / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return len(rows)


def config(name: str, raw: Path, out: Path, workers: int) -> dict:
    inputs = ({"input": {"path": str(raw)}} if name == "one_input"
              else {"sources": {s: {"path": str(raw / s)} for s in SOURCES}})
    return {"recipe": "custom", **inputs, "output": {"path": str(out)}, "steps": STEPS,
            "executor": {"kind": "local", "workers": workers, "tasks": len(SOURCES)}}


def worker(name: str, raw: Path, out: Path, workers: int) -> None:
    from datapipe import run_pipeline, validate_config

    cfg = validate_config(config(name, raw, out, workers))
    start = time.perf_counter()
    report = run_pipeline(cfg)
    seconds = time.perf_counter() - start
    emit_result({"seconds": seconds, "docs": report["input"]["docs"], "kept": report["output"]["docs"],
                 "removed": {s["step"]: s["docs_in"] - s["docs_out"] for s in report["steps"]},
                 "has_sources": "sources" in report})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1500, help="documents in all (2/3 unique, 1/3 planted copies)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="an empty or missing folder (default: a temporary one)")
    parser.add_argument("--worker", choices=NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--raw", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    add_round_args(parser, rounds=5)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.raw), Path(args.out), args.workers)
        return 0

    root, tmp = work_folder(args.workdir, "bench-sources-")
    if any(root.iterdir()):
        parser.error(f"--workdir {root} is not empty")
    try:
        total = make_corpus(root / "raw", args.docs)
        runs = iter(range(10**6))

        def spawn(name: str) -> dict:
            out = root / f"{name}-{next(runs)}"
            return run_worker([sys.executable, __file__, "--worker", name, "--raw", root / "raw", "--out", out,
                               "--workers", args.workers], name, cwd=root)

        per_round, failed = run_rounds(NAMES, spawn, args.rounds,
                                       describe=lambda r: f"{r['docs'] / r['seconds']:.1f} docs/s")
        for r in per_round:
            if len(r) == 2 and r["one_input"]["removed"] != r["sources"]["removed"]:
                failed["sources"] = (f"removed {r['sources']['removed']}, one input removed "
                                     f"{r['one_input']['removed']}")
            if "sources" in r and not r["sources"]["has_sources"]:
                failed["sources"] = "no sources section in the report"
        spreads = contender_spreads(per_round, {"docs_per_s": lambda r: r["docs"] / r["seconds"],
                                                "seconds": lambda r: r["seconds"]})
        ratio = round_ratio(per_round, "sources", "one_input", lambda r: r["docs"] / r["seconds"])
        load = load_summary(per_round)
        print(f"{total} documents in {len(SOURCES)} sources, {STEPS}, {args.workers} workers, {args.rounds} rounds")
        for name, s in spreads.items():
            print(f"{name:10s} {fmt_spread(s['docs_per_s'], suffix=' docs/s')}  "
                  f"({fmt_spread(s['seconds'], suffix=' s')})")
        if ratio:
            print(f"sources / one_input docs/s  {fmt_spread(ratio, digits=2)}")
        if "load1" in load:
            print(f"load average {fmt_spread(load['load1'])} (max {load['load1_max']:.1f}) on {load['cpus']} CPUs")
        if args.json:
            write_json(args.json, {"per_round": per_round, "spreads": spreads, "ratio": ratio, "load": load,
                                   "failed": failed})
        finish(failed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
