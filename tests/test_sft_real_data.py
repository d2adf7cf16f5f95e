"""LoRA SFT on the real self-instruct seed tasks: the loss on assistant tokens falls.

A LoRA adapter cannot move a random network's frozen embedding and output head, so the base
is first given some knowledge of the language by a short full fine-tune on every token
(`train_on_prompt`) of the first 100 tasks; the LoRA run then starts from that run folder's
newest checkpoint and learns the other 75 tasks' answers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sft_fixtures import REPO_ROOT, tiny_model, write_jsonl


def _run(*args: str) -> None:
    proc = subprocess.run([sys.executable, "launch/sft.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_lora_on_self_instruct_lowers_assistant_loss(shared_data, tmp_path):
    from model_defs.hf import save_hf_model
    from trainer.data.tokenizer import train_tokenizer
    from trainer.export import copy_tokenizer

    seed_tasks = shared_data / "self-instruct-seed-tasks.jsonl"
    rows = [json.loads(line) for line in seed_tasks.read_text().splitlines() if line.strip()]
    warm_rows = write_jsonl(tmp_path / "warm.jsonl", rows[:100])
    tune_rows = write_jsonl(tmp_path / "tune.jsonl", rows[100:])
    text = write_jsonl(tmp_path / "text.jsonl", [
        {"text": f"{r['instruction']}\n{i['input']}\n{i['output']}"} for r in rows for i in r["instances"]])
    tok = train_tokenizer([text], tmp_path / "tokenizer", vocab_size=512, overwrite=True)
    base = tiny_model(len(tok), dim=64)
    save_hf_model(base, base.cfg, tmp_path / "base")
    copy_tokenizer(tmp_path / "tokenizer", tmp_path / "base")

    common = ["data.seq_len=192", "train.micro_batch_size=8",
              "optim.lr=1e-2", "optim.warmup_steps=3", "optim.weight_decay=0", "logging.progress=false",
              "logging.tensorboard=false", "logging.log_every=1"]
    _run(f"model.init_from={tmp_path / 'base'}", *common, "sft.method=full", "sft.train_on_prompt=true",
         f"sft.train_files=[{warm_rows}]",
         "train.max_steps=40", f"train.output_dir={tmp_path / 'warm'}")
    _run(f"model.init_from={tmp_path / 'warm'}", *common, "sft.method=lora", f"sft.train_files=[{tune_rows}]",
         "sft.lora.r=16", "sft.lora.alpha=32", "sft.lora.dropout=0", "train.max_steps=40",
         f"train.output_dir={tmp_path / 'lora'}")
    losses = _losses(tmp_path / "lora")
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < start - 0.3, f"assistant-token loss went from {start:.3f} to {end:.3f}"
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").stat().st_size > 0
