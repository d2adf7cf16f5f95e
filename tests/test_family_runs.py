"""Qwen2 and Mistral through the real CLIs: LoRA SFT from a Hub id (offline cache) whose adapter_hf loads
with AutoPeftModelForCausalLM, full SFT with packing past Mistral's window exported for transformers, DPO;
and a normal run prints none of the libraries' notices."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_defs.hf import save_hf_model
from tests.sft_fixtures import REPO_ROOT, demo_rows, make_tokenizer, tiny_model, write_jsonl
from tests.test_export_generation import hub_cache
from trainer.export import copy_tokenizer, load_model, load_with_adapter

HUB_ID = "acme/tiny-qwen2"
NOISE = ("Setting accelerator", "Generating train split", "FutureWarning", "UserWarning", "Map:")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("families")
    make_tokenizer(root)
    for family, flags in {"qwen2": dict(qkv_bias=True), "mistral": dict(sliding_window=16)}.items():
        base = tiny_model(512, seed=0, dim=64, family=family, **flags)
        save_hf_model(base, base.cfg, root / family)
        copy_tokenizer(root / "tokenizer", root / family)
    (root / "hub").mkdir()
    hub_cache(root / "hub", HUB_ID, root / "qwen2")
    write_jsonl(root / "sft.jsonl", demo_rows("sft")[:100])
    write_jsonl(root / "dpo.jsonl", demo_rows("dpo")[:32])
    return root


def _run(work: Path, entry: str, out: str, *args: str) -> str:
    cmd = [sys.executable, f"launch/{entry}.py", f"train.output_dir={work / out}", "data.seq_len=128",
           "train.micro_batch_size=4", "train.max_steps=3", "optim.warmup_steps=0", "optim.lr=1e-2",
           "logging.progress=false", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(work / "hub"))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_qwen2_lora_from_a_hub_id_loads_with_auto_peft_offline(work, monkeypatch):
    from huggingface_hub import constants
    from peft import AutoPeftModelForCausalLM

    log = _run(work, "sft", "qwen-lora", f"model.init_from={HUB_ID}", f"sft.train_files=[{work / 'sft.jsonl'}]")
    assert not [n for n in NOISE if n in log], log
    adapter_hf = work / "qwen-lora" / "adapter_hf"
    assert json.loads((adapter_hf / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    assert json.loads((work / "qwen-lora" / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == HUB_ID

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(work / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = AutoPeftModelForCausalLM.from_pretrained(str(adapter_hf)).eval()
    assert type(theirs.base_model.model).__name__ == "Qwen2ForCausalLM"
    ours = load_with_adapter(work / "qwen-lora" / "adapter", merge=False).eval()
    base = load_model(HUB_ID).eval()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        assert (expected - base(ids)).abs().max() > 1e-4  # the adapter was trained


@pytest.mark.slow
def test_mistral_full_sft_packed_past_the_window_exports_and_dpo_trains(work):
    from transformers import AutoModelForCausalLM, GenerationConfig

    _run(work, "sft", "mistral-full", f"model.init_from={work / 'mistral'}", "sft.method=full",
         "sft.packing=true", f"sft.train_files=[{work / 'sft.jsonl'}]")
    exported = work / "mistral-full" / "model"
    config = json.loads((exported / "config.json").read_text())
    assert (config["model_type"], config["sliding_window"]) == ("mistral", 16)
    assert None not in (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"])
    eot = json.loads((exported / "tokenizer.json").read_text())
    eot = next(t["id"] for t in eot["added_tokens"] if t["content"] == "<|eot_id|>")
    assert eot in GenerationConfig.from_pretrained(exported).eos_token_id
    ids = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()(ids).logits
        torch.testing.assert_close(load_model(work / "mistral-full").eval()(ids), theirs, rtol=1e-5, atol=1e-5)

    _run(work, "dpo", "mistral-dpo", f"model.init_from={work / 'mistral'}", "dpo.method=lora",
         f"dpo.train_files=[{work / 'dpo.jsonl'}]", "dpo.max_prompt_len=32")
    rows = [json.loads(line) for line in (work / "mistral-dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert json.loads((work / "mistral-dpo" / "adapter_hf" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str((work / "mistral").resolve())
