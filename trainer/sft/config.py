"""The `sft` section of an SFT recipe: data files and formats, packing, and the fine-tuning method."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from trainer.config import RunConfig, Section

SFTFormat = Literal["auto", "messages", "alpaca", "prompt_completion", "self_instruct"]
Method = Literal["full", "lora", "qlora", "prompt_tuning"]
# Meta's module names in our Transformer; "all-linear" means every one of them.
LINEAR_MODULES: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


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
            from trainer.sft.peft_setup import our_module_name

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


class SFTSection(Section):
    """Supervised fine-tuning data and method."""

    train_files: list[str] = Field(default_factory=list, description="JSONL/JSON files or HF dataset folders")
    val_files: list[str] = Field(default_factory=list, description="held-out files in the same formats")
    format: SFTFormat = Field("auto", description="row shape; auto detects it per row from the keys")
    chat_template: Literal["auto", "llama3", "chatml"] = Field(
        "auto", description="auto keeps the tokenizer's own template, else picks one of ours")
    train_on_prompt: bool = Field(False, description="also put labels on system/user tokens")
    packing: bool = Field(True, description="pack many examples per sequence (no cross-example attention)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="examples longer than data.seq_len")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of failing")
    method: Method = "lora"
    lora: LoraSection = LoraSection()
    prompt_tuning: PromptTuningSection = PromptTuningSection()


class SFTConfig(RunConfig):
    """A pretraining config plus the `sft` section."""

    sft: SFTSection = SFTSection()
