"""The step registry: YAML step names -> datatrove blocks (or ours where datatrove lacks one).

Two kinds of steps:
- stream steps look at one document at a time (filters, formatters) and run inside a stage;
- global steps (dedup) need every document's signature first, so they split the run into stages:
  signatures at the end of one stage, "find" stages in between, the filter at the head of the next.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
)
from datatrove.pipeline.dedup.sentence_dedup import (
    SentDedupConfig, SentenceDedupFilter, SentenceDedupSignature, SentenceFindDedups,
)
from datatrove.pipeline.filters import (
    C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter,
)

from datapipe.accounting import UseField
from datapipe.code_filters import CodeQualityFilter
from datapipe.cross_dedup import OVERLAP_FILE, ExactOverlap, OrderedMinhashCluster, SourceMap, source_priority
from datapipe.decont import Decontaminate
from datapipe.instructions import InstructionRulesFilter
from datapipe.keywords import KeywordFilter
from datapipe.lid import OfflineLanguageFilter
from datapipe.perplexity import PerplexityFilter
from datapipe.pii import PIIScrubber
from datapipe.quality import QualityClassifierFilter
from datapipe.tokens import shared_or_stock


class StepConfigError(ValueError):
    """A step's parameters are wrong; the message names the step and the key."""


@dataclass(frozen=True)
class StreamStep:
    cls: type[PipelineStep]
    is_filter: bool = True
    defaults: dict[str, Any] = field(default_factory=dict)


STREAM_STEPS: dict[str, StreamStep] = {
    "language": StreamStep(OfflineLanguageFilter, defaults={"languages": ["en"], "threshold": 0.65}),
    "gopher_quality": StreamStep(GopherQualityFilter),
    "gopher_repetition": StreamStep(GopherRepetitionFilter),
    "c4_quality": StreamStep(C4QualityFilter),
    "fineweb_quality": StreamStep(FineWebQualityFilter),
    "perplexity": StreamStep(PerplexityFilter),
    "instruction_rules": StreamStep(InstructionRulesFilter),
    "code_quality": StreamStep(CodeQualityFilter),
    "decontaminate": StreamStep(Decontaminate),
    "keywords": StreamStep(KeywordFilter),
    "quality_classifier": StreamStep(QualityClassifierFilter),
    "pii": StreamStep(PIIScrubber, is_filter=False),
}
# Steps whose datatrove block word- or sentence-tokenizes through its `language` argument.
TOKENIZING_STEPS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
GLOBAL_STEPS = ("exact_dedup", "minhash_dedup", "sentence_dedup")
ALL_STEPS = tuple(STREAM_STEPS) + GLOBAL_STEPS


def minhash_threshold(bands: int, rows: int) -> float:
    """Jaccard similarity at which a pair becomes a candidate with probability ~1/2 (the S-curve's knee)."""
    return (1.0 / bands) ** (1.0 / rows)


