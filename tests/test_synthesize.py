"""launch/synthesize.py: Magpie prefixes from templates, per-item sampling, chunked resume (also after
kill -9), duplicate counting, the cleaning recipe by one command, reward-scored preference pairs, bad
input, and the whole chain magpie -> filter -> preferences -> SFT -> DPO on tiny models."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.pretrain_run import env as run_env
from tests.sft_fixtures import REPO_ROOT, make_tokenizer, tiny_model, write_jsonl

SYNTH = str(REPO_ROOT / "launch" / "synthesize.py")
FAST = ["--max-instruction-tokens", "12", "--max-response-tokens", "12", "--device", "cpu", "--no-progress"]


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("synthesize_cli", SYNTH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synth(*args) -> int:
    from trainer.cli import guarded

    cli = _cli()
    try:
        return guarded(lambda: cli.main([str(a) for a in args]))
    except SystemExit as exit_:
        return exit_.code


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A Llama-3-template tokenizer; generators g0..g2 (ours saved as HF folders, g2 saved by
    transformers itself), one without a chat template, and a one-label reward model."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from model_defs.hf import save_hf_model
    from tests.test_score import save_classifier
    from trainer.chat import ensure_chat_template

    root = tmp_path_factory.mktemp("synth")
    tokenizer = ensure_chat_template(make_tokenizer(root, vocab_size=400), "llama3")
    for k in range(2):
        model = tiny_model(len(tokenizer), seed=k)
        save_hf_model(model, model.cfg, root / f"g{k}")
        tokenizer.save_pretrained(str(root / f"g{k}"))
    torch.manual_seed(2)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                                      eos_token_id=tokenizer.eos_token_id))
    hf.save_pretrained(str(root / "g2"))
    tokenizer.save_pretrained(str(root / "g2"))
    # A base model whose tokenizer has neither a chat template nor any chat special token.
    shutil.copytree(root / "g0", root / "plain", ignore=shutil.ignore_patterns("tokenizer*", "chat_template*"))
    words = {f"w{i}": i for i in range(len(tokenizer) - 1)} | {"</s>": len(tokenizer) - 1}
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w0")), eos_token="</s>")
    plain.save_pretrained(str(root / "plain"))
    save_classifier(root / "reward", tokenizer, 1, {0: "reward"})
    save_classifier(root / "three", tokenizer, 3, {0: "a", 1: "b", 2: "c"})
    return root


# ----------------------------------------------------------------------------- pieces


def test_prefix_is_read_off_each_template(work):
    from trainer.chat import CHAT_TEMPLATES
    from trainer.data.tokenizer import load_tokenizer
    from trainer.synthesize.template import magpie_prefix

    tok = load_tokenizer(work / "g0")
    assert magpie_prefix(tok, "m") == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    tok.chat_template = CHAT_TEMPLATES["chatml"]
    assert magpie_prefix(tok, "m") == "<|im_start|>user\n"
    # A Qwen2-style template that adds a default system turn: the prefix carries it.
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
                         "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}")
    assert magpie_prefix(tok, "m") == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n"
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # never shows the content
    with pytest.raises(ValueError, match="m: cannot derive the user-turn prefix"):
        magpie_prefix(tok, "m")
    tok.chat_template = "{{ messages[0]['content'] }}"  # nothing before the user's words
    with pytest.raises(ValueError, match="puts nothing before"):
        magpie_prefix(tok, "m")
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        magpie_prefix(tok, "m")


def test_near_duplicates_match_a_brute_force_jaccard():
    from trainer.synthesize.dedup import InstructionDedup, shingles

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(400)]
    dedup, kept = InstructionDedup(0.6), []
    for t in texts:
        verdict = dedup.check(t)
        key = " ".join(t.lower().split())
        exact = any(key == " ".join(k.lower().split()) for k in kept)
        near = any(len(shingles(t) & shingles(k)) / len(shingles(t) | shingles(k)) >= 0.6 for k in kept)
        assert verdict == ("exact" if exact else "near" if near else None), t
        if verdict is None:
            kept.append(t)
    assert 20 < len(kept) < 390
    d = InstructionDedup(0.8)
    assert d.check("Write a poem about the sea.") is None
    assert d.check("write a POEM about the sea") == "exact"
    assert d.check("Write a short poem about the sea and the sky today.") is None
    assert d.check("Write a short poem about the sea and the sky today please.") == "near"


def test_per_row_generators_make_a_row_independent_of_its_batch():
    from model_defs.generate import generate

    model = tiny_model(64, seed=3).eval()
    prompts = torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    together = generate(model, prompts, max_new_tokens=8, temperature=1.0,
                        generator=[torch.Generator().manual_seed(s) for s in (11, 12, 13)])
    for i, s in enumerate((11, 12, 13)):
        alone = generate(model, prompts[i:i + 1], max_new_tokens=8, temperature=1.0,
                         generator=[torch.Generator().manual_seed(s)])
        assert torch.equal(alone[0], together[i])
    other = generate(model, prompts, max_new_tokens=8, temperature=1.0,
                     generator=[torch.Generator().manual_seed(s) for s in (11, 99, 13)])
    assert torch.equal(other[0], together[0]) and not torch.equal(other[1], together[1])


def test_chunked_output_refuses_foreign_files_and_other_settings(tmp_path):
    from trainer.synthesize.resumable import ChunkedJsonl

    out = ChunkedJsonl(tmp_path / "o.jsonl", {"a": 1})
    out.open()
    out.commit([{"i": 0}, {"i": 1}], 2)
    with open(tmp_path / "o.jsonl", "a") as f:
        f.write('{"i": "half-written')  # a kill between the append and the state
    again = ChunkedJsonl(tmp_path / "o.jsonl", {"a": 1})
    assert again.open().items_done == 2 and again.rows() == [{"i": 0}, {"i": 1}]
    again.commit([{"i": 2}], 3)
    assert read_jsonl(tmp_path / "o.jsonl") == [{"i": 0}, {"i": 1}, {"i": 2}]
    with pytest.raises(ValueError, match=r"other settings \(a: 1 there, 2 now\)"):
        ChunkedJsonl(tmp_path / "o.jsonl", {"a": 2}).open()
    (tmp_path / "mine.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="was not written by this command"):
        ChunkedJsonl(tmp_path / "mine.jsonl", {"a": 1}).open()


# ----------------------------------------------------------------------------- magpie


def test_magpie_rows_resume_and_refusals(work, tmp_path, capsys):
    out = tmp_path / "m.jsonl"
    args = ["magpie", "--model", work / "g0", "--num-items", 6, "--out", out, "--batch-size", 2,
            "--chunk-size", 4, "--seed", 3, *FAST]
    assert synth(*args) == 0
    rows = read_jsonl(out)
    state = json.loads((tmp_path / "m.jsonl.state.json").read_text())
    assert state["complete"] and state["items_done"] == 6 and state["rows"] == len(rows)
    assert state["counters"]["kept"] == len(rows) and sum(state["counters"].values()) == 6
    first = rows[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][0]["content"] == first["instruction"]
    assert first["messages"][1]["content"] == first["response"]
    assert first["generation"]["seed"] == 3 and first["generation"]["instruction_sampling"]["temperature"] == 1.0
    assert [r["generation"]["item"] for r in rows] == sorted({r["generation"]["item"] for r in rows})

    # A run cut after its first chunk (state rewound, half a chunk appended) continues to the same file.
    whole = out.read_bytes()
    first_chunk = [r for r in rows if r["generation"]["item"] < 4]
    cut = sum(len((json.dumps(r, ensure_ascii=False) + "\n").encode()) for r in first_chunk)
    state.update(items_done=4, rows=len(first_chunk), bytes=cut, complete=False,
                 counters={"kept": len(first_chunk)})
    (tmp_path / "m.jsonl.state.json").write_text(json.dumps(state))
    out.write_bytes(whole[:cut] + whole[cut:cut + 7])
    assert synth(*args) == 0
    assert out.read_bytes() == whole

    capsys.readouterr()
    assert synth(*args) == 0 and "already complete" in capsys.readouterr().out
    # Other settings: refused, one line, nothing appended.
    assert synth(*[a if a != "3" else "4" for a in map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings (seed: 3 there, 4 now)" in err
    assert out.read_bytes() == whole


def test_magpie_on_a_transformers_folder_and_a_different_batching(work, tmp_path):
    """g2 was written by transformers; instruction prompts are all the same, so batch size changes nothing
    in the instructions, and per-item seeds make two runs equal."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    common = ["magpie", "--model", work / "g2", "--num-items", 5, "--no-response", *FAST]
    assert synth(*common, "--out", a, "--batch-size", 5) == 0
    assert synth(*common, "--out", b, "--batch-size", 2, "--chunk-size", 3) == 0
    ra, rb = read_jsonl(a), read_jsonl(b)
    assert [r["instruction"] for r in ra] == [r["instruction"] for r in rb]
    assert all("response" not in r and r["messages"][-1]["role"] == "user" for r in ra)


