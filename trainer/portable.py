"""A checkpoint's training state without its sharding: resume on another world size or ZeRO stage.

ZeRO shards (and Accelerate's `optimizer.bin`) are laid out for the exact ranks and stage that wrote
them. Beside them every checkpoint holds `portable/`: each trainable parameter's fp32 value and
its AdamW moments (`exp_avg`, `exp_avg_sq`) whole and named by parameter (safetensors), with the
optimizer's step count and the LR schedule (JSON). Gathering and scattering go through DeepSpeed's
own `safe_get_full_*` / `safe_set_full_*` accessors (the engine owns its partitioning; we only
name tensors), so any stage reads what any other wrote, and plain PyTorch reads them directly.

Frozen parameters (a LoRA run's base) are not stored: they are rebuilt exactly as the run built
them (`model.init_from`, the seed). `topology.json` records who wrote the checkpoint, so a resume
knows whether the sharded state fits or the portable state is needed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

PORTABLE_DIR = "portable"
PORTABLE_TENSORS = "state.safetensors"
PORTABLE_META = "meta.json"
TOPOLOGY = "topology.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class UnsupportedResume(ValueError):
    """A checkpoint this process layout cannot continue from; the message says why and what works."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    zero_stage: int | None  # None: no DeepSpeed
    portable: bool

    def describe(self) -> str:
        engine = "without DeepSpeed" if self.zero_stage is None else f"under ZeRO-{self.zero_stage}"
        return f"{self.world_size} rank{'s' if self.world_size != 1 else ''} {engine}"


@dataclass
class TrainingParts:
    """What a portable state is read from and written into: the prepared model (a DeepSpeed engine
    under ZeRO), the optimizer and LR schedule as built before `prepare`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    zero_stage: int | None


def current_topology(accelerator: Accelerator, zero_stage: int | None, portable: bool) -> Topology:
    return Topology(accelerator.num_processes, zero_stage, portable)


def write_topology(folder: Path, topology: Topology) -> None:
    (folder / TOPOLOGY).write_text(json.dumps({"world_size": topology.world_size,
                                               "zero_stage": topology.zero_stage,
                                               "portable": topology.portable}, indent=1))


def saved_topology(checkpoint: Path) -> Topology:
    """Who wrote `checkpoint`; for one written before topology.json, what its files show."""
    path = checkpoint / TOPOLOGY
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            stage = raw["zero_stage"]
            return Topology(int(raw["world_size"]), None if stage is None else int(stage), bool(raw["portable"]))
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: unreadable (not the JSON this trainer writes)") from None
    ranks = len(list(checkpoint.glob("random_states_*.pkl")))
    deepspeed = (checkpoint / "pytorch_model").is_dir()
    # The stage is not recorded in such checkpoints; -1 stands for "some ZeRO stage".
    return Topology(max(ranks, 1), -1 if deepspeed else None, (checkpoint / PORTABLE_DIR).is_dir())


def needs_portable(saved: Topology, now: Topology) -> bool:
    """Whether the sharded state cannot be loaded as written."""
    if saved.world_size != now.world_size:
        return True
    if saved.zero_stage == -1:  # an old DeepSpeed checkpoint: same world size, so let DeepSpeed try
        return now.zero_stage is None
    return saved.zero_stage != now.zero_stage


def check_resumable(checkpoint: Path, saved: Topology, now: Topology) -> None:
    if needs_portable(saved, now) and not saved.portable:
        raise UnsupportedResume(
            f"--resume {checkpoint}: written by {saved.describe()}, which this run ({now.describe()}) cannot load: "
            "the checkpoint has no portable state (written with checkpoint.portable=false or by an older version). "
            "Resume with the layout that wrote it, or export it (launch/export_hf.py) and start a new run from "
            "model.init_from")


# ----------------------------------------------------------------------------- gather / scatter


def _module(parts: TrainingParts) -> nn.Module:
    model = parts.model
    model = getattr(model, "module", model)  # DeepSpeed engine, DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def _trainable(parts: TrainingParts) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in _module(parts).named_parameters() if p.requires_grad]


def _zero_optimizer(parts: TrainingParts):
    return parts.model.optimizer  # the DeepSpeed engine's ZeRO optimizer


def _fresh_moment_state(param: torch.Tensor, group: dict) -> dict[str, torch.Tensor]:
    # As torch.optim.AdamW initialises a parameter's state on its first step.
    on_device = group.get("fused") or group.get("capturable")
    step = torch.zeros((), dtype=torch.float32, device=param.device if on_device else None)
    return {"step": step, "exp_avg": torch.zeros_like(param), "exp_avg_sq": torch.zeros_like(param)}


def _zero_flats(parts: TrainingParts) -> list[tuple[torch.Tensor, int]]:
    """ZeRO's flat fp32 partitions on this rank and the optimizer group of each. ZeRO-3 puts a
    partition into its group's `params` only while stepping it, so the groups cannot say."""
    zero_opt = _zero_optimizer(parts)
    if parts.zero_stage == 3:
        return [(flat, zero_opt.sub_group_to_group_id[i]) for i, flat in enumerate(zero_opt.fp32_partitioned_groups_flat)]
    return [(flat, i) for i, flat in enumerate(zero_opt.single_partition_of_fp32_groups)]


