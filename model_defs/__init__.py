"""LLaMA-style decoder (and a sequence-classification head on it) with HF checkpoint conversion and
KV-cache generation."""
from .classifier import SequenceClassifier
from .config import PRESETS, ModelConfig
from .flops import count_params, flops_per_token
from .model import Transformer

__all__ = ["PRESETS", "ModelConfig", "SequenceClassifier", "Transformer", "count_params", "flops_per_token"]
