"""IFEval-style checkers, judge statistics, summary.json pieces and launch/compare.py's report, on tiny models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.sft_fixtures import make_tokenizer, tiny_model, write_jsonl


def _row(ids, kwargs, prompt="q"):
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs}


@pytest.mark.parametrize("instruction, kwargs, good, bad", [
    ("length_constraints:number_words", {"relation": "less than", "num_words": 4}, "one two three", "a b c d e"),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 2}, "A. B.", "Just one."),
    ("keywords:existence", {"keywords": ["years"]}, "He is 40 Years old.", "He is 40."),
    ("keywords:forbidden_words", {"forbidden_words": ["red"]}, "It is reddish.", "It is Red."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "a: 1"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a\n* b\n* c"),
    ("change_case:english_lowercase", {}, "all lower", "Not lower"),
    ("change_case:english_capital", {}, "ALL CAPS", "Some caps"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Hi. Any other questions?", "Any other questions? Hi."),
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
])
def test_ifeval_checkers_tell_followed_from_not(instruction, kwargs, good, bad):
    from eval.ifeval import score

    rows = [_row([instruction], [kwargs])] * 2
    result = score(rows, [good, bad])
    assert result["prompt_level_strict_acc"] == 0.5 and result["inst_level_strict_acc"] == 0.5


def test_loose_forgives_a_preamble_line_and_markdown_but_strict_does_not():
    from eval.ifeval import score

    rows = [_row(["change_case:english_lowercase"], [{}]), _row(["startend:end_checker"], [{"end_phrase": "done"}])]
    result = score(rows, ["Sure! Here it is:\nall lower", "we are **done**"])
    assert result["prompt_level_strict_acc"] == 0.0 and result["prompt_level_loose_acc"] == 1.0
    assert result["inst_level_loose_acc"] == 1.0


def test_ifeval_prompt_file_errors_name_file_and_line(tmp_path):
    from eval.ifeval import read_prompts

    path = write_jsonl(tmp_path / "p.jsonl", [_row(["punctuation:no_comma"], [{}]),
                                              _row(["language:made_up"], [{}])])
    with pytest.raises(ValueError, match=r"p.jsonl:2: instruction 'language:made_up' has no checker"):
        read_prompts(path)
    path.write_text('{"prompt": "q", "instruction_id_list": ["a"], "kwargs": []}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: needs 'prompt'"):
        read_prompts(path)
    assert len(read_prompts(Path(__file__).parents[1] / "eval/prompts/ifeval_demo.jsonl")) == 10


def test_both_orders_cancel_a_position_biased_judge():
    from eval.judge import combine_orders, rates

    # A judge that always says "1" gives each side one win per prompt: every prompt is a tie.
    assert combine_orders([1, 1, 1], [1, 1, 1]) == [0, 0, 0]
    assert combine_orders([1, 2, 1], [2, 1, 1]) == [1, -1, 0]
    r = rates([1] * 30 + [0] * 10, samples=500)
    assert r["win"]["value"] == pytest.approx(0.75) and r["win"]["low"] < 0.75 < r["win"]["high"]
    assert r["loss"]["value"] == 0.0 and r["loss"]["high"] == 0.0


def test_bootstrap_interval_narrows_with_more_prompts_and_reward_judge_counts_ties_half():
    from eval.judge import bootstrap, reward_judge

    small = bootstrap([1, 0] * 5, samples=1000)
    large = bootstrap([1, 0] * 500, samples=1000)
    assert small.value == large.value == 0.5
    assert (large.high - large.low) < (small.high - small.low) / 3
    r = reward_judge(np.array([1.0, 2.0, 3.0]), np.array([0.0, 2.0, 5.0]), samples=200)
    assert r["win_rate_a"]["value"] == pytest.approx(0.5) and r["mean_a"]["value"] == pytest.approx(2.0)


def test_a_judge_needs_a_chat_template(tmp_path):
    from model_defs.hf import save_hf_model
    from trainer.export import copy_tokenizer

    from eval.judge import ChatJudge

    tok = make_tokenizer(tmp_path)
    model = tiny_model(len(tok))
    save_hf_model(model, model.cfg, tmp_path / "m")
    copy_tokenizer(tmp_path / "tokenizer", tmp_path / "m")
    config = tmp_path / "m" / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    (tmp_path / "m" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template"):
        ChatJudge(str(tmp_path / "m"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two run folders as training leaves them (model/, metrics.jsonl, summary.json) around tiny models."""
    from model_defs.hf import save_hf_model
    from trainer.export import copy_tokenizer
    from trainer.summary import build_summary, write_summary

    root = tmp_path_factory.mktemp("cmp")
    tok = make_tokenizer(root)
    for i, name in enumerate(("lora", "prompt")):
        run = root / name
        (run / "checkpoints").mkdir(parents=True)
        model = tiny_model(len(tok), seed=i)
        save_hf_model(model, model.cfg, run / "model")
        copy_tokenizer(root / "tokenizer", run / "model")
        (run / "tokenizer").mkdir()
        copy_tokenizer(root / "tokenizer", run / "tokenizer")
        write_jsonl(run / "metrics.jsonl", [{"step": s, "split": "train", "loss": 3.0 - s / 10 - i}
                                            for s in (1, 2, 3)] + [{"step": 3, "split": "val", "loss": 2.5 - i}])
        write_summary(run, build_summary(
            task="sft", method=name, trainable=100 * (i + 1), total=10_000, wall_time_s=5.0 + i, train_time_s=4.0,
            tokens_seen=4000, steps=3, out_dir=run, final_checkpoint=None, last_eval={"loss": 2.5 - i},
            generation=123.0, generation_note=None))
    write_jsonl(root / "pairs.jsonl", [{"prompt": "Where does Durmin live?", "chosen": "Durmin lives in Daxsham.",
                                        "rejected": "Durmin lives in Saifel."}] * 3)
    return root


