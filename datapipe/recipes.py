"""Named recipes: the default step lists, in the order FineWeb / The Stack / SFT pipelines use.

Steps that need a user-supplied file (decontaminate: eval sets; perplexity: a model) join a recipe
only when `step_params` configures them.
"""
from __future__ import annotations

from typing import Callable

Steps = list[dict[str, dict]]


def _with(params: dict[str, dict], name: str, defaults: dict | None = None) -> dict[str, dict]:
    return {name: {**(defaults or {}), **params.get(name, {})}}


def _optional(params: dict[str, dict], name: str) -> Steps:
    return [_with(params, name)] if name in params else []


def web(params: dict[str, dict]) -> Steps:
    return [
        _with(params, "language", {"languages": ["en"], "threshold": 0.65}),
        _with(params, "gopher_repetition"),
        _with(params, "gopher_quality"),
        _with(params, "c4_quality", {"filter_no_terminal_punct": False}),
        _with(params, "fineweb_quality"),
        *_optional(params, "perplexity"),
        *_optional(params, "decontaminate"),
        _with(params, "exact_dedup"),
        _with(params, "minhash_dedup", {"n_grams": 5, "bands": 14, "rows": 8}),
        _with(params, "sentence_dedup"),
        _with(params, "pii"),
    ]


def code(params: dict[str, dict]) -> Steps:
    return [
        _with(params, "code_quality"),
        *_optional(params, "decontaminate"),
        _with(params, "exact_dedup"),
        _with(params, "minhash_dedup", {"n_grams": 5, "bands": 14, "rows": 8}),
        _with(params, "pii", {"types": ["private_key", "secret", "email", "ipv4", "ipv6"]}),
    ]


def instructions(params: dict[str, dict]) -> Steps:
    return [
        _with(params, "language", {"languages": ["en"], "threshold": 0.65}),
        _with(params, "instruction_rules"),
        *_optional(params, "decontaminate"),
        _with(params, "exact_dedup", {"field": "instruction"}),
        # 20 bands x 10 rows: pairs at Jaccard 0.8 are caught with p~0.90, 0.9 with p~1.0, 0.6 with
        # p~0.11 (knee ~0.74). Word bigrams suit short instructions.
        _with(params, "minhash_dedup", {"field": "instruction", "n_grams": 2, "bands": 20, "rows": 10}),
        _with(params, "pii"),
    ]


RECIPES: dict[str, Callable[[dict[str, dict]], Steps]] = {"web": web, "code": code, "instructions": instructions}
