"""Reward models: the Bradley-Terry loss against TRL's RewardTrainer, and training through the real CLI
(full and LoRA, exported folders transformers loads, exact resume, bad input, real preference data)."""
from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.pretrain_run import env
from tests.sft_fixtures import demo_rows, make_tokenizer, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400}


def _run(args: list[str], timeout: int = 300, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO_ROOT, env={**env(), "TOKENIZERS_PARALLELISM": "false"},
                          capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _metrics(out: Path, split: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == split}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("reward-demo")
    make_tokenizer(work, vocab_size=400)
    write_jsonl(work / "train.jsonl", demo_rows("dpo")[:64])
    write_jsonl(work / "val.jsonl", demo_rows("dpo_eval")[:16])
    return work


def _config(work: Path, out: Path, model=None, **reward) -> Path:
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(dict(
        model=model or MODEL, data={"tokenizer": str(work / "tokenizer"), "seq_len": 64},
        train={"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "eval_batches": 4,
               "eval_at_start": True},
        optim={"lr": 1e-2, "warmup_steps": 0}, logging={"tensorboard": False, "progress": False},
        reward={"train_files": [str(work / "train.jsonl")], "val_files": [str(work / "val.jsonl")],
                "max_prompt_len": 32, **reward})))
    return path


@pytest.mark.parametrize("margin, center", [(False, 0.0), (True, 0.01)])
def test_bradley_terry_loss_equals_trl_reward_trainer(tmp_path, margin, center):
    """TRL's own compute_loss on transformers' LlamaForSequenceClassification holding our weights."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardTrainer

    from model_defs import ModelConfig, SequenceClassifier
    from model_defs.hf_classifier import save_hf_classifier
    from trainer.dpo.data import TokenPair
    from trainer.reward.batches import collate_scored_pairs
    from trainer.reward.objective import RewardObjective

    torch.manual_seed(0)
    ours = SequenceClassifier(ModelConfig.from_preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                      vocab_size=96), num_labels=1)
    save_hf_classifier(ours, tmp_path / "hf", pad_token_id=0)
    theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    rng = np.random.default_rng(0)
    pairs = [TokenPair(rng.integers(1, 96, p), rng.integers(1, 96, c), rng.integers(1, 96, r),
                       float(rng.normal()) if margin else 0.0)
             for p, c, r in ((5, 3, 9), (2, 11, 4), (7, 6, 6), (3, 1, 12))]
    batch = collate_scored_pairs(pairs, pad_id=0, pad_to_multiple_of=1)
    loss_sum, stats = RewardObjective(center_coefficient=center)(ours.eval(), batch)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if margin:
        inputs["margin"] = batch["margin"]
    trl_self = types.SimpleNamespace(
        model=theirs, args=types.SimpleNamespace(center_rewards_coefficient=center or None),
        accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
        _metrics={"train": {}, "eval": {k: [] for k in ("min_reward", "mean_reward", "max_reward", "accuracy",
                                                         "margin", "num_tokens")}},
        _total_train_tokens=0, _tp_size=1)
    with torch.no_grad():
        trl_loss = RewardTrainer.compute_loss(trl_self, theirs, dict(inputs))
    assert stats["count"].item() == 4
    assert (loss_sum / stats["count"]).item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert stats["accuracy_sum"].item() / 4 == pytest.approx(trl_self._metrics["eval"]["accuracy"][-1])


def test_full_reward_model_trains_exports_and_resumes_exactly(demo):
    from transformers import AutoModelForSequenceClassification

    from model_defs.hf_classifier import load_hf_classifier

    out = demo / "full"
    config = _config(demo, out, method="full")
    overrides = ["train.max_steps=4", "checkpoint.every=2"]
    log = _run([sys.executable, "launch/reward.py", "--config", str(config), *overrides]).stdout
    assert "held-out pairs, step 0 -> step 4: accuracy" in log
    straight, val = _metrics(out, "train"), _metrics(out, "val")
    assert sorted(val) == [0, 4] and {"accuracy", "margin", "chosen_score", "rejected_score"} <= set(val[4])
    assert val[4]["loss"] < val[0]["loss"]
    # model/ is a LlamaForSequenceClassification: transformers scores what we score.
    theirs = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    ours, hf_config = load_hf_classifier(out / "model")
    assert hf_config["num_labels"] == 1 and hf_config["pad_token_id"] is not None
    ids = torch.tensor([[5, 17, 90, 33, 2, 41]])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours.eval()(ids), atol=1e-5)
    # Forget the last checkpoint and what came after step 2, then continue: the same steps 3 and 4.
    shutil.rmtree(out / "checkpoints" / "step_00000004")
    (out / "COMPLETED").unlink()
    (out / "metrics.jsonl").write_text("")
    proc = _run([sys.executable, "launch/reward.py", "--config", str(config), *overrides, "--resume", "auto",
                 "train.eval_at_start=false"])
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = _metrics(out, "train")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(straight[step]["loss"], rel=1e-6)
        assert resumed[step]["margin"] == pytest.approx(straight[step]["margin"], rel=1e-5, abs=1e-7)


def _lora_run_matches_its_adapter(demo, name: str, launcher: list[str], *extra: str) -> None:
    """LoRA on an HF Llama folder's trunk, the head trained in full: model/ (merged) scores exactly what
    the base with the saved adapter scores."""
    from peft import PeftModel

    from model_defs import SequenceClassifier
    from model_defs.hf import load_hf_model, save_hf_model
    from model_defs.hf_classifier import load_hf_classifier
    from tests.sft_fixtures import tiny_model

    base = demo / "base-lm"
    if not base.is_dir():
        lm = tiny_model(400, seed=3)
        save_hf_model(lm, lm.cfg, base)
        shutil.copytree(demo / "tokenizer", base, dirs_exist_ok=True)
    out = demo / name
    config = _config(demo, out, model={"init_from": str(base)}, method="lora", lora={"r": 4, "alpha": 8})
    _run([*launcher, "launch/reward.py", "--config", str(config), *extra])
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["score"]
    merged, _ = load_hf_classifier(out / "model")
    with_adapter = PeftModel.from_pretrained(SequenceClassifier.from_causal_lm(load_hf_model(base), 1),
                                             out / "adapter")
    ids = torch.tensor([[5, 17, 90, 33, 2, 41], [8, 8, 1, 399, 250, 3]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids), with_adapter.eval()(ids), atol=1e-5)
        assert not torch.allclose(merged(ids), SequenceClassifier.from_causal_lm(load_hf_model(base), 1)(ids))
    assert sorted(_metrics(out, "val")) == [0, 4]
    return out


def test_lora_reward_model_on_a_causal_lm_saves_adapter_and_merged_model(demo):
    _lora_run_matches_its_adapter(demo, "lora", [sys.executable])


@pytest.mark.slow
def test_lora_reward_model_under_two_rank_zero3(demo):
    """ZeRO-3 partitions the adapter and the head: both are gathered before the merged model is written."""
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed",
                "--zero_stage", "3"]
    out = _lora_run_matches_its_adapter(demo, "lora-z3", launcher, "train.deepspeed=zero3")
    assert {r["world_size"] for r in _metrics(out, "train").values()} == {2}


def test_bad_reward_input_is_one_line(demo, tmp_path):
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Hello."}])
    proc = _run([sys.executable, "launch/reward.py", "--config", str(_config(demo, tmp_path / "bad", method="full")),
                 f"reward.train_files=[{same}]"], ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{same}:1:" in proc.stderr and "identical" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()
    proc = _run([sys.executable, "launch/reward.py", "--config", str(_config(demo, tmp_path / "bad2")),
                 "reward.method=lora"], ok=False)
    assert proc.returncode == 2 and "reward.method=lora needs model.init_from" in proc.stderr


def test_reward_model_where_a_causal_lm_is_expected_is_one_line(demo):
    out = demo / "full"
    if not (out / "model").is_dir():
        pytest.skip("needs the full-tuning run above")
    config = demo / "sft-on-reward.yaml"
    write_jsonl(demo / "sft.jsonl", demo_rows("sft")[:16])
    config.write_text(yaml.safe_dump(dict(
        model={"init_from": str(out / "model")}, data={"seq_len": 64},
        train={"output_dir": str(demo / "sft-out"), "max_steps": 1, "micro_batch_size": 2},
        logging={"tensorboard": False, "progress": False}, sft={"train_files": [str(demo / "sft.jsonl")]})))
    proc = _run([sys.executable, "launch/sft.py", "--config", str(config)], ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "LlamaForSequenceClassification" in proc.stderr


def test_real_preferences_train_a_reward_model(shared_data, tmp_path):
    """hh-rlhf (harmless): held-out pair accuracy rises above its step-0 value and above 0.55."""
    from trainer.data.tokenizer import train_tokenizer

    rows = [json.loads(line) for line in gzip.open(shared_data / "hh-rlhf-harmless-2000.jsonl.gz", "rt")]
    write_jsonl(tmp_path / "text.jsonl", [{"text": r["chosen"]} for r in rows[:1000]])
    train_tokenizer([tmp_path / "text.jsonl"], tmp_path / "tokenizer", vocab_size=512, overwrite=True)
    write_jsonl(tmp_path / "pairs.jsonl", rows[:1200])
    write_jsonl(tmp_path / "held.jsonl", rows[1800:2000])
    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump(dict(
        model={**MODEL, "dim": 64, "vocab_size": 512}, data={"tokenizer": str(tmp_path / "tokenizer"), "seq_len": 128},
        train={"output_dir": str(tmp_path / "out"), "max_steps": 60, "micro_batch_size": 16, "eval_at_start": True,
               "eval_batches": 13},
        optim={"lr": 1e-3, "warmup_steps": 5}, logging={"tensorboard": False, "progress": False, "log_every": 20},
        reward={"train_files": [str(tmp_path / "pairs.jsonl")], "val_files": [str(tmp_path / "held.jsonl")],
                "max_prompt_len": 64, "method": "full", "on_identical": "drop", "skip_bad_rows": True})))
    _run([sys.executable, "launch/reward.py", "--config", str(config)], timeout=900)
    val = _metrics(tmp_path / "out", "val")
    start, end = val[0], val[60]
    assert end["accuracy"] > start["accuracy"] and end["accuracy"] > 0.55, (start, end)


def test_shipped_reward_and_classify_recipes_validate():
    from trainer.classify.config import ClassifyConfig
    from trainer.config import load_config
    from trainer.reward.config import RewardConfig

    for path in [*(REPO_ROOT / "configs").glob("reward_*.yaml"), REPO_ROOT / "configs" / "demo_reward_cpu.yaml"]:
        assert load_config(path, schema=RewardConfig).reward.method in ("full", "lora", "qlora"), path
    recipes = list((REPO_ROOT / "configs").glob("classify_*.yaml"))
    assert recipes and all(load_config(p, schema=ClassifyConfig).classify.train_files for p in recipes)