def minhash_detection_probability(jaccard: float, bands: int, rows: int) -> float:
    """P(a pair with this Jaccard similarity shares at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - jaccard**rows) ** bands


def _check_keys(label: str, cls: Callable, params: dict, extra_allowed: tuple[str, ...] = ()) -> list[str]:
    sig = inspect.signature(cls)
    allowed = {n for n in sig.parameters if n not in ("exclusion_writer", "self")} | set(extra_allowed)
    errors = [f"steps.{label}.{k}: unknown parameter (known: {sorted(allowed)})" for k in params if k not in allowed]
    required = [n for n, p in sig.parameters.items()
                if p.default is inspect.Parameter.empty and n not in ("self", "exclusion_writer")
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    errors += [f"steps.{label}.{k}: required" for k in required if k not in params]
    return errors


def tokenizer_for(language, share_tokenizer: bool):
    return shared_or_stock(language) if share_tokenizer else language


def build_stream_step(name: str, label: str, params: dict, exclusion_writer,
                      share_tokenizer: bool = True) -> PipelineStep:
    spec = STREAM_STEPS[name]
    kwargs = {**spec.defaults, **params}
    if name in TOKENIZING_STEPS:
        kwargs["language"] = tokenizer_for(kwargs.get("language", "en"), share_tokenizer)
    if name == "language" and isinstance(kwargs.get("languages"), str):
        kwargs["languages"] = [kwargs["languages"]]
    # datatrove filters take tuples where YAML gives lists; pass sequences through unchanged otherwise
    if name == "gopher_repetition":
        for key in ("top_n_grams", "dup_n_grams"):
            if key in kwargs:
                kwargs[key] = tuple(tuple(x) for x in kwargs[key])
    try:
        if spec.is_filter:
            return spec.cls(**kwargs, exclusion_writer=exclusion_writer)
        return spec.cls(**kwargs)
    except (TypeError, ValueError, FileNotFoundError, ImportError, KeyError) as err:
        raise StepConfigError(f"steps.{label}: {err}") from None


def validate_step(name: str, label: str, params: dict) -> list[str]:
    if name in STREAM_STEPS:
        spec = STREAM_STEPS[name]
        errors = _check_keys(label, spec.cls, {**spec.defaults, **params})
        if errors:
            return errors
        try:
            build_stream_step(name, label, params, None)
        except StepConfigError as err:
            return [str(err)]
        return []
    allowed = GLOBAL_PARAMS[name]
    errors = [f"steps.{label}.{k}: unknown parameter (known: {sorted(allowed)})" for k in params if k not in allowed]
    for k, v in params.items():
        if k in allowed and allowed[k] is not None and not isinstance(v, allowed[k]):
            errors.append(f"steps.{label}.{k}: expected {allowed[k].__name__}, got {type(v).__name__}")
    if name == "minhash_dedup":
        for k in ("bands", "rows", "n_grams"):
            if isinstance(params.get(k), int) and params[k] < 1:
                errors.append(f"steps.{label}.{k}: must be >= 1")
    return errors


GLOBAL_PARAMS: dict[str, dict[str, type | tuple | None]] = {
    "exact_dedup": {"field": str},
    "minhash_dedup": {"n_grams": int, "bands": int, "rows": int, "seed": int, "field": str, "language": str},
    "sentence_dedup": {"n_sentences": int, "min_doc_words": int, "min_num_sentences": int, "language": str},
}


def doc_text(doc: Document) -> str:
    return doc.text


# datatrove picks the hash function from the real return type, not the postponed string annotation.
doc_text.__annotations__["return"] = str


@dataclass
class GlobalStepParts:
    """The pieces a global step contributes to the stage plan."""

    signature: list[PipelineStep]  # appended after the previous stage's writer
    find_stages: list[tuple[str, list[PipelineStep], int]]  # (name, pipeline, tasks) run in order
    filter: PipelineStep  # head of the next stage, right after its reader


def build_global_step(name: str, label: str, params: dict, work: str, exclusion_writer,
                      share_tokenizer: bool = True, sources: list[str] | None = None) -> GlobalStepParts:
    """`exclusion_writer` gets the removed documents; for sentence_dedup, every document that lost
    duplicated spans (spans marked), whether it was then kept or dropped as too short.

    `sources` (names in priority order, for runs over several sources): exact and MinHash dedup keep
    the copy from the first-listed source and write the source x source overlap (datapipe/cross_dedup.py).
    """
    sig_dir, found_dir = f"{work}/{label}/signatures", f"{work}/{label}/found"
    overlap_path = f"{work}/{label}/{OVERLAP_FILE}"
    field_step = [UseField(params["field"])] if params.get("field") else []
    maps_dir = f"{work}/{label}/sources"
    source_map = [SourceMap(maps_dir)] if sources else []
    if name == "exact_dedup":
        config = ExactDedupConfig(content_getter=doc_text, document_priority=source_priority if sources else None)
        overlap = ExactOverlap(sig_dir, maps_dir, overlap_path, sources, config.hash_config) if sources else None
        return GlobalStepParts(
            signature=field_step + source_map + [ExactDedupSignature(sig_dir, config=config, finder_workers=1)],
            find_stages=[(f"{label}-find", [ExactFindDedups(sig_dir, found_dir, config=config)], 1)]
            + ([(f"{label}-overlap", [overlap], 1)] if overlap else []),
            filter=ExactDedupFilter(found_dir, config=config, exclusion_writer=exclusion_writer),
        )
    if name == "minhash_dedup":
        config = MinhashConfig(n_grams=params.get("n_grams", 5), num_buckets=params.get("bands", 14),
                               hashes_per_bucket=params.get("rows", 8), seed=params.get("seed", 1))
        language = tokenizer_for(params.get("language", "en"), share_tokenizer)
        buckets_dir = f"{work}/{label}/buckets"
        if sources:
            cluster = OrderedMinhashCluster(buckets_dir, found_dir, config, maps_dir, overlap_path, sources)
        else:
            cluster = MinhashDedupCluster(buckets_dir, found_dir, config=config)
        return GlobalStepParts(
            signature=field_step + source_map + [MinhashDedupSignature(sig_dir, config=config, language=language)],
            find_stages=[
                (f"{label}-buckets", [MinhashDedupBuckets(sig_dir, buckets_dir, config=config)], config.num_buckets),
                (f"{label}-clusters", [cluster], 1),
            ],
            filter=MinhashDedupFilter(found_dir, exclusion_writer=exclusion_writer),
        )
    if name == "sentence_dedup":
        config = SentDedupConfig(n_sentences=params.get("n_sentences", 3),
                                 min_doc_words=params.get("min_doc_words", 50),
                                 min_num_sentences=params.get("min_num_sentences", 3))
        language = tokenizer_for(params.get("language", "en"), share_tokenizer)
        return GlobalStepParts(
            signature=[SentenceDedupSignature(sig_dir, finder_workers=1, config=config, language=language)],
            find_stages=[(f"{label}-find", [SentenceFindDedups(sig_dir, found_dir, config=config)], 1)],
            filter=SentenceDedupFilter(found_dir, config=config, exclusion_writer=exclusion_writer,
                                       language=language),
        )
    raise StepConfigError(f"steps.{label}: unknown step {name!r}")
