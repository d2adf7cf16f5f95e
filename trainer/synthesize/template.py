"""The Magpie pre-query prefix: what a chat template renders before the user's words.

Magpie gives an aligned chat model only the start of a user turn and lets it write the user's
message itself. The prefix is read off the model's own template (render a conversation whose
user message is a sentinel, keep what comes before it), so no family needs a hard-coded string.
"""
from __future__ import annotations

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

SENTINEL = "\u2063MAGPIE-SENTINEL-7f3a\u2063"


def magpie_prefix(tokenizer: PreTrainedTokenizerBase, where: str) -> str:
    """The rendered text up to where a user message's content begins; ValueError naming `where` when
    the template is missing or does not place the user message once, after a non-empty prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: the tokenizer has no chat template, so there is no user turn to start "
                         "(Magpie needs the model's chat template)")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": SENTINEL}], tokenize=False,
                                             add_generation_prompt=False)
    # A template fails through jinja (its own raise_exception included) or on a field it expects.
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise ValueError(f"{where}: the chat template cannot render a user message ({err})") from None
    if not isinstance(text, str) or text.count(SENTINEL) != 1:
        raise ValueError(f"{where}: cannot derive the user-turn prefix: the chat template does not render the "
                         "user message exactly once")
    prefix = text[:text.index(SENTINEL)]
    if not prefix.strip():
        raise ValueError(f"{where}: cannot derive the user-turn prefix: the chat template puts nothing before "
                         "the user message")
    return prefix
