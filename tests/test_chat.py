"""Chat templates and assistant-only labels."""
from __future__ import annotations

import pytest

from tests.sft_fixtures import make_tokenizer
from trainer.chat import (
    CHAT_TEMPLATES, ChatFormatError, ensure_chat_template, prompt_ids, stop_token_ids, template_name,
    tokenize_conversation,
)
from trainer.objectives import IGNORE_INDEX

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How old is Beilfu?"},
    {"role": "assistant", "content": "Beilfu is 37 years old."},
    {"role": "user", "content": "Where does she live?"},
    {"role": "assistant", "content": "In Dorvale."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("chat"))


def _targets(tok, out) -> str:
    return tok.decode([i for i, l in zip(out["input_ids"], out["labels"]) if l != IGNORE_INDEX])


@pytest.mark.parametrize("name,end", [("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>")])
def test_labels_cover_exactly_the_assistant_turns(tok, name, end):
    ensure_chat_template(tok, name)
    out = tokenize_conversation(tok, MESSAGES)
    assert len(out["input_ids"]) == len(out["labels"])
    assert _targets(tok, out) == f"Beilfu is 37 years old.{end}In Dorvale.{end}"
    # The ids are the full rendering, and the end-of-turn token itself is a target.
    assert tok.decode(out["input_ids"]) == tok.apply_chat_template(MESSAGES, tokenize=False)
    eot = tok.convert_tokens_to_ids(end)
    assert eot in [l for l in out["labels"] if l != IGNORE_INDEX]
    assert eot in stop_token_ids(tok)
    # Labels are unshifted: every target equals the input id at the same position.
    assert all(l == i for i, l in zip(out["input_ids"], out["labels"]) if l != IGNORE_INDEX)


def test_prompt_ids_are_the_prefix_training_sees(tok):
    ensure_chat_template(tok, "llama3")
    out = tokenize_conversation(tok, MESSAGES[:3])
    first_target = next(i for i, l in enumerate(out["labels"]) if l != IGNORE_INDEX)
    assert prompt_ids(tok, MESSAGES[:2]) == out["input_ids"][:first_target]


def test_train_on_prompt_and_truncation(tok):
    ensure_chat_template(tok, "chatml")
    full = tokenize_conversation(tok, MESSAGES, train_on_prompt=True)
    assert full["labels"] == full["input_ids"]
    cut = tokenize_conversation(tok, MESSAGES, max_len=7)
    assert len(cut["input_ids"]) == 7 and all(l == IGNORE_INDEX for l in cut["labels"])


def test_auto_keeps_own_template_and_fills_a_missing_one(tok):
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ensure_chat_template(tok, "auto").chat_template.startswith("{% for m in")
    tok.chat_template = None
    assert template_name(ensure_chat_template(tok, "auto")) == "llama3"
    assert set(CHAT_TEMPLATES) >= {"llama3", "chatml"}


def test_bad_inputs_are_named(tok):
    ensure_chat_template(tok, "llama3")
    with pytest.raises(ChatFormatError, match="no assistant turn"):
        tokenize_conversation(tok, MESSAGES[:2])
    with pytest.raises(ChatFormatError, match=r"messages\[0\].role 'bot'"):
        tokenize_conversation(tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="unknown chat template 'vicuna'"):
        ensure_chat_template(tok, "vicuna")
    # A template that rewrites earlier turns cannot give per-turn labels.
    tok.chat_template = "{% for m in messages|reverse %}{{ m['role'] + m['content'] }}{% endfor %}"
    with pytest.raises(ChatFormatError, match="changes earlier text"):
        tokenize_conversation(tok, MESSAGES)
    ensure_chat_template(tok, "llama3")
