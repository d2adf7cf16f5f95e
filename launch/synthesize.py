"""Synthetic alignment data: Magpie instructions + answers, their cleaning, and reward-scored preference pairs.

    python launch/synthesize.py magpie --model MODEL --num-items 1000 --out magpie.jsonl
    python launch/synthesize.py filter --input magpie.jsonl --out cleaned/ [step_params.instruction_rules.min_words=10 ...]
    python launch/synthesize.py preferences --instructions cleaned/data --model A --model B --model C \\
        --reward-model runs/reward --out prefs/
    python launch/synthesize.py onpolicy --questions qa.jsonl --model runs/sft --out onpolicy/

MODEL: one of our checkpoints or run folders, or a local HF model folder, with its tokenizer and chat
template. Outputs are written in chunks; rerunning the same command after an interruption continues
where it stopped, and a rerun with other settings is refused. See docs/synthesize.md.
"""
from __future__ import annotations

import argparse
import sys

from trainer.cli import guarded


def _sampling_args(parser: argparse.ArgumentParser, prefix: str, temperature: float, top_p: float,
                   max_tokens: int, what: str) -> None:
    dash = f"{prefix}-" if prefix else ""
    parser.add_argument(f"--{dash}temperature", type=float, default=temperature, help=f"{what}: 0 = greedy")
    parser.add_argument(f"--{dash}top-p", type=float, default=top_p, help=f"{what}: nucleus sampling")
    parser.add_argument(f"--{dash}top-k", type=int, default=None, help=f"{what}: top-k sampling")
    parser.add_argument(f"--max-{dash}tokens", type=int, default=max_tokens, help=f"{what}: new tokens at most")


def _sampling(args, prefix: str):
    from trainer.synthesize.engine import Sampling

    key = f"{prefix}_" if prefix else ""
    return Sampling(temperature=getattr(args, f"{key}temperature"), top_p=getattr(args, f"{key}top_p"),
                    top_k=getattr(args, f"{key}top_k"), max_new_tokens=getattr(args, f"max_{key}tokens"))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template", default="auto", choices=["auto", "llama3", "chatml"],
                        help="auto: the tokenizer's own template (ours for our tokenizers without one)")
    parser.add_argument("--seed", type=int, default=0, help="item i samples from a generator seeded by (seed, i)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    parser.add_argument("--chunk-size", type=int, default=20, help="items per committed chunk (the resume step)")
    parser.add_argument("--backend", default="torch", choices=["torch", "vllm"],
                        help="torch: our KV-cache generation (CPU or GPU); vllm: vLLM on a GPU when installed")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="run the models in bfloat16 (for GPUs)")
    parser.add_argument("--no-progress", action="store_true")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    magpie = sub.add_parser("magpie", help="instructions from the template's user-turn prefix, then answers")
    magpie.add_argument("--model", required=True, help="a chat model: our checkpoint / run folder or an HF folder")
    magpie.add_argument("--tokenizer", help="tokenizer folder (default: found beside the model)")
    magpie.add_argument("--num-items", type=int, required=True, help="instructions to sample (before dedup)")
    magpie.add_argument("--out", required=True, help="JSONL output (its resume state lies beside it)")
    magpie.add_argument("--system", help="a system message before the user turn")
    magpie.add_argument("--no-response", action="store_true", help="instructions only (answer them later)")
    magpie.add_argument("--near-duplicate", type=float, default=0.8,
                        help="drop an instruction whose word-bigram Jaccard with a kept one reaches this")
    _sampling_args(magpie, "instruction", 1.0, 1.0, 128, "instructions")
    _sampling_args(magpie, "response", 0.7, 0.9, 512, "responses")
    _common(magpie)

    clean = sub.add_parser("filter", help="the cleaning pipeline's instructions recipe over Magpie rows")
    clean.add_argument("--input", required=True, help="magpie output (.jsonl) or a folder of them")
    clean.add_argument("--out", required=True, help="run folder: data/ (kept rows), removed/, report.json")
    clean.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted pipeline config keys, e.g. step_params.instruction_rules.min_words=10")

    prefs = sub.add_parser("preferences", help="K models answer, a reward model scores, best vs worst")
    prefs.add_argument("--instructions", required=True,
                       help="rows with 'instruction', 'prompt' or 'messages' (.jsonl, or a folder of .jsonl)")
    prefs.add_argument("--model", action="append", required=True, help="an answering model (repeat, K >= 2)")
    prefs.add_argument("--tokenizer", action="append", help="tokenizer per --model (default: beside each)")
    prefs.add_argument("--reward-model", required=True,
                       help="a reward run folder / checkpoint or an HF LlamaForSequenceClassification folder")
    prefs.add_argument("--reward-tokenizer", help="the reward model's tokenizer (default: beside it)")
    prefs.add_argument("--out", required=True, help="output folder (answers, scores, pairs.jsonl, summary.json)")
    prefs.add_argument("--margin", type=float, default=0.0, help="keep a pair when best - worst exceeds this")
    prefs.add_argument("--score-batch-size", type=int, default=16)
    prefs.add_argument("--max-len", type=int, default=None, help="tokens scored per answer (default: the run's)")
    prefs.add_argument("--max-prompt-len", type=int, default=None)
    _sampling_args(prefs, "", 0.7, 0.9, 512, "answers")
    _common(prefs)

    onpolicy = sub.add_parser("onpolicy", help="the model answers questions with known answers; "
                                               "each wrong answer is rejected against the reference")
    onpolicy.add_argument("--questions", required=True,
                          help="rows with a prompt ('instruction', 'prompt' or 'messages') and a reference answer")
    onpolicy.add_argument("--reference-key", default="answer", help="the field holding the reference answer")
    onpolicy.add_argument("--model", required=True, help="the policy: our checkpoint / run folder or an HF folder")
    onpolicy.add_argument("--tokenizer", help="tokenizer folder (default: found beside the model)")
    onpolicy.add_argument("--match", default="exact", choices=["exact", "normalized"],
                          help="exact: equal after stripping; normalized: also case, spacing and a final stop")
    onpolicy.add_argument("--out", required=True, help="output folder (answers, pairs.jsonl, summary.json)")
    _sampling_args(onpolicy, "", 0.0, 1.0, 256, "answers")
    _common(onpolicy)
    return parser.parse_args(argv)


