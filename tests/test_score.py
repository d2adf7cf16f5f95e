"""launch/score.py: reward scores equal the reward objective's, order and batching do not change them,
classifier labels, model folders of every kind, and bad input refused with nothing written."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.sft_fixtures import demo_rows, make_tokenizer, write_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)


def _cli():
    spec = importlib.util.spec_from_file_location("score_cli", REPO_ROOT / "launch" / "score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _cli()


def score(*args: str | Path) -> int:
    """The CLI in this process, exit code as the shell would see it."""
    from trainer.cli import guarded

    argv = [str(a) for a in args] + ["--device", "cpu", "--no-progress"]
    try:
        return guarded(lambda: CLI.main(argv))
    except SystemExit as exit_:
        return exit_.code


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def save_classifier(folder: Path, tokenizer, num_labels: int, id2label=None, seed: int = 0):
    from model_defs import ModelConfig, SequenceClassifier
    from model_defs.hf_classifier import save_hf_classifier

    torch.manual_seed(seed)
    model = SequenceClassifier(ModelConfig.from_preset("tiny", vocab_size=len(tokenizer), **SHAPE), num_labels)
    # A trained head, not the N(0, 0.02) init: scores far enough apart that a mix-up shows.
    torch.nn.init.normal_(model.score.weight, std=1.0)
    save_hf_classifier(model, folder, id2label=id2label, pad_token_id=tokenizer.pad_token_id)
    tokenizer.save_pretrained(str(folder))
    return model.eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("score")
    make_tokenizer(work, vocab_size=400)
    return work


def chat_tokenizer(work: Path, template: str):
    from trainer.chat import ensure_chat_template
    from trainer.data.tokenizer import load_tokenizer

    return ensure_chat_template(load_tokenizer(work / "tokenizer"), template)


@pytest.fixture(scope="module")
def reward(work) -> tuple[Path, object]:
    """A one-label model folder (llama3 template) and the model."""
    folder = work / "reward_llama3"
    return folder, save_classifier(folder, chat_tokenizer(work, "llama3"), 1, {0: "reward"})


@pytest.fixture(scope="module")
def classifier(work) -> tuple[Path, object]:
    folder = work / "classifier"
    return folder, save_classifier(folder, chat_tokenizer(work, "llama3"), 3, {0: "ham", 1: "spam", 2: "eggs"}, seed=1)


def mixed_rows() -> list[dict]:
    """Every row shape, lengths all different, in no particular length order."""
    rows = []
    for i, r in enumerate(demo_rows("dpo")[:9]):
        rows.append({"id": i, "prompt": r["prompt"] + " Think." * (i % 4), "response": r["chosen"]})
    rows.append({"id": 9, "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "What is 2 + 2?"},
                                       {"role": "assistant", "content": "4."}]})
    rows.append({"id": 10, "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                                      {"role": "user", "content": "What is 3 + 1?"}], "response": "3 + 1 = 4."})
    rows.append({"id": 11, "text": "A plain text row, scored as classification reads text."})
    rows.append({"id": 12, "prompt": "Say something long.", "response": "words " * 40})
    return rows


# ----------------------------------------------------------------------------- the reward objective's scores


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_pair_scores_equal_the_reward_objective(work, tmp_path, template):
    """Pairs read by reward training's reader, collated by its collate, scored by its objective."""
    from trainer.dpo.data import load_token_pairs
    from trainer.reward.batches import collate_scored_pairs
    from trainer.reward.objective import RewardObjective

    tokenizer = chat_tokenizer(work, template)
    folder = tmp_path / "model"
    model = save_classifier(folder, tokenizer, 1, {0: "reward"}, seed=2)
    pairs = demo_rows("dpo")[:10]
    pairs.append({"prompt": [{"role": "system", "content": "Answer in numbers."},
                             {"role": "user", "content": "What is 5 + 5?"}], "chosen": "10.", "rejected": "11."})
    # Over the limits: training cuts it (prompt to its end, then the response) and so must score.py.
    pairs.append({"prompt": "Count: " + "one two three " * 20, "chosen": "four " * 30, "rejected": "five."})
    max_len, max_prompt_len = 48, 24
    train_file = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    tokens, report = load_token_pairs([train_file], tokenizer, max_len=max_len, max_prompt_len=max_prompt_len,
                                      section="reward")
    assert len(tokens) == len(pairs) and report.truncated >= 1
    expected = []
    with torch.no_grad():
        for pair in tokens:
            _, stats = RewardObjective()(model, collate_scored_pairs([pair], pad_id=tokenizer.pad_token_id,
                                                                     pad_to_multiple_of=1))
            expected += [stats["chosen_score_sum"].item(), stats["rejected_score_sum"].item()]

    rows = [{"prompt": p["prompt"], "response": p[side]} for p in pairs for side in ("chosen", "rejected")]
    write_jsonl(tmp_path / "rows.jsonl", rows)
    assert score("--model", folder, "--input", tmp_path / "rows.jsonl", "--output", tmp_path / "out.jsonl",
                 "--max-len", max_len, "--max-prompt-len", max_prompt_len, "--batch-size", 5) == 0
    got = [r["score"] for r in read_jsonl(tmp_path / "out.jsonl")]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.std(expected) > 1e-2  # the scores tell rows apart, so a shuffled output would fail