def test_duplicates_are_dropped_and_counted(work, tmp_path):
    """Greedy decoding writes the same instruction every time: one is kept, the rest are exact duplicates."""
    out = tmp_path / "d.jsonl"
    assert synth("magpie", "--model", work / "g0", "--num-items", 5, "--out", out, "--instruction-temperature", 0,
                 "--no-response", *FAST) == 0
    state = json.loads((tmp_path / "d.jsonl.state.json").read_text())
    assert len(read_jsonl(out)) == 1 and state["counters"]["dropped_exact"] == 4


def test_magpie_bad_input_is_one_line_and_writes_nothing(work, tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert synth("magpie", "--model", work / "plain", "--num-items", 2, "--out", out, *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "no chat template" in err and err.count("\n") == 0
    assert not out.exists() and not (tmp_path / "x.jsonl.state.json").exists()
    assert synth("magpie", "--model", work / "g0", "--num-items", 2, "--out", out, "--backend", "vllm", *FAST) == 2
    assert "vLLM is not installed" in capsys.readouterr().err or _has_vllm()
    assert not out.exists()


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------- filter


def test_filter_removes_each_rule_and_counts_it(tmp_path):
    from datapipe.synthetic import instruction_corpus, sentence

    rng = random.Random(1)
    rows = instruction_corpus()
    loop = " ".join(sentence(rng) for _ in range(2))
    rows += [{"instruction": f"Tell a story {i}.", "response": " ".join([loop] * 4), "kind": "looping"}
             for i in range(5)]
    magpie_rows = [{"messages": [{"role": "user", "content": r["instruction"]},
                                 {"role": "assistant", "content": r["response"]}],
                    "instruction": r["instruction"], "response": r["response"], "id": i, "kind": r["kind"]}
                   for i, r in enumerate(rows)]
    write_jsonl(tmp_path / "m.jsonl", magpie_rows)
    assert synth("filter", "--input", tmp_path / "m.jsonl", "--out", tmp_path / "clean") == 0
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    by_step = {s["step"]: s for s in report["steps"]}
    removed = by_step["instruction_rules"]["removed"]
    assert removed["repeated_ngrams"]["docs"] == 5 and removed["refusal"]["docs"] == 8
    assert removed["response_too_long"]["docs"] == 8 and removed["repeated_token"]["docs"] == 8
    assert by_step["language"]["removed"]  # the non-English rows (and some one-line answers) go here
    assert by_step["minhash_dedup"]["removed"]
    kept = [json.loads(line) for f in sorted((tmp_path / "clean" / "data").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert {r["kind"] for r in kept} <= {"good", "similar"} and len(kept) >= 50
    assert all(r["messages"][1]["content"] == r["response"] for r in kept)


# ----------------------------------------------------------------------------- preferences


def _instructions(path: Path, n: int = 5) -> Path:
    rows = [{"instruction": f"Say something about the number {i}."} for i in range(n - 2)]
    rows.append({"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Blue."}]})
    rows.append({"prompt": "What is two plus two?"})
    return write_jsonl(path, rows)


def _prefs(work: Path, instructions: Path, out: Path, *extra):
    return synth("preferences", "--instructions", instructions, "--model", work / "g0", "--model", work / "g1",
                 "--model", work / "g2", "--reward-model", work / "reward", "--out", out, "--max-tokens", 10,
                 "--batch-size", 2, "--chunk-size", 3, "--device", "cpu", "--no-progress", *extra)


def test_preferences_pick_best_and_worst_by_the_reward_model(work, tmp_path, capsys):
    from trainer.data.tokenizer import load_tokenizer
    from trainer.dpo.data import load_pairs
    from trainer.score import (
        ScoreReport,
        find_classifier,
        load_scoring_model,
        read_score_rows,
        score_sequences,
        tokenize_score_rows,
    )

    instructions = _instructions(tmp_path / "i.jsonl")
    out = tmp_path / "p"
    assert _prefs(work, instructions, out, "--margin", "0.05") == 0
    assert "pairs kept of 5 instructions" in capsys.readouterr().out
    pairs = read_jsonl(out / "pairs.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kept"] == len(pairs) and summary["kept"] + sum(summary["dropped"].values()) == 5
    assert set(summary["scores_by_model"]) == {"0:g0", "1:g1", "2:g2"}

    # Every answer's score is what launch/score.py's code gives that prompt and response.
    answers = [{"prompt": p["prompt"], "response": a["response"], "score": a["score"]}
               for p in pairs for a in p["answers"] if a["response"].strip()]
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": a["prompt"], "response": a["response"]} for a in answers])
    source = find_classifier(work / "reward")
    report = ScoreReport()
    rows = read_score_rows(tmp_path / "a.jsonl", skip_bad_rows=False, output_fields=["score"], report=report)
    tok = load_tokenizer(work / "reward")
    seqs = tokenize_score_rows(tok, rows, max_len=1024, max_prompt_len=512, chat_template="auto", report=report)
    logits = score_sequences(load_scoring_model(source, torch.device("cpu"), torch.float32), seqs, batch_size=1,
                             pad_id=tok.pad_token_id)
    assert [a["score"] for a in answers] == pytest.approx(logits[:, 0].tolist(), abs=1e-5)

    for p in pairs:
        scored = [a for a in p["answers"] if a["score"] is not None]
        best, worst = max(a["score"] for a in scored), min(a["score"] for a in scored)
        assert p["chosen"] == next(a["response"] for a in scored if a["score"] == best)
        assert p["rejected"] == next(a["response"] for a in scored if a["score"] == worst)
        assert p["score_margin"] == pytest.approx(best - worst) and p["score_margin"] > 0.05
    assert pairs[-1]["prompt"] == [{"role": "user", "content": "What is two plus two?"}]
    system_pair = [p for p in pairs if p["prompt"][0]["role"] == "system"]
    assert all(p["prompt"][-1] == {"role": "user", "content": "Name a colour."} for p in system_pair)
    assert len(load_pairs([out / "pairs.jsonl"], on_identical="error", on_empty="error")) == len(pairs)

    # The margin is applied when pairing, so another threshold reuses the answers and scores of the folder.
    assert _prefs(work, instructions, out, "--margin", "1e9") == 0
    assert read_jsonl(out / "pairs.jsonl") == [] and json.loads((out / "summary.json").read_text())["dropped"]["margin"]
    assert _prefs(work, instructions, out, "--margin", "0.05") == 0
    assert read_jsonl(out / "pairs.jsonl") == pairs
    assert _prefs(work, instructions, out, "--temperature", "0.5") == 2
    assert "other settings (sampling:" in capsys.readouterr().err


def test_preferences_bad_input(work, tmp_path, capsys):
    instructions = _instructions(tmp_path / "i.jsonl")
    assert synth("preferences", "--instructions", instructions, "--model", work / "g0", "--model", work / "g1",
                 "--reward-model", work / "three", "--out", tmp_path / "a", "--device", "cpu") == 2
    assert "has 3 outputs; a reward model has one" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok"}, {"question": "?"}])
    assert _prefs(work, bad, tmp_path / "b") == 2
    err = capsys.readouterr().err.strip()
    assert f"{bad}:2: expected 'instruction'" in err and err.count("\n") == 0
    assert synth("preferences", "--instructions", instructions, "--model", work / "plain", "--model", work / "g1",
                 "--reward-model", work / "reward", "--out", tmp_path / "c", "--device", "cpu") == 2
    assert "no chat template" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    assert _prefs(work, instructions, tmp_path / "d") == 2
    assert "not written by this command" in capsys.readouterr().err


def _onpolicy(work: Path, questions: Path, out: Path, *extra):
    return synth("onpolicy", "--questions", questions, "--model", work / "g0", "--out", out, "--max-tokens", 8,
                 "--batch-size", 2, "--chunk-size", 3, "--device", "cpu", "--no-progress", *extra)


def test_onpolicy_pairs_reject_the_models_own_wrong_answers(work, tmp_path, capsys):
    from trainer.dpo.data import load_pairs

    questions = [f"Say something about the number {i}." for i in range(5)]
    first = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q, "answer": f"Reference {i}."}
                                               for i, q in enumerate(questions)])
    assert _onpolicy(work, first, tmp_path / "a") == 0
    answers = [r["response"] for r in read_jsonl(tmp_path / "a" / "answers-0.jsonl")]
    assert len(answers) == 5 and all(a.strip() for a in answers)
    pairs = read_jsonl(tmp_path / "a" / "pairs.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(f"Reference {i}.", a) for i, a in enumerate(answers)]
    assert "0 of 5 answered correctly" in capsys.readouterr().out

    # Greedy answers are the model's own: given as references (one with other case and spacing), those
    # questions count as correct and make no pair; the rest still pair against their references.
    rows = [{"prompt": q, "gold": answers[i] if i < 2 else f"Reference {i}."} for i, q in enumerate(questions)]
    rows[1]["gold"] = "  " + answers[1].upper().replace(" ", "  ") + "."
    second = write_jsonl(tmp_path / "q2.jsonl", rows)
    assert _onpolicy(work, second, tmp_path / "b", "--reference-key", "gold") == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (summary["correct"], summary["wrong"], summary["pairs"]) == (1, 4, 4)
    assert [r["response"] for r in read_jsonl(tmp_path / "b" / "answers-0.jsonl")] == answers
    # The match rule is applied when pairing, so it reuses the folder's answers.
    assert _onpolicy(work, second, tmp_path / "b", "--reference-key", "gold", "--match", "normalized") == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert (summary["correct"], summary["pairs"]) == (2, 3)
    assert len(load_pairs([tmp_path / "b" / "pairs.jsonl"], on_identical="error", on_empty="error")) == 3
    assert _onpolicy(work, second, tmp_path / "b", "--reference-key", "gold", "--temperature", "0.7") == 2
    assert "other settings (sampling:" in capsys.readouterr().err

    # A row without its reference answer is one line naming file:line, before anything is written.
    assert _onpolicy(work, second, tmp_path / "c") == 2
    err = capsys.readouterr().err.strip()
    assert f"{second}:1: no reference answer: 'answer'" in err and err.count("\n") == 0
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- processes


def _wait_for_chunks(proc: subprocess.Popen, state: Path, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.exists():
            s = json.loads(state.read_text())
            if s["items_done"] >= 2:
                return s
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before a chunk: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("no chunk committed in time")


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(work, tmp_path):
    """World size 1 (one process). The killed run is continued by the same command; the file equals
    that of a run never stopped, with no item lost or repeated."""
    def command(out: Path) -> list[str]:
        return [sys.executable, SYNTH, "magpie", "--model", str(work / "g0"), "--num-items", "24",
                "--out", str(out), "--batch-size", "2", "--chunk-size", "2", "--max-instruction-tokens", "16",
                "--max-response-tokens", "16", "--device", "cpu", "--no-progress"]

    proc = subprocess.Popen(command(tmp_path / "k.jsonl"), cwd=REPO_ROOT, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        at_kill = _wait_for_chunks(proc, tmp_path / "k.jsonl.state.json")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not at_kill["complete"]
    subprocess.run(command(tmp_path / "k.jsonl"), cwd=REPO_ROOT, env=run_env(), check=True, capture_output=True)
    subprocess.run(command(tmp_path / "u.jsonl"), cwd=REPO_ROOT, env=run_env(), check=True, capture_output=True)
    killed, straight = read_jsonl(tmp_path / "k.jsonl"), read_jsonl(tmp_path / "u.jsonl")
    items = [r["generation"]["item"] for r in killed]
    assert len(items) == len(set(items)) and killed == straight
    assert (tmp_path / "k.jsonl").read_bytes() == (tmp_path / "u.jsonl").read_bytes()


@pytest.mark.slow
def test_whole_chain_magpie_filter_preferences_sft_dpo(work, tmp_path):
    """World size 1. Tiny random models write noise, so the filter runs with its rules opened wide (every
    language, short answers): what is tested here is that each stage reads what the one before wrote."""
    import yaml
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    def run(*args: str | Path, timeout: int = 300) -> str:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=run_env(), capture_output=True,
                              text=True, timeout=timeout, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc.stdout + proc.stderr

    run(SYNTH, "magpie", "--model", work / "g0", "--num-items", 24, "--out", tmp_path / "magpie.jsonl",
        "--batch-size", 8, "--chunk-size", 8, "--max-instruction-tokens", 16, "--max-response-tokens", 24,
        "--device", "cpu", "--no-progress")
    languages = sorted(LanguageIdentifier.from_model_file(MODEL_FILE).nb_classes)
    run(SYNTH, "filter", "--input", tmp_path / "magpie.jsonl", "--out", tmp_path / "clean",
        f"step_params.language.languages=[{','.join(languages)}]", "step_params.language.threshold=0",
        "step_params.instruction_rules.min_words=1", "step_params.instruction_rules.max_token_run=100",
        "step_params.instruction_rules.max_repeated_ngram_fraction=1.0")
    cleaned = sorted((tmp_path / "clean" / "data").glob("*.jsonl"))
    n_clean = sum(len(f.read_text().splitlines()) for f in cleaned)
    assert n_clean >= 12
    log = run(SYNTH, "preferences", "--instructions", tmp_path / "clean" / "data", "--model", work / "g0",
              "--model", work / "g1", "--model", work / "g2", "--reward-model", work / "reward",
              "--out", tmp_path / "prefs", "--max-tokens", 16, "--device", "cpu", "--no-progress")
    summary = json.loads((tmp_path / "prefs" / "summary.json").read_text())
    assert summary["instructions"] == n_clean and summary["kept"] >= 8, log

    common = {"logging": {"tensorboard": False, "progress": False}, "optim": {"lr": 1e-3, "warmup_steps": 0}}
    sft = {"model": {"init_from": str(work / "g0")}, "data": {"seq_len": 96},
           "train": {"output_dir": str(tmp_path / "sft"), "max_steps": 2, "micro_batch_size": 4},
           "sft": {"train_files": [str(f) for f in cleaned], "method": "full"}, **common}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    run("launch/sft.py", "--config", tmp_path / "sft.yaml")
    dpo = {"model": {"init_from": str(tmp_path / "sft" / "model")}, "data": {"seq_len": 96},
           "train": {"output_dir": str(tmp_path / "dpo"), "max_steps": 2, "micro_batch_size": 4},
           "dpo": {"train_files": [str(tmp_path / "prefs" / "pairs.jsonl")], "max_prompt_len": 48,
                   "method": "full", "reference": "precompute", "on_identical": "error", "on_empty": "error"},
           **common}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    log = run("launch/dpo.py", "--config", tmp_path / "dpo.yaml")
    assert f"{summary['kept']} rows -> {summary['kept']} pairs" in log
    steps = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r["split"] == "train"][-1] == 2
    assert (tmp_path / "dpo" / "model" / "config.json").is_file()
