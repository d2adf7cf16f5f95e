"""One optimizer step over fixed rows whose target counts differ widely; writes the gradient it took.

    python -m tests.normalization_worker OUT_DIR sft|dpo MICRO ACCUM   (or under `accelerate launch`)

Every layout (micro-batch size x accumulation x ranks) sees the same global rows, so a loss
normalized over the whole step gives the same gradient in all of them.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from model_defs import ModelConfig, Transformer
from trainer.config import load_config
from trainer.dpo.data import TokenPair
from trainer.dpo.loader import collate_pairs
from trainer.dpo.losses import LossParams
from trainer.dpo.objective import PreferenceObjective, count_pairs
from trainer.dpo.reference import PrecomputedReference
from trainer.engine import build_accelerator
from trainer.loop import train
from trainer.objectives import IGNORE_INDEX, causal_lm_objective, count_label_tokens
from trainer import optim

VOCAB, SEQ, ROWS = 64, 24, 4


def sft_rows() -> list[dict[str, torch.Tensor]]:
    """Rows with 1, 4, 11 and 23 labelled tokens: a mean of per-micro-batch means would weigh them unequally."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for n_labels in (1, 4, 11, 23):
        ids = torch.randint(0, VOCAB, (1, SEQ + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, :SEQ - n_labels] = IGNORE_INDEX
        rows.append({"input_ids": ids[:, :-1], "labels": labels})
    return rows


def dpo_pairs() -> tuple[list[TokenPair], torch.Tensor]:
    rng = np.random.default_rng(0)
    pairs = [TokenPair(prompt=rng.integers(0, VOCAB, p), chosen=rng.integers(0, VOCAB, c),
                       rejected=rng.integers(0, VOCAB, r))
             for p, c, r in ((3, 2, 9), (6, 12, 4), (2, 5, 5), (8, 1, 14))]
    return pairs, torch.from_numpy(rng.normal(-30, 5, (ROWS, 2))).float()


class RowsLoader:
    """Rank r takes global rows r, r + world, ...; consecutive micro-batches of `micro` of them."""

    def __init__(self, make_batch, micro: int, rank: int, world: int):
        mine = list(range(ROWS))[rank::world]
        self.batches = [make_batch(mine[i:i + micro]) for i in range(0, len(mine), micro)]

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def main(out_dir: Path, task: str, micro: int, accum: int) -> None:
    cfg = load_config(None, [f"train.output_dir={out_dir}", "train.max_steps=1", f"train.micro_batch_size={micro}",
                             f"train.grad_accum_steps={accum}", "optim.grad_clip=0", "optim.warmup_steps=0",
                             "logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"])
    accelerator = build_accelerator(cfg, hidden_size=32, precision="fp32")
    model_cfg = ModelConfig.from_preset("tiny", vocab_size=VOCAB, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    if task == "sft":
        rows = sft_rows()
        loader = RowsLoader(lambda idx: {k: torch.cat([rows[i][k] for i in idx]) for k in rows[0]}, micro, rank, world)
        objective, count = causal_lm_objective, count_label_tokens
    else:
        pairs, table = dpo_pairs()
        loader = RowsLoader(lambda idx: collate_pairs([pairs[i] for i in idx], pad_id=0, pad_to_multiple_of=1,
                                                      ref_logps=table, indices=idx), micro, rank, world)
        objective = PreferenceObjective("sigmoid", LossParams(beta=0.5), PrecomputedReference())
        count = count_pairs

    grads: dict[str, torch.Tensor] = {}
    plain_step = optim.FiniteStepAdamW.step

    def recording_step(self, closure=None):
        named = {id(p): n for n, p in model.named_parameters()}
        for group in self.param_groups:
            for p in group["params"]:
                grads[named.get(id(p), str(len(grads)))] = p.grad.detach().clone()
        return plain_step(self, closure)

    optim.FiniteStepAdamW.step = recording_step
    train(cfg, accelerator=accelerator, model=model, objective=objective, train_loader=loader,
          count_targets=count, precision="fp32")
    if accelerator.is_main_process:
        save_file(grads, str(out_dir / "grads.safetensors"))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
