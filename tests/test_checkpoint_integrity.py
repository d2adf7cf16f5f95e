"""Checkpoints you can trust: a manifest checked before resume, files loaded as data only, a
one-process DeepSpeed run without a launcher, and a finished run that stays finished.

Damage is done the ways disks and people do it: truncation, a block of 0xFF over the weights
(same size), a deleted file, a planted pickle whose `__reduce__` would create a marker folder.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain_run import REPO_ROOT, env, make_tiny_corpus
from trainer.checkpoint import (
    MANIFEST,
    DamagedCheckpoint,
    complete_checkpoints,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)
from trainer.safe_load import UnsafeCheckpointFile


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"), docs=300, vocab_size=320)


def pretrain(corpus, out: Path, *extra: str) -> subprocess.CompletedProcess:
    tokenizer, shards = corpus
    args = {"data.path": shards, "data.tokenizer": tokenizer, "data.seq_len": 32, "model.preset": "tiny",
            "train.output_dir": out, "train.max_steps": 4, "train.micro_batch_size": 2,
            "train.grad_accum_steps": 1, "train.eval_every": 0, "checkpoint.every": 2,
            "checkpoint.keep_last": 3, "logging.progress": False, "logging.tensorboard": False}
    overrides = [f"{k}={v}" for k, v in args.items()]
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "pretrain.py"), *overrides, *extra],
                          cwd=REPO_ROOT, env=env(), capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4, each with its manifest."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ok(pretrain(corpus, out))
    assert [c.name for c in complete_checkpoints(out)] == ["step_00000002", "step_00000004"]
    return out


@pytest.fixture()
def run_copy(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def overwrite_block(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(min(4096, path.stat().st_size // 4))
        f.write(b"\xff" * 4096)


DAMAGE = {
    "truncated weights": ("model.safetensors", truncate),
    "0xFF block over weights": ("model.safetensors", overwrite_block),
    "truncated optimizer": ("optimizer.bin", truncate),
    "deleted file": ("scheduler.bin", os.remove),
}


def test_manifest_lists_every_file_and_is_written_before_complete(finished_run):
    checkpoint = complete_checkpoints(finished_run)[-1]
    manifest = json.loads((checkpoint / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file()}
    assert set(manifest) == on_disk - {MANIFEST, "COMPLETE"}
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"} <= set(manifest)
    assert manifest["model.safetensors"]["size"] == (checkpoint / "model.safetensors").stat().st_size
    # The marker is written after the manifest (a checkpoint marked complete always has one).
    assert (checkpoint / MANIFEST).stat().st_mtime_ns <= (checkpoint / "COMPLETE").stat().st_mtime_ns
    report = verify_checkpoint(checkpoint)
    assert report.has_manifest and report.files == len(manifest)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_found_and_named(run_copy, damage):
    name, spoil = DAMAGE[damage]
    checkpoint = complete_checkpoints(run_copy)[-1]
    spoil(checkpoint / name)
    with pytest.raises(DamagedCheckpoint, match=str(checkpoint / name)):
        verify_checkpoint(checkpoint)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_auto_falls_back_to_older_checkpoint_and_path_refuses(corpus, run_copy, damage):
    name, spoil = DAMAGE[damage]
    newest = complete_checkpoints(run_copy)[-1]
    spoil(newest / name)

    refused = pretrain(corpus, run_copy, "train.max_steps=6", "--resume", str(newest))
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert len(error_lines(refused)) == 1 and str(newest / name) in error_lines(refused)[0]
    assert "Traceback" not in refused.stderr

    resumed = ok(pretrain(corpus, run_copy, "train.max_steps=6", "--resume", "auto"))
    warnings = [line for line in resumed.stderr.splitlines() if line.startswith("warning: skipping damaged")]
    assert len(warnings) == 1 and str(newest / name) in warnings[0]
    # The run's console may wrap long paths.
    said = (resumed.stdout + resumed.stderr).replace("\n", "")
    assert "step_00000002: verified" in said and "resumed from" in said and "step_00000002 at step 2" in said
    assert (run_copy / "COMPLETED").read_text() == "step 6\n"
    assert complete_checkpoints(run_copy)[-1].name == "step_00000006"


def test_no_intact_checkpoint_starts_fresh_saying_so(run_copy, capsys):
    for checkpoint in complete_checkpoints(run_copy):
        truncate(checkpoint / "model.safetensors")
    assert resolve_resume("auto", run_copy) is None
    err = capsys.readouterr().err
    assert err.count("warning: skipping damaged checkpoint") == 2 and "starting from step 0" in err


def test_corrupt_manifest_is_damage_and_missing_manifest_is_accepted_with_note(run_copy, capsys):
    older, newest = complete_checkpoints(run_copy)
    (newest / MANIFEST).write_text("{not json")
    assert resolve_resume("auto", run_copy) == older
    assert f"{newest / MANIFEST}: manifest is unreadable" in capsys.readouterr().err
    (newest / MANIFEST).unlink()  # written before manifests existed
    assert resolve_resume("auto", run_copy) == newest
    assert "cannot be verified" in capsys.readouterr().err


def test_file_added_after_save_is_damage(run_copy):
    newest = complete_checkpoints(run_copy)[-1]
    (newest / "extra_optim_states.pt").write_bytes(b"x")
    with pytest.raises(DamagedCheckpoint, match="not in the manifest"):
        verify_checkpoint(newest)


def test_finished_run_resumed_again_says_so_and_builds_nothing(corpus, run_copy):
    metrics_before = (run_copy / "metrics.jsonl").read_text()
    proc = ok(pretrain(corpus, run_copy, "--resume", "auto"))
    assert "already finished at step 4" in proc.stdout
    assert "world size" not in proc.stdout  # the banner comes after the process group is built
    assert (run_copy / "metrics.jsonl").read_text() == metrics_before



def test_resume_into_another_shape_and_init_from_a_bin_folder_are_one_line(corpus, run_copy, tmp_path):
    proc = pretrain(corpus, run_copy, "train.max_steps=6", "model.n_layers=3", "--resume", "auto")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "step_00000004: another model shape (n_layers 2 there, 3 here)" in line

    from model_defs import ModelConfig, Transformer
    from model_defs.hf import save_hf_model

    hf = save_hf_model(Transformer(ModelConfig.from_preset("tiny")), ModelConfig.from_preset("tiny"), tmp_path / "hf")
    from safetensors.torch import load_file

    torch.save(load_file(hf / "model.safetensors"), hf / "pytorch_model.bin")
    (hf / "model.safetensors").unlink()
    fresh = tmp_path / "fresh"
    proc = pretrain(corpus, fresh, f"model.init_from={hf}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(error_lines(proc)) == 1
    assert "no model.safetensors" in error_lines(proc)[0] and "only safetensors" in error_lines(proc)[0]
    assert not fresh.exists(), "a run that never started leaves no folder"

# --- files are data, not code ---------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)


def assert_payload_is_live(path: Path, marker: Path) -> None:
    """The planted file really runs code when loaded unsafely (else the refusal tests prove nothing)."""
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_planted_pickle_refused_on_resume(corpus, run_copy, tmp_path):
    newest = complete_checkpoints(run_copy)[-1]
    marker = tmp_path / "pwned"
    plant_pickle(newest / "optimizer.bin", marker)
    write_manifest(newest)  # whoever planted it could rewrite the manifest too
    proc = pretrain(corpus, run_copy, "train.max_steps=6", "--resume", str(newest))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(error_lines(proc)) == 1 and "optimizer.bin: refused to load" in error_lines(proc)[0]
    assert not marker.exists()
    assert_payload_is_live(newest / "optimizer.bin", marker)


def test_planted_random_state_stops_resume_loudly(corpus, run_copy, tmp_path):
    newest = complete_checkpoints(run_copy)[-1]
    marker = tmp_path / "pwned"
    plant_pickle(newest / "random_states_0.pkl", marker)
    write_manifest(newest)
    proc = pretrain(corpus, run_copy, "train.max_steps=6", "--resume", str(newest))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = error_lines(proc)[0]
    assert "random_states_0.pkl: cannot restore" in line and "would not be exact" in line
    assert not marker.exists()


def test_planted_pickle_refused_on_export(run_copy, tmp_path):
    from trainer.export import consolidated_state_dict

    newest = complete_checkpoints(run_copy)[-1]
    marker = tmp_path / "pwned"
    (newest / "model.safetensors").unlink()
    plant_pickle(newest / "pytorch_model.bin", marker)
    with pytest.raises(UnsafeCheckpointFile, match="pytorch_model.bin: refused to load"):
        consolidated_state_dict(newest)
    assert not marker.exists()


# --- DeepSpeed in one process, without a launcher -------------------------------------------

@pytest.fixture(scope="module")
def zero2_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2") / "run"
    proc = ok(pretrain(corpus, out, "train.max_steps=2", "train.deepspeed=zero2"))
    assert "deepspeed ZeRO-2" in proc.stdout and "world size 1" in proc.stdout
    return out


def test_deepspeed_without_launcher_runs_as_world_of_one(zero2_run):
    from trainer.export import consolidated_state_dict

    assert (zero2_run / "COMPLETED").read_text() == "step 2\n"
    newest = complete_checkpoints(zero2_run)[-1]
    assert (newest / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert verify_checkpoint(newest).has_manifest
    assert "tok_embeddings.weight" in consolidated_state_dict(newest)


def test_planted_zero_shard_refused_on_export_and_resume(corpus, zero2_run, tmp_path):
    from trainer.export import consolidated_state_dict

    run = tmp_path / "run"
    shutil.copytree(zero2_run, run)
    newest = complete_checkpoints(run)[-1]
    shard = newest / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    plant_pickle(shard, marker)
    write_manifest(newest)
    with pytest.raises(UnsafeCheckpointFile, match="zero_pp_rank_0_mp_rank_00_optim_states.pt: refused"):
        consolidated_state_dict(newest)
    proc = pretrain(corpus, run, "train.max_steps=4", "train.deepspeed=zero2", "--resume", str(newest))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt: refused to load" in error_lines(proc)[0]
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["../../elsewhere", "/etc", "pytorch_model/../.."])
def test_latest_must_name_a_folder_inside_the_checkpoint(zero2_run, tmp_path, tag):
    from trainer.export import consolidated_state_dict

    checkpoint = tmp_path / "step_00000002"
    shutil.copytree(complete_checkpoints(zero2_run)[-1], checkpoint)
    (checkpoint / "latest").write_text(tag)
    with pytest.raises(ValueError, match="not a folder inside the checkpoint"):
        consolidated_state_dict(checkpoint)


@pytest.mark.slow
def test_two_rank_zero2_manifest_holds_every_rank_and_resume_loads_safely(corpus, tmp_path):
    from tests.pretrain_run import launch_command, run
    from trainer.export import consolidated_state_dict

    tokenizer, shards = corpus
    out = tmp_path / "run"
    args = [f"data.path={shards}", f"data.tokenizer={tokenizer}", "data.seq_len=32", "model.preset=tiny",
            f"train.output_dir={out}", "train.micro_batch_size=2", "train.eval_every=0", "checkpoint.every=2",
            "logging.progress=false", "logging.tensorboard=false"]
    run(launch_command("pretrain.py", [*args, "train.max_steps=2"], ranks=2, zero_stage=2))
    checkpoint = complete_checkpoints(out)[-1]
    listed = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert {f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(listed)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(listed)
    assert "tok_embeddings.weight" in consolidated_state_dict(checkpoint)  # under the allow-list
    resumed = run(launch_command("pretrain.py", [*args, "train.max_steps=4", "--resume", "auto"],
                                 ranks=2, zero_stage=2))
    assert "step_00000002: verified" in resumed.stdout + resumed.stderr
    assert (out / "COMPLETED").read_text() == "step 4\n"
