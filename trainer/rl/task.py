"""Online RL (GRPO or PPO) as a task: a policy, prompts, reward functions and a rollout loader -> the loop.

    accelerate launch launch/rl.py --config configs/rl_RECIPE.yaml

Each optimizer step's micro-batches come from `RolloutLoader` (generation with the current weights,
rewards, then GRPO's group-relative advantages or PPO's value-head GAE); the loop itself is the one every task trains through: the same
checkpoints (the rollout position, sampling RNG and any unfinished buffer included), signals and logs.
Validation greedily completes the held-out prompts and reports their mean rewards.

Run folder (`train.output_dir`): checkpoints/, tokenizer/, metrics.jsonl, and as SFT leaves them
model/ (full tuning, an HF Llama folder) or adapter/ + adapter_hf/ (LoRA/QLoRA); PPO adds value_head/.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from model_defs.generate import generate
from trainer.chat import load_chat_tokenizer, stop_token_ids, template_name
from trainer.data.sampler import StatefulSampler
from trainer.dpo.reference import FrozenCopyReference, frozen_copy
from trainer.export import consolidated_state_dict, with_tied_head, write_hf_folder
from trainer.loop import RunResult
from trainer.rl.config import RLConfig, rl_config_problems
from trainer.rl.objective import GRPOObjective, PPOObjective, per_token_logps
from trainer.rl.prompts import Prompt, load_prompts
from trainer.rl.rewards import RewardFunction, combine, load_reward_functions, reward_model_function, score
from trainer.rl.rollout import RolloutLoader, cut_at_stop, generation_weights, left_pad, rollout_report
from trainer.rl.value_head import VALUE_HEAD, add_value_head, save_value_head, split_value_head
from trainer.task import TaskContext, TaskData, TaskParts, TaskSpec, print_validation_change, run_task
from trainer.tuning.methods import PRECISION_DTYPES
from trainer.tuning.save import _write_adapter as write_adapter
from trainer.tuning.save import adapter_state, gather_trainable_state, to_hf_adapter


class RLData:
    def __init__(self, train: list[Prompt], val: list[Prompt], rewards: list[RewardFunction]):
        self.train, self.val, self.rewards = train, val, rewards


def load_rl_data(cfg: RLConfig) -> TaskData:
    r = cfg.rl
    tokenizer = load_chat_tokenizer(cfg, r.chat_template)
    rewards = load_reward_functions(r.rewards)
    if r.reward_model is not None:
        from trainer.score import find_classifier

        find_classifier(r.reward_model.path)  # reads configs only: a wrong path costs nothing yet
    train = load_prompts(r.train_files, tokenizer, r.max_prompt_len, "rl.train_files")
    val = load_prompts(r.val_files, tokenizer, r.max_prompt_len, "rl.val_files") if r.val_files else []
    names = [f"{f.name} x {f.weight:g}" for f in rewards]
    if r.reward_model is not None:
        names.append(f"reward model {r.reward_model.path} x {r.reward_model.weight:g}")
    report = [f"rl prompts: {len(train)} train, {len(val)} held-out; rewards: " + ", ".join(names)]
    banner = (f"{r.algorithm} | G {r.num_generations} | normalization {r.loss_normalization} | beta {r.beta:g} | "
              f"reference {r.resolved_reference()} | chat template {template_name(tokenizer) or 'the tokenizer own'}")
    return TaskData(payload=RLData(train, val, rewards), tokenizer=tokenizer, report=report, banner=banner)


def keep_reference_copy(ctx: TaskContext, base: nn.Module) -> None:
    """The reference is the policy as loaded, taken before any adapter and before any update."""
    if ctx.cfg.rl.resolved_reference() in ("offload", "resident"):
        ctx.state["ref_model"] = frozen_copy(base)


def make_reference(ctx: TaskContext, model: nn.Module):
    """(input_ids, labels) -> the reference's (B, T) log-probs, or None at beta 0."""
    r, accelerator = ctx.cfg.rl, ctx.accelerator
    strategy = r.resolved_reference()
    chunking = ctx.cfg.train.loss_chunking
    if strategy == "none":
        return None
    if strategy == "adapter":
        if not hasattr(model, "disable_adapter"):
            raise TypeError("rl.reference 'adapter' needs a PEFT model (rl.method lora or qlora)")

        def adapter_off(input_ids, labels):
            with model.disable_adapter():
                return per_token_logps(model, input_ids, labels, temperature=r.temperature, chunking=chunking)[0]
        return adapter_off
    frozen = FrozenCopyReference(ctx.state.pop("ref_model"), accelerator, offload=strategy == "offload")

    def frozen_copy_logps(input_ids, labels):
        return per_token_logps(frozen.model, input_ids, labels, temperature=r.temperature, chunking=chunking)[0]
    return frozen_copy_logps


