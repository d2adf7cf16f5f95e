"""Supervised fine-tuning through the one loop: chat data + the SFT objective + a PEFT method.

Run folder (`train.output_dir`):
  checkpoints/   the loop's sharded, resumable checkpoints
  tokenizer/     the tokenizer with the chat template the run trained with
  adapter/       LoRA/QLoRA/prompt-tuning adapter in our module names (loads onto our Transformer)
  adapter_hf/    the same adapter in HF Llama names (loads onto transformers' LlamaForCausalLM)
  model/         full fine-tuning only: the fine-tuned model as an HF Llama folder
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_seed

from model_defs import flops_per_token
from trainer.build import build_model, model_config_from
from trainer.chat import ensure_chat_template, template_name
from trainer.checkpoint import MODEL_CONFIG_FILE, resolve_resume
from trainer.config import ConfigError, save_resolved
from trainer.engine import build_accelerator, resolve_precision
from trainer.loop import RunResult, train
from trainer.sft.adapter import save_run_outputs
from trainer.sft.config import SFTConfig

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_tokenizer_dir(cfg: SFTConfig) -> Path:
    """`data.tokenizer`, else the tokenizer of the `init_from` model (an HF folder's own, or our run's)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.model.init_from:
        from trainer.export import checkpoint_tokenizer_dir, is_checkpoint, resolve_model_source

        source = resolve_model_source(cfg.model.init_from)
        if is_checkpoint(source):
            # An SFT run keeps the tokenizer it used (with its chat template) beside its checkpoints.
            saved = source.parent.parent / "tokenizer"
            found = saved if (saved / "tokenizer_config.json").is_file() else checkpoint_tokenizer_dir(source)
            if found is not None:
                return found
        elif (source / "tokenizer.json").is_file() or (source / "tokenizer_config.json").is_file():
            return source
    raise ConfigError("defaults: data.tokenizer: no tokenizer given and none found with model.init_from")


def load_chat_tokenizer(cfg, chat_template: str):
    """The run's tokenizer with its chat template (SFT and DPO alike) and a pad token."""
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = ensure_chat_template(load_tokenizer(resolve_tokenizer_dir(cfg)), chat_template)
    if tokenizer.pad_token_id is None:
        # Padding positions carry IGNORE_INDEX labels; any id works, EOS is always in the vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_sft_config(cfg: SFTConfig) -> None:
    problems = []
    if cfg.data.path:
        problems.append("defaults: data.path: SFT reads sft.train_files, not token shards; remove data.path")
    if not cfg.data.document_masking and cfg.sft.packing:
        problems.append("defaults: data.document_masking: packed SFT examples always attend only within "
                        "themselves; leave it true (or set sft.packing=false)")
    if not cfg.sft.train_files:
        problems.append("defaults: sft.train_files: no training files given")
    if problems:
        raise ConfigError("\n".join(problems))


def _deepspeed_stage(accelerator) -> int | None:
    plugin = accelerator.state.deepspeed_plugin
    return None if plugin is None else int(plugin.zero_stage)


def run_sft(cfg: SFTConfig, resume: str | None = None) -> RunResult:
    from trainer.export import resolve_model_source
    from trainer.sft.data import load_sft_examples
    from trainer.sft.loader import SFTLoader
    from trainer.sft.objective import sft_objective
    from trainer.sft.peft_setup import apply_method, check_method_supported, trainable_summary

    check_sft_config(cfg)
    precision = resolve_precision(cfg.train.precision)
    model_cfg = model_config_from(cfg)
    tokenizer = load_chat_tokenizer(cfg, cfg.sft.chat_template)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {model_cfg.vocab_size}")
    seq_len = cfg.data.seq_len
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"defaults: data.seq_len: {seq_len} exceeds the model's max_seq_len {model_cfg.max_seq_len}")
    s = cfg.sft
    common = dict(seq_len=seq_len, fmt=s.format, overlong=s.overlong, train_on_prompt=s.train_on_prompt,
                  skip_bad_rows=s.skip_bad_rows)
    train_examples, train_report = load_sft_examples(s.train_files, tokenizer, **common)
    val_examples, val_report = load_sft_examples(s.val_files, tokenizer, **common) if s.val_files else (None, None)

    accelerator = build_accelerator(cfg, hidden_size=model_cfg.dim, precision=precision)
    check_method_supported(s, deepspeed_stage=_deepspeed_stage(accelerator), cuda=torch.cuda.is_available())
    resume_from = resolve_resume(resume, cfg.train.output_dir)
    out_dir = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        save_resolved(cfg, out_dir)
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
        template = template_name(tokenizer) or "the tokenizer's own"
        accelerator.print(f"precision {precision} | method {s.method} | chat template {template} | "
                          f"packing {s.packing} | "
                          f"world size {accelerator.num_processes}")
        accelerator.print(f"train data: {train_report.summary()}")
        if val_report is not None:
            accelerator.print(f"val data: {val_report.summary()}")
    set_seed(cfg.train.seed)
    model = build_model(cfg, model_cfg)
    # The exact checkpoint, not a run folder whose newest checkpoint may change later.
    base_name = str(resolve_model_source(cfg.model.init_from).resolve()) if cfg.model.init_from else None
    model = apply_method(model, s, tokenizer=tokenizer, compute_dtype=PRECISION_DTYPES[precision], base_name=base_name)
    accelerator.print(trainable_summary(model))
    if cfg.train.compile:
        model = torch.compile(model)

    rank, world = accelerator.process_index, accelerator.num_processes
    loader_args = dict(batch_size=cfg.train.micro_batch_size, seq_len=seq_len, pad_id=tokenizer.pad_token_id,
                       packing=s.packing, seed=cfg.train.seed, rank=rank, world_size=world)
    loader = SFTLoader(train_examples, shuffle=cfg.data.shuffle, **loader_args)

    if val_examples:
        SFTLoader(val_examples, shuffle=False, infinite=False, **loader_args)  # too few rows fails now, not at eval

    def val_batches():
        return iter(SFTLoader(val_examples, shuffle=False, infinite=False, **loader_args))

    # Frozen weights need no weight gradients: about 4N instead of 6N FLOPs per token.
    fpt = flops_per_token(model_cfg, seq_len) * (1.0 if s.method == "full" else 4 / 6)
    result = train(
        cfg,
        accelerator=accelerator,
        model=model,
        objective=sft_objective,
        train_loader=loader,
        val_batches=val_batches if val_examples else None,
        flops_per_token=fpt,
        precision=precision,
        resume_from=resume_from,
        checkpoint_files={MODEL_CONFIG_FILE: json.dumps(model_cfg.to_dict(), indent=2)},
    )
    if result.stopped_by_signal is None:
        save_run_outputs(cfg.sft.method, result, cfg.train.output_dir, tokenizer)
    return result