def test_messages_row_scores_as_its_prompt_and_response(reward, tmp_path):
    folder, _ = reward
    conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    write_jsonl(tmp_path / "in.jsonl", [{"messages": conversation},
                                        {"prompt": conversation[:1], "response": "4."},
                                        {"prompt": "What is 2 + 2?", "response": "4."}])
    assert score("--model", folder, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl") == 0
    first, *others = [r["score"] for r in read_jsonl(tmp_path / "out.jsonl")]
    assert others == [pytest.approx(first, abs=1e-6)] * 2


# ----------------------------------------------------------------------------- order and batching


def test_order_kept_and_batch_size_changes_nothing(reward, tmp_path, capsys):
    folder, _ = reward
    rows = mixed_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    outputs = {}
    for batch_size in (1, 7):
        out = tmp_path / f"out{batch_size}.jsonl"
        assert score("--model", folder, "--input", tmp_path / "in.jsonl", "--output", out,
                     "--batch-size", batch_size) == 0
        outputs[batch_size] = read_jsonl(out)
    assert f"scored {len(rows)} rows" in capsys.readouterr().out
    for scored in outputs.values():
        assert [{k: v for k, v in r.items() if k != "score"} for r in scored] == rows  # rows as read, in order
    one, seven = ([r["score"] for r in outputs[b]] for b in (1, 7))
    np.testing.assert_allclose(one, seven, rtol=0, atol=1e-5)
    assert len(set(np.round(one, 4))) == len(rows)


def test_scores_equal_the_model_on_each_row_alone(reward, tmp_path):
    """Window sorting and padding score each row exactly as a batch of one does."""
    from trainer.score import ScoreReport, parse_score_row, read_score_rows, tokenize_score_rows

    folder, model = reward
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    rows = mixed_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert score("--model", folder, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                 "--batch-size", 4) == 0
    parsed = read_score_rows(tmp_path / "in.jsonl", skip_bad_rows=False, output_fields=["score"],
                             report=ScoreReport())
    assert isinstance(parse_score_row(rows[11]), str)
    seqs = tokenize_score_rows(tokenizer, parsed, max_len=1024, max_prompt_len=512, chat_template="auto",
                               report=ScoreReport())
    with torch.no_grad():
        alone = [model(torch.tensor(s)[None]).item() for s in seqs]
    np.testing.assert_allclose([r["score"] for r in read_jsonl(tmp_path / "out.jsonl")], alone, rtol=0, atol=1e-5)
    assert seqs[11][-1] == tokenizer.eos_token_id  # text rows end in EOS as classification encodes them


# ----------------------------------------------------------------------------- classifiers and model folders


def test_classifier_writes_label_names_and_logits(classifier, tmp_path):
    from trainer.classify.data import encode_texts
    from trainer.data.tokenizer import load_tokenizer

    folder, model = classifier
    texts = [r["text"] for r in demo_rows("pretrain_eval")[:12]]
    write_jsonl(tmp_path / "in.jsonl", [{"text": t, "label": "gold"} for t in texts])
    out = tmp_path / "out.jsonl"
    # The input's own 'label' (gold labels) is not overwritten: the predicted one needs another name.
    assert score("--model", folder, "--input", tmp_path / "in.jsonl", "--output", out) == 2
    assert not out.exists()
    assert score("--model", folder, "--input", tmp_path / "in.jsonl", "--output", out,
                 "--label-field", "predicted", "--max-len", 16) == 0
    scored = read_jsonl(out)
    ids = encode_texts(load_tokenizer(folder), texts, 16)
    with torch.no_grad():
        logits = [model(torch.tensor(i)[None])[0] for i, _ in ids]
    names = ["ham", "spam", "eggs"]
    for row, text, row_logits in zip(scored, texts, logits):
        assert row["text"] == text and row["label"] == "gold"
        assert list(row["scores"]) == names
        np.testing.assert_allclose(list(row["scores"].values()), row_logits.numpy(), rtol=0, atol=1e-5)
        assert row["predicted"] == names[int(row_logits.argmax())]
    assert len({round(r["scores"]["spam"], 4) for r in scored}) == len(texts)


def test_folder_saved_by_transformers(work, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = chat_tokenizer(work, "llama3")
    torch.manual_seed(3)
    theirs = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_labels=2, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})).eval()
    theirs.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(str(tmp_path / "hf"))
    texts = ["One short text.", "Another, a little longer, text to classify."]
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    assert score("--model", tmp_path / "hf", "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl",
                 "--batch-size", 2) == 0
    from trainer.classify.data import encode_texts

    for row, (ids, _) in zip(read_jsonl(tmp_path / "out.jsonl"), encode_texts(tokenizer, texts, 64)):
        with torch.no_grad():
            expected = theirs(torch.tensor(ids)[None]).logits[0]
        np.testing.assert_allclose([row["scores"]["bad"], row["scores"]["good"]], expected.numpy(), atol=1e-5)