class GreedyRewards:
    """Validation objective: greedy completions of held-out prompts, scored by the reward functions.
    Batches carry prompt indices; `row_mask` marks the filler rows of the last batch."""

    def __init__(self, ctx: TaskContext, model: nn.Module, data: RLData):
        self.ctx, self.model, self.data = ctx, model, data
        self.stop_ids = stop_token_ids(ctx.data.tokenizer)

    def __call__(self, _prepared: nn.Module, batch: dict[str, torch.Tensor]):
        r, tokenizer, accelerator = self.ctx.cfg.rl, self.ctx.data.tokenizer, self.ctx.accelerator
        rows = [self.data.val[i] for i in batch["prompt_index"].tolist()]
        ids, mask = left_pad([p.ids for p in rows], tokenizer.pad_token_id)
        with generation_weights(accelerator), accelerator.autocast():
            tokens = generate(self.model, ids.to(accelerator.device), mask.to(accelerator.device),
                              max_new_tokens=r.max_new_tokens, temperature=0.0, stop_token_ids=self.stop_ids,
                              pad_token_id=tokenizer.pad_token_id)
        completions = cut_at_stop(tokens[:, ids.size(1):], self.stop_ids)
        texts = tokenizer.batch_decode([c.tolist() for c in completions], skip_special_tokens=True)
        fields = {k: [p.fields[k] for p in rows] for k in rows[0].fields}
        per_function = score(self.data.rewards, [p.text for p in rows], texts, fields,
                             [p.where for p in rows], [p.messages for p in rows])
        real = batch["row_mask"].float().cpu()
        stats = {"count": real.sum(), "reward_sum": (combine(per_function, self.data.rewards) * real).sum(),
                 "response_length_sum": (torch.tensor([float(len(c)) for c in completions]) * real).sum()}
        for f, column in zip(self.data.rewards, per_function.T):
            stats[f"reward/{f.short_name}_sum"] = (column * real).sum()
        return torch.zeros(()), stats


def val_prompt_batches(n: int, batch_size: int, rank: int, world_size: int):
    sampler = StatefulSampler(n, batch_size, rank=rank, world_size=world_size, shuffle=False, validation=True)
    for chunk, real in sampler:
        yield {"prompt_index": torch.tensor(chunk), "row_mask": torch.tensor([1.0] * real + [0.0] * (batch_size - real)),
               "input_ids": torch.zeros(len(chunk), 1, dtype=torch.long)}


