"""Exact and near-duplicate instructions, decided against the instructions kept so far.

Near duplicates are word-bigram Jaccard similarity >= threshold. Candidates come from prefix
filtering (Chaudhuri et al. 2006): two sets with Jaccard >= t share at least ceil(t*|A|) elements,
so under any fixed element order their first |A| - ceil(t*|A|) + 1 elements intersect. Indexing
only those prefixes makes the check exact without comparing every pair, which a Python loop over
tens of thousands of kept instructions could not afford.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections import defaultdict
from itertools import pairwise

_WORD = re.compile(r"\w+(?:['’]\w+)*")


def normalized(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def shingles(text: str) -> set[str]:
    words = _WORD.findall(text.lower())
    if len(words) < 2:
        return set(words)
    return {f"{a} {b}" for a, b in pairwise(words)}


def _order(shingle: str) -> bytes:
    # A fixed order independent of what has been seen, so a resumed run builds the same index.
    return hashlib.blake2b(shingle.encode(), digest_size=8).digest()


class InstructionDedup:
    """`check(text)` -> None (new: remembered) or the reason it is a duplicate ("exact" / "near")."""

    def __init__(self, threshold: float = 0.8):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold {threshold} must be in (0, 1]")
        self.threshold = threshold
        self.exact: set[str] = set()
        self.sets: list[set[str]] = []
        self.index: dict[str, list[int]] = defaultdict(list)

    def _prefix(self, s: set[str]) -> list[str]:
        keep = len(s) - math.ceil(self.threshold * len(s)) + 1
        return sorted(s, key=_order)[:keep]

    def check(self, text: str) -> str | None:
        key = normalized(text)
        if key in self.exact:
            return "exact"
        s = shingles(text)
        prefix = self._prefix(s) if s else []
        candidates = {i for sh in prefix for i in self.index.get(sh, ())}
        for i in candidates:
            other = self.sets[i]
            if len(s & other) / len(s | other) >= self.threshold:
                return "near"
        self.exact.add(key)
        for sh in prefix:
            self.index[sh].append(len(self.sets))
        self.sets.append(s)
        return None
