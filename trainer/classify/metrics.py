"""Classification loss, summable statistics and the report made from their totals.

The loop sums every stat over micro-batches and ranks, so per-batch stats are counts, never
ratios: `count` (real examples), `correct_sum` (right predictions) and the confusion matrix as
`confusion_{true}_{pred}` keys (class ids). Ratios are made once, from the totals, by
`classification_report`.

A row is real when its `example_mask` is > 0 and its label is not IGNORE_INDEX; the loader's
validation filler rows are neither, and count nowhere.
"""
from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer.objectives import IGNORE_INDEX, Stats

Batch = dict[str, torch.Tensor]
Id2Label = Mapping[int, str] | Mapping[str, str] | Sequence[str]


def real_rows(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the rows that are examples rather than filler."""
    return (mask > 0) & (labels != IGNORE_INDEX)


def example_weights(labels: torch.Tensor, mask: torch.Tensor,
                    class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) fp32 weight of each row in the loss: its mask times its class's weight; 0 on filler rows."""
    weights = torch.where(real_rows(labels, mask), mask.float(), 0.0)
    if class_weights is not None:
        # Filler labels are IGNORE_INDEX; clamping makes them indexable, their weight is 0 already.
        weights = weights * class_weights.to(device=labels.device, dtype=torch.float32)[labels.clamp(min=0)]
    return weights


# ----------------------------------------------------------------------------- loss


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the real rows (fp32) and its normalizer.

    logits (B, C), labels (B,), mask (B,). Without `class_weights` the normalizer is the number of
    real rows. With them, row i's loss is multiplied by `class_weights[labels[i]]` and the
    normalizer is the SUM OF THOSE WEIGHTS over the real rows, not the row count: the loop's
    division by the step's targets (counted by `make_target_counter(class_weights)`) then gives
    the weighted mean, `F.cross_entropy(weight=class_weights)`'s, over the whole step. Keep this
    normalizer out of the `count` stat, which counts examples for accuracy.
    """
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (B, C) and labels (B,), got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    weights = example_weights(labels, mask, class_weights)  # (B,)
    per_row = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")  # (B,)
    # where, not a product: a non-finite logit on a filler row must not reach the sum.
    loss_sum = torch.where(weights > 0, per_row * weights, 0.0).sum()
    return loss_sum, weights.sum()


def make_target_counter(class_weights: torch.Tensor | None = None) -> Callable[[Batch], torch.Tensor]:
    """The loop's `count_targets` for `weighted_cross_entropy` with the same `class_weights`:
    the real examples of a batch, or the sum of their class weights."""

    def count_targets(batch: Batch) -> torch.Tensor:
        return example_weights(batch["labels"], batch["example_mask"], class_weights).sum()

    return count_targets


# ----------------------------------------------------------------------------- statistics


def confusion_key(true: int, pred: int) -> str:
    return f"confusion_{true}_{pred}"


@torch.no_grad()
def batch_stats(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, num_labels: int) -> Stats:
    """Summable counts of one batch: `count`, `correct_sum` and every `confusion_{true}_{pred}`."""
    if logits.shape[-1] != num_labels:
        raise ValueError(f"logits have {logits.shape[-1]} classes, expected num_labels={num_labels}")
    real = real_rows(labels, mask)
    preds = logits.argmax(dim=-1)  # (B,)
    true, pred = labels[real], preds[real]
    cells = torch.bincount(true * num_labels + pred, minlength=num_labels * num_labels).float()  # (C*C,)
    stats = {"count": real.sum().float(), "correct_sum": (true == pred).sum().float()}
    for t in range(num_labels):
        for p in range(num_labels):
            stats[confusion_key(t, p)] = cells[t * num_labels + p]
    return stats


# ----------------------------------------------------------------------------- report


def label_names(id2label: Id2Label) -> list[str]:
    """Class names in id order, from a list or a mapping keyed by int or (as JSON stores it) by str."""
    if isinstance(id2label, Mapping):
        names = []
        for i in range(len(id2label)):
            if i in id2label:
                names.append(id2label[i])
            elif str(i) in id2label:
                names.append(id2label[str(i)])
            else:
                raise ValueError(f"id2label has no entry for class {i} (keys: {', '.join(map(str, id2label))})")
        return names
    return list(id2label)


def confusion_matrix(totals: Mapping[str, float], num_labels: int) -> np.ndarray:
    """(C, C) int64 counts from summed stats: rows are true classes, columns predicted ones."""
    found = sum(1 for k in totals if k.startswith("confusion_"))
    if found != num_labels * num_labels:
        raise ValueError(f"totals hold {found} confusion cells, expected {num_labels * num_labels} for "
                         f"{num_labels} classes; were the stats made with another num_labels?")
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    for t in range(num_labels):
        for p in range(num_labels):
            cm[t, p] = round(float(totals[confusion_key(t, p)]))
    return cm


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num), dtype=np.float64), where=den > 0)


def classification_report(totals: Mapping[str, float], id2label: Id2Label) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the majority-class baseline.

    Undefined ratios are 0 (as sklearn's zero_division=0): precision of a class never predicted,
    recall of a class that never occurs, F1 when both are 0. Macro-F1 averages the classes that
    occur as truth or prediction (sklearn's default label set): a class absent from the data and
    never predicted says nothing about the model. The majority baseline is the accuracy of always
    predicting the most frequent true class.
    """
    names = label_names(id2label)
    cm = confusion_matrix(totals, len(names)).astype(np.float64)
    total = cm.sum()
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted > 0)
    majority = int(np.argmax(support))
    return {
        "count": int(total),
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "majority_baseline": float(support[majority] / total) if total else 0.0,
        "majority_class": names[majority],
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(names)},
        "confusion": cm.astype(np.int64).tolist(),
    }


def write_confusion_matrix(totals: Mapping[str, float], id2label: Id2Label, path: str | Path) -> Path:
    """A CSV of counts, one row per true class and one column per predicted class; written whole or not at all."""
    names = label_names(id2label)
    cm = confusion_matrix(totals, len(names))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *names])
        for name, row in zip(names, cm.tolist()):
            writer.writerow([name, *row])
    os.replace(tmp, path)
    return path