def build_rl(ctx: TaskContext, model: nn.Module) -> TaskParts:
    cfg, data, accelerator = ctx.cfg, ctx.data.payload, ctx.accelerator
    if cfg.rl.reward_model is not None:
        data.rewards.append(reward_model_function(cfg.rl.reward_model, accelerator.device,
                                                  PRECISION_DTYPES[ctx.precision]))
    objective = (PPOObjective if cfg.rl.algorithm == "ppo" else GRPOObjective)(cfg.rl, chunking=cfg.train.loss_chunking)
    loader = RolloutLoader(data.train, cfg.rl, model=model, accelerator=accelerator, tokenizer=ctx.data.tokenizer,
                           rewards=data.rewards, micro_batch_size=cfg.train.micro_batch_size,
                           grad_accum_steps=cfg.train.grad_accum_steps, seed=cfg.train.seed,
                           stop_ids=stop_token_ids(ctx.data.tokenizer), reference=make_reference(ctx, model),
                           chunking=cfg.train.loss_chunking, shuffle=cfg.data.shuffle)
    val = None
    if data.val:
        def val():
            return val_prompt_batches(len(data.val), cfg.train.micro_batch_size, ctx.rank, ctx.world_size)
    # Sampling forwards (one per new token, with a KV cache) are not counted: FLOPs cover the update only,
    # plus a reference forward per token when there is one.
    extra = 1 / 3 if cfg.rl.resolved_reference() != "none" else 0.0
    return TaskParts(objective=objective, train_loader=loader, val_batches=val, count_targets=objective.count_targets,
                     extra_flops_factor=extra, val_objective=GreedyRewards(ctx, model, data) if data.val else None,
                     train_report=rollout_report(ctx.world_size))


def print_before_after(ctx: TaskContext, result: RunResult) -> None:
    print_validation_change(ctx, "held-out prompts (greedy)", lambda first: [("reward", "reward")] + [
        (k, k.removeprefix("reward/")) for k in sorted(first) if k.startswith("reward/")])


def add_critic(ctx: TaskContext, base: nn.Module) -> None:
    """PPO: the reference copy first (it has no use for a value head), then the head on the policy."""
    keep_reference_copy(ctx, base)
    add_value_head(base)


def save_ppo_outputs(ctx: TaskContext, result: RunResult) -> None:
    """The standard outputs of the policy (model/ or adapter/ + adapter_hf/) without its value head, which
    goes to value_head.safetensors beside them."""
    accelerator, out_dir = result.accelerator, Path(ctx.cfg.train.output_dir)
    if ctx.cfg.rl.method == "full":
        if accelerator.is_main_process and result.final_checkpoint is not None:
            state = with_tied_head(consolidated_state_dict(result.final_checkpoint), ctx.model_cfg)
            policy, head = split_value_head(state)
            write_hf_folder(policy, ctx.model_cfg, out_dir / "model", tokenizer_dir=out_dir / "tokenizer",
                            overwrite=True)
            saved = save_value_head(head, out_dir)
            accelerator.print(f"tuned policy exported to {out_dir / 'model'}, its value head to {saved}")
        accelerator.wait_for_everyone()
        return
    _, trainable = gather_trainable_state(accelerator, result.model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(result.model, keep_torch_compile=False)
        state, head = split_value_head(adapter_state(model, trainable))
        # The saved adapter is the policy's alone: loaded onto a plain Transformer, which has no value head.
        config = copy.deepcopy(model.peft_config["default"])
        config.modules_to_save = None
        write_adapter(out_dir / "adapter", state, config, ctx.data.tokenizer)
        hf_state, hf_config = to_hf_adapter(state, config)
        write_adapter(out_dir / "adapter_hf", hf_state, hf_config, ctx.data.tokenizer)
        saved = save_value_head(head, out_dir)
        accelerator.print(f"adapter saved to {out_dir / 'adapter'} (HF Llama names: {out_dir / 'adapter_hf'}), "
                          f"value head to {saved}")
    accelerator.wait_for_everyone()


RL = TaskSpec(name="rl", tuning_section="rl", check_config=rl_config_problems, load_data=load_rl_data,
              before_tuning=keep_reference_copy, build=build_rl, finish=print_before_after)
# The same task with PPO's value head on the policy: an adapter trains the head in full.
RL_PPO = replace(RL, before_tuning=add_critic, modules_to_save=(VALUE_HEAD,), save_outputs=save_ppo_outputs)


def run_rl(cfg: RLConfig, resume: str | None = None) -> RunResult:
    return run_task(cfg, RL_PPO if cfg.rl.algorithm == "ppo" else RL, resume)
