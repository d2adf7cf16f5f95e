"""Preference tuning (DPO, IPO, hinge, SimPO, ORPO) as a task.

    model (full / LoRA / QLoRA) + preference pairs + a reference strategy -> the loop

Run folder (`train.output_dir`):
  checkpoints/       the loop's sharded, resumable checkpoints
  tokenizer/         the tokenizer with the chat template the run trained with
  reference_cache/   precomputed reference log-probs, one file per cache key (unless dpo.reference_cache_dir)
  adapter/, adapter_hf/   LoRA/QLoRA: the trained adapter (our names; HF Llama names)
  model/             full tuning: the tuned model as an HF Llama folder
"""
from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from trainer.chat import load_chat_tokenizer, template_name
from trainer.data.tokenizer import tokenizer_hash
from trainer.dpo.config import DPOConfig, pair_config_problems
from trainer.dpo.data import PreferenceData, TokenPair, load_preference_data
from trainer.dpo.loader import PairBatches, PairLoader
from trainer.dpo.losses import LossParams
from trainer.dpo.objective import PreferenceObjective, count_pairs
from trainer.dpo.precompute import (cached_reference_logps, compute_reference_logps, files_fingerprint,
                                    pairs_key_parts, reference_cache_key, weights_fingerprint)
from trainer.dpo.reference import AdapterReference, FrozenCopyReference, PrecomputedReference, frozen_copy
from trainer.loop import RunResult
from trainer.task import TaskContext, TaskData, TaskParts, TaskSpec, print_validation_change, run_task

def pad_multiple() -> int:
    """Row lengths rounded up for tensor-core friendly shapes on GPUs; exact on CPU."""
    return 8 if torch.cuda.is_available() else 1


def reference_tables(cfg: DPOConfig, accelerator: Accelerator, ref_model: torch.nn.Module, tokenizer,
                     data: PreferenceData, precision: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference log-prob tables for the train (and validation) pairs, from the cache or one pass over them."""
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


def load_dpo_data(cfg: DPOConfig) -> TaskData:
    d = cfg.dpo
    tokenizer = load_chat_tokenizer(cfg, d.chat_template)
    data = load_preference_data(d, tokenizer, seq_len=cfg.data.seq_len, seed=cfg.train.seed, section="dpo")
    report = data.report_lines("dpo")
    banner = (f"loss {d.loss} | reference {d.resolved_reference()} | "
              f"chat template {template_name(tokenizer) or 'the tokenizer own'}")
    return TaskData(payload=data, tokenizer=tokenizer, report=report, banner=banner)


def keep_reference_copy(ctx: TaskContext, base: torch.nn.Module) -> None:
    """The reference is the model as loaded, before any adapter: taken now, it can never see an update."""
    if ctx.cfg.dpo.resolved_reference() in ("precompute", "offload", "resident"):
        ctx.state["ref_model"] = frozen_copy(base)


def build_dpo(ctx: TaskContext, model) -> TaskParts:
    cfg, data, accelerator = ctx.cfg, ctx.data.payload, ctx.accelerator
    d = cfg.dpo
    strategy = d.resolved_reference()
    tokenizer = ctx.data.tokenizer
    train_table = val_table = None
    reference = None
    if strategy == "precompute":
        train_table, val_table = reference_tables(cfg, accelerator, ctx.state.pop("ref_model"), tokenizer, data,
                                                  ctx.precision)
        reference = PrecomputedReference()
    elif strategy in ("offload", "resident"):
        reference = FrozenCopyReference(ctx.state.pop("ref_model"), accelerator, offload=strategy == "offload")
    elif strategy == "adapter":
        reference = AdapterReference(accelerator)
    objective = PreferenceObjective(d.loss, LossParams(beta=d.beta, label_smoothing=d.label_smoothing,
                                                       simpo_gamma=d.simpo_gamma), reference,
                                   chunking=cfg.train.loss_chunking)
    pad = dict(pad_id=tokenizer.pad_token_id, pad_to_multiple_of=pad_multiple())
    loader = PairLoader(data.train, cfg.train.micro_batch_size, seed=cfg.train.seed, rank=ctx.rank,
                        world_size=ctx.world_size, shuffle=cfg.data.shuffle, ref_logps=train_table, **pad)

    def val_batches():
        return iter(PairBatches(data.val, cfg.train.micro_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                ref_logps=val_table, **pad))

    # A reference forward adds 2N per token to the policy's 6N (or 4N with a frozen base).
    extra = 1 / 3 if strategy in ("adapter", "offload", "resident") else 0.0
    return TaskParts(objective=objective, train_loader=loader, val_batches=val_batches if data.val else None,
                     count_targets=count_pairs, extra_flops_factor=extra)


def print_before_after(ctx: TaskContext, result: RunResult) -> None:
    print_validation_change(ctx, "held-out pairs", lambda _: (
        ("policy_accuracy", "policy prefers chosen"), ("reward_accuracy", "reward accuracy"),
        ("reward_margin", "reward margin")))


DPO = TaskSpec(name="dpo", tuning_section="dpo", check_config=lambda cfg: pair_config_problems(cfg, "dpo"), load_data=load_dpo_data,
               before_tuning=keep_reference_copy, build=build_dpo, finish=print_before_after)


def run_dpo(cfg: DPOConfig, resume: str | None = None) -> RunResult:
    return run_task(cfg, DPO, resume)
