"""Text classification as a task: a classification head on the decoder, cross-entropy on labelled texts.

    accelerate launch launch/classify.py --config configs/classify_RECIPE.yaml

Labels are strings, mapped to ids in sorted order from the training files and saved as the
model's `id2label`. Validation reports accuracy, macro-F1, per-class precision/recall and the
majority-class baseline; the last validation's confusion matrix and full report are written
to the run folder. Outputs otherwise: see `trainer.scoring`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.chat import load_run_tokenizer
from trainer.classify.config import ClassifyConfig
from trainer.classify.data import ClassExample, id_to_label, load_classify_examples
from trainer.classify.loader import ClassifyLoader
from trainer.classify.metrics import classification_report, make_target_counter, write_confusion_matrix
from trainer.classify.objective import ClassifyObjective
from trainer.config import ConfigError
from trainer.loop import RunResult
from trainer.scoring import classifier_files, make_classifier, save_classifier_outputs, scoring_config_problems
from trainer.task import TaskContext, TaskData, TaskParts, TaskSpec, run_task


@dataclass
class LabelledData:
    train: list[ClassExample]
    val: list[ClassExample] | None
    id2label: dict[int, str]
    class_weights: torch.Tensor | None


def check_classify_config(cfg: ClassifyConfig) -> list[str]:
    problems = []
    if cfg.data.path:
        problems.append("defaults: data.path: classification reads classify.train_files, not token shards; "
                        "remove data.path")
    if not cfg.classify.train_files:
        problems.append("defaults: classify.train_files: no training files given")
    return problems + scoring_config_problems(cfg, "classify")


def class_weights_for(section, id2label: dict[int, str], counts: dict[str, int]) -> torch.Tensor | None:
    weights = section.class_weights
    if weights is None:
        return None
    if weights == "balanced":
        total = sum(counts.values())
        return torch.tensor([total / (len(id2label) * max(counts[id2label[i]], 1)) for i in range(len(id2label))])
    unknown = sorted(set(weights) - set(id2label.values()))
    if unknown:
        raise ConfigError(f"classify.class_weights: label(s) {', '.join(unknown)} do not occur in the training "
                          f"data (its labels: {', '.join(id2label.values())})")
    return torch.tensor([float(weights.get(id2label[i], 1.0)) for i in range(len(id2label))])


def load_labelled_data(cfg: ClassifyConfig) -> TaskData:
    c = cfg.classify
    tokenizer = load_run_tokenizer(cfg)
    common = dict(max_len=cfg.data.seq_len, text_column=c.text_column, label_column=c.label_column,
                  columns=c.columns, skip_bad_rows=c.skip_bad_rows)
    train, label2id, train_report = load_classify_examples(c.train_files, tokenizer, **common)
    val, val_report = None, None
    if c.val_files:
        val, _, val_report = load_classify_examples(c.val_files, tokenizer, label2id=label2id, **common)
    id2label = id_to_label(label2id)
    report = [f"train data: {train_report.summary()}"] + ([f"val data: {val_report.summary()}"] if val_report else [])
    weights = class_weights_for(c, id2label, train_report.class_counts)
    banner = f"labels {', '.join(id2label.values())}" + (" | class weights" if weights is not None else "")
    return TaskData(payload=LabelledData(train, val, id2label, weights), tokenizer=tokenizer, report=report,
                    banner=banner)


def build_classify(ctx: TaskContext, model) -> TaskParts:
    cfg, data = ctx.cfg, ctx.data.payload
    common = dict(batch_size=cfg.train.micro_batch_size, pad_id=ctx.data.tokenizer.pad_token_id,
                  pad_to_multiple_of=8 if ctx.accelerator.device.type == "cuda" else 1, seed=cfg.train.seed,
                  rank=ctx.rank, world_size=ctx.world_size)
    loader = ClassifyLoader(data.train, shuffle=cfg.data.shuffle, **common)

    def val_batches():
        return iter(ClassifyLoader(data.val, shuffle=False, validation=True, **common))

    def eval_report(totals: dict[str, float]) -> dict[str, float]:
        report = classification_report(totals, data.id2label)
        figures = {"macro_f1": report["macro_f1"], "majority_baseline": report["majority_baseline"]}
        for name, per_class in report["per_class"].items():
            figures[f"precision/{name}"] = per_class["precision"]
            figures[f"recall/{name}"] = per_class["recall"]
        return figures

    num_labels = len(data.id2label)
    return TaskParts(objective=ClassifyObjective(num_labels, data.class_weights), train_loader=loader,
                     val_batches=val_batches if data.val else None,
                     count_targets=make_target_counter(data.class_weights), eval_report=eval_report)


def save_classify_outputs(ctx: TaskContext, result: RunResult) -> None:
    data = ctx.data.payload
    save_classifier_outputs(ctx, result, num_labels=len(data.id2label), id2label=data.id2label)
    if ctx.accelerator.is_main_process and result.last_eval_totals:
        out_dir = Path(ctx.cfg.train.output_dir)
        write_confusion_matrix(result.last_eval_totals, data.id2label, out_dir / "confusion_matrix.csv")
        report = classification_report(result.last_eval_totals, data.id2label)
        (out_dir / "classification_report.json").write_text(json.dumps(report, indent=2, default=float))
        ctx.accelerator.print(f"held-out: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
                              f"(majority class: {report['majority_baseline']:.3f}); confusion matrix in "
                              f"{out_dir / 'confusion_matrix.csv'}")


def _labels_of(ctx: TaskContext) -> dict[int, str]:
    return ctx.data.payload.id2label


CLASSIFY = TaskSpec(
    name="classify", tuning_section="classify", check_config=check_classify_config, load_data=load_labelled_data,
    build=build_classify, make_model=lambda ctx: make_classifier(ctx, num_labels=len(_labels_of(ctx))),
    modules_to_save=("score",), checkpoint_files=lambda ctx: classifier_files(len(_labels_of(ctx)), _labels_of(ctx)),
    save_outputs=save_classify_outputs)


def run_classify(cfg: ClassifyConfig, resume: str | None = None) -> RunResult:
    return run_task(cfg, CLASSIFY, resume)
