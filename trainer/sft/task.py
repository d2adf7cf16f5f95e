"""Supervised fine-tuning as a task: chat data and the SFT objective, with any tuning method.

Run folder (`train.output_dir`):
  checkpoints/   the loop's sharded, resumable checkpoints
  tokenizer/     the tokenizer with the chat template the run trained with
  adapter/       LoRA/QLoRA/prompt-tuning adapter in our module names (loads onto our Transformer)
  adapter_hf/    the same adapter in HF Llama names (loads onto transformers' LlamaForCausalLM)
  model/         full fine-tuning only: the fine-tuned model as an HF Llama folder
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.chat import load_chat_tokenizer, template_name
from trainer.loop import RunResult
from trainer.sft.config import SFTConfig
from trainer.sft.data import Example, load_sft_examples
from trainer.sft.loader import SFTLoader
from trainer.sft.objective import sft_objective_with
from trainer.task import TaskContext, TaskData, TaskParts, TaskSpec, run_task


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example] | None


def check_sft_config(cfg: SFTConfig) -> list[str]:
    problems = []
    if cfg.data.path:
        problems.append("defaults: data.path: SFT reads sft.train_files, not token shards; remove data.path")
    if not cfg.data.document_masking and cfg.sft.packing:
        problems.append("defaults: data.document_masking: packed SFT examples always attend only within "
                        "themselves; leave it true (or set sft.packing=false)")
    if not cfg.sft.train_files:
        problems.append("defaults: sft.train_files: no training files given")
    return problems


def load_sft_data(cfg: SFTConfig) -> TaskData:
    s = cfg.sft
    tokenizer = load_chat_tokenizer(cfg, s.chat_template)
    common = dict(seq_len=cfg.data.seq_len, fmt=s.format, overlong=s.overlong, train_on_prompt=s.train_on_prompt,
                  skip_bad_rows=s.skip_bad_rows)
    train, train_report = load_sft_examples(s.train_files, tokenizer, **common)
    val, val_report = load_sft_examples(s.val_files, tokenizer, **common) if s.val_files else (None, None)
    report = [f"train data: {train_report.summary()}"]
    if val_report is not None:
        report.append(f"val data: {val_report.summary()}")
    banner = f"chat template {template_name(tokenizer) or 'the tokenizer own'} | packing {s.packing}"
    return TaskData(payload=SFTData(train, val), tokenizer=tokenizer, report=report, banner=banner)


def build_sft(ctx: TaskContext, model) -> TaskParts:
    cfg, data = ctx.cfg, ctx.data.payload
    common = dict(batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                  pad_id=ctx.data.tokenizer.pad_token_id, packing=cfg.sft.packing, seed=cfg.train.seed,
                  rank=ctx.rank, world_size=ctx.world_size)
    loader = SFTLoader(data.train, shuffle=cfg.data.shuffle, **common)

    def val_batches():
        return iter(SFTLoader(data.val, shuffle=False, validation=True, **common))

    if data.val:
        val_batches()  # an empty validation set fails now, not at the first evaluation
    return TaskParts(objective=sft_objective_with(ctx.cfg.train.loss_chunking), train_loader=loader,
                     val_batches=val_batches if data.val else None)


SFT = TaskSpec(name="sft", tuning_section="sft", check_config=check_sft_config, load_data=load_sft_data,
               build=build_sft)


def run_sft(cfg: SFTConfig, resume: str | None = None) -> RunResult:
    return run_task(cfg, SFT, resume)
