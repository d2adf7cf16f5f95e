"""Preference tuning (DPO, IPO, hinge, SimPO, ORPO) through the one loop.

    model (full / LoRA / QLoRA) + preference pairs + a reference strategy -> train(...)

Run folder (`train.output_dir`):
  checkpoints/       the loop's sharded, resumable checkpoints
  tokenizer/         the tokenizer with the chat template the run trained with
  reference_cache/   precomputed reference log-probs, one file per cache key (unless dpo.reference_cache_dir)
  adapter/, adapter_hf/   LoRA/QLoRA: the trained adapter (our names; HF Llama names)
  model/             full tuning: the tuned model as an HF Llama folder
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from model_defs import flops_per_token
from trainer.build import build_model, model_config_from
from trainer.chat import template_name
from trainer.checkpoint import MODEL_CONFIG_FILE, resolve_resume
from trainer.config import ConfigError, save_resolved
from trainer.dpo.config import DPOConfig
from trainer.dpo.data import PairReport, TokenPair, load_token_pairs
from trainer.dpo.loader import PairBatches, PairLoader
from trainer.dpo.losses import LossParams
from trainer.dpo.objective import PreferenceObjective
from trainer.dpo.precompute import (cached_reference_logps, compute_reference_logps, files_fingerprint,
                                    pairs_key_parts, reference_cache_key, weights_fingerprint)
from trainer.dpo.reference import AdapterReference, FrozenCopyReference, PrecomputedReference, frozen_copy, zero_stage
from trainer.engine import build_accelerator, resolve_precision
from trainer.loop import RunResult, train
from trainer.sft.adapter import save_run_outputs

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PreferenceData:
    train: list[TokenPair]
    val: list[TokenPair] | None
    train_report: PairReport
    val_report: PairReport | None


def load_preference_data(cfg: DPOConfig, tokenizer) -> PreferenceData:
    """Train and validation token pairs; without `dpo.val_files`, `dpo.val_fraction` of the pairs (a fixed
    seeded draw) is held out."""
    d = cfg.dpo
    common = dict(max_len=cfg.data.seq_len, max_prompt_len=d.max_prompt_len, overlong=d.overlong,
                  on_identical=d.on_identical, on_empty=d.on_empty, skip_bad_rows=d.skip_bad_rows)
    train_pairs, train_report = load_token_pairs(d.train_files, tokenizer, **common)
    if d.val_files:
        val_pairs, val_report = load_token_pairs(d.val_files, tokenizer, key="dpo.val_files", **common)
        return PreferenceData(train_pairs, val_pairs, train_report, val_report)
    if d.val_fraction > 0:
        order = np.random.default_rng([cfg.train.seed, 1]).permutation(len(train_pairs))
        n_val = max(1, int(len(train_pairs) * d.val_fraction))
        held = set(order[:n_val].tolist())
        val = [p for i, p in enumerate(train_pairs) if i in held]
        train = [p for i, p in enumerate(train_pairs) if i not in held]
        return PreferenceData(train, val, train_report, None)
    return PreferenceData(train_pairs, None, train_report, None)


def pad_multiple() -> int:
    """Row lengths rounded up for tensor-core friendly shapes on GPUs; exact on CPU."""
    return 8 if torch.cuda.is_available() else 1


def load_dpo_tokenizer(cfg: DPOConfig):
    from trainer.sft.run import load_chat_tokenizer

    return load_chat_tokenizer(cfg, cfg.dpo.chat_template)


def check_dpo_config(cfg: DPOConfig) -> None:
    problems = []
    if cfg.data.path:
        problems.append("defaults: data.path: DPO reads dpo.train_files, not token shards; remove data.path")
    if not cfg.dpo.train_files:
        problems.append("defaults: dpo.train_files: no preference files given")
    if cfg.dpo.max_prompt_len >= cfg.data.seq_len:
        problems.append(f"defaults: dpo.max_prompt_len: {cfg.dpo.max_prompt_len} leaves no room for a response "
                        f"within data.seq_len {cfg.data.seq_len}")
    if problems:
        raise ConfigError("\n".join(problems))


def reference_tables(cfg: DPOConfig, accelerator: Accelerator, ref_model: torch.nn.Module, tokenizer,
                     data: PreferenceData, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-prob tables for the train (and validation) pairs, from the cache or one pass over them."""
    from accelerate.utils import broadcast_object_list

    from trainer.data.tokenizer import tokenizer_hash

    d = cfg.dpo
    cache_dir = Path(d.reference_cache_dir or Path(cfg.train.output_dir) / "reference_cache")
    weights = [weights_fingerprint(ref_model) if accelerator.is_main_process else None]
    broadcast_object_list(weights, from_process=0)
    shared = dict(weights=weights[0], tokenizer=tokenizer_hash(tokenizer), template=tokenizer.chat_template or "",
                  max_len=cfg.data.seq_len, max_prompt_len=d.max_prompt_len, precision=precision)
    reference = None

    def table(pairs: list[TokenPair], files: list[str], split: str) -> torch.Tensor:
        parts = dict(shared, data=files_fingerprint(files), split=split, **pairs_key_parts(pairs))
        key = reference_cache_key(**parts)

        def compute() -> torch.Tensor:
            nonlocal reference
            if reference is None:
                # Built only on a miss: a cache hit needs no reference model at all.
                reference = FrozenCopyReference(ref_model, accelerator, offload=False)
            return compute_reference_logps(accelerator, reference, pairs, cfg.train.micro_batch_size,
                                           tokenizer.pad_token_id, pad_multiple())

        result, hit = cached_reference_logps(accelerator, cache_dir, key, len(pairs), compute,
                                             {k: v for k, v in parts.items() if k != "template"})
        accelerator.print(f"reference log-probs for {len(pairs)} {split} pairs: "
                          f"{'cache hit' if hit else 'computed'} ({cache_dir / key}.safetensors)")
        return result

    train_table = table(data.train, d.train_files, "train")
    val_files = d.val_files or d.train_files
    val_table = table(data.val, val_files, "val" if d.val_files else f"val_fraction={d.val_fraction}") \
        if data.val else None
    return train_table, val_table


