"""`summary.json`: what one training run cost and what it reached, in one small file per run folder.

Written by `trainer.task.run_task` after the run's outputs, so every task has one:
method, trainable parameters and share, wall time, tokens/s, peak memory, the size on disk of
what the run leaves (adapter, model or final checkpoint), the final train and validation figures,
and the generation speed of the trained model. `launch/compare.py` reads it.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model_defs.atomic import staging_path

SUMMARY_FILE = "summary.json"
# A short greedy continuation of a fixed prompt: enough steps that the KV-cache decode dominates.
GENERATION_PROMPT_TOKENS = 16
GENERATION_NEW_TOKENS = 32


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at their full size."""
    def numel(p: nn.Parameter) -> int:
        return int(getattr(p, "ds_numel", p.numel()))

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def peak_memory_gb() -> dict[str, float]:
    """The accelerator's peak allocation when there is one, and the process's peak resident memory."""
    peak = {}
    if torch.cuda.is_available():
        peak["gpu"] = torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak["host_rss"] = rss / (2**30 if sys.platform == "darwin" else 2**20)
    return peak


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def saved_output(out_dir: Path, final_checkpoint: Path | None) -> tuple[str, Path] | None:
    """What a user takes away from the run: the adapter, else the exported model, else the last checkpoint."""
    for kind in ("adapter", "model"):
        if (out_dir / kind).is_dir():
            return kind, out_dir / kind
    if final_checkpoint is not None and final_checkpoint.is_dir():
        return "checkpoint", final_checkpoint
    return None


def last_train_record(metrics_path: Path) -> dict[str, Any]:
    """The newest train-split record of metrics.jsonl (empty when the run logged none)."""
    if not metrics_path.is_file():
        return {}
    last: dict[str, Any] = {}
    for line in metrics_path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if record.get("split") == "train":
                last = record
    return last


@torch.no_grad()
def generation_tokens_per_s(model: nn.Module, vocab_size: int) -> float:
    """Greedy decode speed of a causal LM through our KV cache (batch 1, fixed prompt, no stop token).

    The prompt is fixed token ids, not text: the figure is about speed, not content."""
    from model_defs.generate import generate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    prompt = (torch.arange(GENERATION_PROMPT_TOKENS, device=device) % vocab_size)[None]
    # Prompt tuning prepends virtual tokens, which the KV cache's fixed layout does not hold.
    use_cache = hasattr(model, "layers")
    generate(model, prompt, max_new_tokens=2, use_cache=use_cache)  # warm-up: first-call allocations
    start = time.perf_counter()
    out = generate(model, prompt, max_new_tokens=GENERATION_NEW_TOKENS, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    model.train(was_training)
    return (out.shape[1] - prompt.shape[1]) / elapsed


def build_summary(*, task: str, method: str, trainable: int, total: int, wall_time_s: float,
                  train_time_s: float, tokens_seen: int, steps: int, out_dir: Path,
                  final_checkpoint: Path | None, last_eval: dict[str, float],
                  generation: float | None, generation_note: str | None) -> dict[str, Any]:
    train_record = last_train_record(out_dir / "metrics.jsonl")
    saved = saved_output(out_dir, final_checkpoint)
    summary: dict[str, Any] = {
        "task": task,
        "method": method,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_share": trainable / max(total, 1),
        "steps": steps,
        "wall_time_s": wall_time_s,
        "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / train_time_s if train_time_s > 0 else None,
        "peak_memory_gb": peak_memory_gb(),
        "output": None if saved is None else {"kind": saved[0], "path": str(saved[1]),
                                              "bytes": folder_bytes(saved[1])},
        "final_train": {k: v for k, v in train_record.items() if k not in ("step", "split", "time")},
        "final_val": dict(last_eval),
        "generation_tokens_per_s": generation,
    }
    if generation_note:
        summary["generation_note"] = generation_note
    return summary


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Whole or not at all: written beside, then renamed."""
    path = Path(out_dir) / SUMMARY_FILE
    tmp = staging_path(path)
    try:
        tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {SUMMARY_FILE} (a run that did not finish, or an older one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None


def summarize_run(ctx, result, *, spec_name: str, method: str, causal_lm: bool, started: float,
                  train_seconds: float, resumed: bool) -> None:
    """Write OUTPUT/summary.json on the main process; every rank calls it (the model may be gathered)."""
    from trainer.engine import zero_stage

    accelerator = result.accelerator
    model = accelerator.unwrap_model(result.model, keep_torch_compile=False)
    trainable, total = count_parameters(model)
    generation, note = None, None
    if not causal_lm:
        note = "not a causal LM: no generation"
    elif zero_stage(accelerator) == 3:
        note = "ZeRO-3 shards the weights; measure with launch/compare.py on the saved model"
    elif accelerator.is_main_process:
        generation = generation_tokens_per_s(model, ctx.model_cfg.vocab_size)
    if accelerator.is_main_process:
        out_dir = Path(ctx.cfg.train.output_dir)
        summary = build_summary(
            task=spec_name, method=method, trainable=trainable, total=total,
            wall_time_s=time.perf_counter() - started, train_time_s=train_seconds,
            tokens_seen=result.state.tokens_seen, steps=result.state.step, out_dir=out_dir,
            final_checkpoint=result.final_checkpoint, last_eval=result.last_eval,
            generation=generation, generation_note=note)
        if resumed:
            # tokens_seen counts the steps before the resume, the clock only this session.
            summary["tokens_per_s"] = None
            summary["resumed"] = True
        write_summary(out_dir, summary)
    accelerator.wait_for_everyone()
