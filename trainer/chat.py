"""Chat templates and conversation tokenization with assistant-only labels.

A conversation is rendered with the tokenizer's chat template (ours or its own) turn by
turn: the text each turn adds is the difference between the rendering of the messages up
to it and the rendering up to the turn before. An assistant turn is split at the
generation prompt (`<|start_header_id|>assistant<|end_header_id|>\\n\\n`, `<|im_start|>assistant\\n`),
so its header is prompt and its content plus end-of-turn token are targets.

Each piece is tokenized on its own and the ids are concatenated: the prompt ids are then
exactly what generation feeds the model (the rendering with `add_generation_prompt=True`),
and the targets are exactly what it should emit after them.

`labels` are aligned with `input_ids` (HF convention, not shifted): `labels[i]` is
`input_ids[i]` on tokens the model is trained to produce and `IGNORE_INDEX` elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from trainer.config import ConfigError
from trainer.data.tokenizer import load_tokenizer
from trainer.objectives import IGNORE_INDEX
from trainer.run_folder import tokenizer_for_model

Message = dict[str, Any]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT_TEMPLATES: dict[str, str] = {"llama3": LLAMA3_TEMPLATE, "chatml": CHATML_TEMPLATE}
# The special tokens each template is written in; a tokenizer without them would split them into pieces.
TEMPLATE_TOKENS: dict[str, tuple[str, ...]] = {
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "chatml": ("<|im_start|>", "<|im_end|>"),
}
END_OF_TURN: dict[str, str] = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}
ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation or template that cannot be turned into training tokens."""


def _has_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[str]) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in tokens)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, name: str = "auto") -> PreTrainedTokenizerBase:
    """Give `tokenizer` a chat template and return it.

    `auto`: keep the tokenizer's own template when it has one; otherwise Llama-3 style when its
    vocabulary has the header tokens, else ChatML when it has `<|im_start|>`/`<|im_end|>`.
    `llama3` / `chatml`: set that template, replacing the tokenizer's own.
    """
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            return tokenizer
        for candidate in CHAT_TEMPLATES:
            if _has_tokens(tokenizer, TEMPLATE_TOKENS[candidate]):
                tokenizer.chat_template = CHAT_TEMPLATES[candidate]
                return tokenizer
        raise ChatFormatError(
            "tokenizer has no chat template and none of the special tokens of ours "
            f"({', '.join(t for ts in TEMPLATE_TOKENS.values() for t in ts)}); add them or name a template")
    if name not in CHAT_TEMPLATES:
        raise ChatFormatError(f"unknown chat template '{name}' (choose auto, {', '.join(CHAT_TEMPLATES)})")
    missing = [t for t in TEMPLATE_TOKENS[name] if t not in tokenizer.get_vocab()]
    if missing:
        raise ChatFormatError(f"chat template '{name}' needs special token(s) {', '.join(missing)} "
                              "that the tokenizer lacks")
    tokenizer.chat_template = CHAT_TEMPLATES[name]
    return tokenizer


def template_name(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """Which of our templates the tokenizer carries (None for a template of its own)."""
    for name, template in CHAT_TEMPLATES.items():
        if tokenizer.chat_template == template:
            return name
    return None


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn: the template's end-of-turn token(s) and EOS."""
    vocab = tokenizer.get_vocab()
    template = tokenizer.chat_template or ""
    ids = {vocab[tok] for tok in END_OF_TURN.values() if tok in vocab and tok in template}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def validate_messages(messages: Any) -> list[Message]:
    """The messages as a list of {role, content} dicts with known roles and at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatFormatError(f"messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ChatFormatError(f"messages[{i}].role '{m['role']}' is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatFormatError(f"messages[{i}].content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("conversation has no assistant turn to learn from")
    return messages


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], add_generation_prompt: bool) -> str:
    if not messages and not add_generation_prompt:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def conversation_segments(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant_target) pieces whose concatenation is the full rendering."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("tokenizer has no chat template (call ensure_chat_template first)")
    segments: list[tuple[str, bool]] = []
    done = ""
    for k, message in enumerate(messages):
        pieces = []
        if message["role"] == "assistant":
            pieces.append((_render(tokenizer, messages[:k], add_generation_prompt=True), False))
        pieces.append((_render(tokenizer, messages[:k + 1], add_generation_prompt=False),
                       message["role"] == "assistant"))
        for text, is_target in pieces:
            if not text.startswith(done):
                raise ChatFormatError(
                    f"the chat template renders messages[{k}] so that it changes earlier text; assistant-only "
                    "labels need a template where each turn appends (use chat_template llama3 or chatml)")
            if len(text) > len(done):
                added = text[len(done):]
                segments.extend(_split_after_end_of_turn(added) if is_target else [(added, False)])
            done = text
    return segments


def _split_after_end_of_turn(text: str) -> list[tuple[str, bool]]:
    """Targets end with the end-of-turn token; what a template adds after it (ChatML's newline) is prompt."""
    cut = max((text.rfind(tok) + len(tok) for tok in END_OF_TURN.values() if tok in text), default=len(text))
    return [(text[:cut], True)] + ([(text[cut:], False)] if cut < len(text) else [])


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[Message],
    *,
    train_on_prompt: bool = False,
    max_len: int | None = None,
) -> dict[str, list[int]]:
    """`input_ids` of the rendered conversation and `labels`: IGNORE_INDEX except on assistant tokens
    (content and end-of-turn token), or on every token with `train_on_prompt`.

    `max_len` keeps the first `max_len` tokens (callers that must count truncations compare lengths
    with `max_len=None` themselves).
    """
    validate_messages(messages)
    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in conversation_segments(tokenizer, messages):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if (is_target or train_on_prompt) else [IGNORE_INDEX] * len(ids))
    if max_len is not None:
        input_ids, labels = input_ids[:max_len], labels[:max_len]
    return {"input_ids": input_ids, "labels": labels}


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of `messages` followed by the assistant generation prompt: what generation starts from."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


__all__ = [
    "CHAT_TEMPLATES", "ChatFormatError", "END_OF_TURN", "ensure_chat_template", "tokenize_conversation",
    "conversation_segments", "prompt_ids", "stop_token_ids", "template_name", "validate_messages",
]


def resolve_tokenizer_dir(cfg) -> Path:
    """`data.tokenizer`, else the tokenizer of the `init_from` model (an HF folder's own, or our run's)."""
    if cfg.data.tokenizer:
        return Path(cfg.data.tokenizer)
    if cfg.model.init_from:
        found = tokenizer_for_model(cfg.model.init_from)
        if found is not None:
            return found
    raise ConfigError("defaults: data.tokenizer: no tokenizer given and none found with model.init_from")


def load_chat_tokenizer(cfg, chat_template: str) -> PreTrainedTokenizerBase:
    """A tuning run's tokenizer with its chat template and a pad token."""
    return ensure_chat_template(load_run_tokenizer(cfg), chat_template)


def load_run_tokenizer(cfg) -> PreTrainedTokenizerBase:
    """A tuning run's tokenizer (`data.tokenizer`, else the `init_from` model's) with a pad token."""
    tokenizer = load_tokenizer(resolve_tokenizer_dir(cfg))
    if tokenizer.pad_token_id is None:
        # Padding positions carry IGNORE_INDEX labels; any id works, EOS is always in the vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
