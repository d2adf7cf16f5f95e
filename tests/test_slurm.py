"""launch/slurm/train.sbatch on a real local Slurm cluster: two tasks acting as two machines
(one CPU process each, gloo, DeepSpeed ZeRO-2), preemption by SIGUSR1, requeue and exact resume."""
from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.slurm_cluster import FINAL_STATES, SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
SBATCH = "launch/slurm/train.sbatch"
PROFILE = "launch/accelerate/cpu_2proc.yaml"
MAX_STEPS = 200  # ~20-30 ms per step: seconds between the signal (after step 10) and the planned end
PREEMPT_AFTER = 10


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Demo corpus -> 512-entry BPE tokenizer -> packed token shards, all generated here."""
    from trainer.data.demo_corpus import write_demo_data
    from trainer.data.prepare import prepare_data
    from trainer.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("slurm-data")
    write_demo_data(root / "raw", seed=0, n_pretrain_docs=200, n_people=8)
    corpus = [str(root / "raw" / "pretrain.jsonl")]
    train_tokenizer(corpus, root / "tokenizer", vocab_size=512)
    prepare_data(corpus, root / "tokenizer", root / "tokens", val_fraction=0.05, num_proc=1, show_progress=False)
    return root


@pytest.fixture(scope="module")
def recipe(tiny_data: Path) -> Path:
    path = tiny_data / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "data": {"path": str(tiny_data / "tokens"), "tokenizer": str(tiny_data / "tokenizer"), "seq_len": 32},
        "train": {"max_steps": MAX_STEPS, "micro_batch_size": 4, "precision": "fp32", "eval_batches": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 10},
        "checkpoint": {"every": 0, "keep_last": 2},
        "logging": {"log_every": 1, "tensorboard": False, "progress": False},
    }))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def submit_training(cluster: SlurmCluster, recipe: Path, out: Path, *overrides: str) -> int:
    """The real sbatch script, as a user submits it, with two tasks on the one node."""
    env = {
        "ACCELERATE_CONFIG": PROFILE,
        "NPROC_PER_NODE": "1",
        "LOG_DIR": str(out / "logs"),
        # Two tasks share two cores: one thread each keeps them from starving one another.
        "OMP_NUM_THREADS": "1",
        # Job ids restart at 1 on every test cluster; the default port (from the id) could collide
        # with another test session's cluster on the same host.
        "MAIN_PORT": str(free_port()),
    }
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["VENV"] = sys.prefix  # the script's own activation, as on a cluster
    (out / "logs").mkdir(parents=True, exist_ok=True)
    args = ["--ntasks-per-node=2", "--job-name=tiny", SBATCH, "launch/pretrain.py", str(recipe),
            f"train.output_dir={out / 'run'}", *overrides]
    return cluster.submit(args, log=out / "logs" / "%x-%j.out", cwd=REPO, env=env)


def test_sbatch_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / SBATCH)], check=True)


@pytest.mark.parametrize("recipe_train, overrides, expected", [
    ({}, [], "runs/default"),
    ({"output_dir": "runs/from_recipe"}, [], "runs/from_recipe"),
    ({"output_dir": "runs/from_recipe"}, ["optim.lr=1e-3", "train.output_dir=/x/cli", "--flag"], "/x/cli"),
])
def test_output_dir_follows_trainer_precedence(tmp_path, recipe_train, overrides, expected):
    recipe = tmp_path / "r.yaml"
    # An SFT-style section the pretraining schema does not know must not get in the way.
    recipe.write_text(yaml.safe_dump({"train": recipe_train, "sft": {"template": "chatml"}}))
    spec = importlib.util.spec_from_file_location("output_dir", REPO / "launch/slurm/output_dir.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.resolve_output_dir(recipe, overrides) == expected


def test_output_dir_names_a_missing_recipe(tmp_path):
    proc = subprocess.run([sys.executable, "launch/slurm/output_dir.py", str(tmp_path / "nope.yaml")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and "nope.yaml: recipe not found" in proc.stderr


def job_logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((out / "logs").iterdir()))


def train_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == "train"]


def logged_steps(run: Path) -> int:
    """Train rows in metrics.jsonl so far; the file is being appended to, so the last line may be partial."""
    path = run / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    return sum('"split": "train"' in line for line in text.splitlines()[:-1])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{MAX_STEPS:08d}" / "pytorch_model" / "mp_rank_00_model_states.pt"
    return torch.load(ckpt, map_location="cpu", weights_only=False)["module"]


@pytest.fixture(scope="module")
def straight_run(slurm_cluster: SlurmCluster, recipe: Path, tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("straight")
    job = submit_training(slurm_cluster, recipe, out)
    state = slurm_cluster.wait(job, timeout=300)
    assert state == "COMPLETED", f"job {job} ended {state}\n{job_logs(out)}\n{slurm_cluster.diagnostics(job)}"
    return out, job


@pytest.mark.slurm
@pytest.mark.slow
def test_two_machine_zero2_run_completes(slurm_cluster: SlurmCluster, straight_run: tuple[Path, int]):
    out, job = straight_run
    run = out / "run"
    info = slurm_cluster.job(job)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert (run / "COMPLETED").is_file()
    shards = sorted(p.name for p in (run / "checkpoints" / f"step_{MAX_STEPS:08d}" / "pytorch_model").iterdir())
    assert [s for s in shards if s.startswith("zero_pp_rank_")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    metrics = train_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, MAX_STEPS + 1))
    assert {m["world_size"] for m in metrics} == {2}
    batch_log = (out / "logs" / f"tiny-{job}.out").read_text()
    assert "2 machine(s) x 1 process(es)" in batch_log and "run complete" in batch_log
    # One log per task: both machines ran their own `accelerate launch`.
    assert {p.name for p in (out / "logs").glob("*-task*.log")} == {
        f"tiny-{job}-restart0-task0.log", f"tiny-{job}-restart0-task1.log"}


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_and_resumes_exactly(
    slurm_cluster: SlurmCluster, recipe: Path, straight_run: tuple[Path, int], tmp_path: Path,
):
    out = tmp_path
    run = out / "run"
    job = submit_training(slurm_cluster, recipe, out)

    deadline = time.monotonic() + 240
    while logged_steps(run) < PREEMPT_AFTER:
        assert time.monotonic() < deadline, f"no progress\n{job_logs(out)}\n{slurm_cluster.diagnostics(job)}"
        assert slurm_cluster.state(job) not in FINAL_STATES, f"job ended early\n{job_logs(out)}"
        time.sleep(0.1)
    # Like `--signal=USR1@N`: every process of the training step gets it, the batch shell does not.
    slurm_cluster.run("scancel", "--signal=USR1", str(job))

    deadline = time.monotonic() + 120
    while (info := slurm_cluster.job(job))["Restarts"] == "0" or info["JobState"] != "PENDING":
        assert info["JobState"] not in FINAL_STATES, f"job ended {info['JobState']} instead of requeueing\n{job_logs(out)}"
        assert time.monotonic() < deadline, f"job not requeued\n{job_logs(out)}"
        time.sleep(0.5)
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and (saved[0] / "COMPLETE").is_file(), saved
    stopped_at = int(saved[0].name.removeprefix("step_"))
    assert PREEMPT_AFTER <= stopped_at < MAX_STEPS
    assert not (run / "COMPLETED").exists()

    # The requeued job starts again by itself once the cluster's credential lifetime has passed.
    state = slurm_cluster.wait(job, timeout=300)
    assert state == "COMPLETED", f"job {job} ended {state}\n{job_logs(out)}\n{slurm_cluster.diagnostics(job)}"
    assert slurm_cluster.job(job)["Restarts"] == "1"
    assert (run / "COMPLETED").is_file()
    batch_log = (out / "logs" / f"tiny-{job}.out").read_text()
    assert "requeueing" in batch_log and "restart 1:" in batch_log and "run complete" in batch_log
    assert f"at step {stopped_at}" in (out / "logs" / f"tiny-{job}-restart1-task0.log").read_text()
    assert (out / "logs" / f"tiny-{job}-restart1-task1.log").is_file()

    steps = [m["step"] for m in train_metrics(run)]
    assert steps == list(range(1, stopped_at + 1)) + list(range(stopped_at + 1, MAX_STEPS + 1))
    reference, resumed = final_weights(straight_run[0] / "run"), final_weights(run)
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, resumed[name]), f"{name} differs after preemption + resume"


@pytest.mark.slurm
@pytest.mark.slow
def test_failed_training_is_not_requeued(slurm_cluster: SlurmCluster, recipe: Path, tmp_path: Path):
    job = submit_training(slurm_cluster, recipe, tmp_path, "train.no_such_key=1")
    state = slurm_cluster.wait(job, timeout=180)
    info = slurm_cluster.job(job)
    assert state == "FAILED" and info["Restarts"] == "0", f"{info}\n{job_logs(tmp_path)}"
    assert "not requeueing" in (tmp_path / "logs" / f"tiny-{job}.out").read_text()
    assert "no_such_key" in (tmp_path / "logs" / f"tiny-{job}-restart0-task0.log").read_text()
