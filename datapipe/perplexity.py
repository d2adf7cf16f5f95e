"""Perplexity band filter scored by one of our checkpoints (HF-format folder) or a KenLM model."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Literal

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.logging import logger


def model_loader_name() -> str:
    """Which loader reads HF-format folders: our `model_defs.hf` when present, else transformers."""
    if importlib.util.find_spec("model_defs") is not None and importlib.util.find_spec("model_defs.hf") is not None:
        return "model_defs"
    return "transformers"


class CheckpointScorer:
    """Per-document perplexity from a causal LM saved as an HF-format folder (config + safetensors + tokenizer)."""

    def __init__(self, path: str, max_tokens: int = 512, device: str = "cpu"):
        import torch
        from transformers import AutoTokenizer

        self.loader = model_loader_name()
        if self.loader == "model_defs":
            from model_defs.hf import load_hf_model

            self.model = load_hf_model(path)
        else:
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path)
        logger.info(f"perplexity: scoring with {path} loaded by {self.loader}")
        self.model.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.max_tokens = max_tokens
        self.device = device
        self._torch = torch

    def perplexity(self, text: str) -> float:
        torch = self._torch
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_tokens]
        if self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id] + ids
        if len(ids) < 2:
            return float("inf")
        input_ids = torch.tensor([ids], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (1, T, V)
            nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), input_ids[0, 1:])
        return math.exp(nll.item())


class KenLMScorer:
    def __init__(self, path: str):
        try:
            import kenlm
        except ImportError:
            raise ImportError("perplexity: kind=kenlm needs the `kenlm` package (pip install kenlm)") from None
        self.model = kenlm.Model(path)

    def perplexity(self, text: str) -> float:
        # KenLM scores one sentence per call; lines are scored separately and averaged by word count.
        log10, words = 0.0, 0
        for line in text.splitlines():
            if line.strip():
                log10 += self.model.score(line.strip(), bos=True, eos=True)
                words += len(line.split()) + 1
        return 10.0 ** (-log10 / words) if words else float("inf")


class PerplexityFilter(BaseFilter):
    """Keeps documents whose perplexity lies in [min_perplexity, max_perplexity]; sets `perplexity` metadata."""

    name = "📉 Perplexity band"

    def __init__(self, model_path: str, kind: Literal["checkpoint", "kenlm"] = "checkpoint",
                 min_perplexity: float = 0.0, max_perplexity: float = float("inf"), max_tokens: int = 512,
                 exclusion_writer: DiskWriter | None = None):
        super().__init__(exclusion_writer)
        if kind not in ("checkpoint", "kenlm"):
            raise ValueError(f"perplexity.kind: {kind!r} is not one of ['checkpoint', 'kenlm']")
        if not model_path:
            raise ValueError("perplexity.model_path: required")
        if not Path(model_path).exists():
            raise FileNotFoundError(f"perplexity.model_path: {model_path} does not exist")
        if kind == "checkpoint" and not (Path(model_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"perplexity.model_path: {model_path} has no config.json (expected an HF-format folder)")
        if kind == "kenlm" and importlib.util.find_spec("kenlm") is None:
            raise ImportError("perplexity: kind=kenlm needs the `kenlm` package (pip install kenlm)")
        if min_perplexity > max_perplexity:
            raise ValueError("perplexity: min_perplexity > max_perplexity")
        self.model_path = str(model_path)
        self.kind = kind
        self.min_perplexity = min_perplexity
        self.max_perplexity = max_perplexity
        self.max_tokens = max_tokens
        self._scorer = None

    @property
    def scorer(self):
        if self._scorer is None:
            self._scorer = (CheckpointScorer(self.model_path, self.max_tokens) if self.kind == "checkpoint"
                            else KenLMScorer(self.model_path))
        return self._scorer

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        ppl = self.scorer.perplexity(doc.text)
        doc.metadata["perplexity"] = round(ppl, 3)
        if ppl < self.min_perplexity:
            return False, "perplexity_too_low"
        if ppl > self.max_perplexity:
            return False, "perplexity_too_high"
        return True

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_scorer"] = None
        return state
