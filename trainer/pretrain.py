"""Pretraining: packed token shards + the causal-LM objective, through the one loop."""
from __future__ import annotations

import json
from pathlib import Path

from accelerate.utils import set_seed

from model_defs import flops_per_token
from trainer.build import build_model, model_config_from
from trainer.checkpoint import MODEL_CONFIG_FILE, resolve_resume
from trainer.config import ConfigError, RunConfig, save_resolved
from trainer.engine import build_accelerator, resolve_precision
from trainer.loop import RunResult, train
from trainer.objectives import across_documents, causal_lm_objective


def run_pretraining(cfg: RunConfig, resume: str | None = None) -> RunResult:
    from trainer.data.shards import PretrainLoader, TokenShards, check_tokenizer_matches

    if not cfg.data.path:
        raise ConfigError("defaults: data.path: no token shards given (run launch/prepare_data.py first)")
    data_dir = Path(cfg.data.path)
    if not (data_dir / "train").is_dir():
        raise FileNotFoundError(f"data.path: {data_dir}/train not found (expected prepare_data output)")
    precision = resolve_precision(cfg.train.precision)
    train_shards = TokenShards(data_dir / "train")
    model_cfg = model_config_from(cfg, data_vocab_size=train_shards.vocab_size)
    # Before any process group or model exists: a mismatched tokenizer must cost nothing.
    check_tokenizer_matches(train_shards, cfg.data.tokenizer, model_vocab_size=model_cfg.vocab_size)
    val_dir = data_dir / "val"
    val_shards = TokenShards(val_dir) if (val_dir / "index.json").is_file() else None

    accelerator = build_accelerator(cfg, hidden_size=model_cfg.dim, precision=precision)
    resume_from = resolve_resume(resume, cfg.train.output_dir)
    if accelerator.is_main_process:
        save_resolved(cfg, cfg.train.output_dir)
        accelerator.print(f"precision {precision} | attention {model_cfg.attention} | "
                          f"world size {accelerator.num_processes} | "
                          f"deepspeed {accelerator.state.deepspeed_plugin is not None}")
    set_seed(cfg.train.seed)
    model = build_model(cfg, model_cfg)
    if cfg.train.compile:
        import torch

        model = torch.compile(model)

    rank, world = accelerator.process_index, accelerator.num_processes
    loader = PretrainLoader(train_shards, batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                            seed=cfg.train.seed, rank=rank, world_size=world, shuffle=cfg.data.shuffle)

    def val_batches():
        return iter(PretrainLoader(val_shards, batch_size=cfg.train.micro_batch_size, seq_len=cfg.data.seq_len,
                                   seed=cfg.train.seed, rank=rank, world_size=world, shuffle=False,
                                   infinite=False))

    return train(
        cfg,
        accelerator=accelerator,
        model=model,
        objective=causal_lm_objective if cfg.data.document_masking else across_documents(causal_lm_objective),
        train_loader=loader,
        val_batches=val_batches if val_shards is not None else None,
        flops_per_token=flops_per_token(model_cfg, cfg.data.seq_len),
        precision=precision,
        resume_from=resume_from,
        checkpoint_files={MODEL_CONFIG_FILE: json.dumps(model_cfg.to_dict(), indent=2)},
    )
