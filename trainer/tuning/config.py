"""The tuning-method fields every tuning task's section carries (`sft.method`, `dpo.lora.r`, ...).

Module names live here too: they are what the LoRA validator checks against, and keeping them
beside the sections (not in the PEFT code) means the config imports nothing that imports it back.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from trainer.config import Section

Method = Literal["full", "lora", "qlora", "prompt_tuning"]
# Meta's module names in our Transformer; "all-linear" means every one of them.
LINEAR_MODULES: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Our (Meta) module names <-> HF Llama's, for target_modules given either way and for adapter export.
HF_MODULE_NAMES: dict[str, str] = {
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}
HF_PARENT: dict[str, str] = {"attention": "self_attn", "feed_forward": "mlp"}


def our_module_name(name: str) -> str | None:
    if name in HF_MODULE_NAMES:
        return name
    return {hf: ours for ours, hf in HF_MODULE_NAMES.items()}.get(name)


class LoraSection(Section):
    """LoRA (and QLoRA) adapter shape."""

    r: int = Field(8, gt=0, description="rank")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear", description="'all-linear' or a list of wq wk wv wo w1 w2 w3 (HF names are accepted too)")

    @model_validator(mode="after")
    def _known_targets(self) -> "LoraSection":
        if isinstance(self.target_modules, list):
            bad = [m for m in self.target_modules if our_module_name(m) is None]
            if bad:
                raise ValueError(f"target_modules: unknown module(s) {', '.join(bad)} "
                                 f"(choose from {', '.join(LINEAR_MODULES)} or all-linear)")
            if not self.target_modules:
                raise ValueError("target_modules: empty list")
        return self


class PromptTuningSection(Section):
    """Soft prompt: virtual tokens prepended to every example."""

    num_virtual_tokens: int = Field(16, gt=0)
    init: Literal["sample_vocab", "random", "text"] = Field(
        "sample_vocab", description="copies of random vocabulary embeddings, N(0, 1), or the embeddings of init_text")
    init_text: Optional[str] = Field(None, description="text whose token embeddings initialise the prompt")

    @model_validator(mode="after")
    def _text_given(self) -> "PromptTuningSection":
        if self.init == "text" and not self.init_text:
            raise ValueError("init_text: required when init is 'text'")
        return self


class TuningSection(Section):
    """The method fields of a tuning task's section; the task's own section subclasses it (and narrows
    `method` where a method cannot serve the task)."""

    method: Method = "lora"
    lora: LoraSection = LoraSection()


class PromptTunableSection(TuningSection):
    """A tuning section whose task also accepts prompt tuning (its rows are unpacked token sequences)."""

    prompt_tuning: PromptTuningSection = PromptTuningSection()
