"""The `rl` section of an online-RL recipe: prompts, generation, rewards and the GRPO or PPO objective."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from trainer.config import RunConfig, Section
from trainer.tuning.config import TuningSection

LossNormalization = Literal["grpo", "dapo", "dr_grpo"]
ReferenceName = Literal["auto", "adapter", "offload", "resident", "none"]


class RewardFunctionSection(Section):
    """A Python reward: `function(prompts, completions, **fields) -> list[float]`, one per completion."""

    function: str = Field(..., description="module:function, importable on every rank")
    weight: float = Field(1.0, description="its share of the total reward (rewards are summed with weights)")


class RewardModelSection(Section):
    """A reward model (ours or any HF sequence-classification folder) scoring prompt + completion."""

    path: str = Field(..., description="a reward run folder, its model/, a checkpoint or an HF folder")
    weight: float = Field(1.0, description="its share of the total reward")
    batch_size: int = Field(16, gt=0, description="sequences per scoring forward")


class RLSection(TuningSection):
    """Prompts, how completions are sampled and scored, and the policy-gradient objective."""

    algorithm: Literal["grpo", "ppo"] = Field("grpo", description="grpo (group-relative advantages) or ppo "
                                                                    "(a value head on the policy, GAE)")
    train_files: list[str] = Field(default_factory=list, description="JSONL/JSON rows with a `prompt` (text or "
                                                                      "messages); other fields reach the rewards")
    val_files: list[str] = Field(default_factory=list, description="held-out prompts: greedy completions scored")
    chat_template: Literal["auto", "llama3", "chatml"] = Field("auto", description="auto keeps the tokenizer's own")
    max_prompt_len: int = Field(128, gt=0, description="a longer prompt is an error naming its row")
    max_new_tokens: int = Field(64, gt=0, description="completion budget; data.seq_len must hold both")
    num_generations: int = Field(4, ge=1, description="G: completions sampled per prompt (one group; GRPO needs "
                                                      "2 or more, PPO usually takes 1)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; the loss uses the same tempered "
                                                      "distribution")
    top_k: Optional[int] = Field(None, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    rewards: list[RewardFunctionSection] = Field(default_factory=list, description="Python reward functions")
    reward_model: Optional[RewardModelSection] = Field(
        None, description="a reward model, re-tokenizing the text with its own tokenizer (summed with the rest)")
    scale_rewards: Literal["group", "none"] = Field(
        "group", description="group: advantages (r - group mean) / (group std + 1e-4); none: Dr. GRPO's r - mean")
    loss_normalization: LossNormalization = Field(
        "grpo", description="grpo: mean over each completion's tokens, then over completions; dapo: over every "
                            "token of the step; dr_grpo: over completions x max_new_tokens")
    epsilon: float = Field(0.2, gt=0, description="clip range below 1 (and above, unless epsilon_high)")
    epsilon_high: Optional[float] = Field(None, gt=0, description="DAPO's clip-higher: upper clip range")
    beta: float = Field(0.0, ge=0, description="weight of the per-token KL (k3) to the reference; 0: no reference")
    reference: ReferenceName = Field(
        "auto", description="adapter | offload | resident | none; auto: none at beta 0, else adapter with "
                            "LoRA/QLoRA and resident for full tuning")
    epochs: int = Field(1, gt=0, description="passes over each rollout buffer (TRL's num_iterations)")
    minibatches: int = Field(1, gt=0, description="optimizer steps per pass over a rollout buffer")
    # PPO only (TRL's PPOTrainer defaults).
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: discount of GAE")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: lambda of GAE")
    vf_coef: float = Field(0.1, ge=0, description="PPO: weight of the value loss beside the policy loss")
    value_clip: float = Field(0.2, gt=0, description="PPO: values move at most this far from the rollout's")
    whiten_rewards: bool = Field(False, description="PPO: whiten the per-token rewards over the buffer "
                                                    "(mean kept) before GAE")
    method: Literal["full", "lora", "qlora"] = "full"

    @model_validator(mode="after")
    def _consistent(self) -> "RLSection":
        if self.beta > 0 and self.reference == "none":
            raise ValueError("reference: beta > 0 needs a reference (adapter, offload or resident)")
        if self.reference == "adapter" and self.method == "full":
            raise ValueError("reference: 'adapter' needs method lora or qlora (full tuning has no adapter to disable)")
        return self

    def resolved_reference(self) -> str:
        if self.reference != "auto":
            return self.reference
        if self.beta == 0:
            return "none"
        return "resident" if self.method == "full" else "adapter"

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class RLConfig(RunConfig):
    """A run config plus the `rl` section. `train.micro_batch_size` counts completions; one rollout buffer is
    micro_batch_size x grad_accum_steps x rl.minibatches completions per rank (a whole number of groups)."""

    rl: RLSection = RLSection()


def rl_config_problems(cfg: RLConfig) -> list[str]:
    r, t = cfg.rl, cfg.train
    problems = []
    if r.algorithm == "grpo" and r.num_generations < 2:
        problems.append(f"defaults: rl.num_generations: grpo needs at least 2 completions per prompt (a group), "
                        f"got {r.num_generations}")
    if r.algorithm == "ppo" and r.epsilon_high is not None:
        problems.append("defaults: rl.epsilon_high: GRPO's clip-higher; ppo clips both sides with rl.epsilon")
    if cfg.data.path:
        problems.append("defaults: data.path: this task reads rl.train_files, not token shards; remove data.path")
    if not r.train_files:
        problems.append("defaults: rl.train_files: no prompt files given")
    if not r.rewards and r.reward_model is None:
        problems.append("defaults: rl.rewards: no reward given (module:function entries or rl.reward_model)")
    if r.max_prompt_len + r.max_new_tokens > cfg.data.seq_len:
        problems.append(f"defaults: rl.max_prompt_len + rl.max_new_tokens = {r.max_prompt_len + r.max_new_tokens} "
                        f"exceeds data.seq_len {cfg.data.seq_len}")
    rows = t.micro_batch_size * t.grad_accum_steps * r.minibatches
    if rows % r.num_generations:
        problems.append(f"defaults: train.micro_batch_size x train.grad_accum_steps x rl.minibatches = {rows} "
                        f"completions per rank is not a whole number of groups of rl.num_generations "
                        f"{r.num_generations}")
    if r.method != "full" and not cfg.model.init_from:
        problems.append(f"defaults: rl.method={r.method} needs model.init_from (a trained policy to adapt)")
    return problems
