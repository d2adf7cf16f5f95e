"""Preference pairs from K models' answers scored by a reward model.

Per instruction: each of K models answers (one model loaded at a time, freed before the next), a
reward model scores every answer, chosen = best, rejected = worst; the pair is kept when the score
margin exceeds a threshold. Everything is resumable: each model's answers and the scores are
chunked files (see resumable.py); pairs.jsonl and summary.json are rebuilt from them at the end.

Folder layout:  preferences.json (settings)  answers-<k>.jsonl  scores.jsonl  pairs.jsonl  summary.json
"""
from __future__ import annotations

import hashlib
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.synthesize.engine import (
    EngineSettings,
    Sampling,
    item_seed,
    load_chat_tokenizer,
    open_engine,
    resolve_device,
)
from trainer.synthesize.progress import item_progress
from trainer.synthesize.resumable import ChunkedJsonl, write_json_atomic

SETTINGS_FILE = "preferences.json"
_SHAPES = "'instruction', 'prompt' (text or messages) or 'messages'"


# ----------------------------------------------------------------------------- instructions


def prompt_of(row: Any) -> list[dict]:
    """The prompt conversation of one instruction row; ValueError says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object with {_SHAPES}, got {type(row).__name__}")  # noqa: TRY004
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise ValueError("'messages' must be a list of {role: system|user|assistant, content: str}")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()  # an SFT row: the instruction is what comes before its answer
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise ValueError("'messages' holds no user turn to answer")
        return messages
    for key in ("instruction", "prompt"):
        if key in row:
            value = row[key]
            if isinstance(value, str) and value.strip():
                return [{"role": "user", "content": value}]
            if key == "prompt" and isinstance(value, list):
                return prompt_of({"messages": value})
            raise ValueError(f"'{key}' must be a non-empty string")
    raise ValueError(f"expected {_SHAPES}; the row has {', '.join(sorted(row)) or 'no fields'}")


def instruction_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise FileNotFoundError(f"{path}: a folder with no .jsonl files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such instruction file")
    return [path]


def read_instructions(path: str | Path) -> list[list[dict]]:
    """Every row's prompt, in order; a bad row raises ValueError naming file:line."""
    from trainer.sft.data import iter_rows

    prompts = []
    for file in instruction_files(path):
        for where, row in iter_rows(file):
            try:
                prompts.append(prompt_of(row))
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
    if not prompts:
        raise ValueError(f"{path}: no instructions")
    return prompts


def fingerprint(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- settings


@dataclass(kw_only=True)
class PreferenceSettings(EngineSettings):
    instructions: str
    models: list[str]
    reward_model: str
    out: str
    tokenizers: list[str | None] = field(default_factory=list)
    reward_tokenizer: str | None = None
    sampling: Sampling = field(default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, max_new_tokens=512))
    margin: float = 0.0
    score_batch_size: int = 16
    max_len: int | None = None
    max_prompt_len: int | None = None

    def check(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"--model: at least two models make a pair, got {len(self.models)}")
        if self.tokenizers and len(self.tokenizers) != len(self.models):
            raise ValueError(f"--tokenizer: give one per --model ({len(self.models)}) or none")
        self.check_at_least_one("score_batch_size")

    def tokenizer_of(self, k: int) -> str | None:
        return self.tokenizers[k] if self.tokenizers else None

    def recorded(self, fingerprint_: str) -> dict:
        return {"command": "preferences", "instructions": fingerprint_,
                "models": [str(Path(m).resolve()) for m in self.models], "tokenizers": self.tokenizers or None,
                "reward_model": str(Path(self.reward_model).resolve()), "reward_tokenizer": self.reward_tokenizer,
                "chat_template": self.chat_template, "sampling": self.sampling.to_dict(), "seed": self.seed,
                "batch_size": self.batch_size, "chunk_size": self.chunk_size, "max_len": self.max_len,
                "max_prompt_len": self.max_prompt_len, "backend": self.backend, "bf16": self.bf16}


