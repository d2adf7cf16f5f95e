"""Model configuration: one typed dataclass, its derived fields, and the named presets."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

ATTENTION_BACKENDS = ("sdpa", "eager", "flash_attn", "auto")
# HF architectures the decoder reproduces; each differs from Llama only by the flags below.
FAMILIES = ("llama", "qwen2", "mistral")

# Keys each HF rope type accepts (besides "rope_type"); the first tuple is required, the second optional.
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"), ("original_max_position_embeddings",)),
    "yarn": (
        ("factor",),
        (
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ),
    ),
}


def llama_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's SwiGLU width rule: 2/3 of 4*dim, optionally scaled, rounded up to `multiple_of`."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """Shape and numerics of a LLaMA-style decoder. Serializable with `to_dict`/`from_dict`."""

    vocab_size: int = 32000
    """Rows of the embedding table and of the LM head."""
    dim: int = 4096
    """Width of the residual stream (HF `hidden_size`)."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Query heads per block; `head_dim = dim // n_heads`."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); defaults to `n_heads`."""
    ffn_dim: int | None = None
    """SwiGLU hidden width (HF `intermediate_size`); derived from `multiple_of` and `ffn_dim_multiplier` when None."""
    multiple_of: int = 256
    """The derived `ffn_dim` is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Scales the derived `ffn_dim` before rounding (Llama 3: 1.3 for 8B, 1.5 for 1B)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict[str, Any] | None = None
    """None, or an HF-style dict {"rope_type": "linear"|"dynamic"|"llama3"|"yarn", "factor": ..., ...}."""
    max_seq_len: int = 2048
    """Context length the model is trained for (HF `max_position_embeddings`); RoPE tables grow past it on demand."""
    tie_embeddings: bool = False
    """Share the LM head weight with the token embedding table."""
    attention: str = "sdpa"
    """Attention backend: "sdpa" | "eager" | "flash_attn" | "auto" (flash_attn on CUDA when importable, else sdpa)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward instead of storing its activations."""
    init_std: float = 0.02
    """Std of the normal init of every Linear and Embedding weight (as HF Llama's `initializer_range`)."""
    family: str = "llama"
    """HF architecture the weights export to: "llama" | "qwen2" | "mistral" (numerics come from the flags)."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2)."""
    sliding_window: int | None = None
    """Each token attends to at most this many tokens, itself included (Mistral); None = full causal."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = llama_ffn_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type in ("llama3", "yarn"):
                # HF's default when the checkpoint does not say: the trained length is the original one.
                self.rope_scaling.setdefault("original_max_position_embeddings", self.max_seq_len)
        problems = self.problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def problems(self) -> list[str]:
        """Every inconsistency in the config, so one error can name them all."""
        out: list[str] = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                out.append(f"{name}={value!r} must be a positive int")
        if out:
            return out
        if self.dim % self.n_heads:
            out.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        elif self.head_dim % 2:
            out.append(f"head_dim={self.head_dim} (dim // n_heads) must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            out.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.attention not in ATTENTION_BACKENDS:
            out.append(f"attention={self.attention!r} is not one of {ATTENTION_BACKENDS}")
        if self.norm_eps <= 0:
            out.append(f"norm_eps={self.norm_eps} must be > 0")
        if self.rope_theta <= 0:
            out.append(f"rope_theta={self.rope_theta} must be > 0")
        if self.init_std <= 0:
            out.append(f"init_std={self.init_std} must be > 0")
        if self.family not in FAMILIES:
            out.append(f"family={self.family!r} is not one of {FAMILIES}")
        # Each family's HF architecture fixes these, so an export can always be loaded by it.
        elif self.qkv_bias != (self.family == "qwen2"):
            out.append(f"qkv_bias={self.qkv_bias} does not fit family={self.family!r} (q/k/v biases are qwen2's, "
                       "and always on there)")
        if self.sliding_window is not None and self.family != "mistral":
            out.append(f"sliding_window={self.sliding_window} needs family='mistral' (or None)")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool)
                or self.sliding_window <= 0):
            out.append(f"sliding_window={self.sliding_window!r} must be a positive int or None")
        out.extend(_rope_scaling_problems(self.rope_scaling))
        return out

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig key(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**copy.deepcopy(dict(d)))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        d = copy.deepcopy(PRESETS[name])
        if overrides.keys() & {"dim", "multiple_of", "ffn_dim_multiplier"} and "ffn_dim" not in overrides:
            d.pop("ffn_dim", None)  # a preset's explicit width no longer fits a changed shape; re-derive it
        d.update(overrides)
        return cls.from_dict(d)


def _rope_scaling_problems(rope_scaling: dict[str, Any] | None) -> list[str]:
    if rope_scaling is None:
        return []
    if not isinstance(rope_scaling, dict):
        return [f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}"]
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        return [f"rope_scaling.rope_type={rope_type!r} is not one of {tuple(ROPE_SCALING_KEYS)}"]
    required, optional = ROPE_SCALING_KEYS[rope_type]
    out = [f"rope_scaling.{k} is required for rope_type {rope_type!r}" for k in required if rope_scaling.get(k) is None]
    allowed = {"rope_type", *required, *optional}
    out += [f"rope_scaling.{k} is not a {rope_type!r} parameter" for k in sorted(set(rope_scaling) - allowed)]
    factor = rope_scaling.get("factor")
    if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
        out.append(f"rope_scaling.factor={factor!r} must be a positive number")
    if rope_type == "llama3" and not out:
        if rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]:
            out.append("rope_scaling.high_freq_factor must be greater than low_freq_factor")
    return out


_LLAMA3_VOCAB = 128256
_QWEN2_VOCAB = 151936

PRESETS: dict[str, dict[str, Any]] = {
    # Unit-test size: GQA, two blocks, runs in milliseconds on a CPU.
    "tiny": dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256),
    # Laptop demo / benchmark size.
    "debug": dict(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64, max_seq_len=512),
    "125m": dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, multiple_of=256, max_seq_len=2048),
    "350m": dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, multiple_of=256, max_seq_len=2048),
    # Published shapes of meta-llama/Llama-3.2-1B, Llama-3.2-3B and Llama-3.1-8B (config.json).
    "llama3.2-1b": dict(
        vocab_size=_LLAMA3_VOCAB, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_seq_len=131072, tie_embeddings=True,
    ),
    "llama3.2-3b": dict(
        vocab_size=_LLAMA3_VOCAB, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192,
        multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_seq_len=131072, tie_embeddings=True,
    ),
    "llama3.1-8b": dict(
        vocab_size=_LLAMA3_VOCAB, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_seq_len=131072, tie_embeddings=False,
    ),
    # Published shapes of Qwen/Qwen2.5-0.5B, -1.5B and -3B: q/k/v biases, tied embeddings, RoPE theta 1e6.
    "qwen2.5-0.5b": dict(
        family="qwen2", vocab_size=_QWEN2_VOCAB, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, qkv_bias=True,
    ),
    "qwen2.5-1.5b": dict(
        family="qwen2", vocab_size=_QWEN2_VOCAB, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_dim=8960,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, qkv_bias=True,
    ),
    "qwen2.5-3b": dict(
        family="qwen2", vocab_size=_QWEN2_VOCAB, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, ffn_dim=11008,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=True, qkv_bias=True,
    ),
    # mistralai/Mistral-7B-v0.3 (full attention) and Mistral-7B-v0.1 (4096-token sliding window).
    "mistral-7b": dict(
        family="mistral", vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        norm_eps=1e-5, rope_theta=1000000.0, max_seq_len=32768, tie_embeddings=False,
    ),
    "mistral-7b-v0.1": dict(
        family="mistral", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=32768, tie_embeddings=False, sliding_window=4096,
    ),
}
