"""One runner for every objective: `run_task(cfg, spec)`.

A task (pretraining, SFT, DPO, ...) is a `TaskSpec`: what it reads, what it checks, which
objective it trains and what it saves. Everything around the loop is here, once: precision,
model source and shape, the tokenizer-fits-model check, the accelerator, resume, seed, build,
the tuning method (full / LoRA / QLoRA / prompt tuning), compile, the start-up banner, FLOPs,
`train`, and the outputs a tuning run leaves. A new objective is one new spec; if a spec
needs to repeat a line of setup, this runner is missing a hook.

    load_data(cfg)            -> TaskData     before any process group: bad data costs nothing
    before_tuning(ctx, base)                  the plain model, before an adapter wraps it
    build(ctx, model)         -> TaskParts    objective, loaders, target counter, extra FLOPs
    finish(ctx, result)                       extra outputs after the standard ones
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from model_defs import ModelConfig, flops_per_token
from trainer.build import build_model, model_config_from
from trainer.checkpoint import MODEL_CONFIG_FILE, check_same_model, resolve_resume
from trainer.config import ConfigError, RunConfig, save_resolved
from trainer.engine import build_accelerator, resolve_precision, zero_stage
from trainer.hub import is_hub_id
from trainer.loop import EvalReport, RunResult, StatefulLoader, train
from trainer.objectives import Objective, count_label_tokens
from trainer.run_folder import check_output_dir, model_source
from trainer.summary import summarize_run
from trainer.tuning.config import TuningSection
from trainer.tuning.methods import PRECISION_DTYPES, apply_method, check_method_supported, trainable_summary
from trainer.tuning.save import save_run_outputs

Batch = dict[str, torch.Tensor]
# Without weight gradients a frozen base costs forward + input-gradient backward: about 4N, not 6N, per token.
FROZEN_BASE_FLOPS_FACTOR = 4 / 6


@dataclass
class TaskData:
    """What a task read before any process exists."""

    payload: Any  # the task's own data (shards, examples, pairs)
    tokenizer: Any = None  # saved as OUTPUT/tokenizer and checked against the model's vocabulary
    data_vocab_size: Optional[int] = None  # a fresh model's vocabulary comes from the data's tokenizer
    report: list[str] = field(default_factory=list)  # printed under the banner (rows kept, dropped, ...)
    banner: str = ""  # the task's part of the start-up line (method, loss, template, ...)


@dataclass
class TaskContext:
    """The run as the spec's builders see it."""

    cfg: RunConfig
    precision: str
    model_cfg: ModelConfig
    accelerator: Accelerator
    data: TaskData
    state: dict[str, Any] = field(default_factory=dict)  # the spec's own values between its hooks

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes


@dataclass
class TaskParts:
    """What the loop needs from a task."""

    objective: Objective
    train_loader: StatefulLoader
    val_batches: Optional[Callable[[], Iterable[Batch]]] = None
    count_targets: Callable[[Batch], torch.Tensor] = count_label_tokens
    # Training FLOPs beyond the policy's own forward and backward, in units of 6N (+ attention) per token,
    # e.g. a reference model's forward is 1/3.
    extra_flops_factor: float = 0.0
    # The task's own validation figures from the global sums (macro-F1, per-class recall, ...).
    eval_report: Optional[EvalReport] = None
    # Validation that measures something other than the training loss (e.g. rewards of generated text).
    val_objective: Optional[Objective] = None
    # The task's own training figures from a logged step's global sums (e.g. rollout throughput).
    train_report: Optional[EvalReport] = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    load_data: Callable[[RunConfig], TaskData]
    build: Callable[[TaskContext, nn.Module], TaskParts]
    # The config section that carries the tuning method (`sft`, `dpo`, ...); None trains every weight.
    tuning_section: Optional[str] = None
    check_config: Callable[[RunConfig], list[str]] = lambda cfg: []
    check_model: Optional[Callable[[RunConfig, TaskData, ModelConfig], None]] = None
    before_tuning: Optional[Callable[[TaskContext, nn.Module], None]] = None
    finish: Optional[Callable[[TaskContext, RunResult], None]] = None
    # A model other than the causal LM (a scoring head, ...), built after the seed is set.
    make_model: Optional[Callable[[TaskContext], nn.Module]] = None
    # Modules an adapter trains in full beside its low-rank updates (a fresh scoring head).
    modules_to_save: tuple[str, ...] = ()
    # Replaces the tuning outputs (adapter/, adapter_hf/ or model/ as a causal LM) for other model kinds.
    save_outputs: Optional[Callable[[TaskContext, RunResult], None]] = None
    # Files (name -> text) written into every checkpoint besides the model config: what kind of model it holds.
    checkpoint_files: Optional[Callable[[TaskContext], dict[str, str]]] = None