def test_summary_holds_the_cost_figures(runs):
    from trainer.summary import read_summary

    s = read_summary(runs / "lora")
    assert s["trainable_share"] == pytest.approx(0.01) and s["tokens_per_s"] == pytest.approx(1000.0)
    assert s["output"]["kind"] == "model" and s["output"]["bytes"] > 0
    assert s["final_train"]["loss"] == pytest.approx(2.7) and s["final_val"] == {"loss": 2.5}


def test_compare_writes_csv_report_and_figures_from_one_call(runs, capsys):
    import csv

    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
    from compare import main

    out = runs / "report"
    assert main([str(runs / "lora"), str(runs / "prompt"), "--labels", "LoRA,prompt tuning", "--out", str(out),
                 "--pairs", str(runs / "pairs.jsonl"), "--raw-sample", "Durmin lives in"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "efficiency.png", "loss_curves.png",
                                                    "metrics.png", "report.md"]
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["label"] for r in rows] == ["LoRA", "prompt tuning"]
    assert [r["trainable_params"] for r in rows] == ["100", "200"]
    assert [r["final_val_loss"] for r in rows] == ["2.5", "1.5"]
    assert all(0.0 <= float(r["pref_accuracy"]) <= 1.0 for r in rows)
    report = (out / "report.md").read_text()
    assert "| LoRA | lora | 100 | 1.000% |" in report and "Skipped" not in report
    # The folder now holds a report: a second call refuses it rather than replacing it.
    with pytest.raises(ValueError, match="already exists"):
        main([str(runs / "lora"), "--out", str(out)])


def test_compare_measures_several_named_pair_sets(runs, tmp_path):
    import csv
    import sys

    from eval.compare import load_for_eval, preference_accuracy, read_entry

    sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
    from compare import main

    flipped = write_jsonl(tmp_path / "flipped.jsonl", [{"prompt": "Where does Durmin live?",
                                                        "chosen": "Durmin lives in Saifel.",
                                                        "rejected": "Durmin lives in Daxsham."}] * 2)
    out = tmp_path / "report"
    assert main([str(runs / "lora"), "--out", str(out), "--pairs", f"made_up={runs / 'pairs.jsonl'}",
                 "--pairs", f"own-answers={flipped}"]) == 0
    row = next(csv.DictReader((out / "comparison.csv").open()))
    model, tokenizer = load_for_eval(read_entry(runs / "lora", "x"))
    for name, file in (("made_up", runs / "pairs.jsonl"), ("own-answers", flipped)):
        direct = preference_accuracy(model, tokenizer, file)
        assert float(row[f"pref_accuracy/{name}"]) == pytest.approx(direct["pref_accuracy"])
        assert float(row[f"pref_margin/{name}"]) == pytest.approx(direct["pref_margin"], abs=1e-4)
    # The same pair flipped: exactly one of the two sets is preferred.
    assert float(row["pref_accuracy/made_up"]) + float(row["pref_accuracy/own-answers"]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="expected FILE or NAME=FILE"):
        main([str(runs / "lora"), "--out", str(tmp_path / "o"), "--pairs", f"bad name={flipped}"])


