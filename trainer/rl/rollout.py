"""The rollout phase as a resumable loader: generate with the current policy, score, compute advantages,
then yield the loop's micro-batches from that buffer.

One buffer holds `micro_batch_size x grad_accum_steps x rl.minibatches` completions per rank: that many
divided by G prompts (each rank its own prompts, every group whole on one rank), each sampled G times.
The buffer serves `rl.epochs x rl.minibatches` optimizer steps; with more than one, the log-probs of the
sampling policy (`old_logps`) are computed once after generation. With `rl.beta > 0` the reference's
per-token log-probs are computed then too, so the training step needs no reference forward.
PPO (`rl.algorithm: ppo`) keeps the sampling policy's log-probs and the value head's estimates from the
same forward and turns the rewards into per-token advantages and returns (GAE) before the first update.

Generation runs lazily, on the first micro-batch the loop asks for after the buffer is used up, i.e.
with the weights of the latest optimizer step. Exact resume: the state holds the prompt sampler's
position, the sampling generator's state and, when a checkpoint falls inside a buffer, the buffer itself.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from model_defs.generate import generate
from trainer.data.sampler import StatefulSampler
from trainer.engine import zero_stage
from trainer.objectives import IGNORE_INDEX
from trainer.rl.config import RLSection
from trainer.rl.losses import group_advantages, ppo_advantages
from trainer.rl.objective import logps_and_values, per_token_logps
from trainer.rl.prompts import Prompt, prompts_fingerprint
from trainer.rl.rewards import RewardFunction, combine, score
from trainer.token_logps import LossChunking

Batch = dict[str, torch.Tensor]
# (input_ids, labels) -> (B, T) reference log-probs, under no_grad
ReferenceLogps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def generation_weights(accelerator: Accelerator):
    """Whole weights for generation. Under ZeRO-3 they are gathered once for the whole rollout and the
    engine's per-module gather hooks are lifted meanwhile, as TRL's `unwrap_model_for_generation` does:
    otherwise every decoding step would all-gather every layer, and ranks whose rows finish early would
    stop taking part in those collectives."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    engine = accelerator.deepspeed_engine_wrapped.engine
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


