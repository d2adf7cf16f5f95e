"""Word and sentence tokenization done once per text and shared by every step of a process.

datatrove's filters and dedup blocks each call their language's tokenizer on the same document
(Gopher, C4, FineWeb, MinHash, sentence dedup). For English that is spaCy's rule-based tokenizer,
which datatrove runs inside `memory_zone()`: every call forgets the lexemes it created, so spaCy's
per-word cache never warms up and each document costs ~60 ms on one core.

`SharedTokenizer` is a datatrove `WordTokenizer` (the blocks accept one in place of a language code)
running the *same* spaCy tokenizer and sentencizer, so words and sentences are the same strings and
the filters decide exactly as before, but:
- the lexeme cache is kept across documents (the pipeline is rebuilt when the vocabulary passes
  `max_lexemes`, which bounds memory on an endless stream), ~10x faster per parse;
- one parse yields words, sentences and sentence spans, kept for the last few texts, so a step that
  tokenizes the text the previous step already tokenized pays nothing.

The state lives in a per-process registry, not in the instances, so the copies each pipeline step
gets after pickling (local workers, Slurm jobs) share one cache.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

from datatrove.utils.word_tokenizers import (
    SpaCyTokenizer,
    WordTokenizer,
    load_word_tokenizer,
    strip_strings,
)

# Texts remembered per process: a document passes every stream step of a stage before the next is
# read, so a handful covers one document's variants (raw, C4-trimmed, MinHash-simplified, ...).
MEMO_SIZE = 16
MAX_LEXEMES = 1_000_000


@dataclass(frozen=True)
class Parsed:
    words: list[str]
    sentences: list[str]
    spans: list[tuple[int, int]]


class _ProcessState:
    def __init__(self, language: str, max_lexemes: int):
        self.language = language
        self.max_lexemes = max_lexemes
        self.nlp = None
        self.memo: OrderedDict[str, Parsed] = OrderedDict()
        self.parses = 0
        self.hits = 0

    def _tokenizer(self):
        if self.nlp is None or len(self.nlp.vocab) > self.max_lexemes:
            spacy = import_spacy()
            from spacy.pipeline import Sentencizer

            # The tokenizer datatrove's SpaCyTokenizer builds for a language without a custom config.
            self.nlp = spacy.blank(self.language)
            self.punct_chars = frozenset(Sentencizer.default_punct_chars)
        return self.nlp

    def parse(self, text: str) -> Parsed:
        parsed = self.memo.get(text)
        if parsed is not None:
            self.hits += 1
            self.memo.move_to_end(text)
            return parsed
        parsed = self._parse(text)
        self.parses += 1
        self.memo[text] = parsed
        if len(self.memo) > MEMO_SIZE:
            self.memo.popitem(last=False)
        return parsed

    def _parse(self, text: str) -> Parsed:
        from spacy.attrs import IDX, IS_PUNCT, LENGTH

        # datatrove retokenizes a text containing "IS_ALPHA" without it when spaCy's full pipeline raises,
        # which happens or not depending on what that process tokenized before; the tokenizer alone
        # never raises, so here such text keeps the string (the one known difference).
        nlp = self._tokenizer()
        nlp.max_length = len(text) + 10
        doc = nlp.make_doc(text)
        # Offsets from one array call instead of a Python Token object per word (most of spaCy's cost
        # here); a token's text is always the slice of the input it covers.
        idx, length, is_punct = doc.to_array([IDX, LENGTH, IS_PUNCT]).T.tolist() if len(doc) else ([], [], [])
        tokens = [text[a:a + n] for a, n in zip(idx, length)]
        spans = [(idx[a], idx[b - 1] + length[b - 1]) for a, b in self._sentence_bounds(tokens, is_punct)]
        return Parsed(words=strip_strings(tokens), sentences=strip_strings([text[a:b] for a, b in spans]),
                      spans=spans)

    def _sentence_bounds(self, tokens: list[str], is_punct: list[int]) -> list[tuple[int, int]]:
        """spaCy's Sentencizer rule on token texts: a sentence ends before the first token that is
        neither punctuation nor a sentence-final character, once a sentence-final character was seen."""
        starts = [0] if tokens else []
        seen_final = False
        for i, token in enumerate(tokens):
            final = token in self.punct_chars
            if seen_final and not is_punct[i] and not final:
                starts.append(i)
                seen_final = False
            elif final:
                seen_final = True
        return list(zip(starts, starts[1:] + [len(tokens)]))


_STATES: dict[tuple[str, int], _ProcessState] = {}


def import_spacy():
    """spaCy, imported without torch where torch is not loaded yet.

    Its tokenizer needs no torch, but thinc imports torch eagerly when it is installed: seconds (more
    than half of `import spacy`) that each run pays again in its worker server before the first
    task. A `None` entry in sys.modules makes that import fail the way thinc expects when torch is
    absent; it is removed right after, so the process can still import torch itself (for example
    the perplexity step), only thinc's own torch bridge stays off.
    """
    if "spacy" in sys.modules or "torch" in sys.modules:
        import spacy

        return spacy
    sys.modules["torch"] = None
    try:
        import spacy
    finally:
        del sys.modules["torch"]
    return spacy


class SharedTokenizer(WordTokenizer):
    """spaCy's tokenizer for `language`, with a warm lexeme cache and one parse per text."""

    def __init__(self, language: str = "en", max_lexemes: int = MAX_LEXEMES):
        super().__init__(language)
        self.max_lexemes = max_lexemes

    @property
    def state(self) -> _ProcessState:
        key = (self.language, self.max_lexemes)
        if key not in _STATES:
            _STATES[key] = _ProcessState(self.language, self.max_lexemes)
        return _STATES[key]

    def parse(self, text: str) -> Parsed:
        return self.state.parse(text)

    def word_tokenize(self, text: str) -> list[str]:
        return list(self.parse(text).words)

    def sent_tokenize(self, text: str) -> list[str]:
        return list(self.parse(text).sentences)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return list(self.parse(text).spans)

    # Equal instances share datatrove's lru-cached splits (keyed on the tokenizer) across steps.
    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SharedTokenizer) and other.language == self.language
                and other.max_lexemes == self.max_lexemes)

    def __hash__(self) -> int:
        return hash((SharedTokenizer, self.language, self.max_lexemes))

    def __repr__(self) -> str:
        return f"SharedTokenizer({self.language!r})"


def warm(language: str = "en") -> None:
    """Import spaCy and build the tokenizer now (in a process whose children inherit it)."""
    SharedTokenizer(language).state._tokenizer()


def shared_or_stock(language: str | WordTokenizer) -> str | WordTokenizer:
    """The shared tokenizer where datatrove would use plain spaCy for `language`, else `language` as is
    (NLTK, Stanza, Indic, ... tokenizers and spaCy ones with a custom config keep their own path)."""
    if not isinstance(language, str):
        return language
    try:
        stock = load_word_tokenizer(language)
    except ValueError:
        return language
    if type(stock) is SpaCyTokenizer and stock.config is None:
        return SharedTokenizer(language)
    return language
