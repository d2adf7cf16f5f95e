"""Decontamination: drop documents sharing a long word n-gram with any evaluation set.

datatrove's n-gram decontamination indexes lighteval tasks; here the evaluation sets are the
user's own JSONL files, small enough to index in memory in every task.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

_TOKEN = re.compile(r"[^\W_]+")


def normalize_words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _ngrams(words: list[str], n: int) -> set[str]:
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


class Decontaminate(BaseFilter):
    """Removes documents that share >= `min_overlap` word n-grams (n=`n`) with an eval set.

    Evaluation items shorter than `n` words but at least `min_words` long are matched as a whole.
    Removed documents carry `contamination: {eval, ngrams, example}`; stats count per eval set.
    """

    name = "🧪 Decontaminate"

    def __init__(self, eval_files: list[str], n: int = 13, min_words: int = 8, min_overlap: int = 1,
                 fields: list[str] | None = None, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if not eval_files:
            raise ValueError("decontaminate: `eval_files` must list at least one JSONL file")
        missing = [f for f in eval_files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"decontaminate.eval_files: not found: {missing}")
        self.eval_files = [str(f) for f in eval_files]
        self.n = n
        self.min_words = min_words
        self.min_overlap = min_overlap
        self.fields = fields
        self._index: dict[int, dict[str, str]] | None = None

    def _row_texts(self, row: dict, path: str, line: int) -> list[str]:
        keys = self.fields if self.fields is not None else [k for k, v in row.items() if isinstance(v, str)]
        out = []
        for key in keys:
            if key not in row:
                raise KeyError(f"{path}:{line}: eval row has no field {key!r}")
            out.append(str(row[key]))
        return out

    def build_index(self) -> dict[int, dict[str, str]]:
        """n-gram length -> {n-gram: eval set name}."""
        index: dict[int, dict[str, str]] = {}
        for path in self.eval_files:
            name = Path(path).stem
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
                    for text in self._row_texts(row, path, line_no):
                        words = normalize_words(text)
                        if len(words) >= self.n:
                            grams, size = _ngrams(words, self.n), self.n
                        elif len(words) >= self.min_words:
                            grams, size = {" ".join(words)}, len(words)
                        else:
                            continue
                        bucket = index.setdefault(size, {})
                        for g in grams:
                            bucket.setdefault(g, name)
        return index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._index is None:
            self._index = self.build_index()
        words = normalize_words(doc.text)
        hits: dict[str, list[str]] = {}
        for size, grams in self._index.items():
            for i in range(len(words) - size + 1):
                gram = " ".join(words[i:i + size])
                name = grams.get(gram)
                if name is not None:
                    hits.setdefault(name, []).append(gram)
        if not hits:
            return True
        name, grams = max(hits.items(), key=lambda kv: len(kv[1]))
        if len(grams) < self.min_overlap:
            return True
        doc.metadata["contamination"] = {"eval": name, "ngrams": len(grams), "example": grams[0]}
        self.stat_update(f"contaminated_{name}")
        self.stat_update(f"overlap_ngrams_{name}", value=len(grams))
        return False, "contaminated"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_index"] = None
        return state