def run_filter(args) -> int:
    from rich.console import Console

    from datapipe.config import ConfigError, _set_dotted, validate_config
    from datapipe.readers import BadInputError
    from datapipe.report import print_report
    from datapipe.run import run_pipeline
    from datapipe.steps import StepConfigError

    data = {"recipe": "instructions", "input": {"path": args.input, "format": "jsonl", "text_field": "response"},
            "output": {"path": args.out}}
    try:
        import yaml

        for item in args.overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r}: expected key=value")
            key, value = item.split("=", 1)
            _set_dotted(data, key, yaml.safe_load(value))
        report = run_pipeline(validate_config(data, "synthesize filter"))
    except (ConfigError, StepConfigError, BadInputError) as err:
        raise ValueError(str(err).replace("\n", "; ")) from None
    print_report(report, Console())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "filter":
        return run_filter(args)
    if args.command == "magpie":
        from trainer.synthesize.magpie import MagpieSettings, run_magpie

        counters = run_magpie(MagpieSettings(
            model=args.model, out=args.out, num_items=args.num_items, tokenizer=args.tokenizer,
            chat_template=args.chat_template, system=args.system,
            instruction_sampling=_sampling(args, "instruction"),
            response_sampling=None if args.no_response else _sampling(args, "response"),
            seed=args.seed, near_duplicate=args.near_duplicate, batch_size=args.batch_size,
            chunk_size=args.chunk_size, backend=args.backend, device=args.device, bf16=args.bf16,
            progress=not args.no_progress))
        dropped = ", ".join(f"{k.removeprefix('dropped_')} {v}" for k, v in counters.items() if k != "kept")
        print(f"magpie: {counters['kept']} rows kept of {args.num_items} items (dropped: {dropped}) -> {args.out}")
        return 0
    if args.command == "onpolicy":
        return run_onpolicy_command(args)
    from trainer.synthesize.preferences import PreferenceSettings, run_preferences

    summary = run_preferences(PreferenceSettings(
        instructions=args.instructions, models=args.model, reward_model=args.reward_model, out=args.out,
        tokenizers=args.tokenizer or [], reward_tokenizer=args.reward_tokenizer, chat_template=args.chat_template,
        sampling=_sampling(args, ""), seed=args.seed, margin=args.margin, batch_size=args.batch_size,
        score_batch_size=args.score_batch_size, chunk_size=args.chunk_size, max_len=args.max_len,
        max_prompt_len=args.max_prompt_len, backend=args.backend, device=args.device, bf16=args.bf16,
        progress=not args.no_progress))
    print_summary(summary, args.out)
    return 0


def run_onpolicy_command(args) -> int:
    from trainer.synthesize.onpolicy import OnPolicySettings, run_onpolicy

    summary = run_onpolicy(OnPolicySettings(
        questions=args.questions, model=args.model, out=args.out, tokenizer=args.tokenizer,
        reference_key=args.reference_key, match=args.match, chat_template=args.chat_template,
        sampling=_sampling(args, ""), seed=args.seed, batch_size=args.batch_size, chunk_size=args.chunk_size,
        backend=args.backend, device=args.device, bf16=args.bf16, progress=not args.no_progress))
    print(f"onpolicy: {summary['correct']} of {summary['questions']} answered correctly ({summary['match']} match), "
          f"{summary['empty']} empty; {summary['pairs']} pairs (reference chosen, own answer rejected) "
          f"-> {args.out}/pairs.jsonl")
    return 0


def print_summary(summary: dict, out: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="reward scores by model")
    for col in ("model", "n", "mean", "std", "min", "median", "max", "chosen", "empty"):
        table.add_column(col)
    for model, st in summary["scores_by_model"].items():
        nums = [f"{st[k]:.3f}" if k in st else "-" for k in ("mean", "std", "min", "median", "max")]
        table.add_row(model, str(st["n"]), *nums, str(summary["chosen_by_model"].get(model, 0)),
                      str(summary["empty_answers_by_model"][model]))
    Console().print(table)
    dropped = ", ".join(f"{k} {v}" for k, v in summary["dropped"].items()) or "none"
    print(f"preferences: {summary['kept']} pairs kept of {summary['instructions']} instructions "
          f"(margin > {summary['margin_threshold']}; dropped: {dropped}) -> {out}/pairs.jsonl")


if __name__ == "__main__":
    sys.exit(guarded(main))
