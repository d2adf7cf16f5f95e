"""Magpie: a chat model writes user instructions from its template's user-turn prefix, then answers them.

Items are numbered 0..n-1; item i's instruction and answer are sampled from generators seeded
from (seed, i). An item whose instruction is empty, an exact duplicate or a near duplicate of a
kept one is dropped and counted. Rows are SFT `messages` rows (plus flat `instruction` /
`response` fields the cleaning recipe reads) with the generation settings under `generation`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.synthesize.dedup import InstructionDedup
from trainer.synthesize.engine import (
    EngineSettings,
    Sampling,
    item_seed,
    load_chat_tokenizer,
    open_engine,
    resolve_device,
)
from trainer.synthesize.progress import item_progress
from trainer.synthesize.resumable import ChunkedJsonl
from trainer.synthesize.template import magpie_prefix

DROP_REASONS = ("empty", "exact", "near")


@dataclass(kw_only=True)
class MagpieSettings(EngineSettings):
    model: str
    out: str
    num_items: int
    tokenizer: str | None = None
    system: str | None = None
    instruction_sampling: Sampling = field(
        default_factory=lambda: Sampling(temperature=1.0, top_p=1.0, max_new_tokens=128))
    response_sampling: Sampling | None = field(
        default_factory=lambda: Sampling(temperature=0.7, top_p=0.9, max_new_tokens=512))
    near_duplicate: float = 0.8

    def check(self) -> None:
        self.check_at_least_one("num_items")
        if not 0.0 < self.near_duplicate <= 1.0:
            raise ValueError(f"--near-duplicate {self.near_duplicate} must be in (0, 1]")

    def recorded(self) -> dict:
        """What the output depends on: a rerun must match these to continue the file.
        Batch size is among them because left padding changes a row's logits in the last bits."""
        return {"command": "magpie", "model": str(Path(self.model).resolve()), "tokenizer": self.tokenizer,
                "chat_template": self.chat_template, "system": self.system, "num_items": self.num_items,
                "instruction_sampling": self.instruction_sampling.to_dict(),
                "response_sampling": self.response_sampling.to_dict() if self.response_sampling else None,
                "seed": self.seed, "near_duplicate": self.near_duplicate, "batch_size": self.batch_size,
                "chunk_size": self.chunk_size, "backend": self.backend, "bf16": self.bf16}


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_magpie(s: MagpieSettings) -> dict:
    """Generate (or continue) `s.out`; returns the counters."""
    from trainer.chat import prompt_ids

    s.check()
    out = ChunkedJsonl(s.out, s.recorded())
    progress = out.open()
    counters = {"kept": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}, **progress.counters}
    if progress.complete:
        print(f"{s.out}: already complete ({progress.rows} rows)")
        return counters
    tokenizer = load_chat_tokenizer(s.model, s.tokenizer, s.chat_template)
    system = [{"role": "system", "content": s.system}] if s.system else []
    prefix_text = magpie_prefix(tokenizer, s.model) if not system else _system_prefix(tokenizer, system, s.model)
    prefix = tokenizer(prefix_text, add_special_tokens=False)["input_ids"]
    device = resolve_device(s.device)
    dedup = InstructionDedup(s.near_duplicate)
    for row in out.rows():
        dedup.check(row["instruction"])
    engine = open_engine(s.backend, s.model, tokenizer, device, torch.bfloat16 if s.bf16 else torch.float32)
    try:
        with item_progress(s.progress) as bar:
            task = bar.add_task("magpie", total=s.num_items, completed=progress.items_done)
            for start in range(progress.items_done, s.num_items, s.chunk_size):
                items = list(range(start, min(start + s.chunk_size, s.num_items)))
                instructions: list[str] = []
                for batch in _batches(items, s.batch_size):
                    seeds = [item_seed(s.seed, "instruction", i) for i in batch]
                    instructions += engine.complete([prefix] * len(batch), seeds, s.instruction_sampling)
                kept = []
                for i, text in zip(items, instructions):
                    reason = "empty" if not text.strip() else dedup.check(text)
                    if reason is None:
                        kept.append((i, text))
                        counters["kept"] += 1
                    else:
                        counters[f"dropped_{reason}"] += 1
                responses: list[str | None] = [None] * len(kept)
                if s.response_sampling is not None:
                    responses = []
                    for batch in _batches(kept, s.batch_size):
                        prompts = [prompt_ids(tokenizer, system + [{"role": "user", "content": t}]) for _, t in batch]
                        seeds = [item_seed(s.seed, "response", i) for i, _ in batch]
                        responses += engine.complete(prompts, seeds, s.response_sampling)
                out.commit([_row(s, engine.name, i, text, response) for (i, text), response in zip(kept, responses)],
                           items[-1] + 1, counters, complete=items[-1] + 1 == s.num_items)
                bar.update(task, completed=items[-1] + 1)
    finally:
        engine.close()
    return counters


def _system_prefix(tokenizer, system: list[dict], where: str) -> str:
    """The prefix with a system message first: the rendering of the system turn plus a sentinel user turn."""
    from trainer.synthesize.template import SENTINEL

    text = tokenizer.apply_chat_template(system + [{"role": "user", "content": SENTINEL}], tokenize=False)
    if text.count(SENTINEL) != 1:
        raise ValueError(f"{where}: cannot derive the user-turn prefix after a system message")
    return text[:text.index(SENTINEL)]


def _row(s: MagpieSettings, backend: str, item: int, instruction: str, response: str | None) -> dict:
    meta = {"source": "magpie", "model": s.model, "item": item, "seed": s.seed, "backend": backend,
            "instruction_sampling": s.instruction_sampling.to_dict()}
    messages = ([{"role": "system", "content": s.system}] if s.system else []) + \
        [{"role": "user", "content": instruction}]
    if response is None:
        return {"instruction": instruction, "messages": messages, "generation": meta}
    meta["response_sampling"] = s.response_sampling.to_dict()
    return {"messages": messages + [{"role": "assistant", "content": response}], "instruction": instruction,
            "response": response, "generation": meta}
