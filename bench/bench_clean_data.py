"""Throughput of the data-cleaning pipeline against datatrove's stock tokenization, same filters, same run.

    python bench/bench_clean_data.py --docs 3000 --files 4 --workers 2 --rounds 3 [--recipe web] [--workdir W]

Generates a web-like corpus with planted duplicates once, then runs the recipe in alternating rounds with
two contenders, each in a child process:
- `shared`:    this pipeline (each text word/sentence-tokenized once for every step);
- `datatrove`: the same datatrove blocks with their stock tokenizer (every step tokenizes on its own).
Per step it reports the time datatrove measured inside the step, summed over tasks (rates are per core),
and for the whole run the wall clock; docs/s and MB/s of each contender and the ratio shared/datatrove as
median [min-max] over rounds, with the machine's load. Both contenders must keep and remove exactly the
same documents for the same reasons, else the bench fails; so does a failed contender.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import LoadSampler, emit_result, fmt_spread, run_worker, spread, work_folder  # noqa: E402

CONTENDERS = ("shared", "datatrove")


def make_corpus(root: Path, docs: int, files: int, seed: int) -> tuple[int, int]:
    from datapipe.synthetic import eval_set, web_corpus

    root.mkdir(parents=True, exist_ok=True)
    evals = eval_set()
    (root / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    # the planted-case mix of the tests, scaled: ~60% unique documents
    unit = 245
    rows: list[dict] = []
    for k in range(max(1, round(docs / unit))):
        for r in web_corpus(seed=seed + k, eval_rows=evals):
            rows.append(dict(r, id=f"{k}-{r['id']}"))
    rows = rows[:docs]
    raw = root / "raw"
    raw.mkdir()
    for i in range(files):
        (raw / f"part{i:03d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[i::files]))
    return len(rows), sum(len(r["text"].encode()) for r in rows)


def decisions(out: Path) -> dict:
    """Kept document ids with a hash of their text, and removed ids per step and reason."""
    import hashlib

    def rows(folder: Path):
        for f in sorted(folder.rglob("*.jsonl")):
            for line in f.read_text().splitlines():
                yield json.loads(line)

    kept = {r["id"]: hashlib.sha1(r["text"].encode()).hexdigest()[:12] for r in rows(out / "data")}
    removed = {}
    for step in sorted(p for p in (out / "removed").iterdir() if p.is_dir()):
        # <step>/<reason>/<rank>.jsonl
        removed[step.name] = sorted(f"{json.loads(line)['id']}:{f.parent.name}"
                                    for f in sorted(step.glob("*/*.jsonl")) for line in f.read_text().splitlines())
    return {"kept": kept, "removed": removed}


def worker(args) -> int:
    from datapipe import run_pipeline, validate_config

    root = Path(args.workdir)
    out = root / f"out_{args.worker}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = validate_config({
        "recipe": args.recipe, "input": {"path": str(root / "raw")}, "output": {"path": str(out)},
        "executor": {"kind": "local", "workers": args.workers}, "tokenizer": args.worker,
        "step_params": {"decontaminate": {"eval_files": [str(root / "evals.jsonl")]}} if args.recipe == "web" else {},
    })
    start = time.perf_counter()
    report = run_pipeline(cfg)
    wall = time.perf_counter() - start
    emit_result({"wall": wall, "input": report["input"], "output": report["output"],
                 "steps": [{k: s[k] for k in ("step", "docs_in", "bytes_in", "docs_out", "seconds")}
                           for s in report["steps"]],
                 "decisions": decisions(out)})
    return 0


def compare_decisions(a: dict, b: dict) -> list[str]:
    problems = []
    if a["kept"] != b["kept"]:
        diff = set(a["kept"].items()) ^ set(b["kept"].items())
        problems.append(f"kept documents differ ({len(diff)} id/text pairs)")
    for step in sorted(set(a["removed"]) | set(b["removed"])):
        ra, rb = set(a["removed"].get(step, [])), set(b["removed"].get(step, []))
        if ra != rb:
            problems.append(f"{step}: removed differ (only shared {len(ra - rb)}, only datatrove {len(rb - ra)})")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--recipe", default="web", choices=["web", "code"])
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--workdir", default=None, help="corpus and run folders (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        # The bench writes and replaces raw/ and out_*/ in it: never in a folder holding someone's files.
        print(f"error: --workdir {args.workdir} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    work, tmp = work_folder(args.workdir, "bench_clean_data_")
    n_docs, n_bytes = make_corpus(work, args.docs, args.files, args.seed)
    results: dict[str, list[dict]] = {c: [] for c in args.only}
    with LoadSampler() as load:
        for r in range(args.rounds):
            # alternate who goes first, so drift in the machine's load hits both alike
            order = args.only if r % 2 == 0 else list(reversed(args.only))
            for name in order:
                cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(work), "--recipe", args.recipe,
                       "--workers", str(args.workers)]
                try:
                    results[name].append(run_worker(cmd, name, Path(__file__).resolve().parents[1]))
                except RuntimeError as err:
                    print(f"error: {err}", file=sys.stderr)
                    return 1
                print(f"round {r + 1}/{args.rounds} {name}: {results[name][-1]['wall']:.1f} s", file=sys.stderr)

    problems = []
    first = {name: runs[0]["decisions"] for name, runs in results.items()}
    for name, runs in results.items():
        for run in runs[1:]:
            problems += [f"{name} not reproducible: {p}" for p in compare_decisions(first[name], run["decisions"])]
    if len(first) == 2:
        problems += compare_decisions(first["shared"], first["datatrove"])

    console = Console()
    steps = [s["step"] for s in next(iter(results.values()))[0]["steps"]]
    table = Table(title=f"{args.recipe} recipe: {n_docs:,} docs, {n_bytes / 1e6:.1f} MB, {args.files} files, "
                        f"{args.workers} workers, {args.rounds} rounds; median [min-max]")
    table.add_column("step")
    table.add_column("docs in", justify="right")
    for name in args.only:
        table.add_column(f"{name} docs/s", justify="right")
        table.add_column(f"{name} MB/s", justify="right")
    if len(args.only) == 2:
        table.add_column("ratio docs/s", justify="right")
        table.add_column("ratio MB/s", justify="right")
    summary: dict = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "corpus":
                     {"docs": n_docs, "bytes": n_bytes}, "steps": {}, "load": load.summary()}

    def rates(name: str, step: str | None) -> tuple[list[float], list[float]]:
        docs, mbs = [], []
        for run in results[name]:
            if step is None:
                sec, d, b = run["wall"], run["input"]["docs"], run["input"]["bytes"]
            else:
                s = next(x for x in run["steps"] if x["step"] == step)
                sec, d, b = max(s["seconds"], 1e-9), s["docs_in"], s["bytes_in"]
            docs.append(d / sec)
            mbs.append(b / 1e6 / sec)
        return docs, mbs

    for step in [*steps, None]:
        label = step or "whole run (wall)"
        per = {name: rates(name, step) for name in args.only}
        row = {name: {"docs_per_s": spread(per[name][0]), "mb_per_s": spread(per[name][1])} for name in args.only}
        cells = []
        for name in args.only:
            cells += [fmt_spread(row[name]["docs_per_s"], digits=0), fmt_spread(row[name]["mb_per_s"], digits=3)]
        if len(args.only) == 2:
            # rounds pair up in order: round r's shared run against round r's datatrove run
            ratio_d = [a / b for a, b in zip(per["shared"][0], per["datatrove"][0])]
            ratio_m = [a / b for a, b in zip(per["shared"][1], per["datatrove"][1])]
            row["ratio_docs_per_s"], row["ratio_mb_per_s"] = spread(ratio_d), spread(ratio_m)
            cells += [fmt_spread(row["ratio_docs_per_s"], digits=2, suffix="x"),
                      fmt_spread(row["ratio_mb_per_s"], digits=2, suffix="x")]
        docs_in = n_docs if step is None else next(x for x in results[args.only[0]][0]["steps"]
                                                   if x["step"] == step)["docs_in"]
        table.add_row(f"[b]{label}[/b]" if step is None else label, f"{docs_in:,}", *cells)
        summary["steps"][label] = row
    console.print(table)
    ld = load.summary()
    console.print(f"load average (1 min) during the bench: median {ld['load1_median']:.1f}, "
                  f"max {ld['load1_max']:.1f}, on {ld['cpus']} CPUs")
    summary["decisions_equal"] = not problems
    (work / "bench.json").write_text(json.dumps(summary, indent=2))
    console.print(f"results: {work / 'bench.json'}")
    if tmp is not None:
        tmp.cleanup()
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    console.print("decisions: identical (kept ids and texts, removed ids and reasons per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