def _ensure_zero_state(parts: TrainingParts) -> None:
    """ZeRO creates the AdamW state of its flat fp32 partitions on the first step; before one (a resume,
    or a run whose every step was skipped) create it as AdamW would, so the accessors have a target."""
    zero_opt, base = _zero_optimizer(parts), parts.optimizer
    for flat, group in _zero_flats(parts):
        if not base.state.get(flat):
            base.state[flat] = _fresh_moment_state(flat, base.param_groups[group])
    if parts.zero_stage in (1, 2):
        # ZeRO-1/2 links each parameter to its moments once, right after the first group's first
        # step, when the other groups have no state yet: with two groups (decayed and not) the second
        # is linked to nothing. Linking again now that every group has its state fixes that.
        zero_opt._hp_optimizer_states_linked = False
        zero_opt._lazy_init_hp_params_optimizer_state()


def _tensors_by_group(parts: TrainingParts) -> list[list[torch.Tensor]]:
    """What the optimizer holds state for, by group: ZeRO's flat partitions, or the parameters."""
    if parts.zero_stage in (1, 2, 3):
        groups: list[list[torch.Tensor]] = [[] for _ in parts.optimizer.param_groups]
        for flat, group in _zero_flats(parts):
            groups[group].append(flat)
        return groups
    return [list(group["params"]) for group in parts.optimizer.param_groups]


def _steps(parts: TrainingParts) -> list[float]:
    """The AdamW step count of each param group (every tensor of a group steps together)."""
    out = []
    for tensors in _tensors_by_group(parts):
        states = [parts.optimizer.state.get(t) for t in tensors]
        steps = [float(s["step"]) for s in states if s and "step" in s]
        out.append(steps[0] if steps else 0.0)
    return out


