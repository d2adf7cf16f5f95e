"""The one training loop. Pretraining, SFT and DPO differ only in the objective and the batches.

    for step: accumulate micro-batches (forward, loss, backward) -> clip -> optimizer step
              -> schedule -> global metrics -> validate -> checkpoint -> honour stop signals
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from accelerate import Accelerator
from torch import nn

from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import RunConfig
from trainer.engine import zero_stage
from trainer.metrics import RunLogger, device_peak_tflops
from trainer.objectives import Objective, count_label_tokens
from trainer.optim import build_optimizer, build_scheduler
from trainer.portable import TrainingParts
from trainer.run_folder import COMPLETE_MARKER, STEP_PREFIX, checkpoints_root
from trainer.signals import StopRequest


class StatefulLoader(Protocol):
    def __iter__(self): ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    loader: dict = field(default_factory=dict)


@dataclass
class RunResult:
    """What a run leaves for its entry point: e.g. SFT saves adapters from `model` after training."""

    accelerator: Accelerator
    model: nn.Module  # as prepared by Accelerate (a DeepSpeed engine under ZeRO)
    state: TrainState
    stopped_by_signal: str | None
    final_checkpoint: Path | None
    last_eval: dict[str, float]
    last_eval_totals: dict[str, float] = field(default_factory=dict)  # the sums behind `last_eval`


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _global_sum(accelerator: Accelerator, stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum summable statistics over ranks in one collective."""
    if not stats:
        return {}
    keys = sorted(stats)
    packed = torch.stack([stats[k].detach().float().reshape(()) for k in keys]).to(accelerator.device)
    packed = accelerator.reduce(packed, reduction="sum")
    return dict(zip(keys, packed.tolist()))


def _any_rank_true(accelerator: Accelerator, flag: bool) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def summarize(totals: dict[str, float]) -> dict[str, float]:
    """Turn summed statistics into means: `x_sum`/`x_count` where the objective gives a figure its own
    denominator (RL's per-token means beside its per-completion ones), else `x_sum`/`tokens` for
    token-weighted ones and `x_sum`/`count` otherwise."""
    out = {}
    for key, value in totals.items():
        if key.endswith("_sum"):
            name = key.removesuffix("_sum")
            if f"{name}_count" in totals:
                out[name] = value / max(totals[f"{name}_count"], 1e-12)
                continue
            denom = totals.get("count")
            if name == "loss":
                # An objective whose targets are weighted reports their total weight as `loss_normalizer`.
                denom = totals.get("loss_normalizer", totals.get("tokens", denom))
            if denom is None:
                denom = totals.get("tokens", 1.0)
            out[name] = value / max(denom, 1e-12)
    if "tokens" in totals:
        out["target_tokens"] = totals["tokens"]
    return out


EvalReport = Callable[[dict[str, float]], dict[str, float]]


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: nn.Module, objective: Objective,
             batches: Iterable[dict[str, torch.Tensor]], max_batches: int,
             report: EvalReport | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Global validation figures and the global sums they come from; every rank must take part (ZeRO-3
    gathers weights per forward). `report` derives the task's own figures (F1, ...) from the sums."""
    model.eval()
    totals: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        _, stats = objective(model, _to_device(batch, accelerator.device))
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v.detach().float()
    model.train()
    global_totals = _global_sum(accelerator, totals)
    result = summarize(global_totals)
    if "loss" in result and "target_tokens" in result:
        # Only a per-token loss has a perplexity; a per-pair preference loss does not.
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    if report is not None:
        result.update(report(global_totals))
    return result, global_totals