def validation_change(metrics_file: Path, what: str,
                      figures: Callable[[dict], Iterable[tuple[str, str]]]) -> str | None:
    """'<what>, step a -> step b: <label> x -> y, ...' between the first and the last validation in the run's
    metrics.jsonl, or None when it validated fewer than twice. `figures(first_row)` names the (key, label)
    pairs to show; keys missing from either row are left out."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("split") == "val"]
    if len(val) < 2:
        return None
    first, last = val[0], val[-1]
    parts = [f"{label} {first[key]:.3f} -> {last[key]:.3f}" for key, label in figures(first)
             if key in first and key in last]
    return f"{what}, step {first['step']} -> step {last['step']}: " + ", ".join(parts)


def print_validation_change(ctx: TaskContext, what: str,
                            figures: Callable[[dict], Iterable[tuple[str, str]]]) -> None:
    """Every tuning task closes with the before -> after line of its held-out figures (main process only)."""
    if ctx.accelerator.is_main_process:
        line = validation_change(Path(ctx.cfg.train.output_dir) / "metrics.jsonl", what, figures)
        if line:
            ctx.accelerator.print(line)


def tuning_of(cfg: RunConfig, spec: TaskSpec) -> TuningSection | None:
    return getattr(cfg, spec.tuning_section) if spec.tuning_section else None


def check_tokenizer_fits(tokenizer, model_cfg: ModelConfig) -> None:
    if tokenizer is not None and len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model_cfg.vocab_size}")


def base_model_name(cfg: RunConfig) -> str | None:
    """What an adapter records as its base: the exact checkpoint or folder `model.init_from` resolved to,
    not a run folder whose newest checkpoint may change later; a Hub id as it is."""
    if not cfg.model.init_from:
        return None
    if is_hub_id(cfg.model.init_from):
        return cfg.model.init_from
    return str(model_source(cfg.model.init_from).resolve())


def run_task(cfg: RunConfig, spec: TaskSpec, resume: str | None = None) -> RunResult:
    started = time.perf_counter()
    problems = spec.check_config(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    tuning = tuning_of(cfg, spec)
    check_output_dir(cfg.train.output_dir)
    precision = resolve_precision(cfg.train.precision)
    data = spec.load_data(cfg)
    model_cfg = model_config_from(cfg, data_vocab_size=data.data_vocab_size)
    # Before any process group or model exists: a mismatch must cost nothing.
    (spec.check_model or (lambda c, d, m: check_tokenizer_fits(d.tokenizer, m)))(cfg, data, model_cfg)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"defaults: data.seq_len: {cfg.data.seq_len} exceeds the model's max_seq_len "
                          f"{model_cfg.max_seq_len}")

    accelerator = build_accelerator(cfg, hidden_size=model_cfg.dim, precision=precision)
    if tuning is not None:
        check_method_supported(tuning, key=spec.tuning_section, deepspeed_stage=zero_stage(accelerator),
                               cuda=torch.cuda.is_available())
    resume_from = resolve_resume(resume, cfg.train.output_dir)
    if resume_from is not None:
        check_same_model(resume_from, model_cfg.to_dict())
    out_dir = Path(cfg.train.output_dir)
    ctx = TaskContext(cfg=cfg, precision=precision, model_cfg=model_cfg, accelerator=accelerator, data=data)
    if accelerator.is_main_process:
        stage = zero_stage(accelerator)
        parts = [spec.name, f"precision {precision}", f"attention {model_cfg.attention}",
                 f"world size {accelerator.num_processes}",
                 "deepspeed off" if stage is None else f"deepspeed ZeRO-{stage}"]
        if tuning is not None:
            parts.append(f"method {tuning.method}")
        accelerator.print(" | ".join(parts + ([data.banner] if data.banner else [])))
        for line in data.report:
            accelerator.print(line)

    set_seed(cfg.train.seed)
    model = spec.make_model(ctx) if spec.make_model is not None else build_model(cfg, model_cfg)
    if spec.before_tuning is not None:
        spec.before_tuning(ctx, model)
    if tuning is not None:
        model = apply_method(model, tuning, key=spec.tuning_section, tokenizer=data.tokenizer,
                             compute_dtype=PRECISION_DTYPES[precision], base_name=base_model_name(cfg),
                             modules_to_save=spec.modules_to_save)
        accelerator.print(trainable_summary(model))
    if cfg.train.compile:
        model = torch.compile(model)
    task = spec.build(ctx, model)
    # Only now, with data, model and task built: a run that failed before this leaves no folder
    # holding only a config.
    if accelerator.is_main_process:
        save_resolved(cfg, out_dir)
        if data.tokenizer is not None:
            data.tokenizer.save_pretrained(str(out_dir / "tokenizer"))

    frozen_base = tuning is not None and tuning.method != "full"
    factor = (FROZEN_BASE_FLOPS_FACTOR if frozen_base else 1.0) + task.extra_flops_factor
    train_started = time.perf_counter()
    result = train(
        cfg,
        accelerator=accelerator,
        model=model,
        objective=task.objective,
        train_loader=task.train_loader,
        val_batches=task.val_batches,
        flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len) * factor,
        precision=precision,
        resume_from=resume_from,
        checkpoint_files={MODEL_CONFIG_FILE: json.dumps(model_cfg.to_dict(), indent=2),
                          **(spec.checkpoint_files(ctx) if spec.checkpoint_files else {})},
        count_targets=task.count_targets,
        eval_report=task.eval_report,
        val_objective=task.val_objective,
        train_report=task.train_report,
    )
    train_seconds = time.perf_counter() - train_started
    if result.stopped_by_signal is None:
        if spec.save_outputs is not None:
            spec.save_outputs(ctx, result)
        elif tuning is not None:
            save_run_outputs(tuning.method, result, out_dir, data.tokenizer)
        if spec.finish is not None:
            spec.finish(ctx, result)
        summarize_run(ctx, result, spec_name=spec.name, method=tuning.method if tuning is not None else "full",
                      causal_lm=spec.make_model is None, started=started, train_seconds=train_seconds,
                      resumed=resume_from is not None)
    return result
