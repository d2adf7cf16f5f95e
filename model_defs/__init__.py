"""LLaMA-style decoder with HF checkpoint conversion and KV-cache generation."""
from .config import PRESETS, ModelConfig
from .flops import count_params, flops_per_token
from .model import Transformer

__all__ = ["ModelConfig", "PRESETS", "Transformer", "count_params", "flops_per_token"]
