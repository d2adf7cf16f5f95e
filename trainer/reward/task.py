"""Reward modelling as a task: a scalar head on the decoder, Bradley-Terry loss on preference pairs.

    accelerate launch launch/reward.py --config configs/reward_RECIPE.yaml

The pairs are read by DPO's readers (every shape DPO accepts); the model starts from any causal
LM we load (its trunk, a fresh `score` head) or from a reward model to keep training. With
LoRA/QLoRA the head trains in full beside the adapter. Outputs: see `trainer.scoring`.
"""
from __future__ import annotations

from trainer.chat import load_chat_tokenizer, template_name
from trainer.dpo.config import pair_config_problems
from trainer.dpo.data import load_preference_data
from trainer.dpo.loader import PairBatches, PairLoader
from trainer.dpo.objective import count_pairs
from trainer.loop import RunResult
from trainer.reward.batches import collate_scored_pairs
from trainer.reward.config import RewardConfig
from trainer.reward.objective import RewardObjective
from trainer.scoring import classifier_files, make_classifier, save_classifier_outputs, scoring_config_problems
from trainer.task import TaskContext, TaskData, TaskParts, TaskSpec, print_validation_change, run_task

REWARD_LABELS = {0: "reward"}


def load_reward_data(cfg: RewardConfig) -> TaskData:
    r = cfg.reward
    tokenizer = load_chat_tokenizer(cfg, r.chat_template)
    data = load_preference_data(r, tokenizer, seq_len=cfg.data.seq_len, seed=cfg.train.seed, section="reward")
    report = data.report_lines("reward")
    banner = f"Bradley-Terry | chat template {template_name(tokenizer) or 'the tokenizer own'}"
    return TaskData(payload=data, tokenizer=tokenizer, report=report, banner=banner)


def build_reward(ctx: TaskContext, model) -> TaskParts:
    cfg, data = ctx.cfg, ctx.data.payload
    # Exact row lengths on CPU; multiples of 8 keep GPU matmuls on tensor-core shapes.
    pad = dict(pad_id=ctx.data.tokenizer.pad_token_id, pad_to_multiple_of=8 if ctx.accelerator.device.type == "cuda"
               else 1, collate=collate_scored_pairs)
    loader = PairLoader(data.train, cfg.train.micro_batch_size, seed=cfg.train.seed, rank=ctx.rank,
                        world_size=ctx.world_size, shuffle=cfg.data.shuffle, **pad)

    def val_batches():
        return iter(PairBatches(data.val, cfg.train.micro_batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                **pad))

    return TaskParts(objective=RewardObjective(cfg.reward.center_coefficient), train_loader=loader,
                     val_batches=val_batches if data.val else None, count_targets=count_pairs)


def print_before_after(ctx: TaskContext, result: RunResult) -> None:
    print_validation_change(ctx, "held-out pairs", lambda _: (("accuracy", "accuracy"), ("margin", "margin")))


def save_reward_outputs(ctx: TaskContext, result: RunResult) -> None:
    save_classifier_outputs(ctx, result, num_labels=1, id2label=REWARD_LABELS)
    print_before_after(ctx, result)


def check_reward_config(cfg: RewardConfig) -> list[str]:
    return pair_config_problems(cfg, "reward") + scoring_config_problems(cfg, "reward")


REWARD = TaskSpec(
    name="reward", tuning_section="reward", check_config=check_reward_config, load_data=load_reward_data, build=build_reward,
    make_model=lambda ctx: make_classifier(ctx, num_labels=1), modules_to_save=("score",),
    checkpoint_files=lambda ctx: classifier_files(1, REWARD_LABELS), save_outputs=save_reward_outputs)


def run_reward(cfg: RewardConfig, resume: str | None = None) -> RunResult:
    return run_task(cfg, REWARD, resume)
