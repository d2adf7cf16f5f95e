"""GRPO step time (rollout + update): our RL task vs TRL's GRPOTrainer, as a ratio.

Both contenders train the same model (one HF Llama folder, which we load into our Transformer and
transformers loads as itself), on the same prompts (the demo world's arithmetic questions, rendered by the
same chat template), with the same G, completions per step, completion length, sampling temperature,
loss (`grpo` normalization, beta 0, one update per rollout), optimizer settings and fp32 on CPU. Each
step generates `--completions` completions of at most `--max-new-tokens` tokens and updates once.
A tiny random model rarely emits an end token, so both sides generate close to the whole budget.

Each contender runs in its own process, `--rounds` times, alternating which goes first. Step time is the
median over the steps after `--warmup` (ours: the loop's `step_time_s`; TRL: a callback at every step end),
on the wall clock. Reported: per contender median [min-max] over rounds, and the per-round ratio TRL/ours
(> 1: ours is faster) as median [min-max], with the 1-minute load average during the runs. A contender
that fails stops the bench with a non-zero exit. `--json PATH` writes every figure.

    python bench/bench_grpo.py --threads 1 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import LoadSampler, emit_result, fmt_spread, run_worker, spread, work_folder  # noqa: E402

CONTENDERS = ("ours", "trl")
WORKER_FLAGS = ("threads", "steps", "warmup", "completions", "num_generations", "max_new_tokens", "lr")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--completions", type=int, default=16, help="completions per step")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(args: argparse.Namespace, work: Path) -> None:
    """Tokenizer (with the chat template), the model as an HF folder, and the prompt file."""
    from model_defs import ModelConfig, Transformer
    from model_defs.hf import save_hf_model
    from trainer.chat import ensure_chat_template
    from trainer.data.demo_corpus import build_demo_data
    from trainer.data.tokenizer import train_tokenizer
    from trainer.rl.demo_rewards import arithmetic_prompts
    import torch

    data = build_demo_data(n_pretrain_docs=400)
    (work / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data["pretrain"]))
    tokenizer = train_tokenizer([work / "text.jsonl"], work / "tokenizer", vocab_size=512, overwrite=True)
    tokenizer = ensure_chat_template(tokenizer, "llama3")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                                  vocab_size=len(tokenizer), max_seq_len=256)
    save_hf_model(Transformer(cfg), cfg, work / "model")
    tokenizer.save_pretrained(str(work / "model"))
    rows = arithmetic_prompts(data["dpo"])
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_ours(args: argparse.Namespace, work: Path) -> list[float]:
    from trainer.rl.config import RLConfig
    from trainer.rl.task import run_rl

    out = work / f"ours-{time.time_ns()}"
    cfg = RLConfig.model_validate({
        "model": {"init_from": str(work / "model")},
        "data": {"seq_len": 48 + args.max_new_tokens, "shuffle": False},
        "train": {"output_dir": str(out), "max_steps": args.steps, "micro_batch_size": args.completions},
        "optim": {"lr": args.lr, "warmup_steps": 0, "weight_decay": 0.0},
        "checkpoint": {"every": 0},
        "logging": {"tensorboard": False, "progress": False, "log_every": 1},
        "rl": {"train_files": [str(work / "prompts.jsonl")], "max_prompt_len": 48, "chat_template": "llama3",
               "max_new_tokens": args.max_new_tokens, "num_generations": args.num_generations,
               "rewards": [{"function": "trainer.rl.demo_rewards:arithmetic_exact"}]}})
    run_rl(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if r.get("split") == "train"]


def run_trl(args: argparse.Namespace, work: Path) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from trainer.rl.demo_rewards import arithmetic_exact

    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(work / "model")
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    def exact(prompts, completions, **_):
        texts = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        answers = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return arithmetic_exact(texts, answers)

    config = GRPOConfig(output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=args.completions,
                        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
                        weight_decay=0.0, beta=0.0, loss_type="grpo", temperature=1.0, logging_steps=1,
                        report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
                        dataloader_num_workers=0, shuffle_dataset=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepClock()])
    trainer.train()
    return [b - a for a, b in zip(marks, marks[1:])]


def worker(args: argparse.Namespace) -> None:
    import torch

    import trl  # noqa: F401  (both sides pay their imports before timing starts)

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    times = run_ours(args, work) if args.worker == "ours" else run_trl(args, work)
    if len(times) != args.steps:
        raise RuntimeError(f"{args.worker}: {len(times)} step times for {args.steps} steps")
    emit_result({"run": args.worker, "step_times": times,
                 "step_time_s": statistics.median(times[args.warmup:])})


def spawn(args: argparse.Namespace, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", args.workdir]
    for flag in WORKER_FLAGS:
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return run_worker(cmd, name, REPO_ROOT, env={"OMP_NUM_THREADS": str(args.threads)})


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    if args.steps <= args.warmup:
        sys.exit("error: --steps must exceed --warmup")
    if args.completions % args.num_generations:
        sys.exit("error: --completions must be a multiple of --num-generations")
    work, tmp = work_folder(args.workdir, "bench-grpo-")
    args.workdir = str(work)
    prepare(args, work)
    results = {name: [] for name in CONTENDERS}
    with LoadSampler() as load:
        for r in range(args.rounds):
            order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                try:
                    results[name].append(spawn(args, name))
                except RuntimeError as err:
                    sys.exit(f"error: {err}")
    ratios = [t["step_time_s"] / o["step_time_s"] for o, t in zip(results["ours"], results["trl"])]
    summary = {name: spread([x["step_time_s"] for x in rs]) for name, rs in results.items()}
    print(f"GRPO step (rollout + update), {args.completions} completions x <= {args.max_new_tokens} tokens, "
          f"G {args.num_generations}, {args.threads} thread(s), {args.rounds} rounds")
    for name in CONTENDERS:
        print(f"  {name:5s} step time {fmt_spread(summary[name], digits=3, suffix=' s')}")
    print(f"  speed-up TRL/ours {fmt_spread(spread(ratios), digits=2, suffix='x')} | load {load.summary()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios,
                                               "summary": summary, "load": load.summary()}, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
