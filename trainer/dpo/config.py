"""The `dpo` section of a preference-tuning recipe: data, loss, reference strategy and the tuning method."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from trainer.config import RunConfig
from trainer.dpo.losses import LOSSES
from trainer.tuning.config import TuningSection

LossName = Literal["sigmoid", "ipo", "hinge", "simpo", "orpo"]
ReferenceName = Literal["auto", "adapter", "precompute", "offload", "resident", "none"]
REFERENCE_STRATEGIES = ("adapter", "precompute", "offload", "resident")


class PairDataSection(TuningSection):
    """Preference pairs as every pairwise task reads them (DPO, reward models): the same files and shapes."""

    train_files: list[str] = Field(
        default_factory=list,
        description="JSONL/JSON files, HF dataset folders or Hub datasets (owner/name[:config][@split]) of pairs")
    val_files: list[str] = Field(default_factory=list, description="held-out pairs in the same shapes")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="without val_files: hold out this share of the pairs")
    chat_template: Literal["auto", "llama3", "chatml"] = Field(
        "auto", description="auto keeps the tokenizer's own template, else picks one of ours")
    max_prompt_len: int = Field(256, gt=0, description="prompt tokens kept (its end); data.seq_len bounds the pair")
    overlong: Literal["truncate", "drop", "error"] = Field("truncate", description="pairs over the length limits")
    on_identical: Literal["drop", "error"] = Field("drop", description="pairs whose responses are identical")
    on_empty: Literal["drop", "error"] = Field("drop", description="pairs with an empty prompt or response")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of failing")


def pair_config_problems(cfg: RunConfig, section: str) -> list[str]:
    """The checks every pairwise task makes of its section and of `data`."""
    pairs: PairDataSection = getattr(cfg, section)
    problems = []
    if cfg.data.path:
        problems.append(f"defaults: data.path: this task reads {section}.train_files, not token shards; "
                        "remove data.path")
    if not pairs.train_files:
        problems.append(f"defaults: {section}.train_files: no preference files given")
    if pairs.max_prompt_len >= cfg.data.seq_len:
        problems.append(f"defaults: {section}.max_prompt_len: {pairs.max_prompt_len} leaves no room for a response "
                        f"within data.seq_len {cfg.data.seq_len}")
    return problems


class DPOSection(PairDataSection):
    """Preference pairs, the objective and where the reference model's log-probabilities come from."""

    loss: LossName = Field("sigmoid", description="sigmoid (DPO), ipo, hinge, simpo or orpo")
    beta: float = Field(0.1, gt=0, description="DPO/IPO/hinge temperature; SimPO's reward scale; ORPO's lambda")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="conservative DPO / SimPO: label flip probability")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")
    reference: ReferenceName = Field(
        "auto", description="adapter | precompute | offload | resident | none; auto: adapter with LoRA/QLoRA, "
                            "precompute for full tuning, none for the reference-free simpo/orpo")
    reference_cache_dir: Optional[str] = Field(
        None, description="where precomputed reference log-probs are cached (default: OUTPUT_DIR/reference_cache)")
    method: Literal["full", "lora", "qlora"] = "lora"

    @model_validator(mode="after")
    def _consistent(self) -> "DPOSection":
        needs = LOSSES[self.loss].needs_reference
        if not needs and self.reference not in ("auto", "none"):
            raise ValueError(f"reference: '{self.loss}' is reference-free; use reference none (or auto)")
        if needs and self.reference == "none":
            raise ValueError(f"reference: loss '{self.loss}' needs a reference ({', '.join(REFERENCE_STRATEGIES)})")
        if self.reference == "adapter" and self.method == "full":
            raise ValueError("reference: 'adapter' needs method lora or qlora (full tuning has no adapter to disable)")
        return self

    def resolved_reference(self) -> str:
        if self.reference != "auto":
            return self.reference
        if not LOSSES[self.loss].needs_reference:
            return "none"
        return "precompute" if self.method == "full" else "adapter"


class DPOConfig(RunConfig):
    """A run config plus the `dpo` section; `data.seq_len` is the longest prompt + response."""

    dpo: DPOSection = DPOSection()
