"""What a path stands for (run folder, checkpoint, HF folder, adapter), and folders written whole or not at all."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_defs import ModelConfig, Transformer
from trainer.atomic import atomic_directory
from trainer.run_folder import find_checkpoint, model_source, resolve, tokenizer_for_model


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=64, dim=32, max_seq_len=32))


def fake_tokenizer(folder: Path) -> Path:
    """A four-word tokenizer that loads (exports read its special ids), built without training."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(str(folder))
    return folder


def write_checkpoint(run: Path, step: int, model: Transformer | None = None, complete: bool = True,
                     tokenizer: str | None = None) -> Path:
    """A plain (non-ZeRO) checkpoint as the trainer lays it out: weights, model config, resolved config, marker."""
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    if model is not None:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
        (ckpt / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    (ckpt / "config.yaml").write_text(f"data:\n  tokenizer: {tokenizer}\n" if tokenizer else "data: {}\n")
    if complete:
        (ckpt / "COMPLETE").write_text(f"step {step}\n")
    return ckpt


@pytest.fixture
def sft_run(tmp_path) -> Path:
    """A LoRA SFT run: two complete checkpoints and a partial one, its tokenizer, adapter and adapter_hf."""
    run = tmp_path / "sft"
    for step, complete in ((100, True), (200, True), (300, False)):
        write_checkpoint(run, step, complete=complete)
    fake_tokenizer(run / "tokenizer")
    for name in ("adapter", "adapter_hf"):
        (run / name).mkdir()
        (run / name / "adapter_config.json").write_text('{"peft_type": "LORA"}\n')
    return run


def test_run_folder_stands_for_newest_complete_checkpoint_and_its_outputs(sft_run):
    paths = resolve(sft_run)
    assert paths.is_run and paths.run == sft_run
    assert paths.checkpoint == sft_run / "checkpoints" / "step_00000200"
    assert paths.adapter == sft_run / "adapter" and paths.model is None
    assert paths.tokenizer == sft_run / "tokenizer"
    assert find_checkpoint(sft_run) == model_source(sft_run) == paths.checkpoint
    assert tokenizer_for_model(str(sft_run)) == sft_run / "tokenizer"


def test_checkpoint_folder_finds_its_run_and_tokenizer(sft_run, tmp_path):
    ckpt = sft_run / "checkpoints" / "step_00000100"
    paths = resolve(ckpt)
    assert not paths.is_run and paths.run == sft_run
    assert paths.checkpoint == ckpt and paths.adapter is None and paths.model is None
    assert paths.tokenizer == sft_run / "tokenizer"
    # A tokenizer saved inside the checkpoint is the one that step used.
    fake_tokenizer(ckpt)
    assert resolve(ckpt).tokenizer == ckpt
    # A pretraining run keeps no tokenizer/: the checkpoint's config names it.
    pretrain = tmp_path / "pretrain"
    ckpt = write_checkpoint(pretrain, 5, tokenizer="data/tok")
    assert resolve(ckpt).tokenizer == Path("data/tok") == tokenizer_for_model(str(pretrain))
    assert find_checkpoint(ckpt) == ckpt


def test_hf_folder_and_adapter_folder(tmp_path, sft_run):
    from model_defs.hf import save_hf_model

    model = tiny()
    hf = save_hf_model(model, model.cfg, tmp_path / "hf")
    assert resolve(hf).tokenizer is None and tokenizer_for_model(str(hf)) is None
    fake_tokenizer(hf)
    paths = resolve(hf)
    assert paths.model == hf and paths.tokenizer == hf and paths.run is None and paths.checkpoint is None
    assert model_source(hf) == hf

    adapter = resolve(sft_run / "adapter_hf")
    assert adapter.adapter == sft_run / "adapter_hf" and adapter.run == sft_run
    assert adapter.tokenizer == sft_run / "tokenizer"  # this adapter saved none of its own
    with pytest.raises(ValueError, match="a PEFT adapter, not a model"):
        model_source(sft_run / "adapter")


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_or_incomplete_checkpoints_are_one_line_errors(sft_run, tmp_path):
    from trainer.checkpoint import resolve_resume

    partial = sft_run / "checkpoints" / "step_00000300"
    with pytest.raises(ValueError, match="checkpoint is incomplete") as err:
        find_checkpoint(partial)
    assert one_line(err).startswith(str(partial))
    with pytest.raises(ValueError, match="checkpoint is incomplete"):
        model_source(partial)
    with pytest.raises(ValueError, match=f"^--resume {partial}: checkpoint is incomplete"):
        resolve_resume(str(partial), sft_run)
    assert resolve_resume(str(sft_run), tmp_path / "elsewhere") == sft_run / "checkpoints" / "step_00000200"

    empty = tmp_path / "empty"
    write_checkpoint(empty, 1, complete=False)
    with pytest.raises(FileNotFoundError, match="run folder has no complete checkpoint") as err:
        model_source(empty)
    assert one_line(err).startswith(str(empty))
    assert resolve(empty).tokenizer is None and resolve_resume("auto", empty) is None

    with pytest.raises(FileNotFoundError, match="no such file or folder") as err:
        resolve(tmp_path / "nowhere")
    one_line(err)
    with pytest.raises(FileNotFoundError, match="^--resume .*nowhere: no such file or folder"):
        resolve_resume(str(tmp_path / "nowhere"), sft_run)
    (tmp_path / "stuff").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint of ours nor an HF model folder"):
        model_source(tmp_path / "stuff")
    with pytest.raises(ValueError, match="not a checkpoint .* nor a run folder"):
        find_checkpoint(tmp_path / "stuff")


def test_load_and_export_from_a_run_folder(tmp_path):
    from trainer.export import export_checkpoint, load_model, load_pretrained

    model = tiny()
    run = tmp_path / "run"
    write_checkpoint(run, 1, Transformer(model.cfg))
    write_checkpoint(run, 2, model)
    fake_tokenizer(run / "tokenizer")
    loaded = load_model(run)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    out = export_checkpoint(run, tmp_path / "hf")
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="refusing to replace it"):
        export_checkpoint(run, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    export_checkpoint(run / "checkpoints" / "step_00000001", out, overwrite=True)
    replaced = load_pretrained(out)
    assert not torch.equal(replaced.tok_embeddings.weight, model.tok_embeddings.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging or old copy left

    # A full fine-tuning run's exported model/ is what the run folder loads.
    out.rename(run / "model")
    assert resolve(run).model == run / "model"
    assert torch.equal(load_model(run).tok_embeddings.weight, replaced.tok_embeddings.weight)


def test_atomic_directory_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []

    with atomic_directory(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".")
        (staging / "a.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "a.txt").read_text() == "new"


def test_atomic_directory_replaces_only_when_allowed(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "theirs.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to replace it") as err:
        with atomic_directory(target):
            pytest.fail("the body must not run")
    one_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "theirs.txt").read_text() == "keep"

    with atomic_directory(target, replace=True) as staging:
        (staging / "ours.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["ours.txt"]

    # An empty folder holds nothing to lose; a folder that fills up while we write is refused at the end.
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty) as staging:
        (staging / "a.txt").write_text("a")
    assert (empty / "a.txt").is_file()
    late = tmp_path / "late"
    with pytest.raises(ValueError, match="refusing to replace it"):
        with atomic_directory(late) as staging:
            (staging / "ours.txt").write_text("new")
            late.mkdir()
            (late / "theirs.txt").write_text("keep")
    assert [p.name for p in late.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "late", "out"]


def test_save_hf_model_replaces_only_an_earlier_save(tmp_path):
    from model_defs.hf import save_hf_model

    model = tiny()
    out = save_hf_model(model, model.cfg, tmp_path / "hf", max_shard_size="20KB")
    save_hf_model(model, model.cfg, out)  # an earlier save: replaced, stale shards gone
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    (out / "README.md").write_text("mine")
    with pytest.raises(ValueError, match="refusing to replace it"):
        save_hf_model(model, model.cfg, out)
    assert (out / "README.md").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_model_defs_does_not_import_trainer():
    import subprocess
    import sys

    code = "import sys, model_defs.hf, model_defs.atomic; assert not [m for m in sys.modules if m.startswith('trainer')]"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
