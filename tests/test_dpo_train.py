"""DPO through the real CLI: 2-rank ZeRO-3 on CPU, exact resume with a cached reference, and real preference data."""
from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sft_fixtures import demo_rows, make_tokenizer, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")
MODEL = {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("dpo-demo")
    make_tokenizer(work, vocab_size=400)
    write_jsonl(work / "train.jsonl", demo_rows("dpo")[:64])
    write_jsonl(work / "val.jsonl", demo_rows("dpo_eval")[:16])
    return work


def _config(path: Path, **sections) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(sections))
    return path


def _demo_config(work: Path, out: Path, **dpo) -> Path:
    return _config(
        work / f"{out.name}.yaml", model=MODEL,
        data={"tokenizer": str(work / "tokenizer"), "seq_len": 64},
        train={"output_dir": str(out), "max_steps": 3, "micro_batch_size": 4, "eval_batches": 4,
               "eval_at_start": True},
        optim={"lr": 2e-2, "warmup_steps": 0},
        logging={"tensorboard": False, "progress": False},
        dpo={"train_files": [str(work / "train.jsonl")], "val_files": [str(work / "val.jsonl")],
             "max_prompt_len": 32, **dpo})


def _run(args: list[str], timeout: int = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _split(rows: list[dict], split: str) -> dict[int, dict]:
    return {r["step"]: r for r in rows if r["split"] == split}


def test_zero3_two_ranks_precompute_and_adapter_agree(demo):
    runs = {}
    for strategy in ("precompute", "adapter"):
        out = demo / f"z3-{strategy}"
        log = _run([str(ACCELERATE), "launch", "--num_processes", "2", "--use_deepspeed", "--zero_stage", "3",
                    "launch/dpo.py", "--config", str(_demo_config(demo, out, method="lora", reference=strategy)),
                    "train.deepspeed=zero3"])
        if strategy == "precompute":
            assert "reference log-probs for 64 train pairs: computed" in log
        runs[strategy] = _metrics(out)
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    for strategy, rows in runs.items():
        train = _split(rows, "train")
        assert sorted(train) == [1, 2, 3] and all(r["world_size"] == 2 for r in train.values()), strategy
        assert train[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts as its reference
    # Same pairs, same initial policy, the same reference by two routes: the same run.
    pre, ada = (_split(runs[s], "train") for s in ("precompute", "adapter"))
    for step in (2, 3):
        for key in ("loss", "chosen_reward", "rejected_reward", "reward_accuracy"):
            assert pre[step][key] == pytest.approx(ada[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert pre[3]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # the reference mattered by step 3
    val_pre, val_ada = _split(runs["precompute"], "val"), _split(runs["adapter"], "val")
    assert val_pre[0]["reward_accuracy"] == 0.0 and val_pre[3]["loss"] == pytest.approx(val_ada[3]["loss"], rel=1e-4)


def test_full_tuning_resumes_exactly_and_reuses_the_reference_cache(demo):
    out = demo / "full-resume"
    config = _demo_config(demo, out, method="full", reference="precompute", loss="ipo")
    overrides = ["train.max_steps=4", "checkpoint.every=2", "train.eval_at_start=false"]
    first = _run([sys.executable, "launch/dpo.py", "--config", str(config), *overrides])
    assert "64 train pairs: computed" in first
    straight = _split(_metrics(out), "train")
    assert (out / "model" / "config.json").is_file()  # full tuning exports the tuned model
    # Forget the last checkpoint and everything after step 2, then continue from step 2.
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "COMPLETED").unlink()
    (out / "metrics.jsonl").write_text("")
    second = _run([sys.executable, "launch/dpo.py", "--config", str(config), *overrides, "--resume", "auto"])
    assert "resumed from" in second and "cache hit" in second and ": computed (" not in second
    resumed = _split(_metrics(out), "train")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6)
        assert resumed[step]["reward_margin"] == pytest.approx(straight[step]["reward_margin"], rel=1e-5, abs=1e-7)


def test_bad_config_is_reported_with_key_and_file(demo):
    from trainer.config import ConfigError, load_config
    from trainer.dpo.config import DPOConfig

    config = _demo_config(demo, demo / "bad")
    with pytest.raises(ConfigError) as err:
        load_config(config, ["dpo.bta=0.2", "dpo.label_smoothing=0.7"], schema=DPOConfig)
    assert "command line: dpo: unknown key 'bta' (did you mean 'beta'?)" in str(err.value)
    assert "command line: dpo.label_smoothing:" in str(err.value)
    with pytest.raises(ConfigError, match="simpo' is reference-free"):
        load_config(config, ["dpo.loss=simpo", "dpo.reference=adapter"], schema=DPOConfig)
    with pytest.raises(ConfigError, match="'adapter' needs method lora or qlora"):
        load_config(config, ["dpo.method=full", "dpo.reference=adapter"], schema=DPOConfig)
    cfg = load_config(config, ["dpo.method=full"], schema=DPOConfig)
    assert cfg.dpo.resolved_reference() == "precompute"
    assert load_config(config, ["dpo.loss=orpo"], schema=DPOConfig).dpo.resolved_reference() == "none"


def test_shipped_dpo_recipes_validate():
    from trainer.config import load_config
    from trainer.dpo.config import DPOConfig

    recipes = sorted((REPO_ROOT / "configs").glob("dpo_*.yaml")) + [REPO_ROOT / "configs" / "demo_dpo_cpu.yaml"]
    assert len(recipes) >= 5
    strategies = {load_config(path, schema=DPOConfig).dpo.resolved_reference() for path in recipes}
    assert strategies >= {"adapter", "precompute", "offload", "none"}


def test_real_preferences_raise_held_out_reward_accuracy(shared_data, tmp_path):
    """hh-rlhf (harmless): a short SFT on chosen responses, then DPO; held-out reward accuracy must rise."""
    from trainer.data.tokenizer import train_tokenizer
    from trainer.dpo.data import parse_row

    rows = [json.loads(line) for line in gzip.open(shared_data / "hh-rlhf-harmless-2000.jsonl.gz", "rt")]
    train_rows, held_rows = rows[:320], rows[1900:1996]
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["chosen"]} for r in rows[:1000]])
    train_tokenizer([tmp_path / "text.jsonl"], tmp_path / "tokenizer", vocab_size=512, overwrite=True)
    sft_rows = []
    for r in train_rows:
        _, pair = parse_row(r)
        if pair.chosen.strip():
            sft_rows.append({"messages": pair.prompt + [{"role": "assistant", "content": pair.chosen}]})
    write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    write_jsonl(tmp_path / "pairs.jsonl", train_rows)
    write_jsonl(tmp_path / "held.jsonl", held_rows)
    model = {**MODEL, "dim": 64, "vocab_size": 512}
    common = {"logging": {"tensorboard": False, "progress": False, "log_every": 10}}
    sft = _config(tmp_path / "sft.yaml", model=model, data={"tokenizer": str(tmp_path / "tokenizer"), "seq_len": 128},
                  train={"output_dir": str(tmp_path / "sft"), "max_steps": 30, "micro_batch_size": 8},
                  optim={"lr": 3e-3, "warmup_steps": 3}, sft={"train_files": [str(tmp_path / "sft.jsonl")],
                                                              "method": "full"}, **common)
    _run([sys.executable, "launch/sft.py", "--config", str(sft)])
    dpo = _config(tmp_path / "dpo.yaml", model={"init_from": str(tmp_path / "sft" / "model")},
                  data={"seq_len": 128},
                  train={"output_dir": str(tmp_path / "dpo"), "max_steps": 30, "micro_batch_size": 8,
                         "eval_at_start": True, "eval_batches": 12},
                  optim={"lr": 3e-4, "warmup_steps": 0, "weight_decay": 0.0},
                  dpo={"train_files": [str(tmp_path / "pairs.jsonl")], "val_files": [str(tmp_path / "held.jsonl")],
                       "max_prompt_len": 64, "method": "full", "reference": "precompute", "beta": 0.1}, **common)
    log = _run([sys.executable, "launch/dpo.py", "--config", str(dpo)])
    assert "shapes transcript:" in log and "empty dropped" in log  # hh-rlhf has pairs to refuse; they are counted
    val = _split(_metrics(tmp_path / "dpo"), "val")
    start, end = val[0], val[30]
    # At step 0 the policy is its reference: every margin is exactly 0, so no pair counts as won.
    assert start["reward_accuracy"] == 0.0 and start["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert end["reward_accuracy"] > start["reward_accuracy"] and end["reward_accuracy"] > 0.5
    assert end["reward_margin"] > 0
