"""Quality classifier: a fastText model trained on the user's good and bad examples (the DCLM /
FineWeb-Edu approach), and the filter step that keeps documents scoring above a threshold.

A model folder holds `model.bin` (fastText) and `classifier.json` (labels, threshold, held-out
precision/recall); the step reads both, so the text preparation and the positive label cannot drift
between training and filtering.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

POSITIVE, NEGATIVE = "hq", "lq"
MODEL_FILE, META_FILE = "model.bin", "classifier.json"


def prepare(text: str) -> str:
    """One line of lower-cased, whitespace-separated tokens: fastText reads one example per line."""
    return " ".join(text.lower().split())


def read_examples(path: str, text_field: str = "text") -> list[str]:
    """Texts from .jsonl (`text_field`) or plain text (one example per line); one-line errors name file:line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: not found")
    texts = []
    for line_no, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise ValueError(f"{path}:{line_no}: no string field {text_field!r}")
            line = row[text_field]
        if prepare(line):
            texts.append(line)
    return texts


@dataclass
class HeldOut:
    precision: float
    recall: float
    f1: float
    accuracy: float
    positives: int
    negatives: int
    threshold: float


def split(texts: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    texts = texts[:]
    rng.shuffle(texts)
    n_valid = max(1, round(len(texts) * fraction))
    return texts[n_valid:], texts[:n_valid]


def train(positive: list[str], negative: list[str], out_dir: Path, *, valid_fraction: float = 0.2,
          threshold: float = 0.5, epoch: int = 25, lr: float = 0.5, word_ngrams: int = 2, dim: int = 64,
          seed: int = 0, min_examples: int = 2) -> HeldOut:
    """Trains on a (1 - valid_fraction) split, writes model + metadata into `out_dir`, returns the
    held-out precision/recall of the positive class at `threshold`."""
    import fasttext

    for name, texts in (("positive", positive), ("negative", negative)):
        if len(texts) < min_examples:
            raise ValueError(f"{name} examples: {len(texts)} found; a classifier needs at least {min_examples} "
                             f"of each class (both good and bad examples)")
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction: must be between 0 and 1, got {valid_fraction}")
    rng = random.Random(seed)
    pos_train, pos_valid = split(positive, valid_fraction, rng)
    neg_train, neg_valid = split(negative, valid_fraction, rng)
    lines = [f"__label__{POSITIVE} {prepare(t)}" for t in pos_train] + [f"__label__{NEGATIVE} {prepare(t)}"
                                                                        for t in neg_train]
    rng.shuffle(lines)
    train_file = out_dir / "train.txt"
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # thread=1: fastText's result then depends only on the seed
    model = fasttext.train_supervised(str(train_file), epoch=epoch, lr=lr, wordNgrams=word_ngrams, dim=dim,
                                      seed=seed, thread=1, verbose=0, minCount=1, loss="softmax")
    train_file.unlink()
    model.save_model(str(out_dir / MODEL_FILE))
    scorer = Scorer(out_dir, model=model)
    held = evaluate(scorer, pos_valid, neg_valid, threshold)
    (out_dir / META_FILE).write_text(json.dumps({
        "positive_label": POSITIVE, "negative_label": NEGATIVE, "threshold": threshold,
        "train": {"positive": len(pos_train), "negative": len(neg_train)},
        "held_out": held.__dict__,
        "params": {"epoch": epoch, "lr": lr, "word_ngrams": word_ngrams, "dim": dim, "seed": seed,
                   "valid_fraction": valid_fraction},
    }, indent=2))
    return held


def evaluate(scorer: Scorer, positive: list[str], negative: list[str], threshold: float) -> HeldOut:
    tp = sum(scorer.score(t) >= threshold for t in positive)
    fp = sum(scorer.score(t) >= threshold for t in negative)
    fn, tn = len(positive) - tp, len(negative) - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return HeldOut(round(precision, 4), round(recall, 4), round(f1, 4), round((tp + tn) / (tp + fp + fn + tn), 4),
                   len(positive), len(negative), threshold)


class Scorer:
    """P(positive) of a text under a model folder written by `train`."""

    def __init__(self, folder: str | Path, model=None):
        folder = Path(folder)
        meta_path, model_path = folder / META_FILE, folder / MODEL_FILE
        for p in (model_path,) if model is not None else (model_path, meta_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: not found (train one with launch/train_quality_classifier.py)")
        if model is None:
            import fasttext

            model = fasttext.load_model(str(model_path))
            labels = {label.removeprefix("__label__") for label in model.labels}
            if labels != {POSITIVE, NEGATIVE}:
                raise ValueError(f"{model_path}: labels {sorted(labels)}, expected {[POSITIVE, NEGATIVE]}")
        self.model = model

    def score(self, text: str) -> float:
        labels, probs = self.model.predict(prepare(text), k=2)
        return float(dict(zip(labels, probs)).get(f"__label__{POSITIVE}", 0.0))


class QualityClassifierFilter(BaseFilter):
    """Keeps documents whose quality score is >= `threshold` (default: the one the model was trained
    with); records it as `quality_score` metadata; removed ones get reason `low_quality`."""

    name = "🏅 Quality classifier (fastText)"

    def __init__(self, model: str, threshold: float | None = None, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        meta = Path(model) / META_FILE
        if not meta.is_file():
            raise FileNotFoundError(f"model: {meta} not found (train one with launch/train_quality_classifier.py)")
        if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
            raise ValueError(f"threshold: must be a number in [0, 1], got {threshold!r}")
        self.model = model
        self.threshold = float(threshold if threshold is not None else json.loads(meta.read_text())["threshold"])
        self._scorer: Scorer | None = None

    @property
    def scorer(self) -> Scorer:
        if self._scorer is None:
            self._scorer = Scorer(self.model)
        return self._scorer

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        score = self.scorer.score(doc.text)
        doc.metadata["quality_score"] = round(score, 4)
        if score < self.threshold:
            return False, "low_quality"
        return True

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_scorer"] = None
        return state
