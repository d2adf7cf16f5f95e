"""Throughput of the data-cleaning pipeline against datatrove's stock tokenization and against the
pipeline before shared tokenization, same filters, same corpus, same run.

    python bench/bench_clean_data.py --docs 3000 --files 4 --workers 2 --rounds 3 [--recipe web] [--workdir W]

Generates a web-like corpus with planted duplicates once, then runs the recipe in alternating rounds
(bench/common.py's driver), each contender in a child process:
- `shared`:    this pipeline (each text word/sentence-tokenized once for every step);
- `datatrove`: the same datatrove blocks with their stock tokenizer (every step tokenizes on its own);
- `before`:    the pipeline of commit `--before` (default 887f7a7, the last one before shared
               tokenization: the baseline of the 10x goal), its `datapipe/` taken with `git archive`
               into a temporary folder and imported from there; the repo is not touched.
Per step it reports the time datatrove measured inside the step, summed over tasks (rates are per core),
and for the whole run the wall clock; docs/s and MB/s of each contender and the ratios shared/other as
median [min-max] over rounds (each ratio within one round), with the machine's load. Every contender
must keep and remove exactly the same documents for the same reasons as the first one, else the bench
fails; so does a failed contender.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    add_round_args,
    emit_result,
    finish,
    fmt_spread,
    load_summary,
    round_ratio,
    run_rounds,
    run_worker,
    spread,
    work_folder,
    write_json,
)

CONTENDERS = ("shared", "datatrove", "before")


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
    if args.tree:
        # the `before` contender: its datapipe package wins over this checkout's
        sys.path.insert(0, args.tree)
    from datapipe import run_pipeline, validate_config

    if args.tree and not Path(sys.modules["datapipe"].__file__).resolve().is_relative_to(Path(args.tree).resolve()):
        raise SystemExit(f"error: datapipe was not imported from {args.tree}")
    root = Path(args.workdir)
    out = root / f"out_{args.worker}"
    shutil.rmtree(out, ignore_errors=True)
    raw = {
        "recipe": args.recipe, "input": {"path": str(root / "raw")}, "output": {"path": str(out)},
        "executor": {"kind": "local", "workers": args.workers},
        "step_params": {"decontaminate": {"eval_files": [str(root / "evals.jsonl")]}} if args.recipe == "web" else {},
    }
    if args.worker != "before":  # the older config has no `tokenizer` key
        raw["tokenizer"] = args.worker
    cfg = validate_config(raw)
    start = time.perf_counter()
    report = run_pipeline(cfg)
    wall = time.perf_counter() - start
    emit_result({"wall": wall, "input": report["input"], "output": report["output"],
                 "steps": [{k: s[k] for k in ("step", "docs_in", "bytes_in", "docs_out", "seconds")}
                           for s in report["steps"]],
                 "decisions": decisions(out)})
    return 0


def compare_decisions(a: dict, b: dict, names: tuple[str, str]) -> list[str]:
    problems = []
    if a["kept"] != b["kept"]:
        diff = set(a["kept"].items()) ^ set(b["kept"].items())
        problems.append(f"kept documents differ ({len(diff)} id/text pairs)")
    for step in sorted(set(a["removed"]) | set(b["removed"])):
        ra, rb = set(a["removed"].get(step, [])), set(b["removed"].get(step, []))
        if ra != rb:
            problems.append(f"{step}: removed differ (only {names[0]} {len(ra - rb)}, only {names[1]} {len(rb - ra)})")
    return problems


def extract_tree(rev: str, dest: Path) -> Path:
    """`datapipe/` as of `rev`, written under `dest` (a folder the bench created) by `git archive`."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev, "datapipe"],
                             capture_output=True, check=False)
    if archive.returncode != 0:
        raise SystemExit(f"error: --before {rev}: {archive.stderr.decode().strip()}")
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    add_round_args(parser)
    parser.add_argument("--recipe", default="web", choices=["web", "code"])
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--before", default="887f7a7", help="commit of the `before` contender (default 887f7a7)")
    parser.add_argument("--workdir", default=None, help="corpus and run folders (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.workdir and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        # The bench writes and replaces raw/ and out_*/ in it: never in a folder holding someone's files.
        print(f"error: --workdir {args.workdir} is not empty; give a new or empty folder", file=sys.stderr)
        return 2
    work, tmp = work_folder(args.workdir, "bench_clean_data_")
    tree = extract_tree(args.before, work / "before_tree") if "before" in args.only else None
    n_docs, n_bytes = make_corpus(work, args.docs, args.files, args.seed)
    repo = Path(__file__).resolve().parents[1]

    def spawn(name: str) -> dict:
        cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(work), "--recipe", args.recipe,
               "--workers", str(args.workers)]
        env = None
        if name == "before":
            cmd += ["--tree", str(tree)]
            # worker processes (forked or spawned) import the same datapipe
            env = {"PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        return run_worker(cmd, name, repo, env)

    per_round, failed = run_rounds(args.only, spawn, args.rounds, describe=lambda r: f"{r['wall']:.1f} s")
    results: dict[str, list[dict]] = {c: [r[c] for r in per_round if c in r] for c in args.only}
    names = [c for c in args.only if results[c]]

    problems = []
    first = {name: results[name][0]["decisions"] for name in names}
    for name in names:
        for run in results[name][1:]:
            problems += [f"{name} not reproducible: {p}"
                         for p in compare_decisions(first[name], run["decisions"], (name, name))]
    for name in names[1:]:
        problems += [f"{names[0]} vs {name}: {p}"
                     for p in compare_decisions(first[names[0]], first[name], (names[0], name))]

    # wide enough for three contenders and their ratios without wrapping cells
    console = Console(width=max(Console().width, 200))
    steps = [s["step"] for s in results[names[0]][0]["steps"]] if names else []
    others = [n for n in names if n != "shared"] if "shared" in names else []
    table = Table(title=f"{args.recipe} recipe: {n_docs:,} docs, {n_bytes / 1e6:.1f} MB, {args.files} files, "
                        f"{args.workers} workers, {args.rounds} rounds; median [min-max]")
    table.add_column("step")
    table.add_column("docs in", justify="right")
    for name in names:
        table.add_column(f"{name} docs/s", justify="right")
        table.add_column(f"{name} MB/s", justify="right")
    for other in others:
        table.add_column(f"shared/{other} docs/s (= MB/s)", justify="right")
    summary: dict = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "tree")},
                     "corpus": {"docs": n_docs, "bytes": n_bytes}, "steps": {}, "load": load_summary(per_round),
                     "rounds": [{n: {k: r[n][k] for k in ("wall", "load")} for n in r} for r in per_round]}

    def rates(run: dict, step: str | None) -> tuple[float, float]:
        if step is None:
            sec, d, b = run["wall"], run["input"]["docs"], run["input"]["bytes"]
        else:
            s = next((x for x in run["steps"] if x["step"] == step), None)
            if s is None:
                return float("nan"), float("nan")
            sec, d, b = max(s["seconds"], 1e-9), s["docs_in"], s["bytes_in"]
        return d / sec, b / 1e6 / sec

    for step in [*steps, None]:
        label = step or "whole run (wall)"
        row: dict = {}
        cells = []
        for name in names:
            per = [rates(run, step) for run in results[name]]
            row[name] = {"docs_per_s": spread([p[0] for p in per]), "mb_per_s": spread([p[1] for p in per])}
            cells += [fmt_spread(row[name]["docs_per_s"], digits=0), fmt_spread(row[name]["mb_per_s"], digits=3)]
        for other in others:
            # within one round: that round's shared run against that round's other run
            ratio = round_ratio(per_round, "shared", other, lambda run, step=step: rates(run, step)[0])
            row[f"ratio_shared_{other}_docs_per_s"] = ratio
            cells.append(fmt_spread(ratio, digits=2, suffix="x") if ratio else "-")
        docs_in = n_docs if step is None else next(x for x in results[names[0]][0]["steps"]
                                                   if x["step"] == step)["docs_in"]
        table.add_row(f"[b]{label}[/b]" if step is None else label, f"{docs_in:,}", *cells)
        summary["steps"][label] = row
    console.print(table)
    ld = summary["load"]
    if "load1" in ld:
        console.print(f"load average (1 min) during the bench: median {ld['load1']['median']:.1f} "
                      f"[{ld['load1']['min']:.1f}-{ld['load1']['max']:.1f}] over runs, max {ld['load1_max']:.1f}, "
                      f"on {ld['cpus']} CPUs")
    summary["decisions_equal"] = not problems
    write_json(args.json or work / "bench.json", summary)
    console.print(f"results: {args.json or work / 'bench.json'}")
    if tmp is not None:
        tmp.cleanup()
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    finish(failed)
    if problems:
        return 1
    console.print(f"decisions: identical across {', '.join(names)} (kept ids and texts, removed ids and reasons "
                  f"per step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