def test_compare_bad_input_is_one_line(runs, tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
    from compare import main

    bare = tmp_path / "bare"
    (bare / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="run folder has no metrics.jsonl"):
        main([str(bare), "--out", str(tmp_path / "o1")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="broken: cannot be loaded"):
        main([str(broken), "--out", str(tmp_path / "o2")])
    assert main([str(broken), str(runs / "lora"), "--out", str(tmp_path / "o3"), "--keep-going"]) == 0
    report = (tmp_path / "o3" / "report.md").read_text()
    assert report.index("Skipped") < report.index("## Cost") and "broken: load" in report


@pytest.mark.slow  # two training runs through launch/sft.py, then launch/compare.py
def test_lora_vs_prompt_tuning_table_from_one_call(tmp_path):
    import csv
    import os
    import subprocess
    import sys

    from model_defs.hf import save_hf_model
    from trainer.export import copy_tokenizer

    from tests.sft_fixtures import REPO_ROOT, demo_rows

    tok = make_tokenizer(tmp_path)
    base = tiny_model(len(tok), seed=0, dim=64)
    save_hf_model(base, base.cfg, tmp_path / "base")
    copy_tokenizer(tmp_path / "tokenizer", tmp_path / "base")
    write_jsonl(tmp_path / "sft.jsonl", demo_rows("sft")[:200])
    write_jsonl(tmp_path / "sft_eval.jsonl", demo_rows("sft_eval")[:20])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for method, extra in (("lora", []), ("prompt_tuning", ["sft.packing=false",
                                                           "sft.prompt_tuning.num_virtual_tokens=4"])):
        args = [f"model.init_from={tmp_path / 'base'}", f"sft.train_files=[{tmp_path / 'sft.jsonl'}]",
                f"sft.val_files=[{tmp_path / 'sft_eval.jsonl'}]", "data.seq_len=128", "train.micro_batch_size=4",
                "train.max_steps=3", "train.eval_batches=1", "optim.warmup_steps=0", "logging.progress=false",
                "logging.tensorboard=false", f"sft.method={method}", f"train.output_dir={tmp_path / method}", *extra]
        proc = subprocess.run([sys.executable, "launch/sft.py", *args], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=400, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        assert summary["method"] == method and summary["steps"] == 3 and summary["output"]["kind"] == "adapter"
        assert summary["generation_tokens_per_s"] > 0 and summary["final_val"]["loss"] > 0
    proc = subprocess.run([sys.executable, "launch/compare.py", str(tmp_path / "lora"), str(tmp_path / "prompt_tuning"),
                           "--out", str(tmp_path / "cmp")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["label"]: r for r in csv.DictReader((tmp_path / "cmp" / "comparison.csv").open())}
    lora, prompt = rows["lora"], rows["prompt_tuning"]
    # Prompt tuning trains 4 x dim parameters; LoRA far more; both saved as small adapters.
    assert int(prompt["trainable_params"]) == 4 * 64 < int(lora["trainable_params"])
    assert int(prompt["output_bytes"]) < int(lora["output_bytes"])
    assert all(float(r[k]) > 0 for r in rows.values() for k in ("wall_time_s", "final_val_loss",
                                                                 "generation_tokens_per_s"))


def test_judges_are_matched_against_the_first_or_the_previous_model():
    from eval.judge import opponents

    assert opponents(["base", "sft", "dpo"], "first") == [("sft", "base"), ("dpo", "base")]
    assert opponents(["base", "sft", "dpo"], "previous") == [("sft", "base"), ("dpo", "sft")]


def _compare_main():
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "launch"))
    from compare import main
    return main


@pytest.fixture(scope="module")
def judges(runs) -> Path:
    """A reward model (one output), a three-output classifier, and judge prompts in the shape compare reads."""
    from tests.test_score import save_classifier
    from trainer.data.tokenizer import load_tokenizer

    tok = load_tokenizer(runs / "tokenizer")
    save_classifier(runs / "rm", tok, 1, {0: "reward"})
    save_classifier(runs / "three", tok, 3, {0: "a", 1: "b", 2: "c"})
    write_jsonl(runs / "questions.jsonl", [{"prompt": q} for q in (
        "Where does Durmin live?", "What is 18 + 10?", "What colour does Durmin like?", "Name a town.")])
    return runs


def test_compare_runs_both_judges_into_csv_report_and_figure(judges):
    import csv

    from eval import compare as C
    from eval import judge as J

    out = judges / "judged"
    assert _compare_main()([str(judges / "lora"), str(judges / "lora"), str(judges / "prompt"),
                            "--labels", "LoRA,LoRA again,prompt", "--out", str(out),
                            "--judge-prompts", str(judges / "questions.jsonl"), "--judge", str(judges / "lora" / "model"),
                            "--reward-judge", str(judges / "rm"), "--judge-against", "previous",
                            "--max-new-tokens", "8"]) == 0
    assert (out / "judges.png").is_file()
    rows = {r["label"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    first, same, other = rows["LoRA"], rows["LoRA again"], rows["prompt"]
    assert first["judge/vs"] == "" and first["reward/vs"] == "" and first["reward/mean"] != ""
    # The same model against itself: identical answers, so the judge picks one position in both orders
    # (every prompt a tie) and the reward model scores both sides equally (a win rate of one half).
    assert (same["judge/vs"], same["judge/tie"], same["judge/win"], same["judge/same_position"]) == \
        ("LoRA", "1", "0", "1")
    assert (same["reward/vs"], same["reward/win_rate"], same["reward/mean"]) == ("LoRA", "0.5", first["reward/mean"])
    # A different model: the figures are what the judges give on the answers the models generate.
    prompts = J.read_judge_prompts(judges / "questions.jsonl")
    answers = []
    for run in ("lora", "prompt"):
        model, tok = C.load_for_eval(C.read_entry(judges / run, run))
        answers.append(C.generate_texts(model, tok, prompts, chat=True, max_new_tokens=8))
    expected = J.pairwise(J.ChatJudge(judges / "lora" / "model"), prompts, answers[1], answers[0])
    assert other["judge/vs"] == "LoRA again" and other["judge/n"] == "4"
    for outcome in ("win", "tie", "loss"):
        low, value, high = (float(other[f"judge/{outcome}{s}"]) for s in ("_low", "", "_high"))
        assert value == pytest.approx(expected[outcome]["value"], abs=1e-5) and low <= value <= high
    assert sum(float(other[f"judge/{o}"]) for o in ("win", "tie", "loss")) == pytest.approx(1.0)
    scores = J.RewardJudge(judges / "rm")
    expected = J.reward_judge(scores.scores(prompts, answers[1]), scores.scores(prompts, answers[0]))
    assert float(other["reward/mean"]) == pytest.approx(expected["mean_a"]["value"], rel=1e-4)
    assert float(other["reward/win_rate"]) == pytest.approx(expected["win_rate_a"]["value"], abs=1e-5)
    report = (out / "report.md").read_text()
    assert "## Judges" in report and "each model against the model before it" in report
    assert "| LoRA again | LoRA | 0 [0, 0] | 1 [1, 1] | 0 [0, 0] | 100% | 4 |" in report


def test_compare_judge_bad_input_is_one_line_before_any_evaluation(judges, tmp_path):
    import json
    import shutil

    main = _compare_main()
    models = [str(judges / "lora"), str(judges / "prompt")]
    questions = str(judges / "questions.jsonl")
    plain = tmp_path / "plain"
    shutil.copytree(judges / "lora" / "model", plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="plain: the judge's tokenizer has no chat template"):
        main([*models, "--out", str(tmp_path / "a"), "--judge-prompts", questions, "--judge", str(plain)])
    with pytest.raises(ValueError, match="three: the model has 3 outputs; a reward model has one"):
        main([*models, "--out", str(tmp_path / "b"), "--judge-prompts", questions, "--reward-judge",
              str(judges / "three")])
    shapeless = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "ok"}, {"question": "?"}])
    with pytest.raises(ValueError, match=r"q.jsonl:2: needs 'prompt' as a non-empty string"):
        main([*models, "--out", str(tmp_path / "c"), "--judge-prompts", str(shapeless), "--reward-judge",
              str(judges / "rm")])
    (tmp_path / "q.txt").write_text("Where does Durmin live?\n")
    with pytest.raises(ValueError, match=r"q.txt:1: not valid JSON"):
        main([*models, "--out", str(tmp_path / "d"), "--judge-prompts", str(tmp_path / "q.txt"), "--reward-judge",
              str(judges / "rm")])
    for argv in (["--judge", str(judges / "lora" / "model")], ["--judge-prompts", questions],
                 ["--labels", "x,x"]):
        with pytest.raises(SystemExit):
            main([*models, "--out", str(tmp_path / "e"), *argv])
    assert not any((tmp_path / d).exists() for d in "abcde")
    # A model that cannot be loaded, with --keep-going: its comparisons are listed as skipped, at the top.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert main([str(broken), *models, "--out", str(tmp_path / "f"), "--keep-going", "--judge-prompts", questions,
                 "--reward-judge", str(judges / "rm"), "--max-new-tokens", "4"]) == 0
    report = (tmp_path / "f" / "report.md").read_text()
    skipped = report[:report.index("## Cost")]
    assert "broken: load" in skipped and "reward judge: `lora` vs `broken`: no answers from `broken`" in skipped
    assert "| prompt | " in report[report.index("## Judges"):]
