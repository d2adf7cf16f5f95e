"""Offline language identification with py3langid, whose model ships inside its wheel."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter


def _window_identifier():
    from py3langid.langid import LanguageIdentifier

    class WindowIdentifier(LanguageIdentifier):
        """py3langid's model and scores, with its byte-by-byte DFA walk (a Python loop, ~3 ms for a
        1.5 kB page: the language step's whole cost) replaced by a few numpy gathers.

        The model's DFA is langid.py's Aho-Corasick scanner over byte n-grams: its state after a
        text is the longest suffix of the text that is a node of its trie, so it depends on the last
        `depth` bytes only (`depth`: the trie's height, 6 for the shipped model, measured at load).
        Walking `depth` steps from the start state for every position at once gives every
        position's state, hence the same feature counts in the same first-seen order, hence
        bit-identical scores; a test compares both walks, and the bench compares decisions with
        the pipeline that used py3langid's own walk.
        """

        __slots__ = ("_walk",)

        def _raw_score(self, text):
            visits = self._visits(text)
            if not visits:
                return super()._raw_score(text)  # no feature: the library's fill value
            return self._sparse_score(visits, self.nb_ptc)

        def _visits(self, data: bytes) -> dict[int, int]:
            nextmove, rowbase, output, depth = self._walk
            text = np.frombuffer(data, dtype=np.uint8)
            n = len(text)
            states = np.zeros(n, dtype=np.int64)
            for k in range(depth):
                # step k of the window ending at each position i reads byte i - depth + 1 + k
                shift = depth - 1 - k
                if shift >= n:
                    continue
                states[shift:] = nextmove[rowbase[states[shift:]] + text[: n - shift]]
            features = output[states]
            features = features[features >= 0]
            if not len(features):
                return {}
            ids, first, counts = np.unique(features, return_index=True, return_counts=True)
            order = np.argsort(first, kind="stable")
            return dict(zip(ids[order].tolist(), counts[order].tolist()))

    return WindowIdentifier


def trie_depth(nextmove: np.ndarray, rowbase: np.ndarray) -> int:
    """The most bytes any state needs to be reached from the start state (breadth-first): for an
    Aho-Corasick automaton, the trie's height, i.e. its longest feature in bytes."""
    table = nextmove.reshape(-1, 256)  # row -> its 256 successors; states share rows
    row_of = rowbase >> 8
    seen = np.zeros(len(rowbase), dtype=bool)
    frontier = seen.copy()
    seen[0] = frontier[0] = True
    depth = 0
    while True:
        rows = np.zeros(len(table), dtype=bool)
        rows[row_of[frontier]] = True
        reached = np.zeros(len(rowbase), dtype=bool)
        reached[table[rows].ravel()] = True
        frontier = reached & ~seen
        if not frontier.any():
            return depth
        seen |= frontier
        depth += 1


@lru_cache(maxsize=1)
def load_identifier():
    """One model per process (and per forkserver, whose children inherit it: see datapipe/warm.py)."""
    from py3langid.langid import MODEL_FILE

    identifier = _window_identifier().from_model_file(MODEL_FILE, norm_probs=True)
    # The shipped table is float16, which numpy widens row by row in every document's score (a third
    # of the step's time); widened once here (exact: every float16 is a float32) the matmul gets the
    # same float32 operands, so the same scores, for 57 MB shared by the forked workers.
    identifier.nb_ptc = identifier.nb_ptc.astype(np.float32)
    identifier._full_model = (identifier.nb_ptc, *identifier._full_model[1:])
    nextmove = np.frombuffer(identifier.tk_nextmove, dtype=np.uint32)  # a view, not a copy
    rowbase = np.asarray(identifier._rowbase, dtype=np.int64)
    identifier._walk = (nextmove, rowbase, np.asarray(identifier.tk_output, dtype=np.int64),
                        trie_depth(nextmove, rowbase))
    return identifier


class OfflineLanguageFilter(BaseFilter):
    """Keeps documents whose most likely language is one of `languages` with probability >= threshold.

    datatrove's LanguageFilter fetches a fastText model at run time; py3langid needs no download.
    Probabilities are normalised over its 97 languages. Sets `language` / `language_score` metadata.
    """

    name = "🌍 Language ID (py3langid)"

    def __init__(self, languages: list[str], threshold: float = 0.65, max_chars: int = 10_000,
                 exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if not languages:
            raise ValueError("language: `languages` must list at least one language code")
        self.languages = set(languages)
        self.threshold = threshold
        # Long documents add cost but not accuracy to a character n-gram classifier.
        self.max_chars = max_chars
        self._identifier = None

    @property
    def identifier(self):
        if self._identifier is None:
            self._identifier = load_identifier()
        return self._identifier

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.identifier.classify(doc.text[: self.max_chars])
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        if lang not in self.languages:
            return False, "other_language"
        if score < self.threshold:
            return False, "low_language_score"
        return True

    def __getstate__(self):
        # The model is rebuilt in each worker instead of being pickled into every Slurm job.
        state = self.__dict__.copy()
        state["_identifier"] = None
        return state
