"""Prompt rows for online RL: `{"prompt": text | messages, ...other fields}` -> token ids + what rewards see.

A text prompt becomes one user message. The prompt is rendered with the chat template up to the assistant
header (what generation starts from). Every other key of the row is kept and handed to the reward
functions, aligned with the completions. A prompt longer than `rl.max_prompt_len` tokens is an error
naming its row: cutting a question short changes its answer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.chat import ChatFormatError, Message, prompt_ids
from trainer.data.sources import DataError
from trainer.dpo.data import _messages
from trainer.sft.data import _BadRow, iter_rows


@dataclass
class Prompt:
    ids: np.ndarray  # rendered prompt token ids, ending in the assistant header
    text: str  # the last user message: what reward functions read as the prompt
    fields: dict[str, Any] = field(default_factory=dict)
    where: str = ""
    messages: list[Message] = field(default_factory=list)  # the whole prompt conversation (reward models)


def parse_prompt_row(row: Any, where: str) -> tuple[list[Message], dict[str, Any]]:
    if isinstance(row, _BadRow):
        raise DataError(f"{where}: {row.problem}")
    if not isinstance(row, dict) or "prompt" not in row:
        raise DataError(f"{where}: a prompt row needs a 'prompt' key (text or a list of messages)")
    value = row["prompt"]
    try:
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")
    except ChatFormatError as err:
        raise DataError(f"{where}: {err}") from None
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise DataError(f"{where}: the prompt must end in a non-empty user message")
    return messages, {k: v for k, v in row.items() if k != "prompt"}


def load_prompts(files: list[str], tokenizer: PreTrainedTokenizerBase, max_prompt_len: int,
                 key: str) -> list[Prompt]:
    prompts = []
    for path in files:
        for where, row in iter_rows(path):
            messages, fields = parse_prompt_row(row, where)
            ids = np.asarray(prompt_ids(tokenizer, messages), dtype=np.int64)
            if len(ids) > max_prompt_len:
                raise DataError(f"{where}: the prompt is {len(ids)} tokens, over rl.max_prompt_len "
                                f"{max_prompt_len}")
            prompts.append(Prompt(ids, messages[-1]["content"], fields, where, messages))
    if not prompts:
        raise DataError(f"{key}: no prompt rows in {', '.join(files)}")
    names = set(prompts[0].fields)
    for p in prompts:
        if set(p.fields) != names:
            raise DataError(f"{p.where}: fields {sorted(p.fields)} differ from the first row's {sorted(names)} "
                            "(reward functions receive every field as a list aligned with the completions)")
    return prompts


def prompts_fingerprint(prompts: list[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(len(p.ids).to_bytes(4, "little"))
        h.update(p.ids.tobytes())
    return h.hexdigest()[:16]
