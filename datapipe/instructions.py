"""Rules for synthetic SFT sets: response length, token runs, repeated n-grams, refusals."""
from __future__ import annotations

import re
from collections import Counter

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

DEFAULT_REFUSALS = (
    "as an ai", "as a language model", "as an ai language model", "i cannot", "i can't", "i can not",
    "i'm sorry, but", "i am sorry, but", "i'm unable to", "i am unable to", "i'm not able to",
    "i am not able to", "i apologize, but", "i won't be able to",
)
_WORD = re.compile(r"\w+(?:['’]\w+)*")


def repeated_ngram_fraction(words: list[str], n: int) -> float:
    """Share of the word n-grams that occur more than once: a model stuck in a loop repeats phrases,
    not single tokens, so `longest_run` misses it."""
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    counts = Counter(grams)
    return sum(c for c in counts.values() if c > 1) / len(grams)


def longest_run(tokens: list[str]) -> int:
    best = run = 0
    prev = None
    for tok in tokens:
        run = run + 1 if tok == prev else 1
        best = max(best, run)
        prev = tok
    return best


class InstructionRulesFilter(BaseFilter):
    """Drops SFT rows whose response is too short/long, stutters, loops over phrases, or refuses.

    The response is the document text (the configured `text_field`); the other fields of the row
    are kept untouched and written back on output.
    """

    name = "📝 Instruction rules"

    def __init__(self, min_words: int = 20, max_words: int = 500, max_token_run: int = 3,
                 repeated_ngram: int = 3, max_repeated_ngram_fraction: float = 0.3,
                 refusal_phrases: list[str] | None = None, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        self.min_words = min_words
        self.max_words = max_words
        self.max_token_run = max_token_run
        self.repeated_ngram = repeated_ngram
        self.max_repeated_ngram_fraction = max_repeated_ngram_fraction
        phrases = [p.lower() for p in (refusal_phrases if refusal_phrases is not None else DEFAULT_REFUSALS)]
        # Apostrophes are normalised so "I can’t" and "I can't" are the same phrase.
        self._refusal = re.compile("|".join(rf"\b{re.escape(p)}" for p in phrases)) if phrases else None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        words = _WORD.findall(doc.text.lower().replace("’", "'"))
        if len(words) < self.min_words:
            return False, "response_too_short"
        if len(words) > self.max_words:
            return False, "response_too_long"
        if longest_run(words) > self.max_token_run:
            return False, "repeated_token"
        if repeated_ngram_fraction(words, self.repeated_ngram) > self.max_repeated_ngram_fraction:
            return False, "repeated_ngrams"
        if self._refusal is not None and self._refusal.search(doc.text.lower().replace("’", "'")):
            return False, "refusal"
        return True
