"""Exports that generate right (bos/eos/pad ids, generation_config.json with the end-of-turn token) and
models named by their Hub id, resolved offline from a cache laid out as huggingface_hub lays it."""
from __future__ import annotations

import json
import runpy
import shutil
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig

from model_defs.generate import generate
from model_defs.hf import save_hf_model
from tests.sft_fixtures import REPO_ROOT, make_tokenizer, tiny_model
from trainer.chat import prompt_ids, stop_token_ids
from trainer.export import copy_tokenizer, load_model, write_hf_folder

transformers.logging.set_verbosity_error()
PROMPT = "How old is Beilfu?"
MAX_NEW = 16


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    make_tokenizer(root)
    return root / "tokenizer"


def test_exported_model_stops_where_generate_py_stops(tmp_path, tokenizer_dir, monkeypatch):
    from trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in stop_token_ids(tok) and eot != tok.eos_token_id
    model = tiny_model(len(tok), seed=3).eval()
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": PROMPT}])])
    free = generate(model, ids, max_new_tokens=MAX_NEW)[0, ids.shape[1]:].tolist()
    # A random model never ends its turn; make it end where it would have said its fourth token.
    with torch.no_grad():
        model.output.weight[eot] = 1.5 * model.output.weight[free[3]]
    write_hf_folder(model.state_dict(), model.cfg, tmp_path / "export", tokenizer_dir=tokenizer_dir)

    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert eot in GenerationConfig.from_pretrained(tmp_path / "export").eos_token_id

    generate_py = runpy.run_path(str(REPO_ROOT / "launch" / "generate.py"))  # in process: no second import of torch
    monkeypatch.setattr(sys, "argv", ["generate.py", "--model", str(tmp_path / "export"), "--prompt", PROMPT,
                                      "--max-new-tokens", str(MAX_NEW), "--out", str(tmp_path / "gen.jsonl")])
    assert generate_py["main"]() == 0
    response = json.loads((tmp_path / "gen.jsonl").read_text())["response"]

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                      do_sample=False)[0, ids.shape[1]:].tolist()
    assert new[-1] == eot and len(new) < MAX_NEW and eot not in new[:-1]
    assert tok.decode(new[:-1], skip_special_tokens=True).strip() == response
    # Without generation_config.json transformers knows only config.json's EOS and runs past the turn.
    past = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                       generation_config=GenerationConfig(eos_token_id=config["eos_token_id"],
                                                          pad_token_id=config["pad_token_id"]))
    assert past.shape[1] - ids.shape[1] > len(new)


def hub_cache(root, repo_id: str, folder) -> None:
    """Put `folder` in a huggingface_hub cache at `root` as a download of `repo_id` would."""
    owner, name = repo_id.split("/")
    repo = root / f"models--{owner}--{name}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_loads_from_the_cache_offline(tmp_path, tokenizer_dir, offline_hub):
    from trainer.run_folder import resolve

    model = tiny_model(400, seed=1, family="qwen2", qkv_bias=True).eval()
    save_hf_model(model, model.cfg, tmp_path / "qwen")
    copy_tokenizer(tokenizer_dir, tmp_path / "qwen")
    hub_cache(offline_hub, "acme/tiny-qwen", tmp_path / "qwen")

    loaded = load_model("acme/tiny-qwen").eval()
    x = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert resolve("acme/tiny-qwen").tokenizer.parent.name == "snapshots"
    with pytest.raises(FileNotFoundError, match="acme/missing: not a local path.*HF_HUB_OFFLINE=1"):
        load_model("acme/missing")


def test_a_hub_dataset_split_is_read_offline_by_name_config_and_split(tmp_path, offline_hub):
    from trainer.dpo.precompute import files_fingerprint
    from trainer.sft.data import iter_rows

    repo = offline_hub / "datasets--acme--chats"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for config, split, n in (("en", "train", 3), ("en", "test", 1), ("de", "train", 2)):
        (snapshot / config).mkdir(parents=True, exist_ok=True)
        (snapshot / config / f"{split}.jsonl").write_text(
            "".join(json.dumps({"prompt": f"{config} {split} {i}", "completion": "ok"}) + "\n" for i in range(n)))
    (snapshot / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n"
        "  - {split: train, path: en/train.jsonl}\n  - {split: test, path: en/test.jsonl}\n"
        "- config_name: de\n  data_files:\n  - {split: train, path: de/train.jsonl}\n---\n")

    rows = [row["prompt"] for _, row in iter_rows("acme/chats:en")]
    assert rows == ["en train 0", "en train 1", "en train 2"]
    assert [row["prompt"] for _, row in iter_rows("acme/chats:en@test")] == ["en test 0"]
    assert [where for where, _ in iter_rows("acme/chats:de")] == ["acme/chats:de:row 1", "acme/chats:de:row 2"]
    assert files_fingerprint(["acme/chats:en"]) != files_fingerprint(["acme/chats:de"])
    with pytest.raises(ValueError, match="acme/chats:en@dev"):
        list(iter_rows("acme/chats:en@dev"))
    with pytest.raises(FileNotFoundError, match="acme/absent: no such file.*HF_HUB_OFFLINE=1"):
        list(iter_rows("acme/absent"))
