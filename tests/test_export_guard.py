"""launch/export_hf.py never swallows what it did not write: not the source checkpoint or run
folder, not the current directory, not a folder of the user's files (even with --overwrite)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.pretrain_run import REPO_ROOT, env
from tests.test_run_folder import fake_tokenizer, tiny, write_checkpoint
from trainer.export import check_export_target, export_checkpoint


@pytest.fixture
def run_folder(tmp_path):
    run = tmp_path / "run"
    write_checkpoint(run, 1, tiny())
    fake_tokenizer(run / "tokenizer")
    return run


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def export_cli(*args, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "export_hf.py"), *map(str, args)],
                          cwd=cwd, env=env(), capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("where", ["the run folder", "the checkpoint", "a folder above the run"])
def test_export_refuses_to_swallow_its_source(run_folder, where, monkeypatch):
    target = {"the run folder": run_folder, "the checkpoint": run_folder / "checkpoints" / "step_00000001",
              "a folder above the run": run_folder.parent}[where]
    monkeypatch.chdir(run_folder.parent.parent)
    before = listing(run_folder)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is or contains the source") as err:
            export_checkpoint(run_folder, target, overwrite=overwrite)
        assert "\n" not in str(err.value)
    assert listing(run_folder) == before


def test_export_refuses_the_current_directory_and_foreign_folders(run_folder, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    proc = export_cli(run_folder, ".", "--overwrite", cwd=work)
    assert proc.returncode == 2 and "is or contains the current directory" in proc.stderr
    assert "Traceback" not in proc.stderr and (work / "notes.txt").read_text() == "mine"

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    (theirs / "model.safetensors").write_bytes(b"")
    (theirs / "data").mkdir()  # an export has no sub-folders
    with pytest.raises(ValueError, match="refusing to replace it even with --overwrite"):
        check_export_target(theirs, [run_folder], overwrite=True)
    with pytest.raises(ValueError, match="refusing to replace it .--overwrite replaces an earlier export"):
        check_export_target(theirs, [run_folder], overwrite=False)
    assert listing(theirs) == ["config.json", "data", "model.safetensors"]

    # An earlier export is replaced with --overwrite, and only with it.
    out = export_checkpoint(run_folder, tmp_path / "hf")
    with pytest.raises(ValueError, match="refusing to replace it"):
        export_checkpoint(run_folder, out)
    assert export_checkpoint(run_folder, out, overwrite=True) == out