def left_pad(rows: list[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.from_numpy(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def cut_at_stop(new_tokens: torch.Tensor, stop_ids: list[int]) -> list[np.ndarray]:
    """Each row's completion up to and including its first stop token (the whole budget without one)."""
    rows = []
    stop = torch.tensor(stop_ids, dtype=torch.long)
    for row in new_tokens.cpu():
        hits = torch.nonzero(torch.isin(row, stop)).flatten()
        end = int(hits[0]) + 1 if len(hits) else len(row)
        rows.append(row[:end].numpy().astype(np.int64))
    return rows


def training_rows(prompts: list[np.ndarray], completions: list[np.ndarray], pad_id: int) -> Batch:
    """Right-padded prompt + completion rows with next-token labels on the completion only (as DPO's)."""
    longest = max(len(p) + len(c) - 1 for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), longest), IGNORE_INDEX, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        seq = torch.from_numpy(np.concatenate([p, c]))
        n = len(seq) - 1
        input_ids[b, :n] = seq[:-1]
        labels[b, len(p) - 1:n] = seq[len(p):]
    return {"input_ids": input_ids, "labels": labels}


def _encode(t: torch.Tensor) -> dict:
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.flatten().tolist()}


def _decode(d: dict) -> torch.Tensor:
    return torch.tensor(d["data"], dtype=getattr(torch, d["dtype"])).reshape(d["shape"])


class RolloutLoader:
    """Infinite iterator of rollout micro-batches with `state_dict()` / `load_state_dict()`."""

    def __init__(self, prompts: list[Prompt], rl: RLSection, *, model: nn.Module, accelerator: Accelerator,
                 tokenizer, rewards: list[RewardFunction], micro_batch_size: int, grad_accum_steps: int,
                 seed: int, stop_ids: list[int], reference: ReferenceLogps | None = None,
                 chunking: LossChunking = "auto", shuffle: bool = True):
        self.prompts, self.rl, self.model, self.accelerator = prompts, rl, model, accelerator
        self.tokenizer, self.rewards, self.reference = tokenizer, rewards, reference
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.stop_ids, self.chunking = stop_ids, chunking
        self.rows_per_buffer = micro_batch_size * grad_accum_steps * rl.minibatches
        self.prompts_per_buffer = self.rows_per_buffer // rl.num_generations
        rank, world = accelerator.process_index, accelerator.num_processes
        self.sampler = StatefulSampler(len(prompts), self.prompts_per_buffer, seed=seed, rank=rank, world_size=world,
                                       shuffle=shuffle, name="prompt loader",
                                       identity={"num_prompts": len(prompts),
                                                 "fingerprint": prompts_fingerprint(prompts)})
        self.sampler.require_units(f"{len(prompts)} prompts", "lower train.micro_batch_size or add prompts")
        self.generator = torch.Generator(device=accelerator.device)
        self.generator.manual_seed(seed * 1_000_003 + rank)
        self.steps_per_buffer = rl.epochs * rl.minibatches
        self.buffer: Batch | None = None
        self.position = 0  # micro-batches of the buffer already handed out
        self._draws: Iterator | None = None

    # -- the buffer ---------------------------------------------------------------------------------------------
    def _next_prompts(self) -> list[Prompt]:
        if self._draws is None:
            self._draws = iter(self.sampler)
        mine, _ = next(self._draws)
        return [self.prompts[i] for i in mine]

    @torch.no_grad()
    def rollout(self) -> Batch:
        r, device = self.rl, self.accelerator.device
        prompts = self._next_prompts()
        rows = [p for p in prompts for _ in range(r.num_generations)]  # each group's rows side by side
        pad_id = self.tokenizer.pad_token_id
        ids, mask = left_pad([p.ids for p in rows], pad_id)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        with generation_weights(self.accelerator), self.accelerator.autocast():
            tokens = generate(self.model, ids.to(device), mask.to(device), max_new_tokens=r.max_new_tokens,
                              temperature=r.temperature, top_k=r.top_k, top_p=r.top_p if r.top_p < 1 else None,
                              stop_token_ids=self.stop_ids, pad_token_id=pad_id, generator=self.generator)
        seconds = time.perf_counter() - start
        completions = cut_at_stop(tokens[:, ids.size(1):], self.stop_ids)
        texts = self.tokenizer.batch_decode([c.tolist() for c in completions], skip_special_tokens=True)
        fields = {k: [p.fields[k] for p in rows] for k in rows[0].fields}
        per_function = score(self.rewards, [p.text for p in rows], texts, fields, [p.where for p in rows],
                             [p.messages for p in rows])
        rewards = combine(per_function, self.rewards)
        batch = training_rows([p.ids for p in rows], completions, pad_id)
        batch["rewards"] = rewards
        if r.algorithm == "grpo":
            batch["advantages"] = group_advantages(rewards, r.num_generations, scale=r.scale_rewards == "group")
        for f, column in zip(self.rewards, per_function.T):
            batch[f"reward/{f.short_name}"] = column.clone()
        # PPO always needs the sampling policy's log-probs and values (they build the advantages).
        with_old = self.steps_per_buffer > 1 or r.algorithm == "ppo"
        if with_old or self.reference is not None:
            for lo in range(0, len(rows), self.micro_batch_size):
                part = {k: batch[k][lo:lo + self.micro_batch_size].to(device) for k in ("input_ids", "labels")}
                with self.accelerator.autocast():
                    if r.algorithm == "ppo":
                        old, _, values = logps_and_values(self.model, part["input_ids"], part["labels"],
                                                          temperature=r.temperature, chunking=self.chunking)
                        batch.setdefault("_old", []).append(old.float().cpu())
                        batch.setdefault("_values", []).append(values.float().cpu())
                    elif with_old:
                        old, _ = per_token_logps(self.model, part["input_ids"], part["labels"],
                                                 temperature=r.temperature, chunking=self.chunking)
                        batch.setdefault("_old", []).append(old.float().cpu())
                    if self.reference is not None:
                        batch.setdefault("_ref", []).append(self.reference(part["input_ids"], part["labels"]).cpu())
            for key in ("old_logps", "ref_logps", "old_values"):
                parts = batch.pop({"old_logps": "_old", "ref_logps": "_ref", "old_values": "_values"}[key], None)
                if parts is not None:
                    batch[key] = torch.cat(parts)
        if r.algorithm == "ppo":
            _, batch["advantages"], batch["returns"] = ppo_advantages(
                rewards, batch["old_logps"], batch.get("ref_logps"), batch["old_values"],
                batch["labels"] != IGNORE_INDEX, beta=r.beta, gamma=r.gamma, lam=r.lam,
                whiten_rewards=r.whiten_rewards, all_sum=self._all_sum)
        self.model.train(was_training)
        groups = rewards.view(-1, r.num_generations)
        generated = float(sum(len(c) for c in completions))
        # A group of one has no spread to speak of: it counts as neither group nor flat group.
        flat = float((groups.std(dim=1) == 0).sum()) if r.num_generations > 1 else 0.0
        batch["rollout_stats"] = torch.tensor([generated, seconds, float(len(rows)), float(rewards.sum()),
                                               float((rewards ** 2).sum()),
                                               float(groups.size(0)) if r.num_generations > 1 else 0.0, flat],
                                              dtype=torch.float64)
        return batch

    def _all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (the buffer is one batch split over them), back on `t`'s device."""
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum").to(t.device)

    def micro_batch(self, index: int) -> Batch:
        """The `index`-th micro-batch handed out from the buffer: epochs repeat the buffer's order."""
        within = index % (self.rl.minibatches * self.grad_accum_steps)
        lo = within * self.micro_batch_size
        part = {k: v[lo:lo + self.micro_batch_size] for k, v in self.buffer.items() if k != "rollout_stats"}
        # Trim the buffer's padding to this micro-batch's longest row.
        real = (part["labels"] != IGNORE_INDEX).any(dim=0).nonzero()
        width = int(real.max()) + 1 if len(real) else 1
        for k, v in part.items():
            if v.dim() == 2:  # the per-token columns: ids, labels, log-probs, values, advantages, returns
                part[k] = v[:, :width]
        if index == 0:
            names = ("tokens", "seconds", "completions", "reward", "reward_sq", "groups", "zero_std_groups")
            for name, value in zip(names, self.buffer["rollout_stats"]):
                part[f"rollout_{name}"] = value.clone()
        return part

    def __iter__(self) -> Iterator[Batch]:
        per_buffer = self.steps_per_buffer * self.grad_accum_steps
        while True:
            if self.buffer is None or self.position >= per_buffer:
                self.buffer, self.position = self.rollout(), 0
            part = self.micro_batch(self.position)
            # Counted before it is handed out: a checkpoint after this step must not hand it out again.
            self.position += 1
            yield part

    # -- resume -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        per_buffer = self.steps_per_buffer * self.grad_accum_steps
        mid_buffer = self.buffer is not None and self.position < per_buffer
        return {"sampler": self.sampler.state_dict(),
                "generator": self.generator.get_state().tolist(),
                "position": self.position if mid_buffer else 0,
                "buffer": {k: _encode(v) for k, v in self.buffer.items()} if mid_buffer else None}

    def load_state_dict(self, state: dict) -> None:
        for key in ("sampler", "generator", "position", "buffer"):
            if key not in state:
                raise ValueError(f"rollout loader state lacks key '{key}' (not a checkpoint of an RL run)")
        self.sampler.load_state_dict(state["sampler"])
        self._draws = None
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self.buffer = {k: _decode(v) for k, v in state["buffer"].items()} if state["buffer"] else None
        self.position = int(state["position"])


def rollout_report(world_size: int) -> Callable[[dict[str, float]], dict[str, float]]:
    """Training figures of the rollouts behind a step, from the global sums (absent on steps without one)."""

    def report(totals: dict[str, float]) -> dict[str, float]:
        n = totals.get("rollout_completions")
        if not n:
            return {}
        mean = totals["rollout_reward"] / n
        var = max(totals["rollout_reward_sq"] / n - mean ** 2, 0.0) * n / max(n - 1, 1)
        figures = {"rollout_reward_mean": mean, "rollout_reward_std": var ** 0.5,
                   # Ranks generate at the same time: their mean seconds are the wall time.
                   "rollout_tokens_per_s": totals["rollout_tokens"] / max(totals["rollout_seconds"] / world_size,
                                                                          1e-9)}
        if totals.get("rollout_groups"):  # GRPO's groups (PPO samples one completion per prompt: none)
            figures["rollout_zero_std_groups"] = totals["rollout_zero_std_groups"] / totals["rollout_groups"]
        return figures

    return report
