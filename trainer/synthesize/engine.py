"""Load a chat model and complete token prompts in batches: our KV-cache generation, or vLLM on a GPU.

Every item samples from its own generator seeded from (seed, stream, item index), so an item's
text does not depend on its batch neighbours' draws, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import gc
import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float | None = 1.0
    top_k: int | None = None
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max new tokens={self.max_new_tokens} must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class EngineSettings:
    """How a synthesize command runs its models (magpie, preferences and onpolicy alike)."""
    chat_template: str = "auto"
    seed: int = 0
    batch_size: int = 8
    chunk_size: int = 20
    backend: str = "torch"
    device: str = "auto"
    bf16: bool = False
    progress: bool = True

    def check_at_least_one(self, *keys: str) -> None:
        for key in ("batch_size", "chunk_size", *keys):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")


def item_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for one item of one stream (instructions, one model's answers, ...)."""
    digest = hashlib.blake2b(f"{seed}:{stream}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def find_tokenizer_dir(model: str | Path, explicit: str | Path | None = None) -> Path:
    """`explicit`, else the tokenizer that goes with the model (its folder's, else its run's)."""
    from trainer.run_folder import resolve

    if explicit:
        if not Path(explicit).is_dir():
            raise FileNotFoundError(f"{explicit}: no such tokenizer folder")
        return Path(explicit)
    found = resolve(model).tokenizer
    if found is None:
        raise FileNotFoundError(f"{model}: no tokenizer found beside the model; pass a tokenizer folder")
    return found


def load_chat_tokenizer(model: str | Path, tokenizer_dir: str | Path | None, chat_template: str
                        ) -> PreTrainedTokenizerBase:
    from trainer.chat import ChatFormatError, ensure_chat_template
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(find_tokenizer_dir(model, tokenizer_dir))
    try:
        return ensure_chat_template(tokenizer, chat_template)
    except ChatFormatError as err:
        raise ValueError(f"{model}: {err}") from None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


class TorchEngine:
    """Our Transformer with its KV cache; any model `trainer.export.load_model` loads."""

    name = "torch"

    def __init__(self, model: str | Path, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        from trainer.chat import stop_token_ids
        from trainer.export import load_model

        self.tokenizer = tokenizer
        self.device = device
        self.model = load_model(model).to(device=device, dtype=dtype).eval()
        self.stops = stop_token_ids(tokenizer)
        self.pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)

    def complete(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling) -> list[str]:
        """The text each prompt continues with, up to (not including) its first stop token."""
        from model_defs.generate import generate

        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, longest - len(p):] = True
        generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
        out = generate(self.model, ids.to(self.device), attention_mask=mask.to(self.device),
                       max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                       top_k=sampling.top_k, top_p=sampling.top_p, stop_token_ids=self.stops,
                       pad_token_id=self.pad_id, generator=generators,
                       # Prompt tuning prepends virtual tokens, which the KV cache's fixed layout does not hold.
                       use_cache=hasattr(self.model, "layers"))
        texts = []
        for row in out[:, longest:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stops), len(row))
            texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
        return texts

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class VllmEngine:
    """vLLM over an HF model folder (GPU). Same inputs and outputs as TorchEngine; per-request seeds."""

    name = "vllm"

    def __init__(self, model: str | Path, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        try:
            import vllm
        except ImportError:
            raise ValueError("--backend vllm: vLLM is not installed (pip install vllm, on a CUDA machine); "
                             "the default --backend torch needs nothing more") from None
        from trainer.chat import stop_token_ids
        from trainer.run_folder import resolve

        paths = resolve(model)
        folder = paths.model if paths.is_run and paths.model is not None else Path(model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"{model}: vLLM reads HF model folders; export the checkpoint first "
                             "(launch/export_hf.py)")
        self.vllm = vllm
        self.tokenizer = tokenizer
        self.stops = stop_token_ids(tokenizer)
        self.llm = vllm.LLM(model=str(folder), tokenizer=str(find_tokenizer_dir(model)),
                            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "auto"))

    def complete(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], sampling: Sampling) -> list[str]:
        params = [self.vllm.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p or 1.0,
                                           top_k=sampling.top_k or -1, max_tokens=sampling.max_new_tokens,
                                           stop_token_ids=self.stops, seed=s, skip_special_tokens=True)
                  for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    def close(self) -> None:
        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()


ENGINES = {"torch": TorchEngine, "vllm": VllmEngine}


def open_engine(backend: str, model: str | Path, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                dtype: torch.dtype):
    if backend not in ENGINES:
        raise ValueError(f"--backend {backend}: unknown (choose {', '.join(ENGINES)})")
    return ENGINES[backend](model, tokenizer, device, dtype)
