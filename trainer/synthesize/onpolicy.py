"""On-policy preference pairs from questions with known answers.

The policy answers every question (resumable, like the other passes); an answer that does not match
the reference becomes the rejected side of a pair whose chosen side is the reference. The rejected
answers are the mistakes the model actually makes, which is what preference tuning has to move it away
from; a made-up wrong answer is one the model may never have given (the demo's SFT model preferred
the correct answer over such answers on 0.86 of its held-out questions, and over its own answers on
0.05: docs/dpo.md).

Folder layout:  onpolicy.json (settings)  answers-0.jsonl  pairs.jsonl  summary.json
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trainer.synthesize.engine import (
    EngineSettings,
    Sampling,
    load_chat_tokenizer,
    resolve_device,
)
from trainer.synthesize.preferences import (
    answer_pass,
    fingerprint,
    instruction_files,
    open_output_folder,
    prompt_of,
)
from trainer.synthesize.progress import item_progress
from trainer.synthesize.resumable import ChunkedJsonl, write_json_atomic

SETTINGS_FILE = "onpolicy.json"
MATCHES = ("exact", "normalized")


@dataclass(kw_only=True)
class OnPolicySettings(EngineSettings):
    questions: str
    model: str
    out: str
    tokenizer: str | None = None
    reference_key: str = "answer"
    match: str = "exact"
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.0, max_new_tokens=256))

    # The answer pass is shared with `preferences`, which answers with K models.
    @property
    def models(self) -> list[str]:
        return [self.model]

    def tokenizer_of(self, k: int) -> str | None:
        return self.tokenizer

    def check(self) -> None:
        if self.match not in MATCHES:
            raise ValueError(f"--match: one of {', '.join(MATCHES)}, got {self.match!r}")
        self.check_at_least_one()

    def recorded(self, fingerprint_: str) -> dict:
        return {"command": "onpolicy", "questions": fingerprint_, "models": [str(Path(self.model).resolve())],
                "tokenizers": [self.tokenizer] if self.tokenizer else None, "reference_key": self.reference_key,
                "chat_template": self.chat_template, "sampling": self.sampling.to_dict(), "seed": self.seed,
                "batch_size": self.batch_size, "chunk_size": self.chunk_size, "backend": self.backend,
                "bf16": self.bf16}


def read_questions(path: str | Path, reference_key: str) -> tuple[list[list[dict]], list[str]]:
    """Every row's prompt and reference answer, in order; a bad row raises ValueError naming file:line."""
    from trainer.sft.data import iter_rows

    prompts, references = [], []
    for file in instruction_files(path):
        for where, row in iter_rows(file):
            try:
                prompt = prompt_of(row)
                reference = row.get(reference_key)
                if not isinstance(reference, str) or not reference.strip():
                    raise ValueError(f"no reference answer: '{reference_key}' must be a non-empty string "
                                     "(--reference-key names the field)")
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            prompts.append(prompt)
            references.append(reference)
    if not prompts:
        raise ValueError(f"{path}: no questions")
    return prompts, references


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().rstrip(".!").casefold()


def matches(answer: str, reference: str, how: str) -> bool:
    if how == "normalized":
        return _normalized(answer) == _normalized(reference)
    return answer.strip() == reference.strip()


def build_onpolicy_pairs(prompts: list[list[dict]], references: list[str], answers: list[str],
                         how: str) -> tuple[list[dict], dict]:
    """DPO rows (chosen = reference, rejected = the model's own wrong answer) and the summary."""
    pairs, outcome = [], Counter()
    for i, (prompt, reference, answer) in enumerate(zip(prompts, references, answers)):
        if not answer.strip():
            outcome["empty"] += 1
        elif matches(answer, reference, how):
            outcome["correct"] += 1
        else:
            outcome["wrong"] += 1
            pairs.append({"prompt": prompt, "chosen": reference, "rejected": answer, "item": i})
    summary = {"questions": len(prompts), "correct": outcome["correct"], "wrong": outcome["wrong"],
               "empty": outcome["empty"], "accuracy": outcome["correct"] / len(prompts), "pairs": len(pairs),
               "match": how}
    return pairs, summary


def run_onpolicy(s: OnPolicySettings) -> dict:
    """Answer (or continue answering) and pair; returns the summary."""
    from trainer.score import write_jsonl_atomic

    s.check()
    files = instruction_files(s.questions)
    prompts, references = read_questions(s.questions, s.reference_key)
    load_chat_tokenizer(s.model, s.tokenizer, s.chat_template)  # a missing template fails before any work
    device = resolve_device(s.device)
    out = Path(s.out)
    recorded = s.recorded(fingerprint(files))
    open_output_folder(out, recorded, SETTINGS_FILE)
    with item_progress(s.progress) as bar:
        answer_pass(s, 0, prompts, out, recorded, device, bar)
    answers_file = ChunkedJsonl(out / "answers-0.jsonl", {**recorded, "pass": "answers-0"})
    answers_file.open()
    answers = [r["response"] for r in answers_file.rows()]
    pairs, summary = build_onpolicy_pairs(prompts, references, answers, s.match)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    write_json_atomic(out / "summary.json", summary)
    return summary
