"""Instruction following, IFEval style: prompts with verifiable instructions, scored strict and loose.

A prompt file is JSONL, one row per prompt, in IFEval's own shape so either checker set reads it:
    {"key": 1, "prompt": "...", "instruction_id_list": ["length_constraints:number_words", ...],
     "kwargs": [{"relation": "less than", "num_words": 20}, ...]}

The checkers are lm-eval's (lm_eval.tasks.ifeval) when they import cleanly: they need NLTK's
`punkt_tab` data, and importing them without it starts a download. Offline without that data the
checkers below are used; they implement the same instruction ids and arguments (word and sentence
counts, keywords, forbidden words, JSON, bullet lists, case, end phrase, no commas, quotation) with a
regex sentence splitter instead of NLTK's. Other ids are a one-line error naming the file and line.

Strict scores the response as it is; loose takes the best of eight variants (first or last line
dropped, markdown asterisks removed), as IFEval defines it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

Checker = Callable[[str, dict[str, Any]], bool]


def _compare(count: int, relation: str, bound: int) -> bool:
    if relation == "less than":
        return count < bound
    if relation == "at least":
        return count >= bound
    raise ValueError(f"relation '{relation}' is not 'less than' or 'at least'")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _json(text: str, _: dict) -> bool:
    body = text.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
    body = body.removeprefix("```").removesuffix("```").strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


OWN_CHECKERS: dict[str, Checker] = {
    "length_constraints:number_words":
        lambda t, k: _compare(len(_words(t)), k["relation"], k["num_words"]),
    "length_constraints:number_sentences":
        lambda t, k: _compare(len(_sentences(t)), k["relation"], k["num_sentences"]),
    "keywords:existence":
        lambda t, k: all(re.search(re.escape(w), t, re.IGNORECASE) for w in k["keywords"]),
    "keywords:frequency":
        lambda t, k: _compare(len(re.findall(re.escape(k["keyword"]), t, re.IGNORECASE)), k["relation"],
                              k["frequency"]),
    "keywords:forbidden_words":
        lambda t, k: not any(re.search(r"\b" + re.escape(w) + r"\b", t, re.IGNORECASE) for w in k["forbidden_words"]),
    "detectable_format:json_format": _json,
    "detectable_format:number_bullet_lists":
        lambda t, k: len(re.findall(r"^\s*[*-][^*].*$", t, re.MULTILINE)) == k["num_bullets"],
    "change_case:english_lowercase": lambda t, k: t == t.lower(),
    "change_case:english_capital": lambda t, k: t == t.upper(),
    "startend:end_checker": lambda t, k: t.strip().lower().endswith(k["end_phrase"].strip().lower()),
    "startend:quotation": lambda t, k: len(t.strip()) > 1 and t.strip()[0] == t.strip()[-1] == '"',
    "punctuation:no_comma": lambda t, k: "," not in t,
}


def lm_eval_checkers() -> dict[str, Callable[[str, dict[str, Any], str], bool]] | None:
    """lm-eval's checkers when their NLTK data is present; None otherwise (importing would download)."""
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
        from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT
    except (ImportError, LookupError):
        return None

    def check(instruction_id: str):
        def run(text: str, kwargs: dict[str, Any], prompt: str) -> bool:
            instruction = INSTRUCTION_DICT[instruction_id](instruction_id)
            instruction.build_description(**{k: v for k, v in kwargs.items() if v})
            if "prompt" in (instruction.get_instruction_args() or {}):
                instruction.build_description(prompt=prompt)
            return bool(text.strip()) and bool(instruction.check_following(text))
        return run

    return {name: check(name) for name in INSTRUCTION_DICT}


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file")
    known = set(OWN_CHECKERS) | set(lm_eval_checkers() or {})
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
        ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
        if not isinstance(row.get("prompt"), str) or not isinstance(ids, list) or not isinstance(kwargs, list) \
                or len(ids) != len(kwargs):
            raise ValueError(f"{path}:{line_no}: needs 'prompt', and 'instruction_id_list' and 'kwargs' lists "
                             "of the same length")
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ValueError(f"{path}:{line_no}: instruction '{unknown[0]}' has no checker here")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    variants = [response, *cut]
    return variants + [v.replace("*", "") for v in variants]


def score(rows: list[dict[str, Any]], responses: list[str]) -> dict[str, Any]:
    """Prompt-level (every instruction followed) and instruction-level accuracy, strict and loose."""
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} prompts but {len(responses)} responses")
    theirs = lm_eval_checkers() or {}
    counts = {"prompt_strict": 0, "prompt_loose": 0, "inst_strict": 0, "inst_loose": 0, "instructions": 0}
    for row, response in zip(rows, responses):
        strict, loose = [], []
        for instruction_id, kwargs in zip(row["instruction_id_list"], row["kwargs"]):
            if instruction_id in theirs:
                def check(text, _id=instruction_id, _k=kwargs):
                    return theirs[_id](text, _k, row["prompt"])
            else:
                def check(text, _id=instruction_id, _k=kwargs):
                    return bool(text.strip()) and OWN_CHECKERS[_id](text, _k)
            strict.append(check(response))
            loose.append(any(check(v) for v in _loose_variants(response)))
        counts["prompt_strict"] += all(strict)
        counts["prompt_loose"] += all(loose)
        counts["inst_strict"] += sum(strict)
        counts["inst_loose"] += sum(loose)
        counts["instructions"] += len(strict)
    n, m = len(rows), max(counts["instructions"], 1)
    return {"prompt_level_strict_acc": counts["prompt_strict"] / n, "prompt_level_loose_acc": counts["prompt_loose"] / n,
            "inst_level_strict_acc": counts["inst_strict"] / m, "inst_level_loose_acc": counts["inst_loose"] / m,
            "checkers": "lm-eval" if theirs else "own"}