def open_output_folder(out: Path, recorded: dict, settings_name: str = SETTINGS_FILE) -> None:
    """Create the folder, or check that an existing one holds this configuration's work."""
    settings = out / settings_name
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: not a folder")
    if settings.is_file():
        held = json.loads(settings.read_text())
        differing = sorted(k for k in set(held) | set(recorded) if held.get(k) != recorded.get(k))
        if differing:
            key = differing[0]
            raise ValueError(f"{out}: written with other settings ({key}: {held.get(key)!r} there, "
                             f"{recorded.get(key)!r} now); rerun with the same settings or choose another --out")
        return
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out}: a non-empty folder without {settings_name}, not written by this command; "
                         "choose another --out")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: no such folder for the output")
    out.mkdir(exist_ok=True)
    write_json_atomic(settings, recorded)


# ----------------------------------------------------------------------------- the passes


def answer_pass(s, k: int, prompts: list[list[dict]], out: Path, recorded: dict,
                device: torch.device, bar) -> None:
    """Model k's answers to every prompt into answers-<k>.jsonl; `s` is any settings object with the
    answering fields of PreferenceSettings (models, tokenizer_of, sampling, seed, batching, backend)."""
    from trainer.chat import prompt_ids

    answers = ChunkedJsonl(out / f"answers-{k}.jsonl", {**recorded, "pass": f"answers-{k}"})
    progress = answers.open()
    if progress.complete:
        return
    model = s.models[k]
    tokenizer = load_chat_tokenizer(model, s.tokenizer_of(k), s.chat_template)
    engine = open_engine(s.backend, model, tokenizer, device, torch.bfloat16 if s.bf16 else torch.float32)
    task = bar.add_task(f"answers {k}: {Path(model).name}", total=len(prompts), completed=progress.items_done)
    try:
        for start in range(progress.items_done, len(prompts), s.chunk_size):
            end = min(start + s.chunk_size, len(prompts))
            rows = []
            for b in range(start, end, s.batch_size):
                batch = range(b, min(b + s.batch_size, end))
                texts = engine.complete([prompt_ids(tokenizer, prompts[i]) for i in batch],
                                        [item_seed(s.seed, f"answer-{k}", i) for i in batch], s.sampling)
                rows += [{"item": i, "response": t} for i, t in zip(batch, texts)]
            answers.commit(rows, end, complete=end == len(prompts))
            bar.update(task, completed=end)
    finally:
        engine.close()  # freed before the next model loads


def _score_pass(s: PreferenceSettings, prompts: list[list[dict]], out: Path, recorded: dict,
                device: torch.device, source, bar) -> None:
    from trainer.data.tokenizer import load_tokenizer
    from trainer.dpo.data import PreferencePair
    from trainer.score import (
        ScoreReport,
        ScoreRow,
        length_limits,
        load_scoring_model,
        score_sequences,
        tokenize_score_rows,
    )

    scores = ChunkedJsonl(out / "scores.jsonl", {**recorded, "pass": "scores"})
    progress = scores.open()
    if progress.complete:
        return
    answers = [ChunkedJsonl(out / f"answers-{k}.jsonl", {**recorded, "pass": f"answers-{k}"})
               for k in range(len(s.models))]
    for a in answers:
        a.open()
    responses = [[r["response"] for r in a.rows()] for a in answers]  # [model][item]
    max_len, max_prompt_len = length_limits(source, s.max_len, s.max_prompt_len)
    tokenizer_dir = Path(s.reward_tokenizer) if s.reward_tokenizer else source.tokenizer
    if tokenizer_dir is None:
        raise FileNotFoundError(f"{s.reward_model}: no tokenizer found beside the reward model; "
                                "pass --reward-tokenizer")
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_scoring_model(source, device, torch.bfloat16 if s.bf16 else torch.float32)
    pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    task = bar.add_task("scores", total=len(prompts), completed=progress.items_done)
    report = ScoreReport()
    for start in range(progress.items_done, len(prompts), s.chunk_size):
        end = min(start + s.chunk_size, len(prompts))
        todo = [(i, k) for i in range(start, end) for k in range(len(s.models)) if responses[k][i].strip()]
        rows = [ScoreRow(f"item {i}", {}, pair=PreferencePair(prompts[i], responses[k][i], responses[k][i]))
                for i, k in todo]
        values: dict[tuple[int, int], float] = {}
        if rows:
            seqs = tokenize_score_rows(tokenizer, rows, max_len=max_len, max_prompt_len=max_prompt_len,
                                       chat_template=s.chat_template, report=report)
            logits = score_sequences(model, seqs, batch_size=s.score_batch_size, pad_id=pad_id)
            values = {key: float(v[0]) for key, v in zip(todo, logits)}
        scores.commit([{"item": i, "scores": [values.get((i, k)) for k in range(len(s.models))]}
                       for i in range(start, end)], end, complete=end == len(prompts))
        bar.update(task, completed=end)
    del model