def run_dpo(cfg: DPOConfig, resume: str | None = None) -> RunResult:
    from trainer.sft.peft_setup import apply_method, check_method_supported, trainable_summary

    check_dpo_config(cfg)
    d = cfg.dpo
    strategy = d.resolved_reference()
    precision = resolve_precision(cfg.train.precision)
    model_cfg = model_config_from(cfg)
    tokenizer = load_dpo_tokenizer(cfg)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model_cfg.vocab_size}")
    if cfg.data.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"defaults: data.seq_len: {cfg.data.seq_len} exceeds the model's max_seq_len "
                          f"{model_cfg.max_seq_len}")
    data = load_preference_data(cfg, tokenizer)

    accelerator = build_accelerator(cfg, hidden_size=model_cfg.dim, precision=precision)
    check_method_supported(d, deepspeed_stage=zero_stage(accelerator) or None, cuda=torch.cuda.is_available())
    resume_from = resolve_resume(resume, cfg.train.output_dir)
    out_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        save_resolved(cfg, out_dir)
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        accelerator.print(f"precision {precision} | method {d.method} | loss {d.loss} | reference {strategy} | "
                          f"chat template {template_name(tokenizer) or 'the tokenizer own'} | "
                          f"world size {accelerator.num_processes}")
        accelerator.print(f"train pairs: {data.train_report.summary()}")
        if data.val_report is not None:
            accelerator.print(f"val pairs: {data.val_report.summary()}")
        elif data.val:
            accelerator.print(f"val pairs: {len(data.val)} held out of the train files (dpo.val_fraction)")
    set_seed(cfg.train.seed)
    model = build_model(cfg, model_cfg)
    # The reference is the model as loaded, before any adapter: taken now, it can never see an update.
    ref_model = frozen_copy(model) if strategy in ("precompute", "offload", "resident") else None
    base_name = str(Path(cfg.model.init_from).resolve()) if cfg.model.init_from else None
    model = apply_method(model, d, tokenizer=tokenizer, compute_dtype=PRECISION_DTYPES[precision], base_name=base_name)
    accelerator.print(trainable_summary(model))

    train_table = val_table = None
    reference = None
    if strategy == "precompute":
        train_table, val_table = reference_tables(cfg, accelerator, ref_model, tokenizer, data, precision)
        ref_model = None  # the tables replace it
        reference = PrecomputedReference()
    elif strategy in ("offload", "resident"):
        reference = FrozenCopyReference(ref_model, accelerator, offload=strategy == "offload")
    elif strategy == "adapter":
        reference = AdapterReference(accelerator)
    objective = PreferenceObjective(d.loss, LossParams(beta=d.beta, label_smoothing=d.label_smoothing,
                                                       simpo_gamma=d.simpo_gamma), reference)

    rank, world = accelerator.process_index, accelerator.num_processes
    pad = dict(pad_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple())
    loader = PairLoader(data.train, cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank, world_size=world,
                        shuffle=cfg.data.shuffle, ref_logps=train_table, **pad)

    def val_batches():
        return iter(PairBatches(data.val, cfg.train.micro_batch_size, rank=rank, world_size=world,
                                ref_logps=val_table, **pad))

    # Frozen base weights need no weight gradients (about 4N instead of 6N per token); a reference forward adds 2N.
    fpt = flops_per_token(model_cfg, cfg.data.seq_len) * (1.0 if d.method == "full" else 4 / 6)
    if strategy in ("adapter", "offload", "resident"):
        fpt += flops_per_token(model_cfg, cfg.data.seq_len) / 3
    result = train(
        cfg,
        accelerator=accelerator,
        model=model,
        objective=objective,
        train_loader=loader,
        val_batches=val_batches if data.val else None,
        flops_per_token=fpt,
        precision=precision,
        resume_from=resume_from,
        checkpoint_files={MODEL_CONFIG_FILE: json.dumps(model_cfg.to_dict(), indent=2)},
    )
    if result.stopped_by_signal is None:
        save_run_outputs(cfg.dpo.method, result, cfg.train.output_dir, tokenizer)
        if accelerator.is_main_process:
            line = before_after(out_dir / "metrics.jsonl")
            if line:
                accelerator.print(line)
    return result


def before_after(metrics_file: Path) -> str | None:
    """'held-out pairs, first -> last validation: ...' from the run's metrics, or None without two validations."""
    if not metrics_file.is_file():
        return None
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    val = [r for r in rows if r.get("split") == "val"]
    if len(val) < 2:
        return None
    first, last = val[0], val[-1]
    figures = [f"{name} {first[key]:.3f} -> {last[key]:.3f}" for key, name in (
        ("policy_accuracy", "policy prefers chosen"), ("reward_accuracy", "reward accuracy"),
        ("reward_margin", "reward margin")) if key in first and key in last]
    return f"held-out pairs, step {first['step']} -> step {last['step']}: " + ", ".join(figures)
