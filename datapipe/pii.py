"""PII scrubbing: typed placeholders, validated matches, counts per type.

datatrove's PIIFormatter covers emails and IPv4 only and replaces them with fake values; here
every type gets a placeholder (`<EMAIL>`, `<CREDIT_CARD>` ...) and a per-type count in the report.
Matches are validated (Luhn, issuer digit and digit grouping for cards, mod-97 for IBANs, `ipaddress`
for IPs, the words just before a match) so that version and section numbers, ISBNs, dates, order
numbers and times stay untouched.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Callable

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.typeshelper import StatHints

PII_TYPES = ("private_key", "secret", "email", "iban", "credit_card", "ipv6", "ipv4", "phone")
# Dotted numbers after these words are versions or document structure ("section 4.2.1.3"), not addresses.
_NOT_AN_ADDRESS_CONTEXT = re.compile(
    r"(?:\bv|\bversion|\bver\.?|\brelease|\bbuild|\bsections?|\bsec\.|§|\bchapters?|\bch\.|\bclauses?"
    r"|\bparagraphs?|\bpara\.|\barticles?|\bart\.|\bparts?|\bitems?|\brules?|\bsteps?|\bfigures?|\bfig\."
    r"|\btables?|\bappendix|\bpages?|\bpp?\.|\bexercises?|\btheorem|\blemma|\bequation|\beq\.|\bno\.)\s*$",
    re.IGNORECASE)
# A labelled book number ("ISBN 978-0-7432-7356-5", "ISBN-13: ...") is never a card, even when it passes Luhn.
_ISBN_CONTEXT = re.compile(r"\bISBN(?:-1[03])?\s*:?\s*$", re.IGNORECASE)
# Separated card numbers come in these group layouts: 4-4-4-4(-3), Amex 4-6-5, Diners 4-6-4.
_CARD_GROUPS = {(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 4, 1), (4, 4, 4, 4, 1), (4, 4, 4, 4, 2)}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    iban = candidate.replace(" ", "")
    if not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    numeric = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(numeric) % 97 == 1


def isbn13_valid(digits: str) -> bool:
    if len(digits) != 13 or not digits.startswith(("978", "979")):
        return False
    return sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(digits)) % 10 == 0


def _card_valid(text: str, m: re.Match) -> bool:
    number = m.group(0)
    digits = re.sub(r"\D", "", number)
    separators = set(re.findall(r"[ -]", number))
    if not (13 <= len(digits) <= 19 and len(separators) <= 1 and luhn_valid(digits)):
        return False
    # Payment cards start with 2-6 (the ISO/IEC 7812 industry digits of banks and card networks);
    # ISBN-13s start with 9, so one without its label is still left alone.
    if digits[0] not in "23456":
        return False
    if separators and tuple(len(g) for g in re.split(r"[ -]", number)) not in _CARD_GROUPS:
        return False
    return not (_ISBN_CONTEXT.search(text[max(0, m.start() - 10): m.start()]) and isbn13_valid(digits))


def _ip_valid(text: str, m: re.Match) -> bool:
    # Slices and scope operators ("a[::2]", "std::") parse as IPv6; real addresses have 3+ groups.
    if ":" in m.group(0) and sum(1 for g in m.group(0).split(":") if g) < 3:
        return False
    try:
        ip = ipaddress.ip_address(m.group(0))
    except ValueError:
        return False
    # Private, loopback and documentation ranges identify no one; scrubbing them only hurts code/docs.
    return ip.is_global and not _NOT_AN_ADDRESS_CONTEXT.search(text[max(0, m.start() - 12): m.start()])


def _phone_valid(text: str, m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    if m.group(0).startswith("+"):
        return 8 <= len(digits) <= 15
    return len(digits) == 10


def _secret_value_valid(text: str, m: re.Match) -> bool:
    value = m.group("value")
    # Real keys mix letters and digits; words like "password: correcthorsebattery" do not.
    return bool(re.search(r"[A-Za-z]", value) and re.search(r"\d", value))


@dataclass(frozen=True)
class PIIPattern:
    kind: str
    regex: re.Pattern
    validator: Callable[[str, re.Match], bool] | None = None
    group: str | int = 0  # the part of the match that is replaced


def default_patterns() -> list[PIIPattern]:
    secret_tokens = "|".join([
        r"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key id
        r"gh[pousr]_[A-Za-z0-9]{36,}", r"github_pat_[A-Za-z0-9_]{22,}",
        r"sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}",  # OpenAI / Anthropic style
        r"xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
        r"AIza[0-9A-Za-z_-]{35}",  # Google API key
        r"[rs]k_(?:live|test)_[0-9A-Za-z]{16,}",  # Stripe
        r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    ])
    return [
        PIIPattern("private_key", re.compile(
            r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----")),
        PIIPattern("secret", re.compile(rf"\b(?:{secret_tokens})\b")),
        PIIPattern("secret", re.compile(
            r"(?i)\b(?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)\b"
            r"[\"']?\s*[:=]\s*[\"']?(?P<value>[A-Za-z0-9_\-+/=]{16,})"), _secret_value_valid, "value"),
        PIIPattern("email", re.compile(
            r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b")),
        PIIPattern("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
                   lambda text, m: iban_valid(m.group(0))),
        PIIPattern("credit_card", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"), _card_valid),
        PIIPattern("ipv6", re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"), _ip_valid),
        PIIPattern("ipv4", re.compile(
            r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"),
            _ip_valid),
        PIIPattern("phone", re.compile(
            r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
            r"|(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4})(?![\w-])"), _phone_valid),
    ]


def placeholder(kind: str) -> str:
    return "<SECRET>" if kind == "private_key" else f"<{kind.upper()}>"


def scrub(text: str, patterns: list[PIIPattern], counts: dict[str, int]) -> str:
    """Replace every validated match in order; `counts` is incremented per type."""
    for pattern in patterns:
        def replace(m: re.Match, pattern: PIIPattern = pattern) -> str:
            if pattern.validator is not None and not pattern.validator(text_now, m):
                return m.group(0)
            counts[pattern.kind] = counts.get(pattern.kind, 0) + 1
            if pattern.group == 0:
                return placeholder(pattern.kind)
            start, end = m.span(pattern.group)
            return m.group(0)[: start - m.start()] + placeholder(pattern.kind) + m.group(0)[end - m.start():]

        text_now = text
        text = pattern.regex.sub(replace, text)
    return text


class PIIScrubber(PipelineStep):
    """Formatter step: scrubs the configured PII types and counts them as `pii_<type>` stats."""

    type = "✂️ - FORMAT"
    name = "🔏 PII scrub"

    def __init__(self, types: list[str] | None = None):
        super().__init__()
        types = list(types or PII_TYPES)
        unknown = sorted(set(types) - set(PII_TYPES))
        if unknown:
            raise ValueError(f"pii.types: unknown {unknown}; known: {list(PII_TYPES)}")
        self.types = types

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        patterns = [p for p in default_patterns() if p.kind in self.types]
        for doc in data:
            self.stat_update(StatHints.total)
            counts: dict[str, int] = {}
            with self.track_time():
                doc.text = scrub(doc.text, patterns, counts)
            for kind, n in counts.items():
                self.stat_update(f"pii_{kind}", value=n)
            if counts:
                self.stat_update("docs_with_pii")
                doc.metadata["pii"] = counts
            self.update_doc_stats(doc)
            yield doc
