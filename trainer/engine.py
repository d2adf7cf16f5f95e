"""Accelerate + DeepSpeed setup: precision choice, ZeRO config selection and its "auto" values."""
from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

from trainer.config import ConfigError, RunConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
ACCELERATE_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}


def resolve_precision(requested: str) -> str:
    """`auto` -> bf16 on Ampere+ GPUs, fp16 on older GPUs (T4, V100), fp32 on CPU."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return requested


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """A ds_configs/ name (zero2, zero3_offload, ...) or a path to a DeepSpeed JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"train.deepspeed: '{name_or_path}' is neither a file nor one of: {known}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None


def fill_ds_auto(
    ds: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    hidden_size: int,
) -> dict[str, Any]:
    """Replace every "auto" with the value our own config implies (explicit values are kept)."""
    ds = copy.deepcopy(ds)
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
    }
    for key, value in values.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    for dtype in ("bf16", "fp16"):
        section = ds.setdefault(dtype, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = precision == dtype
    zero = ds.get("zero_optimization", {})
    # DeepSpeed's own recommendations, scaled by the hidden size (as transformers' integration does).
    zero_auto = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in zero_auto.items():
        if zero.get(key) == "auto":
            zero[key] = value
    leftover = [k for k, v in _flatten(ds).items() if v == "auto"]
    if leftover:
        raise ConfigError(f"DeepSpeed config: no value known for 'auto' at {', '.join(leftover)}")
    return ds


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world_of_one() -> None:
    """`python launch/pretrain.py ... train.deepspeed=zero2` with no launcher: without a launcher's
    env DeepSpeed falls back to discovering the world through MPI (and dies without mpi4py)."""
    if any(key in os.environ for key in _LAUNCHER_ENV):
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))


def build_accelerator(cfg: RunConfig, hidden_size: int, precision: str) -> Accelerator:
    """One Accelerator for every setting: single process, DDP, or DeepSpeed ZeRO from our config
    (`train.deepspeed`) or from the `accelerate launch` config file."""
    if cfg.train.deepspeed:
        _world_of_one()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    handlers = []
    if not torch.cuda.is_available() and world_size > 1:
        # Without gloo each CPU process would silently train alone with world size 1.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    fill = dict(
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        world_size=world_size,
        grad_clip=cfg.optim.grad_clip,
        precision=precision,
        hidden_size=hidden_size,
    )
    plugin = None
    if cfg.train.deepspeed:
        plugin = DeepSpeedPlugin(hf_ds_config=fill_ds_auto(load_ds_config(cfg.train.deepspeed), **fill))
    launched_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    # Without cpu=True, Accelerate sets up no process group for CPU ranks outside DeepSpeed: each
    # process would train alone while reporting the launcher's world size.
    cpu_ranks = not torch.cuda.is_available() and world_size > 1 and plugin is None and not launched_deepspeed
    accelerator = Accelerator(
        cpu=cpu_ranks,
        mixed_precision=ACCELERATE_PRECISION[precision],
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,
    )
    launched_plugin = accelerator.state.deepspeed_plugin
    if plugin is None and launched_plugin is not None:
        # Chosen by `accelerate launch --config_file ...`: its "auto" values come from us too.
        fill["world_size"] = accelerator.num_processes
        filled = fill_ds_auto(launched_plugin.deepspeed_config, **fill)
        launched_plugin.deepspeed_config.clear()
        launched_plugin.deepspeed_config.update(filled)
    if world_size > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(f"WORLD_SIZE={world_size} but no process group was set up; each rank would train alone")
    if accelerator.num_processes != world_size and plugin is not None:
        raise RuntimeError(f"WORLD_SIZE={world_size} but the process group has {accelerator.num_processes} ranks")
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage of the DeepSpeed config in force (ours or the launcher's); None without DeepSpeed."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))
