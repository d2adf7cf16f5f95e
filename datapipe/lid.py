"""Offline language identification with py3langid, whose model ships inside its wheel."""
from __future__ import annotations

from functools import lru_cache

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter


@lru_cache(maxsize=1)
def load_identifier():
    """One model per process (and per forkserver, whose children inherit it: see datapipe/warm.py)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


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
