"""Pretraining as a task: packed token shards and the causal-LM objective."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config import RunConfig
from trainer.data.shards import PretrainLoader, TokenShards, check_tokenizer_matches
from trainer.loop import RunResult
from trainer.objectives import across_documents, causal_lm
from trainer.task import TaskContext, TaskData, TaskParts, TaskSpec, run_task


@dataclass
class Shards:
    train: TokenShards
    val: TokenShards | None


def check_pretrain_config(cfg: RunConfig) -> list[str]:
    if not cfg.data.path:
        return ["defaults: data.path: no token shards given (run launch/prepare_data.py first)"]
    return []


def load_shards(cfg: RunConfig) -> TaskData:
    data_dir = Path(cfg.data.path)
    if not (data_dir / "train").is_dir():
        raise FileNotFoundError(f"data.path: {data_dir}/train not found (expected prepare_data output)")
    val_dir = data_dir / "val"
    train_shards = TokenShards(data_dir / "train")
    val = TokenShards(val_dir) if (val_dir / "index.json").is_file() else None
    return TaskData(payload=Shards(train_shards, val), data_vocab_size=train_shards.vocab_size)


def check_shards_fit_model(cfg: RunConfig, data: TaskData, model_cfg) -> None:
    check_tokenizer_matches(data.payload.train, cfg.data.tokenizer, model_vocab_size=model_cfg.vocab_size)


def build_pretraining(ctx: TaskContext, model) -> TaskParts:
    cfg, shards = ctx.cfg, ctx.data.payload
    common = dict(batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len, seed=cfg.train.seed,
                  rank=ctx.rank, world_size=ctx.world_size)
    loader = PretrainLoader(shards.train, shuffle=cfg.data.shuffle, **common)

    def val_batches():
        return iter(PretrainLoader(shards.val, shuffle=False, validation=True, **common))

    objective = causal_lm(cfg.train.loss_chunking)
    if not cfg.data.document_masking:
        objective = across_documents(objective)
    return TaskParts(objective=objective, train_loader=loader,
                     val_batches=val_batches if shards.val is not None else None)


PRETRAIN = TaskSpec(name="pretrain", check_config=check_pretrain_config, load_data=load_shards,
                    check_model=check_shards_fit_model, build=build_pretraining)


def run_pretraining(cfg: RunConfig, resume: str | None = None) -> RunResult:
    return run_task(cfg, PRETRAIN, resume)