def build_pairs(s: PreferenceSettings, prompts: list[list[dict]], responses: list[list[str]],
                scores: list[list[float | None]]) -> tuple[list[dict], dict]:
    """DPO rows (prompt / chosen / rejected plus every answer and score) and the summary."""
    labels = [f"{k}:{Path(m).name}" for k, m in enumerate(s.models)]
    pairs, dropped, wins, margins = [], Counter(), Counter(), []
    for i, prompt in enumerate(prompts):
        scored = [(scores[i][k], k) for k in range(len(s.models)) if scores[i][k] is not None]
        if len(scored) < 2:
            dropped["too_few_answers"] += 1
            continue
        best = max(scored, key=lambda x: (x[0], -x[1]))
        worst = min(scored, key=lambda x: (x[0], x[1]))
        margin = best[0] - worst[0]
        if responses[best[1]][i].strip() == responses[worst[1]][i].strip():
            dropped["identical"] += 1
            continue
        if not margin > s.margin:
            dropped["margin"] += 1
            continue
        wins[labels[best[1]]] += 1
        margins.append(margin)
        pairs.append({"prompt": prompt, "chosen": responses[best[1]][i], "rejected": responses[worst[1]][i],
                      "chosen_model": labels[best[1]], "rejected_model": labels[worst[1]],
                      "score_margin": margin, "item": i,
                      "answers": [{"model": labels[k], "response": responses[k][i], "score": scores[i][k]}
                                  for k in range(len(s.models))]})
    summary = {"instructions": len(prompts), "kept": len(pairs), "dropped": dict(dropped),
               "margin_threshold": s.margin, "chosen_by_model": dict(wins), "kept_margin": _stats(margins),
               "scores_by_model": {labels[k]: _stats([r[k] for r in scores if r[k] is not None])
                                   for k in range(len(s.models))},
               "empty_answers_by_model": {labels[k]: sum(1 for r in scores if r[k] is None)
                                          for k in range(len(s.models))}}
    return pairs, summary


def _stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values), "std": statistics.pstdev(values),
            "min": min(values), "median": statistics.median(values), "max": max(values)}


def run_preferences(s: PreferenceSettings) -> dict:
    """Answer, score and pair (or continue doing so); returns the summary."""
    from trainer.score import find_classifier, write_jsonl_atomic

    s.check()
    files = instruction_files(s.instructions)
    prompts = read_instructions(s.instructions)
    source = find_classifier(s.reward_model)
    if source.num_labels != 1:
        raise ValueError(f"{s.reward_model}: the model has {source.num_labels} outputs; a reward model has one")
    for k, model in enumerate(s.models):  # every model's tokenizer and chat template, before any work
        load_chat_tokenizer(model, s.tokenizer_of(k), s.chat_template)
    device = resolve_device(s.device)
    out = Path(s.out)
    recorded = s.recorded(fingerprint(files))
    open_output_folder(out, recorded)
    with item_progress(s.progress) as bar:
        for k in range(len(s.models)):
            answer_pass(s, k, prompts, out, recorded, device, bar)
        _score_pass(s, prompts, out, recorded, device, source, bar)
    responses = []
    for k in range(len(s.models)):
        answers = ChunkedJsonl(out / f"answers-{k}.jsonl", {**recorded, "pass": f"answers-{k}"})
        answers.open()
        responses.append([r["response"] for r in answers.rows()])
    scores_file = ChunkedJsonl(out / "scores.jsonl", {**recorded, "pass": "scores"})
    scores_file.open()
    scores = [r["scores"] for r in scores_file.rows()]
    pairs, summary = build_pairs(s, prompts, responses, scores)
    write_jsonl_atomic(out / "pairs.jsonl", pairs)
    write_json_atomic(out / "summary.json", summary)
    return summary