def train(
    cfg: RunConfig,
    *,
    accelerator: Accelerator,
    model: nn.Module,
    objective: Objective,
    train_loader: StatefulLoader,
    val_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    flops_per_token: float | None = None,
    precision: str = "fp32",
    resume_from: str | Path | None = None,
    checkpoint_files: dict[str, str] | None = None,
    count_targets: Callable[[dict[str, torch.Tensor]], torch.Tensor] = count_label_tokens,
    eval_report: EvalReport | None = None,
    val_objective: Objective | None = None,
    train_report: EvalReport | None = None,
) -> RunResult:
    """Run `cfg.train.max_steps` optimizer steps of `objective` over `train_loader`.

    `count_targets(batch)` counts what the objective's `loss_sum` sums over (labelled tokens by
    default, pairs for preference losses); each step's loss is divided by the all-ranks total.
    `val_batches` returns a fresh iterable of validation batches each time it is called.
    `flops_per_token` (training FLOPs, 6N + attention) turns throughput into MFU.
    `checkpoint_files` (name -> text) are written into every checkpoint, e.g. the model's own config.
    `val_objective` replaces `objective` for validation batches; `train_report` adds a task's own figures
    from a logged step's global sums, as `eval_report` does for validation.
    """
    tcfg, out_dir = cfg.train, Path(cfg.train.output_dir)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, tcfg.max_steps)
    # Accelerate's DeepSpeed wrapper makes scheduler.step() a no-op and DeepSpeed only steps its own
    # schedule types, so the loop steps the raw LambdaLR itself once per optimizer step.
    raw_scheduler, raw_optimizer = scheduler, optimizer
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # What the portable state (another world size or ZeRO stage) is gathered from and loaded into.
    parts = TrainingParts(model, raw_optimizer, raw_scheduler, zero_stage(accelerator))

    state = TrainState()
    if resume_from is not None:
        state = TrainState(**load_checkpoint(accelerator, resume_from, parts))
        train_loader.load_state_dict(state.loader)

    logger = RunLogger(out_dir, enabled=accelerator.is_main_process, max_steps=tcfg.max_steps,
                       start_step=state.step, trackers=cfg.trackers(), progress=cfg.logging.progress,
                       run_config=cfg.model_dump(mode="json"))
    if resume_from is not None:
        logger.print(f"resumed from {resume_from} at step {state.step}")
    peak_tflops = device_peak_tflops(precision)
    config_yaml = cfg.to_yaml()

    def checkpoint() -> Path:
        state.loader = train_loader.state_dict()
        return save_checkpoint(accelerator, out_dir, state.step, asdict(state), config_yaml,
                               cfg.checkpoint.keep_last, extra_files=checkpoint_files, parts=parts,
                               portable=cfg.checkpoint.portable)

    batches = iter(train_loader)
    last_eval: dict[str, float] = {}
    last_totals: dict[str, float] = {}
    if val_batches is not None and tcfg.eval_at_start and state.step == 0:
        last_eval, last_totals = evaluate(accelerator, model, val_objective or objective, val_batches(), tcfg.eval_batches,
                                          eval_report)
        logger.log(0, last_eval, split="val")
    final_checkpoint = None
    stop_signal = None
    model.train()
    with StopRequest() as stop:
        while state.step < tcfg.max_steps:
            step_start = time.perf_counter()
            micro_batches = [next(batches) for _ in range(tcfg.grad_accum_steps)]
            data_time = time.perf_counter() - step_start
            # One collective before any forward: the step's targets over every micro-batch and rank
            # (the loss normalizer) and its input tokens (throughput).
            counts = torch.stack([torch.stack([count_targets(b) for b in micro_batches]).sum().float(),
                                  torch.tensor(float(sum(b["input_ids"].numel() for b in micro_batches)))])
            counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum")
            # Engines average gradients over ranks and divide the loss by the accumulation steps;
            # undoing both leaves sum(loss_sum) / step targets.
            scale = (accelerator.num_processes * tcfg.grad_accum_steps) / counts[0].clamp(min=1)
            totals: dict[str, torch.Tensor] = {}
            nonfinite = torch.zeros((), dtype=torch.bool, device=accelerator.device)
            grad_norm = None
            for batch in micro_batches:
                batch = _to_device(batch, accelerator.device)
                with accelerator.accumulate(model):
                    loss_sum, stats = objective(model, batch)
                    # Tracked on the device: a host sync per micro-batch would stall the GPU queue.
                    nonfinite |= ~torch.isfinite(loss_sum.detach())
                    for k, v in stats.items():
                        totals[k] = totals.get(k, 0) + v.detach().float()
                    accelerator.backward(loss_sum * scale)
                    if accelerator.sync_gradients:
                        max_norm = cfg.optim.grad_clip or float("inf")
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                    # A non-finite gradient reaches every rank through the gradient reduction, and
                    # every engine then leaves weights and moments alone (FiniteStepAdamW, DeepSpeed's
                    # overflow check, the fp16 loss scaler): the whole step is skipped.
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            if torch.is_tensor(grad_norm):
                nonfinite |= ~torch.isfinite(grad_norm.detach().to(nonfinite.device))
            elif grad_norm is not None and not math.isfinite(grad_norm):
                nonfinite |= True
            skipped = bool(nonfinite)  # the step's one host sync
            lr = raw_scheduler.get_last_lr()[0]
            raw_scheduler.step()
            state.step += 1
            global_tokens = int(counts[1].item())
            state.tokens_seen += global_tokens

            if skipped and precision != "fp16":
                grad_norm = None  # DeepSpeed would report the previous step's norm
                state.nonfinite_in_a_row += 1
                state.nonfinite_total += 1
                logger.print(f"step {state.step}: non-finite loss or gradient, update skipped "
                             f"({state.nonfinite_in_a_row} in a row)")
                if state.nonfinite_in_a_row >= tcfg.max_nonfinite_steps:
                    logger.close()
                    raise NonFiniteLossError(
                        f"stopped at step {state.step}: {state.nonfinite_in_a_row} non-finite steps in a row "
                        f"(train.max_nonfinite_steps={tcfg.max_nonfinite_steps}); the last good checkpoint in "
                        f"{out_dir / 'checkpoints'} is intact")
            else:
                state.nonfinite_in_a_row = 0

            if state.step % cfg.logging.log_every == 0 or state.step == tcfg.max_steps:
                step_time = time.perf_counter() - step_start
                step_totals = _global_sum(accelerator, totals)
                metrics = summarize(step_totals)
                if train_report is not None:
                    metrics.update(train_report(step_totals))
                if skipped:
                    metrics["loss"] = float("nan")  # no update was made from it
                if torch.is_tensor(grad_norm):
                    grad_norm = grad_norm.item()
                tokens_per_s = global_tokens / step_time
                metrics.update(
                    lr=lr,
                    grad_norm=float(grad_norm) if grad_norm is not None else None,
                    tokens_per_s=tokens_per_s,
                    tokens_seen=state.tokens_seen,
                    step_time_s=step_time,
                    data_time_share=data_time / step_time,
                    # Without the data's share: a task whose batches are generated (RL rollouts) trains this fast.
                    compute_tokens_per_s=global_tokens / max(step_time - data_time, 1e-9),
                    nonfinite_total=state.nonfinite_total,
                    world_size=accelerator.num_processes,
                )
                if flops_per_token and peak_tflops:
                    metrics["mfu"] = flops_per_token * tokens_per_s / (peak_tflops * 1e12 * accelerator.num_processes)
                if torch.cuda.is_available():
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                logger.log(state.step, metrics)

            done = state.step == tcfg.max_steps
            if val_batches is not None and (done or (tcfg.eval_every and state.step % tcfg.eval_every == 0)):
                last_eval, last_totals = evaluate(accelerator, model, val_objective or objective, val_batches(),
                                                  tcfg.eval_batches, eval_report)
                logger.log(state.step, last_eval, split="val")

            stop_now = _any_rank_true(accelerator, stop.received is not None)
            every = cfg.checkpoint.every
            if done or stop_now or (every and state.step % every == 0):
                final_checkpoint = checkpoint()
            if stop_now and not done:
                stop_signal = stop.name or "signal on another rank"
                logger.print(f"{stop_signal}: checkpoint saved at step {state.step} ({final_checkpoint}); exiting")
                break

    if (stop_signal is None and final_checkpoint is None and resume_from is not None
            and not (checkpoints_root(out_dir) / f"{STEP_PREFIX}{state.step:08d}" / COMPLETE_MARKER).is_file()):
        # Resumed at max_steps into another folder: nothing to train, so the run's one product is the
        # checkpoint in this process layout (how a checkpoint is re-sharded for another world size).
        final_checkpoint = checkpoint()
    logger.close()
    if stop_signal is None and accelerator.is_main_process:
        (out_dir / "COMPLETED").write_text(f"step {state.step}\n")
    accelerator.wait_for_everyone()
    return RunResult(accelerator=accelerator, model=model, state=state, stopped_by_signal=stop_signal,
                     final_checkpoint=final_checkpoint, last_eval=last_eval, last_eval_totals=last_totals)
