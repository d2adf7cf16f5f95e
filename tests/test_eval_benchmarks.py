"""Our lm-eval model type against lm-eval's own `hf` model on the same weights: equal log-likelihoods,
rolling log-likelihoods and greedy generations, on a plain model and on a LoRA adapter used without export;
and the task-file checks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from tests.sft_fixtures import make_tokenizer, tiny_model  # noqa: E402

ROLLING_YAML = """
task: tiny_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: text.jsonl}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity}
  - {metric: bits_per_byte}
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    import torch
    from model_defs.hf import save_hf_model
    from trainer.export import copy_tokenizer

    from eval.demo_tasks import DEMO_TASKS_DIR

    root = tmp_path_factory.mktemp("bench")
    tok = make_tokenizer(root)
    base = tiny_model(len(tok), seed=0, dim=32, max_seq_len=64)
    with torch.no_grad():  # peaked logits: a random model's near-ties would make greedy decoding arbitrary
        base.output.weight.mul_(20)
    save_hf_model(base, base.cfg, root / "base")
    copy_tokenizer(root / "tokenizer", root / "base")
    # A LoRA adapter with non-zero updates, in our module names, saved as an SFT run saves it.
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.peft_config["default"].base_model_name_or_path = str(root / "base")
    peft_model.save_pretrained(str(root / "adapter"))
    copy_tokenizer(root / "tokenizer", root / "adapter")
    # Tasks: the demo's two, cut short, plus a rolling one; long texts cross the 64-token window.
    tasks = root / "tasks"
    tasks.mkdir()
    for name in ("demo_facts_mc", "demo_sums_gen"):
        (tasks / f"{name}.yaml").write_text((DEMO_TASKS_DIR / f"{name}.yaml").read_text())
        rows = (DEMO_TASKS_DIR / f"{name}.jsonl").read_text().splitlines()[:4]
        (tasks / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    (tasks / "tiny_rolling.yaml").write_text(ROLLING_YAML)
    texts = ["Durmin lives in Daxsham. " * n for n in (1, 9, 30)]
    (tasks / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


def _stop_at_eos(folder: Path) -> None:
    """Our exports leave eos_token_id unset, and transformers then decodes past EOS; ours stops there.
    Like for like: the HF folder names the tokenizer's EOS, as a released model's config does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").unlink(missing_ok=True)


def _hf_results(folder: Path, tasks: Path) -> dict:
    import lm_eval

    _stop_at_eos(folder)
    from eval.benchmarks import load_task_config, task_files

    configs = [load_task_config(f) for f in task_files([tasks])]
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=configs,
                                   batch_size=4, device="cpu", log_samples=True)


def _responses(results: dict) -> dict[str, list]:
    return {task: [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])]
            for task, samples in results["samples"].items()}


def _assert_same(ours: dict, theirs: dict) -> None:
    a, b = _responses(ours), _responses(theirs)
    assert a.keys() == b.keys() == {"demo_facts_mc", "demo_sums_gen", "tiny_rolling"}
    for task in a:
        for mine, hf in zip(a[task], b[task], strict=True):
            if task == "demo_sums_gen":
                assert mine == hf
            elif task == "tiny_rolling":
                assert mine == pytest.approx(hf, rel=1e-4)
            else:
                for (ll, greedy), (ll_hf, greedy_hf) in zip(mine, hf, strict=True):
                    assert ll == pytest.approx(ll_hf, abs=1e-3) and greedy == greedy_hf
    for task, metrics in theirs["results"].items():
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-4), (task, key)


@pytest.mark.slow  # two full lm-eval runs
def test_scores_equal_lm_eval_hf_on_the_same_weights(world):
    from eval.benchmarks import run_benchmarks

    ours = run_benchmarks(world / "base", [world / "tasks"], batch_size=4, log_samples=True)
    _assert_same(ours, _hf_results(world / "base", world / "tasks"))
    # A random model does generate something: the comparison is not between empty strings.
    assert any(r[0] for r in _responses(ours)["demo_sums_gen"])


@pytest.mark.slow  # three full lm-eval runs
def test_a_lora_adapter_scores_as_its_merged_export(world):
    from eval.benchmarks import run_benchmarks
    from trainer.export import export_merged

    ours = run_benchmarks(world / "adapter", [world / "tasks"], batch_size=4, log_samples=True)
    merged = export_merged(world / "adapter", world / "merged", tokenizer_dir=world / "tokenizer")
    _assert_same(ours, _hf_results(merged, world / "tasks"))
    base = run_benchmarks(world / "base", [world / "tasks"], batch_size=4, log_samples=True)
    assert _responses(base)["tiny_rolling"] != _responses(ours)["tiny_rolling"]  # the adapter was applied


@pytest.mark.parametrize("text, message", [
    ("task: x\ndataset_path: json\noutput_type: multiple_choice\ndoc_to_text: q\n", "missing key doc_to_choice"),
    ("task: x\ndataset_path: json\noutput_type: ranking\ndoc_to_text: q\n", "output_type: 'ranking'"),
    ("task: x\noutput_type: generate_until\ndoc_to_text: q\n", "missing key dataset_path"),
    ("task: x\ndataset_path: json\noutput_type: generate_until\ndoc_to_text: q\n", "data_files"),
    ("task: x\ndataset_path: json\ndataset_kwargs: {data_files: {test: nope.jsonl}}\n"
     "output_type: generate_until\ndoc_to_text: q\n", "nope.jsonl does not exist"),
    ("process_results: !function utils.process\n", "not valid YAML without tags"),
    ("- a list\n", "a mapping"),
])
def test_task_files_in_the_wrong_shape_fail_in_one_line(tmp_path, text, message):
    from eval.benchmarks import load_task_config

    path = tmp_path / "task.yaml"
    path.write_text(text)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_task_config(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_shipped_demo_tasks_match_the_demo_world(tmp_path):
    from eval.demo_tasks import DEMO_TASKS_DIR, write_demo_tasks

    write_demo_tasks(tmp_path)
    for name in ("demo_facts_mc.jsonl", "demo_sums_gen.jsonl"):
        assert (tmp_path / name).read_text() == (DEMO_TASKS_DIR / name).read_text()



@pytest.mark.slow  # two lm-eval runs
def test_chat_rendered_tasks_render_and_answer_as_lm_eval_hf(world):
    """apply_chat_template (IFEval on an instruction-tuned model): the same prompts as lm-eval's `hf` model
    renders through the tokenizer's template, and the same greedy answers."""
    import lm_eval

    from eval.benchmarks import load_task_config, run_benchmarks

    tasks = world / "tasks" / "demo_sums_gen.yaml"
    ours = run_benchmarks(world / "base", [tasks], batch_size=4, log_samples=True, apply_chat_template=True)
    _stop_at_eos(world / "base")
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={world / 'base'},dtype=float32",
                                     tasks=[load_task_config(tasks)], batch_size=4, device="cpu", log_samples=True,
                                     apply_chat_template=True)
    mine, hf = ({s["doc_id"]: s for s in r["samples"]["demo_sums_gen"]} for r in (ours, theirs))
    assert mine.keys() == hf.keys() and len(mine) == 4
    for doc_id, sample in mine.items():
        prompt = sample["arguments"][0][0]
        assert "<|start_header_id|>" in prompt and sample["doc"]["question"] in prompt
        assert prompt == hf[doc_id]["arguments"][0][0]
        assert sample["filtered_resps"] == hf[doc_id]["filtered_resps"]
