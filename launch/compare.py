"""Compare runs and models side by side: cost (each run's summary.json) and the evaluations asked.

    python launch/compare.py runs/demo/pretrain runs/demo/sft runs/demo/dpo --labels base,sft,dpo \
        --tasks eval/tasks/demo --pairs runs/demo/data/raw/dpo_eval.jsonl --out runs/demo/compare
    python launch/compare.py runs/lora runs/prompt_tuning --out cmp      # the cost table alone
    python launch/compare.py runs/base runs/sft runs/dpo --out cmp --judge-prompts questions.jsonl \
        --judge runs/judge --reward-judge runs/reward --judge-against previous      # judges, each vs the one before

Each RUN_OR_MODEL is a run folder (its summary.json and metrics.jsonl are read; the model is its
adapter, else its model/, else its newest checkpoint) or a model path (a checkpoint, an HF Llama
folder, an adapter). Writes OUT/comparison.csv, OUT/report.md and PNG figures, all or nothing; an
evaluation that fails stops the command, or with --keep-going is listed as skipped at the top of the report.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.cli import guarded


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", metavar="RUN_OR_MODEL")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the report")
    p.add_argument("--labels", help="comma-separated names, one per model (default: folder names)")
    p.add_argument("--tasks", nargs="*", default=[], help="lm-eval task YAMLs / folders, or task names in the HF cache")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="lm-eval: render the tasks' prompts through each model's chat template (IFEval)")
    p.add_argument("--pairs", action="append", default=[], metavar="[NAME=]FILE",
                   help="preference pairs JSONL: the policy's own preference accuracy on them (repeat for several "
                        "sets; a NAME makes the metrics pref_accuracy/NAME, pref_margin/NAME)")
    p.add_argument("--ifeval", help="IFEval-style prompt JSONL (see eval/ifeval.py), scored strict and loose")
    p.add_argument("--judge-prompts", help="JSONL rows with a 'prompt': every model answers them (chat) for the judges")
    p.add_argument("--judge", help="a local chat model that judges two models' answers pairwise, both orders")
    p.add_argument("--reward-judge", help="a reward model (one output) that scores every model's answers")
    p.add_argument("--judge-against", choices=("first", "previous"), default="first",
                   help="each model is judged against the first (default: a baseline and its variants) or the one "
                        "before it (a pipeline: what each stage added)")
    p.add_argument("--raw-sample", action="append", default=[], help="text every model continues (report samples)")
    p.add_argument("--chat-sample", action="append", default=[], help="a question every model answers in chat")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--keep-going", action="store_true", help="list failed evaluations as skipped instead of stopping")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(m).name for m in args.models]
    if len(labels) != len(args.models):
        p.error(f"--labels names {len(labels)} models but {len(args.models)} were given")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        p.error(f"two models are labelled {repeated[0]!r}; give --labels that tell them apart")
    judged = args.judge or args.reward_judge
    if judged and not args.judge_prompts:
        p.error("--judge and --reward-judge need --judge-prompts")
    if args.judge_prompts and not judged:
        p.error("--judge-prompts needs --judge or --reward-judge")
    if judged and len(args.models) < 2:
        p.error("the judges compare models: give at least two")
    return args, labels


def named_pairs(spec: str) -> tuple[str, str]:
    """'NAME=FILE' or 'FILE' -> (name or '', file)."""
    name, sep, file = spec.partition("=")
    if not sep or Path(spec).is_file():
        return "", spec
    if not name or not file or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"--pairs {spec!r}: expected FILE or NAME=FILE with NAME made of letters, digits, - and _")
    return name, file


def main(argv=None) -> int:
    from eval import compare as C
    from eval import judge as J
    from trainer.atomic import atomic_directory, refuse_occupied

    args, labels = parse_args(argv)
    out = Path(args.out)
    refuse_occupied(out)  # before any evaluation: a taken folder costs nothing
    pair_sets = [named_pairs(spec) for spec in args.pairs]
    for path in [*(file for _, file in pair_sets), args.ifeval, args.judge_prompts]:
        if path and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
    entries = [C.read_entry(m, label) for m, label in zip(args.models, labels)]
    # Judges that cannot judge are refused before hours of evaluation, not after.
    prompts = J.read_judge_prompts(args.judge_prompts) if args.judge_prompts else []
    if args.judge:
        J.judge_tokenizer(args.judge)
    reward_judge = J.RewardJudge(args.reward_judge, batch_size=args.batch_size) if args.reward_judge else None
    metric_names: list[str] = []
    notes: list[str] = []
    skipped: list[str] = []
    answers: dict[str, list[str]] = {}
    ifeval_rows = None
    if args.ifeval:
        from eval.ifeval import read_prompts

        ifeval_rows = read_prompts(args.ifeval)

    def attempt(what: str, fn, *fn_args, **fn_kwargs):
        try:
            return fn(*fn_args, **fn_kwargs)
        except (ValueError, FileNotFoundError, RuntimeError, KeyError) as err:
            if not args.keep_going:
                raise ValueError(f"{what}: {str(err).splitlines()[0]}") from None
            skipped.append(f"{what}: {str(err).splitlines()[0]}")
            return None

    def add(entry, figures: dict[str, float] | None):
        for name, value in (figures or {}).items():
            entry.figures[name] = value
            if name not in metric_names:
                metric_names.append(name)

    for entry in entries:
        loaded = attempt(f"{entry.label}: load", C.load_for_eval, entry)
        if loaded is None:
            continue
        model, tokenizer = loaded
        if "generation_tokens_per_s" not in entry.summary or entry.summary["generation_tokens_per_s"] is None:
            entry.figures["generation_tokens_per_s"] = C.measured_generation_speed(model, model.cfg.vocab_size)
        if args.tasks:
            from eval.benchmarks import headline_scores, run_benchmarks

            results = attempt(f"{entry.label}: lm-eval {' '.join(map(str, args.tasks))}", run_benchmarks,
                              entry.path, args.tasks, batch_size=args.batch_size, limit=args.limit,
                              apply_chat_template=args.apply_chat_template)
            add(entry, headline_scores(results) if results else None)
        for name, file in pair_sets:
            figures = attempt(f"{entry.label}: preference pairs {file}", C.preference_accuracy, model, tokenizer,
                              file)
            add(entry, {f"{k}/{name}" if name else k: v for k, v in (figures or {}).items()} or None)
        if ifeval_rows is not None:
            from eval.ifeval import score

            def ifeval(model, tokenizer):
                responses = C.generate_texts(model, tokenizer, [r["prompt"] for r in ifeval_rows], chat=True,
                                             max_new_tokens=args.max_new_tokens)
                scored = score(ifeval_rows, responses)
                notes.append("ifeval: scored by lm-eval's own checkers" if scored.pop("checkers") == "lm-eval" else
                             "ifeval: scored by this project's checkers (lm-eval's need NLTK data not present here)")
                return {f"ifeval/{k}": v for k, v in scored.items()}
            add(entry, attempt(f"{entry.label}: ifeval", ifeval, model, tokenizer))
        if prompts:
            texts = attempt(f"{entry.label}: answers for the judges", C.generate_texts, model, tokenizer, prompts,
                            chat=True, max_new_tokens=args.max_new_tokens)
            if texts is not None:
                answers[entry.label] = texts
        for text in args.raw_sample:
            entry.samples.append((text, C.generate_texts(model, tokenizer, [text], chat=False,
                                                         max_new_tokens=args.max_new_tokens)[0]))
        for text in args.chat_sample:
            entry.samples.append((f"[chat] {text}", C.generate_texts(model, tokenizer, [text], chat=True,
                                                                     max_new_tokens=args.max_new_tokens)[0]))
        model = tokenizer = None  # freed before the next entry loads

    judge_notes = C.run_judges(entries, prompts, answers, prompts_file=args.judge_prompts, judge=args.judge,
                               reward_judge=reward_judge, against=args.judge_against, attempt=attempt,
                               skipped=skipped)
    if args.pairs:
        notes.append("pref_accuracy: share of held-out pairs where the model itself gives the chosen answer a "
                     "higher log-probability than the rejected one (chat-rendered, no reference model); "
                     "pref_margin: the mean log-probability difference (`/NAME`: on the pairs given as --pairs NAME=FILE)")
    with atomic_directory(out) as staging:
        figures = C.draw_figures(entries, metric_names, staging)
        (staging / "comparison.csv").write_text(C.write_csv(entries, metric_names))
        (staging / "report.md").write_text(C.markdown_report(entries, metric_names, skipped, sorted(set(notes)),
                                                             judge_notes, figures))
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