def fake_run(run: Path, model_folder: Path | None, model, tokenizer, classifier_json: bool = True) -> Path:
    """A run folder as training leaves it: config.yaml, tokenizer/, one checkpoint, optionally model/."""
    import shutil

    import yaml
    from safetensors.torch import save_file

    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, step / "model.safetensors")
    (step / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    if classifier_json:
        (step / "classifier.json").write_text(json.dumps({"num_labels": 1, "id2label": {"0": "reward"}}))
    (step / "COMPLETE").write_text("")
    tokenizer.save_pretrained(str(run / "tokenizer"))
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"seq_len": 64}, "reward": {"max_prompt_len": 32}}))
    if model_folder is not None:
        shutil.copytree(model_folder, run / "model")
    return run


def test_run_folder_its_model_and_its_checkpoint_score_alike(reward, work, tmp_path, capsys):
    """A run folder scores with its model/ (else its newest checkpoint) and cuts rows to the run's limits."""
    folder, model = reward
    tokenizer = chat_tokenizer(work, "llama3")
    rows = [{"prompt": "Tell me " + "more and " * 30, "response": "Fine. " * 20}, {"prompt": "Hi", "response": "Hi."}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    with_model = fake_run(tmp_path / "run", folder, model, tokenizer)
    checkpoint_only = fake_run(tmp_path / "run2", None, model, tokenizer)
    results = {}
    for name, path in [("run", with_model), ("model", with_model / "model"), ("checkpoint_run", checkpoint_only),
                       ("checkpoint", checkpoint_only / "checkpoints" / "step_00000004"),
                       ("explicit", folder)]:
        limits = ["--max-len", 64, "--max-prompt-len", 32] if name == "explicit" else []
        assert score("--model", path, "--input", tmp_path / "in.jsonl", "--output", tmp_path / f"{name}.jsonl",
                     *limits) == 0, capsys.readouterr().err
        results[name] = [r["score"] for r in read_jsonl(tmp_path / f"{name}.jsonl")]
    assert "1 cut to --max-len 64 / --max-prompt-len 32" in capsys.readouterr().out
    for name, got in results.items():
        np.testing.assert_allclose(got, results["explicit"], rtol=0, atol=1e-5, err_msg=name)


def test_causal_lm_is_refused(work, tmp_path, capsys):
    from model_defs.hf import save_hf_model
    from tests.sft_fixtures import tiny_model

    tokenizer = chat_tokenizer(work, "llama3")
    lm = tiny_model(len(tokenizer))
    save_hf_model(lm, lm.cfg, tmp_path / "lm")
    tokenizer.save_pretrained(str(tmp_path / "lm"))
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "Hi", "response": "Hi."}])
    from model_defs import ModelConfig, SequenceClassifier

    sft_run = fake_run(tmp_path / "sft_run", None, SequenceClassifier(ModelConfig.from_preset("tiny", **SHAPE), 1),
                       tokenizer, classifier_json=False)
    for path in (tmp_path / "lm", sft_run):
        assert score("--model", path, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl") == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "causal LM" in err, err
        assert not (tmp_path / "out.jsonl").exists()


# ----------------------------------------------------------------------------- bad input, nothing written


GOOD = {"prompt": "What is 1 + 1?", "response": "2."}


@pytest.mark.parametrize("line, problem", [
    ("{not json", "not valid JSON"),
    (json.dumps({"prompt": "Hi"}), "missing 'response'"),
    (json.dumps({"question": "Hi", "answer": "Ho"}), "expected 'prompt' + 'response'"),
    (json.dumps({"prompt": "Hi", "response": "  "}), "empty response"),
    (json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}),
     "empty response"),
    (json.dumps({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Ho"}]}),
     "must be the assistant's"),
    (json.dumps({"prompt": [{"role": "robot", "content": "Hi"}], "response": "Ho"}), "'prompt': messages[0].role"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_bad_row_names_file_and_line_and_writes_nothing(reward, tmp_path, capsys, line, problem):
    folder, _ = reward
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    out = tmp_path / "out.jsonl"
    assert score("--model", folder, "--input", inp, "--output", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{inp}:4: " in err and problem in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output, no temp file

    assert score("--model", folder, "--input", inp, "--output", out, "--skip-bad-rows") == 0
    assert "1 bad rows skipped (e.g. " in capsys.readouterr().out
    assert [{k: r[k] for k in GOOD} for r in read_jsonl(out)] == [GOOD] * 3


def test_output_refusals(reward, tmp_path, capsys):
    folder, _ = reward
    inp = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "out.jsonl"
    assert score("--model", folder, "--input", inp, "--output", inp) == 2
    assert "would replace the input" in capsys.readouterr().err
    out.write_text("keep me\n")
    assert score("--model", folder, "--input", inp, "--output", out) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert score("--model", folder, "--input", inp, "--output", out, "--overwrite") == 0
    assert read_jsonl(out)[0]["prompt"] == GOOD["prompt"]
    # A row that already holds the output field is refused whole, not skipped: every row would lose it.
    write_jsonl(inp, [{**GOOD, "score": 1.0}])
    assert score("--model", folder, "--input", inp, "--output", tmp_path / "o2.jsonl", "--skip-bad-rows") == 2
    assert f"{inp}:1: the row already has a 'score' field" in capsys.readouterr().err
    assert score("--model", folder, "--input", inp, "--output", tmp_path / "o2.jsonl", "--field", "reward") == 0
    assert read_jsonl(tmp_path / "o2.jsonl")[0]["score"] == 1.0
    assert score("--model", folder, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o3.jsonl") == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err


def test_a_failed_write_leaves_no_file(tmp_path):
    from trainer.score import write_jsonl_atomic

    out = tmp_path / "out.jsonl"
    with pytest.raises(TypeError):
        write_jsonl_atomic(out, [{"a": 1}] * 100 + [{"b": object()}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_cuda_and_bf16_score_as_the_cpu_does(reward, tmp_path):
    """GPU batches pad to multiples of 8 and may run in bf16; the scores stay the CPU's."""
    from trainer.cli import guarded

    folder, _ = reward
    write_jsonl(tmp_path / "in.jsonl", mixed_rows())
    results = {}
    for name, extra in (("cpu", ["--device", "cpu"]), ("cuda", ["--device", "cuda"]),
                        ("bf16", ["--device", "cuda", "--bf16"])):
        argv = ["--model", str(folder), "--input", str(tmp_path / "in.jsonl"), "--output",
                str(tmp_path / f"{name}.jsonl"), "--batch-size", "5", "--no-progress", *extra]
        assert guarded(lambda argv=argv: CLI.main(argv)) == 0
        results[name] = np.array([r["score"] for r in read_jsonl(tmp_path / f"{name}.jsonl")])
    np.testing.assert_allclose(results["cuda"], results["cpu"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(results["bf16"], results["cpu"], rtol=0, atol=0.1 * np.abs(results["cpu"]).max())


def test_the_command_line(reward, tmp_path):
    """The real entry point, progress bar included (not a terminal here); its errors are tested in-process."""
    folder, _ = reward
    inp = write_jsonl(tmp_path / "in.jsonl", [GOOD, {"text": "Plain."}, {"prompt": "Hi"}])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "launch/score.py", "--model", str(folder), "--input", str(inp),
                           "--output", str(tmp_path / "out.jsonl"), "--device", "cpu", "--skip-bad-rows"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "scored 2 rows" in proc.stdout and f"1 bad rows skipped (e.g. {inp}:3: missing 'response')" in proc.stdout
    assert [r["score"] for r in read_jsonl(tmp_path / "out.jsonl")] == [pytest.approx(s, abs=1e-5) for s in (
        [r["score"] for r in _in_process(folder, tmp_path, [GOOD, {"text": "Plain."}])])]


def _in_process(folder: Path, tmp_path: Path, rows: list[dict]) -> list[dict]:
    write_jsonl(tmp_path / "again.jsonl", rows)
    assert score("--model", folder, "--input", tmp_path / "again.jsonl", "--output", tmp_path / "again_out.jsonl") == 0
    return read_jsonl(tmp_path / "again_out.jsonl")
