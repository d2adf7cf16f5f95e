"""Bad input ends in one line naming the file, line or key, before any work; in-process where the
check lives in a function (the CLI paths that need a run are in test_checkpoint_integrity.py)."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
from safetensors.torch import save_file

from model_defs import Transformer
from tests.pretrain_run import REPO_ROOT
from tests.test_run_folder import tiny, write_checkpoint
from trainer.data.sources import DataError
from trainer.export import load_pretrained
from trainer.run_folder import check_output_dir
from trainer.sft.data import load_conversations


def launch_module(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO_ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(ValueError, match=r"train.output_dir: .*taken is a file, not a folder") as err:
        check_output_dir(tmp_path / "taken")
    one_line(err)
    with pytest.raises(ValueError, match=r"train.output_dir: .*taken is a file, so .*run cannot be created"):
        check_output_dir(tmp_path / "taken" / "run")
    check_output_dir(tmp_path / "new" / "run")  # creatable: fine
    assert (tmp_path / "taken").read_text() == "mine" and not (tmp_path / "new").exists()


def test_a_lora_runs_checkpoint_is_not_a_model(tmp_path):
    model = tiny()
    run = tmp_path / "sft"
    ckpt = write_checkpoint(run, 1, model)
    state = {f"base_model.model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["base_model.model.layers.0.attention.wq.lora_A.default.weight"] = torch.zeros(2, model.cfg.dim)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"a LoRA/QLoRA run's checkpoint .*merge the adapter first "
                                         r"\(python launch/export_hf.py --adapter .*sft/adapter MERGED\)") as err:
        load_pretrained(run)
    one_line(err)

    other = tmp_path / "other"
    ckpt = write_checkpoint(other, 1, model)
    bigger = Transformer(type(model.cfg).from_dict({**model.cfg.to_dict(), "dim": model.cfg.dim * 2}))
    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"step_00000001: weights do not fit its model_config.json") as err:
        load_pretrained(other)
    one_line(err)


def test_sft_rows_with_an_empty_reply_are_named(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"chat.jsonl:2: assistant message 1 is empty") as err:
        load_conversations([path])
    one_line(err)
    assert len(load_conversations([path], skip_bad_rows=True)) == 1


def test_generate_names_missing_paths_bad_prompt_lines_and_a_foreign_tokenizer(tmp_path):
    generate = launch_module("generate")
    with pytest.raises(FileNotFoundError, match=r"^--model .*missing: no such file or folder$"):
        generate.find_tokenizer_dir(str(tmp_path / "missing"), None, None)
    with pytest.raises(FileNotFoundError, match=r"^--tokenizer .*nope: no such file or folder$"):
        generate.find_tokenizer_dir(str(tmp_path), None, str(tmp_path / "nope"))

    prompts = tmp_path / "prompts.jsonl"
    for line, message in (('{"prompt": "ok"}\n{"prompt": "a",\n', r"prompts.jsonl:2: not valid JSON"),
                          ('["a list"]\n', r"prompts.jsonl:1: expected a JSON object"),
                          ('{"messages": [{"role": "user"}]}\n', r"prompts.jsonl:1: 'messages' must be a list"),
                          ('{"prompt": 3}\n', r"prompts.jsonl:1: expected a string 'prompt'")):
        prompts.write_text(line)
        args = argparse.Namespace(prompt=None, prompts_file=str(prompts), limit=None)
        with pytest.raises(ValueError, match=message) as err:
            generate.read_prompts(args)
        one_line(err)

    class Tokenizer:
        name_or_path = "tok/big"

        def __len__(self):
            return 10_000

    with pytest.raises(ValueError, match=r"tokenizer tok/big has 10000 tokens but the model's vocabulary is \d+"):
        generate.check_tokenizer_fits_model(Tokenizer(), tiny())


def test_clean_data_yaml_errors_are_one_line(tmp_path):
    from datapipe.config import ConfigError, load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("input:\n  path: raw/\nexecutor: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml: invalid YAML \(line 3, column 11: could not determine a "
                                          r"constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'\)"
                       ) as err:
        load_config(recipe)
    one_line(err)
    recipe.write_text("input:\n  path: raw/\n")
    with pytest.raises(ConfigError, match=r"override 'executor.workers=\[': invalid YAML value") as err:
        load_config(recipe, ["executor.workers=["])
    one_line(err)


def test_unreadable_trainer_state_is_named(tmp_path):
    from trainer.checkpoint import TRAINER_STATE, _trainer_state

    for text in ("{not json", '{"tokens_seen": 3}', "[1, 2]"):
        (tmp_path / TRAINER_STATE).write_text(text)
        with pytest.raises(ValueError, match=rf"{TRAINER_STATE}: (unreadable trainer state|not the trainer state)"):
            _trainer_state(tmp_path)


def test_a_permission_error_is_one_line(capsys):
    # Root may write anywhere, so an unwritable output_dir cannot be staged here; its error class can.
    from trainer.cli import guarded

    def main():
        raise PermissionError(13, "Permission denied", "/srv/runs/out")

    with pytest.raises(SystemExit) as exit_info:
        guarded(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: [Errno 13] Permission denied: '/srv/runs/out'"
