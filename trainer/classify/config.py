"""The `classify` section of a text-classification recipe: labelled files, columns, class weights, method."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field

from trainer.config import RunConfig
from trainer.tuning.config import TuningSection


class ClassifySection(TuningSection):
    """`{text, label}` rows (JSONL, CSV or TSV) and how the classifier is tuned."""

    train_files: list[str] = Field(default_factory=list, description="JSONL/JSON, CSV or TSV files of labelled texts")
    val_files: list[str] = Field(default_factory=list, description="held-out files in the same shape")
    text_column: str = Field("text", description="the column (or JSON key) holding the text")
    label_column: str = Field("label", description="the column (or JSON key) holding the label")
    columns: Optional[list[str]] = Field(None, description="column names of CSV/TSV files without a header row")
    class_weights: Union[None, Literal["balanced"], dict[str, float]] = Field(
        None, description="per-label loss weights: a {label: weight} map, or 'balanced' (n / (classes x n_label))")
    skip_bad_rows: bool = Field(False, description="skip and count malformed rows instead of failing")
    method: Literal["full", "lora", "qlora"] = "lora"


class ClassifyConfig(RunConfig):
    """A run config plus the `classify` section; `data.seq_len` bounds each text (in tokens, BOS and EOS included)."""

    classify: ClassifySection = ClassifySection()
