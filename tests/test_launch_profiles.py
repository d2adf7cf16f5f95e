"""Hardware profiles (launch/accelerate/*.yaml) and DeepSpeed configs (ds_configs/*.json) pass
the parsers and launch-time checks of Accelerate and DeepSpeed themselves, so none of them rots."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env
from deepspeed.runtime.config import DeepSpeedConfig

from trainer.engine import fill_ds_auto, load_ds_config

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "launch" / "accelerate"
DS_CONFIGS = REPO / "ds_configs"

# profile -> (DeepSpeed JSON or None, ZeRO stage, processes, machines, mixed precision, use_cpu)
EXPECTED = {
    "cpu_2proc.yaml": ("ds_configs/zero2.json", 2, 2, 1, "no", True),
    "t4_fp16.yaml": (None, None, 1, 1, "fp16", False),
    "1gpu_bf16.yaml": (None, None, 1, 1, "bf16", False),
    "8gpu_zero2_bf16.yaml": ("ds_configs/zero2.json", 2, 8, 1, "no", False),
    "multinode_zero3_bf16.yaml": ("ds_configs/zero3.json", 3, 16, 2, "no", False),
    "multinode_zero3_offload_bf16.yaml": ("ds_configs/zero3_offload.json", 3, 16, 2, "no", False),
}


def launch_check(profile: Path) -> tuple[Any, DeepSpeedPlugin | None]:
    """What `accelerate launch --config_file PROFILE launch/pretrain.py` validates before it starts
    a process, then the DeepSpeed plugin each worker builds from the environment it is given."""
    config = load_config_from_file(str(profile))
    assert isinstance(config, ClusterConfig)
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(config.deepspeed_config) - known)
    if unknown:
        # Accelerate copies nested keys onto its arguments without checking them: a typo is silently dropped.
        raise ValueError(f"{profile.name}: unknown deepspeed_config keys {unknown}")
    # An explicit free port, as train.sbatch passes one: Accelerate refuses a main port in use.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = parser.parse_args(["--config_file", str(profile), "--main_process_port", str(port),
                              "launch/pretrain.py", "--config", "recipe.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if not args.use_deepspeed:
        return args, None
    # As launch_command() does before handing over to the DeepSpeed launcher.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        return args, DeepSpeedPlugin()


def test_every_profile_is_expected():
    assert sorted(p.name for p in PROFILES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_profile_passes_accelerate_launch_checks(name: str, monkeypatch):
    monkeypatch.chdir(REPO)  # profiles name ds_configs/ relative to the repository root, as jobs run
    ds_file, stage, processes, machines, precision, use_cpu = EXPECTED[name]
    profile = PROFILES / name
    args, plugin = launch_check(profile)
    assert (args.num_processes, args.num_machines, args.mixed_precision) == (processes, machines, precision)
    assert bool(args.use_cpu) == use_cpu
    declared = yaml.safe_load(profile.read_text()).get("deepspeed_config", {}).get("deepspeed_config_file")
    assert declared == ds_file
    if ds_file is None:
        assert plugin is None
        return
    assert (REPO / ds_file).is_file()
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.zero3_init_flag == (stage == 3)
    if machines > 1:
        assert args.deepspeed_multinode_launcher == "standard"  # the default, pdsh, is absent on clusters


def test_precision_next_to_a_deepspeed_file_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    profile = yaml.safe_load((PROFILES / "cpu_2proc.yaml").read_text())
    profile["mixed_precision"] = "bf16"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(profile))
    with pytest.raises(ValueError, match="deepspeed_config_file"):
        launch_check(bad)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.update(num_proceses=2), "unknown keys"),
    (lambda p: p["deepspeed_config"].update(deepspeed_config_fle="x.json"), "deepspeed_config_fle"),
])
def test_misspelt_keys_are_rejected(mutate, message, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    profile = yaml.safe_load((PROFILES / "cpu_2proc.yaml").read_text())
    mutate(profile)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(profile))
    with pytest.raises(ValueError, match=message):
        launch_check(bad)


@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_ds_config_parses_in_deepspeed(path: Path, precision: str):
    # "auto" values filled by the trainer's own code, as at run time (world size 1: no process group here).
    filled = fill_ds_auto(load_ds_config(str(path)), micro_batch_size=2, grad_accum_steps=4, world_size=1,
                          grad_clip=1.0, precision=precision, hidden_size=64)
    config = DeepSpeedConfig(filled)
    assert config.zero_optimization_stage == int(path.stem[len("zero")])
    assert config.train_batch_size == 8
    assert config.bfloat16_config.enabled == (precision == "bf16")
    assert config.float16_config.enabled == (precision == "fp16")
    offload = "offload" in path.stem
    assert (config.zero_config.offload_optimizer is not None) == offload
    assert (config.zero_config.offload_param is not None) == (offload and config.zero_optimization_stage == 3)


def test_deepspeed_parser_rejects_a_bad_zero_section():
    with pytest.raises(ValueError, match="bogus_key"):
        DeepSpeedConfig({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                         "gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2, "bogus_key": 1}})
