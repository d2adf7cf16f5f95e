"""Online RL (GRPO): rollout pieces, reward-function errors, and runs through the real CLI (exact resume)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.sft_fixtures import make_tokenizer, tiny_model, write_jsonl
from trainer.config import ConfigError
from trainer.data.sources import DataError
from trainer.objectives import IGNORE_INDEX
from trainer.rl.objective import per_token_logps
from trainer.rl.rewards import RewardFunction, load_reward_function, score
from trainer.rl.rollout import cut_at_stop, training_rows

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_policy_logps_line_up_with_each_completion_token():
    """Right-padded prompt + completion rows: each completion token's log-prob under the model that
    produced it, read from the full logits by hand, at temperature 0.7."""
    model = tiny_model(64).eval()
    prompts = [np.array([5, 9, 11]), np.array([7])]
    completions = [np.array([20, 21]), np.array([30, 31, 32, 33])]
    batch = training_rows(prompts, completions, pad_id=0)
    with torch.no_grad():
        logps, entropy = per_token_logps(model, batch["input_ids"], batch["labels"], temperature=0.7, entropy=True)
        for b, (p, c) in enumerate(zip(prompts, completions)):
            seq = torch.from_numpy(np.concatenate([p, c]))[None]
            logp = (model(seq)[0] / 0.7).log_softmax(-1)
            for j, token in enumerate(c):
                pos = len(p) - 1 + j
                assert batch["labels"][b, pos] == token
                assert logps[b, pos].item() == pytest.approx(logp[pos, token].item(), abs=1e-5)
                assert entropy[b, pos].item() == pytest.approx(-(logp[pos].exp() * logp[pos]).sum().item(), abs=1e-4)
    mask = batch["labels"] != IGNORE_INDEX
    assert mask.sum(1).tolist() == [2, 4] and (logps[~mask] == 0).all()


def test_completions_end_at_the_first_stop_token():
    new = torch.tensor([[4, 5, 2, 0, 0], [6, 7, 8, 9, 10], [3, 1, 1, 1, 1]])
    assert [c.tolist() for c in cut_at_stop(new, stop_ids=[2, 3])] == [[4, 5, 2], [6, 7, 8, 9, 10], [3]]


def _fn(name):
    import tests.rl_rewards as r
    return RewardFunction(f"tests.rl_rewards:{name}", 1.0, getattr(r, name))


def test_reward_function_errors_name_the_function_and_row():
    args = (["p1", "p2"], ["c1", "c2"], {"answer": ["1", "2"]}, ["f.jsonl:1", "f.jsonl:2"])
    assert score([_fn("uses_answer"), _fn("digits")], *args).shape == (2, 2)
    with pytest.raises(ValueError, match=r"tests.rl_rewards:raises raised RuntimeError: reward server down \(first row f.jsonl:1\)"):
        score([_fn("raises")], *args)
    with pytest.raises(ValueError, match="tests.rl_rewards:wrong_count returned 1 values for 2 completions"):
        score([_fn("wrong_count")], *args)
    with pytest.raises(ValueError, match="tests.rl_rewards:not_finite returned nan for row f.jsonl:1"):
        score([_fn("not_finite")], *args)
    with pytest.raises(ConfigError, match="rl.rewards.0..function: cannot import module 'tests.no_such'"):
        load_reward_function("tests.no_such:f", 1.0, "rl.rewards[0].function")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_reward_function("tests.rl_rewards:nope", 1.0, "k")
    with pytest.raises(ConfigError, match="not of the form module:function"):
        load_reward_function("tests.rl_rewards", 1.0, "k")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("rl")
    make_tokenizer(w, vocab_size=400)
    rows = [{"prompt": f"What is {x} + {y}?", "answer": str(x + y)} for x in range(8) for y in range(0, 8, 2)]
    write_jsonl(w / "train.jsonl", rows[:24])
    write_jsonl(w / "val.jsonl", rows[24:])
    return w


def test_overlong_prompt_and_bad_rows_are_errors_naming_the_row(work):
    from trainer.data.tokenizer import load_tokenizer
    from trainer.chat import ensure_chat_template
    from trainer.rl.prompts import load_prompts

    tok = ensure_chat_template(load_tokenizer(work / "tokenizer"), "llama3")
    bad = write_jsonl(work / "long.jsonl", [{"prompt": "What is 1 + 2?"}, {"prompt": "word " * 200}])
    with pytest.raises(DataError, match=r"long.jsonl:2: the prompt is \d+ tokens, over rl.max_prompt_len 32"):
        load_prompts([str(bad)], tok, 32, "rl.train_files")
    bad = write_jsonl(work / "noprompt.jsonl", [{"question": "x"}])
    with pytest.raises(DataError, match="noprompt.jsonl:1: a prompt row needs a 'prompt' key"):
        load_prompts([str(bad)], tok, 32, "rl.train_files")


def _config(work: Path, out: Path, **rl) -> Path:
    import yaml

    cfg = dict(model={"preset": "tiny", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 400},
               data={"tokenizer": str(work / "tokenizer"), "seq_len": 48},
               train={"output_dir": str(out), "max_steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2,
                      "eval_batches": 1, "eval_at_start": True},
               optim={"lr": 3e-3, "warmup_steps": 0}, checkpoint={"every": 1, "keep_last": 10},
               logging={"tensorboard": False, "progress": False, "log_every": 1},
               rl={"train_files": [str(work / "train.jsonl")], "val_files": [str(work / "val.jsonl")],
                   "max_prompt_len": 32, "max_new_tokens": 12, "num_generations": 4, "epochs": 2,
                   "rewards": [{"function": "tests.rl_rewards:digits"},
                               {"function": "tests.rl_rewards:uses_answer", "weight": 0.5}], **rl})
    path = work / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list[str], expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "launch/rl.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _train_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r["split"] == "train"}


def test_bad_config_is_a_one_line_error(work):
    out = work / "bad"
    proc = _run(["--config", str(_config(work, out, rewards=[{"function": "tests.no_such:f"}]))], expect_rc=2)
    assert "error: 1 problem(s) in the configuration" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].strip().startswith("defaults: rl.rewards[0].function: cannot import "
                                                                   "module 'tests.no_such'")
    assert "Traceback" not in proc.stderr and not (out / "checkpoints").exists()


@pytest.mark.slow
def test_kill_and_resume_equals_straight_run_bitwise(work):
    """Six steps, two per rollout buffer (rl.epochs 2): resuming from step 3 restores a half-used buffer
    (step 4), then generates the next buffers with the restored sampling RNG and prompt position."""
    from safetensors.torch import load_file

    out = work / "straight"
    config = _config(work, out, beta=0.05)  # a resident reference: its log-probs ride in the buffer
    log = _run(["--config", str(config)]).stdout
    assert "held-out prompts (greedy), step 0 -> step 6: reward" in log
    straight = _train_rows(out)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    # A rollout on steps 1, 3, 5 only; the second pass over a buffer is off-policy (ratio != 1 somewhere).
    assert [("rollout_reward_mean" in straight[s]) for s in range(1, 7)] == [True, False] * 3
    assert straight[2]["kl"] > 0 and straight[1]["loss"] != 0
    state = json.loads((out / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["loader"]["buffer"] is not None and state["loader"]["position"] == 2
    weights = load_file(out / "model" / "model.safetensors")

    for later in ("step_00000004", "step_00000005", "step_00000006"):
        shutil.rmtree(out / "checkpoints" / later)
    (out / "COMPLETED").unlink()
    (out / "metrics.jsonl").write_text("")
    shutil.rmtree(out / "model")
    proc = _run(["--config", str(config), "--resume", "auto"])
    assert "resumed from" in proc.stdout + proc.stderr
    resumed = _train_rows(out)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "reward", "kl", "entropy", "response_length"):
            assert resumed[step][key] == straight[step][key], (step, key)
    again = load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_reward_model_scores_text_with_its_own_tokenizer(tmp_path):
    """A reward model whose tokenizer is not the policy's: the conversation is re-rendered and re-tokenized
    by the reward model's own tokenizer and template, never fed policy ids."""
    from model_defs import ModelConfig, SequenceClassifier
    from model_defs.hf_classifier import save_hf_classifier
    from trainer.chat import ensure_chat_template
    from trainer.rl.rewards import RewardModelScores

    tokenizer = ensure_chat_template(make_tokenizer(tmp_path, vocab_size=300), "chatml")
    torch.manual_seed(0)
    rm = SequenceClassifier(ModelConfig.from_preset("tiny", dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                                    vocab_size=len(tokenizer)), num_labels=1).eval()
    save_hf_classifier(rm, tmp_path / "rm", pad_token_id=tokenizer.pad_token_id or 0)
    tokenizer.save_pretrained(tmp_path / "rm")
    scorer = RewardModelScores(str(tmp_path / "rm"), torch.device("cpu"), torch.float32, batch_size=2)
    messages = [[{"role": "user", "content": "What is 3 + 4?"}], [{"role": "user", "content": "Count to 3."}]]
    completions = ["3 + 4 = 7.", "1, 2, 3."]
    got = scorer(prompts=["What is 3 + 4?", "Count to 3."], completions=completions, prompt_messages=messages)
    for m, c, value in zip(messages, completions, got):
        text = tokenizer.apply_chat_template(m + [{"role": "assistant", "content": c}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids[:len(ids) - (1 if text.endswith("\n") else 0)]  # the template's newline after the end of turn
        with torch.no_grad():
            assert value == pytest.approx(rm(torch.tensor([ids])).item(), abs=1e-5)


@pytest.mark.slow
def test_two_ranks_zero2_and_zero3(work):
    """2-rank CPU runs: ZeRO-2, and ZeRO-3 with gathered weights for generation and a sharded frozen
    reference. Both start from the same weights and sampling seeds, so their first rollouts agree."""
    from tests.pretrain_run import launch_command, metrics, run

    first = {}
    for stage in (2, 3):
        out = work / f"zero{stage}"
        config = _config(work, out, beta=0.05, epochs=1)
        run(launch_command("rl.py", ["--config", str(config), "train.max_steps=2", "checkpoint.every=2"],
                           ranks=2, zero_stage=stage))
        train = metrics(out)
        assert [r["step"] for r in train] == [1, 2] and all(r["world_size"] == 2 for r in train)
        assert all(r["kl"] >= 0 and r["rollout_tokens_per_s"] > 0 for r in train)
        first[stage] = train[0]
    assert first[2]["rollout_reward_mean"] == first[3]["rollout_reward_mean"]
    assert first[2]["loss"] == pytest.approx(first[3]["loss"], abs=1e-5)
