"""Helpers for end-to-end tests that run the real entry points as users do (subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def make_tiny_corpus(root: Path, docs: int = 600, vocab_size: int = 384) -> tuple[Path, Path]:
    """Demo text -> BPE tokenizer -> token shards, in-process. Returns (tokenizer_dir, shards_dir)."""
    from trainer.data.demo_corpus import make_world, pretrain_documents
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenizer import train_tokenizer
    import random

    root.mkdir(parents=True, exist_ok=True)
    texts = pretrain_documents(make_world(seed=0), docs, random.Random(0))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokenizer_dir, shards_dir = root / "tokenizer", root / "tokens"
    train_tokenizer([corpus], tokenizer_dir, kind="bpe", vocab_size=vocab_size)
    prepare_data([corpus], tokenizer_dir, shards_dir, val_fraction=0.1, num_proc=1, show_progress=False)
    return tokenizer_dir, shards_dir


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    # A DeepSpeed op build killed half-way leaves a lock that stalls every later start in the shared cache.
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / f"llamatrain-tests-ext-{os.getuid()}"))
    return e


def launch_command(entry: str, args: list[str], ranks: int = 1, zero_stage: int | None = None) -> list[str]:
    script = str(REPO_ROOT / "launch" / entry)
    if ranks == 1 and zero_stage is None:
        return [sys.executable, script, *args]
    cmd = [str(VENV_BIN / "accelerate"), "launch", "--num_processes", str(ranks), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if zero_stage is not None:
        cmd += ["--use_deepspeed", "--zero_stage", str(zero_stage)]
        args = [*args, f"train.deepspeed=zero{zero_stage}"]
    else:
        cmd += ["--multi_gpu"]
    return [*cmd, script, *args]


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run to the end; on timeout the whole process group goes (launcher workers outlive their launcher)."""
    popen = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.communicate()
        raise
    proc = subprocess.CompletedProcess(cmd, popen.returncode, out, err)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(output_dir: Path, split: str = "train") -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def _last_step(output_dir: Path) -> int:
    try:
        rows = (output_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(rows[-1])["step"] if rows else 0
    except (FileNotFoundError, json.JSONDecodeError, IndexError):
        return 0


def run_until_signalled(cmd: list[str], output_dir: Path, after_step: int, sig=signal.SIGUSR1,
                        timeout: int = 600) -> subprocess.CompletedProcess:
    """Start a run, and once it has logged `after_step`, send `sig` to every training process
    (as Slurm does on preemption: the workers themselves, not only the launcher)."""
    # Files, not pipes: nobody reads a pipe while we poll, and a full one would block the run.
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env(), stdout=out_file, stderr=err_file, text=True)
        _signal_when_reached(proc, output_dir, after_step, sig, timeout)
        proc.wait(timeout=timeout)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if proc.returncode != 0:
        raise AssertionError(f"signalled run exited {proc.returncode}\n{out[-3000:]}\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_when_reached(proc: subprocess.Popen, output_dir: Path, after_step: int, sig, timeout: int) -> None:
    deadline = time.time() + timeout
    while _last_step(output_dir) < after_step:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"run ended before step {after_step}: rc={proc.returncode}")
        time.sleep(0.005)
    parent = psutil.Process(proc.pid)
    workers = [p for p in [parent, *parent.children(recursive=True)]
               if any("launch/" in part and part.endswith(".py") for part in p.cmdline())
               and "accelerate" not in " ".join(p.cmdline()[:2])]
    for worker in workers:
        worker.send_signal(sig)
