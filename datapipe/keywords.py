"""Keyword filter: block and allow lists matched on word boundaries, with case rules and per-keyword counts.

datatrove has URL and bad-word filters with fixed lists, but no user lists with allow semantics,
case rules or per-keyword counts, hence this step.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter

CaseRule = Literal["insensitive", "sensitive", "smart"]


def _keyword_list(key: str, value, file: str | None) -> list[str]:
    if value is None:
        value = []
    if not isinstance(value, (list, tuple)) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key}: expected a list of strings, got {type(value).__name__}"
                         + (f" {value!r}" if isinstance(value, str) else ""))
    words = list(value)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"{key}_file: {file} not found")
        words += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    empty = [k for k in words if not k.strip()]
    if empty:
        raise ValueError(f"{key}: empty keyword")
    return list(dict.fromkeys(k.strip() for k in words))


class KeywordMatcher:
    """Finds which keywords of a list occur in a text; `smart` case: a keyword with an upper-case letter
    matches only as written ("Apple"), an all-lower-case one in any case ("apple", "APPLE")."""

    def __init__(self, keywords: list[str], case: CaseRule, whole_words: bool):
        self.case = case
        groups: dict[bool, list[str]] = {True: [], False: []}  # case sensitive? -> keywords
        for k in keywords:
            sensitive = case == "sensitive" or (case == "smart" and k != k.lower())
            groups[sensitive].append(k)
        self.patterns: list[tuple[re.Pattern, dict[str, str]]] = []
        for sensitive, words in groups.items():
            if not words:
                continue
            # longest first, so "new york times" wins over "new york" at the same position
            alternatives = [r"\s+".join(map(re.escape, w.split())) for w in sorted(words, key=len, reverse=True)]
            body = "|".join(alternatives)
            if whole_words:
                body = rf"(?<!\w)(?:{body})(?!\w)"
            pattern = re.compile(body, 0 if sensitive else re.IGNORECASE)
            self.patterns.append((pattern, {self._key(w, sensitive): w for w in words}))

    @staticmethod
    def _key(text: str, sensitive: bool) -> str:
        text = " ".join(text.split())
        return text if sensitive else text.lower()

    def find(self, text: str) -> dict[str, int]:
        """keyword -> number of occurrences."""
        hits: dict[str, int] = {}
        for pattern, by_key in self.patterns:
            sensitive = not pattern.flags & re.IGNORECASE
            for m in pattern.finditer(text):
                keyword = by_key[self._key(m.group(0), sensitive)]
                hits[keyword] = hits.get(keyword, 0) + 1
        return hits


class KeywordFilter(BaseFilter):
    """Removes documents containing a `block` keyword (reason `blocked_keyword`); with an `allow` list,
    also those containing none of its keywords (reason `no_allowed_keyword`). Block wins over allow.

    Counts per keyword (`keyword_block:<kw>`, `keyword_allow:<kw>`: documents containing it) go to the
    report; the keywords found are recorded in `keywords` metadata.
    """

    name = "🔑 Keywords"

    def __init__(self, block: list[str] | None = None, allow: list[str] | None = None,
                 block_file: str | None = None, allow_file: str | None = None,
                 case: CaseRule = "smart", whole_words: bool = True, exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if case not in ("insensitive", "sensitive", "smart"):
            raise ValueError(f"case: expected insensitive, sensitive or smart, got {case!r}")
        if not isinstance(whole_words, bool):
            raise ValueError(f"whole_words: expected true or false, got {whole_words!r}")
        self.block = _keyword_list("block", block, block_file)
        self.allow = _keyword_list("allow", allow, allow_file)
        if not self.block and not self.allow:
            raise ValueError("block / allow: give at least one keyword (or block_file / allow_file)")
        self.case, self.whole_words = case, whole_words
        self._matchers: tuple[KeywordMatcher, KeywordMatcher] | None = None

    @property
    def matchers(self) -> tuple[KeywordMatcher, KeywordMatcher]:
        if self._matchers is None:
            self._matchers = (KeywordMatcher(self.block, self.case, self.whole_words),
                              KeywordMatcher(self.allow, self.case, self.whole_words))
        return self._matchers

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        block, allow = self.matchers
        blocked, allowed = block.find(doc.text), allow.find(doc.text)
        for kind, hits in (("block", blocked), ("allow", allowed)):
            for keyword in hits:
                self.stat_update(f"keyword_{kind}:{keyword}")
        if blocked or allowed:
            doc.metadata["keywords"] = {"block": blocked, "allow": allowed}
        if blocked:
            return False, "blocked_keyword"
        if self.allow and not allowed:
            return False, "no_allowed_keyword"
        return True

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_matchers"] = None
        return state
