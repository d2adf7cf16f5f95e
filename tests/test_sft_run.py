"""End to end through launch/sft.py: 2-rank ZeRO-3 LoRA adapters that load in transformers + PEFT,
a 2-rank ZeRO-2 full fine-tune, the merged export, and clean errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.sft_fixtures import REPO_ROOT, demo_rows, make_tokenizer, tiny_model, write_jsonl

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A tokenizer, an HF Llama base folder (dim 64, 2 layers) and demo chat data."""
    from model_defs.hf import save_hf_model
    from trainer.export import copy_tokenizer

    root = tmp_path_factory.mktemp("sftrun")
    tok = make_tokenizer(root)
    base = tiny_model(len(tok), seed=0, dim=64)
    save_hf_model(base, base.cfg, root / "base")
    copy_tokenizer(root / "tokenizer", root / "base")
    write_jsonl(root / "sft.jsonl", demo_rows("sft")[:300])
    write_jsonl(root / "sft_eval.jsonl", demo_rows("sft_eval")[:40])
    return root


def _sft(work: Path, out: str, *extra: str, ranks: int = 1, zero: int | None = None, check: bool = True):
    args = [f"model.init_from={work / 'base'}", f"sft.train_files=[{work / 'sft.jsonl'}]",
            f"sft.val_files=[{work / 'sft_eval.jsonl'}]", "data.seq_len=128", "train.micro_batch_size=4",
            "train.max_steps=3", "train.eval_batches=1", "optim.lr=1e-2", "optim.warmup_steps=0",
            "logging.progress=false", "logging.tensorboard=false", f"train.output_dir={work / out}", *extra]
    if ranks > 1:
        cmd = [ACCELERATE, "launch", "--num_processes", str(ranks), "--use_deepspeed", "--zero_stage", str(zero),
               "launch/sft.py", *args, f"train.deepspeed=zero{zero}"]
    else:
        cmd = [sys.executable, "launch/sft.py", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero3_lora_adapter_is_gathered_and_loads_in_transformers(work):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from trainer.export import export_merged, load_with_adapter

    # r=16 makes every LoRA matrix larger than ZeRO-3's persistence threshold, so they really are partitioned.
    proc = _sft(work, "z3", "sft.lora.r=16", ranks=2, zero=3)
    run = work / "z3"
    assert "trainable parameters" in proc.stdout
    assert {m["world_size"] for m in _metrics(run) if m["split"] == "train"} == {2}
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(state) == 2 * 7 * 2 and all(t.numel() > 0 for t in state.values())
    assert all(t.abs().sum() > 0 for k, t in state.items() if "lora_B" in k)  # trained away from B = 0
    hf_state = load_file(run / "adapter_hf" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight" in hf_state

    ids = torch.randint(0, 400, (2, 24))
    hf_base = LlamaForCausalLM.from_pretrained(work / "base").eval()
    with torch.no_grad():
        base_logits = hf_base(ids).logits
        hf_logits = PeftModel.from_pretrained(hf_base, run / "adapter_hf").eval()(ids).logits
        ours = load_with_adapter(run / "adapter", merge=False).eval()(ids)
    torch.testing.assert_close(hf_logits, ours, rtol=1e-5, atol=1e-5)
    assert (hf_logits - base_logits).abs().max() > 1e-3

    gen = subprocess.run([sys.executable, "launch/generate.py", "--model", str(run), "--prompt", "What is 2 + 3?",
                          "--max-new-tokens", "4"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0 and "### prompt\nWhat is 2 + 3?\n### response\n" in gen.stdout, gen.stderr[-2000:]

    merged = export_merged(run / "adapter", work / "merged")
    assert (merged / "tokenizer.json").is_file() and "<|eot_id|>" in (merged / "chat_template.jinja").read_text()
    with torch.no_grad():
        merged_logits = LlamaForCausalLM.from_pretrained(merged).eval()(ids).logits
    torch.testing.assert_close(merged_logits, hf_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_zero2_full_finetune_exports_the_model(work):
    from transformers import LlamaForCausalLM

    _sft(work, "z2full", "sft.method=full", "sft.packing=false", ranks=2, zero=2)
    run = work / "z2full"
    train = [m for m in _metrics(run) if m["split"] == "train"]
    assert {m["world_size"] for m in train} == {2} and all(m["loss"] > 0 for m in train)
    ids = torch.randint(0, 400, (1, 16))
    with torch.no_grad():
        tuned = LlamaForCausalLM.from_pretrained(run / "model")(ids).logits
        base = LlamaForCausalLM.from_pretrained(work / "base")(ids).logits
    assert (tuned - base).abs().max() > 1e-3
    assert (run / "tokenizer" / "chat_template.jinja").is_file()


def test_bad_rows_and_keys_fail_cleanly(work):
    from trainer.config import ConfigError, load_config
    from trainer.sft.config import SFTConfig

    bad = work / "bad.jsonl"
    bad.write_text(json.dumps(demo_rows("sft")[0]) + "\n" + json.dumps({"messages": [{"role": "user"}]}) + "\n")
    proc = _sft(work, "bad", f"sft.train_files=[{bad}]", check=False)
    assert proc.returncode == 2 and f"{bad}:2: messages[0] must be an object with 'role' and 'content'" in proc.stderr
    assert not (work / "bad").exists()
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sft.metod=lora", "sft.lora.rank=4", "sft.overlong=cut"], schema=SFTConfig)
    lines = str(err.value).splitlines()
    assert "command line: sft: unknown key 'metod' (did you mean 'method'?)" in lines
    assert any(line.startswith("command line: sft.lora: unknown key 'rank'") for line in lines)
    assert any(line.startswith("command line: sft.overlong:") for line in lines)


def test_recipes_validate():
    from trainer.config import load_config
    from trainer.sft.config import SFTConfig

    recipes = sorted((REPO_ROOT / "configs").glob("sft_*.yaml")) + [REPO_ROOT / "configs" / "demo_sft_cpu.yaml"]
    assert len(recipes) >= 4
    for recipe in recipes:
        cfg = load_config(recipe, schema=SFTConfig)
        assert cfg.sft.train_files and cfg.model.init_from, recipe


def test_a_run_folder_stands_for_its_newest_complete_checkpoint(tmp_path):
    from trainer.run_folder import model_source as resolve_model_source

    for step, complete in ((100, True), (200, True), (300, False)):
        ckpt = tmp_path / "checkpoints" / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        if complete:
            (ckpt / "COMPLETE").write_text("done\n")
    assert resolve_model_source(tmp_path) == tmp_path / "checkpoints" / "step_00000200"
    assert resolve_model_source(tmp_path / "checkpoints" / "step_00000100").name == "step_00000100"
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        resolve_model_source(tmp_path / "empty")
