"""The `sft` section of an SFT recipe: data files and formats, packing, and the fine-tuning method."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from trainer.config import RunConfig
from trainer.tuning.config import PromptTunableSection

SFTFormat = Literal["auto", "messages", "alpaca", "prompt_completion", "self_instruct"]


class SFTSection(PromptTunableSection):
    """Supervised fine-tuning data and method."""

    train_files: list[str] = Field(
        default_factory=list,
        description="JSONL/JSON files, HF dataset folders or Hub datasets (owner/name[:config][@split])")
    val_files: list[str] = Field(default_factory=list, description="held-out files in the same formats")
    format: SFTFormat = Field("auto", description="row shape; auto detects it per row from the keys")
    chat_template: Literal["auto", "llama3", "chatml"] = Field(
        "auto", description="auto keeps the tokenizer's own template, else picks one of ours")
    train_on_prompt: bool = Field(False, description="also put labels on system/user tokens")
    packing: bool = Field(True, description="pack many examples per sequence (no cross-example attention)")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="examples longer than data.seq_len")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of failing")


class SFTConfig(RunConfig):
    """A pretraining config plus the `sft` section."""

    sft: SFTSection = SFTSection()