def gather_state(parts: TrainingParts, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every trainable parameter and its moments, whole, on the CPU, and the scalars beside them.
    Every rank must call this (under ZeRO each tensor is an all-reduce); only one that will write
    them needs to `keep` them."""
    sharded = parts.zero_stage in (1, 2, 3)
    if sharded:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
        )

        _ensure_zero_state(parts)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in _trainable(parts):
        if sharded:
            values = {"param": safe_get_full_fp32_param(param),
                      **{key: safe_get_full_optimizer_state(param, key) for key in MOMENTS}}
        else:
            state = parts.optimizer.state.get(param) or _fresh_moment_state(param, {})
            values = {"param": param.detach(), **{key: state[key] for key in MOMENTS}}
        if keep:
            for key, value in values.items():
                tensors[f"{key}/{name}"] = value.detach().float().cpu().contiguous()
    meta = {
        "version": 1,
        "steps": _steps(parts),
        "scheduler": parts.scheduler.state_dict(),
        "param_groups": [{k: v for k, v in g.items() if k != "params" and isinstance(v, (int, float, bool, str))}
                         for g in parts.optimizer.param_groups],
    }
    return tensors, meta


def write_portable(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    target = folder / PORTABLE_DIR
    target.mkdir(exist_ok=True)
    # Tied weights share storage; safetensors refuses shared tensors.
    save_file({k: v.clone() for k, v in tensors.items()}, str(target / PORTABLE_TENSORS))
    (target / PORTABLE_META).write_text(json.dumps(meta, indent=1))


def read_portable(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = checkpoint / PORTABLE_DIR
    try:
        tensors = load_file(str(folder / PORTABLE_TENSORS))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{folder / PORTABLE_TENSORS}: unreadable: {err}") from None
    try:
        meta = json.loads((folder / PORTABLE_META).read_text())
        meta["steps"], meta["scheduler"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{folder / PORTABLE_META}: unreadable (not the JSON this trainer writes)") from None
    return tensors, meta


def _check_names(checkpoint: Path, tensors: dict[str, torch.Tensor], trainable: list[tuple[str, nn.Parameter]]):
    saved = {k.split("/", 1)[1]: v.shape for k, v in tensors.items() if k.startswith("param/")}
    mine = {name: p.ds_shape if hasattr(p, "ds_shape") else p.shape for name, p in trainable}
    where = checkpoint / PORTABLE_DIR / PORTABLE_TENSORS
    for name in sorted(saved.keys() ^ mine.keys()):
        side = "the checkpoint" if name in saved else "this model"
        raise ValueError(f"{where}: trainable parameter {name} is only in {side}: another model or tuning method")
    for name, shape in mine.items():
        if tuple(saved[name]) != tuple(shape):
            raise ValueError(f"{where}: {name} has shape {tuple(saved[name])} in the checkpoint but {tuple(shape)} "
                             "in this model: another model shape")


def load_portable(checkpoint: Path, parts: TrainingParts) -> None:
    """Weights, moments, step counts and schedule from `checkpoint`'s portable state into `parts`
    (every rank calls this)."""
    tensors, meta = read_portable(checkpoint)
    trainable = _trainable(parts)
    _check_names(checkpoint, tensors, trainable)
    groups = parts.optimizer.param_groups
    if len(meta["steps"]) != len(groups):
        raise ValueError(f"{checkpoint / PORTABLE_DIR / PORTABLE_META}: {len(meta['steps'])} optimizer groups, "
                         f"this run has {len(groups)}")
    sharded = parts.zero_stage in (1, 2, 3)
    with torch.no_grad():
        if sharded:
            _ensure_zero_state(parts)
            _load_sharded(parts, trainable, tensors, meta["steps"])
        else:
            for name, param in trainable:
                param.copy_(tensors[f"param/{name}"].to(param.device, param.dtype))
            # load_state_dict puts each value where the optimizer wants it (device, step dtype).
            state_dict = parts.optimizer.state_dict()
            index = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
            group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
            state_dict["state"] = {
                index[id(param)]: {"step": torch.tensor(meta["steps"][group_of[id(param)]], dtype=torch.float32),
                                   **{key: tensors[f"{key}/{name}"] for key in MOMENTS}}
                for name, param in trainable}
            parts.optimizer.load_state_dict(state_dict)
    parts.scheduler.load_state_dict(meta["scheduler"])
    # The optimizer steps next with the rate the schedule reached, as the saving run would have.
    # (optimizer.load_state_dict replaced the group dicts: read them afresh.)
    for group, lr in zip(parts.optimizer.param_groups, parts.scheduler.get_last_lr()):
        group["lr"] = lr


def _load_sharded(parts: TrainingParts, trainable: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor],
                  steps: list[float]) -> None:
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for name, param in trainable:
        value = tensors[f"param/{name}"]
        safe_set_full_fp32_param(param, value.to(param.device))
        for key in MOMENTS:
            safe_set_full_optimizer_state(param, tensors[f"{key}/{name}"].to(param.device), key)
        # The model's own (possibly 16-bit) copy: the forward reads it, not the fp32 master.
        if parts.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                param.copy_(value.to(param.device, param.dtype))
        else:
            param.copy_(value.to(param.device, param.dtype))
    base = parts.optimizer
    for flats, step in zip(_tensors_by_group(parts), steps):
        for flat in flats:
            state = base.state.get(flat)
            if state and "step" in state:
                if torch.is_tensor(state["step"]):
                    state["step"].fill_(step)
                else:
                    state["step"] = step


def resume_note(saved: Topology, now: Topology) -> str:
    return (f"resuming a checkpoint written by {saved.describe()} on {now.describe()}: weights, AdamW moments, "
            "schedule and data position carried over through its portable state; per-rank random states are not "
            "(sampling from them restarts from the seed)")
