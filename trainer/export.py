"""From a training checkpoint (ZeRO shards or a plain state) to one model: in memory or as an HF folder."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from model_defs import ModelConfig, Transformer
from model_defs.hf import _SAVED_FILE, config_from_hf, load_hf_model, save_hf_model
from trainer.atomic import atomic_directory, is_occupied
from trainer.checkpoint import MODEL_CONFIG_FILE, check_latest
from trainer.tuning.prompt_tuning import load_prompt_tuned
from trainer.run_folder import COMPLETE_MARKER, find_checkpoint, is_checkpoint, model_source, resolve
from trainer.safe_load import checkpoint_loading, safe_torch_load

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"


def generation_settings(tokenizer_dir: str | Path) -> tuple[dict[str, int | None], dict]:
    """(config.json's bos/eos/pad ids, generation_config.json's contents) for the tokenizer in `tokenizer_dir`.

    generation_config's eos is every id our own generation stops at (the chat template's end-of-turn
    token and EOS), so transformers' `generate` ends an assistant turn where `launch/generate.py` does.
    """
    from trainer.chat import stop_token_ids
    from trainer.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    # Training pads with EOS when the tokenizer has no pad token (trainer.chat.load_run_tokenizer).
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}
    stops = stop_token_ids(tokenizer)
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
                  "pad_token_id": pad}
    return ids, {k: v for k, v in generation.items() if v not in (None, [])}


def checkpoint_model_config(checkpoint: str | Path) -> ModelConfig:
    path = Path(checkpoint) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a checkpoint written by this trainer")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def consolidated_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of the first model in a checkpoint, gathering ZeRO-2/3 shards when present;
    every file is read as data (weights_only=True, trainer.safe_load)."""
    checkpoint = Path(checkpoint)
    if not is_checkpoint(checkpoint):
        raise ValueError(f"{checkpoint}: not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    if (checkpoint / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = check_latest(checkpoint)
        with checkpoint_loading():
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    elif (checkpoint / "model.safetensors").is_file():
        state = load_file(checkpoint / "model.safetensors")
    elif (checkpoint / "pytorch_model.bin").is_file():
        state = safe_torch_load(checkpoint / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{checkpoint}: no model weights found (ZeRO shards or model.safetensors)")
    # A compiled model saves its weights under `_orig_mod.`; the module itself is the same.
    return {k.removeprefix("_orig_mod."): v for k, v in state.items()}


def with_tied_head(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """safetensors stores a shared tensor once; a tied LM head is the embedding table again."""
    if cfg.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state = {**state, "output.weight": state["tok_embeddings.weight"]}
    return state


def source_model_config(path: str | Path, **overrides) -> ModelConfig:
    """The ModelConfig of one of our checkpoints (or a run folder's newest) or of a local HF Llama folder."""
    path = model_source(path)
    if is_checkpoint(path):
        return ModelConfig.from_dict({**checkpoint_model_config(path).to_dict(), **overrides})
    config_json = path / "config.json"
    try:
        return config_from_hf(json.loads(config_json.read_text()), **overrides)
    except ValueError as err:
        raise ValueError(f"{config_json}: {err}") from None


def load_pretrained(path: str | Path, **overrides) -> Transformer:
    """Our Transformer with the weights of one of our checkpoints (or a run folder's newest) or of a local HF Llama folder."""
    path = model_source(path)
    if not is_checkpoint(path):
        return load_hf_model(path, **overrides)
    cfg = source_model_config(path, **overrides)
    model = Transformer(cfg)
    state = consolidated_state_dict(path)
    if any(".lora_" in k or k.startswith("base_model.model.") for k in state):
        run = path.parent.parent
        raise ValueError(f"{path}: a LoRA/QLoRA run's checkpoint (base and adapter apart), not a model: merge the "
                         f"adapter first (python launch/export_hf.py --adapter {run / 'adapter'} MERGED) and use "
                         "MERGED as the model")
    try:
        model.load_state_dict(with_tied_head(state, cfg), strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split("\n", 2)[1:2]).strip() or str(err).splitlines()[0]
        raise ValueError(f"{path}: weights do not fit its {MODEL_CONFIG_FILE} ({detail})") from None
    return model


def load_model(path: str | Path, adapter: str | Path | None = None):
    """The model `path` stands for, ready to run: `adapter` on it as the base when given; a run
    folder's adapter/ on its base, else its exported model/, else its newest checkpoint; an adapter
    folder on its own base; a checkpoint or an HF folder as it is."""
    if adapter is not None:
        return load_with_adapter(adapter, base=path)
    paths = resolve(path)
    if paths.adapter is not None:
        return load_with_adapter(paths.adapter)
    return load_pretrained(paths.model if paths.is_run and paths.model is not None else path)


def is_previous_export(folder: Path) -> bool:
    """A folder holding only what an export writes (config, safetensors, tokenizer files): replacing
    it loses nothing another export would not write again."""
    if folder.is_symlink() or not folder.is_dir() or not (folder / "config.json").is_file():
        return False
    entries = list(folder.iterdir())
    return (any(_SAVED_FILE.fullmatch(p.name) and p.suffix == ".safetensors" for p in entries)
            and all(p.is_file() and not p.is_symlink() and (_SAVED_FILE.fullmatch(p.name) or p.name in TOKENIZER_FILES)
                    for p in entries))


def check_export_target(out_dir: str | Path, sources: list[str | Path], overwrite: bool) -> None:
    """Before any work: an export never goes where it would swallow its own source or the current
    directory (with --overwrite, replacing them would delete them), and replaces only an earlier export."""
    out = Path(out_dir).resolve()
    protected = [(Path.cwd().resolve(), "the current directory")]
    protected += [(Path(s).resolve(), f"the source {s}") for s in sources if s is not None]
    for path, what in protected:
        if out == path or out in path.parents:
            raise ValueError(f"{out_dir}: is or contains {what}; choose an output folder outside it")
    if not is_occupied(out_dir):
        return
    if not overwrite:
        raise ValueError(f"{out_dir}: already exists and is not an empty folder; refusing to replace it "
                         "(--overwrite replaces an earlier export)")
    if not is_previous_export(Path(out_dir)):
        raise ValueError(f"{out_dir}: holds files an export does not write; refusing to replace it even with "
                         "--overwrite (it replaces only an earlier export: config.json, model safetensors, "
                         "tokenizer files)")


def copy_tokenizer(tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} not found")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, Path(out_dir) / name)


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                      dtype: torch.dtype | None = None, max_shard_size: str | None = None,
                      overwrite: bool = False) -> Path:
    """Consolidate a checkpoint (or a run folder's newest) into an HF Llama folder (safetensors +
    config + the run's tokenizer unless `tokenizer_dir` names another); an existing non-empty
    `out_dir` is replaced only with `overwrite`."""
    paths = resolve(find_checkpoint(checkpoint))
    # Before gathering the shards, which may take minutes.
    check_export_target(out_dir, [checkpoint, paths.checkpoint, tokenizer_dir], overwrite)
    cfg = checkpoint_model_config(paths.checkpoint)
    state = with_tied_head(consolidated_state_dict(paths.checkpoint), cfg)
    return write_hf_folder(state, cfg, out_dir, tokenizer_dir or paths.tokenizer,
                           dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)


def write_hf_folder(state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
                    tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                    max_shard_size: str | None = None, overwrite: bool = False) -> Path:
    """An HF folder of the model's family (safetensors + config + tokenizer files when present), written
    whole or not at all; an existing non-empty `out_dir` is replaced only with `overwrite`.

    With a tokenizer, config.json carries its bos/eos/pad ids and generation_config.json the ids
    generation stops at, so transformers' `generate` ends a turn where ours does.
    """
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} not found")
    token_ids, generation = generation_settings(tokenizer_dir) if tokenizer_dir is not None else ({}, None)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with atomic_directory(out_dir, replace=overwrite) as staging:
        save_hf_model(state, cfg, staging, max_shard_size=max_shard_size, **token_ids)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, staging)
            GenerationConfig(**generation).save_pretrained(str(staging))
    return Path(out_dir)


def load_with_adapter(adapter_dir: str | Path, base: str | Path | None = None, merge: bool = True):
    """Our Transformer with a PEFT adapter saved by an SFT run (its `adapter/` folder) on top.

    `base` defaults to the model the adapter was trained on (`base_model_name_or_path`). LoRA /
    QLoRA adapters are merged into the weights with `merge` (a plain Transformer comes back);
    prompt-tuning adapters stay a wrapper that prepends their virtual tokens.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not an adapter folder (no adapter_config.json)")
    config = json.loads(config_path.read_text())
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path}: no base_model_name_or_path; name the base model explicitly")
    model = load_pretrained(base)
    if config.get("peft_type") == "PROMPT_TUNING":
        return load_prompt_tuned(model, adapter_dir)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')} is not supported (LORA, PROMPT_TUNING)")
    if any(t.endswith("_proj") for t in config.get("target_modules") or []):
        raise ValueError(f"{adapter_dir}: this adapter uses HF Llama module names (an adapter_hf/ folder); "
                         "pass the run's adapter/ folder, which uses ours")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    return peft_model.merge_and_unload() if merge else peft_model


def export_merged(adapter_dir: str | Path, out_dir: str | Path, base: str | Path | None = None,
                  tokenizer_dir: str | Path | None = None, dtype: torch.dtype | None = None,
                  max_shard_size: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA/QLoRA adapter into its base and write a plain HF Llama folder (with the adapter's tokenizer)."""
    check_export_target(out_dir, [adapter_dir, base, tokenizer_dir], overwrite)
    model = load_with_adapter(adapter_dir, base=base, merge=True)
    if not isinstance(model, Transformer):
        raise ValueError(f"{adapter_dir}: a prompt-tuning adapter has no weights to merge; load it with peft instead")
    return write_hf_folder(model.state_dict(), model.cfg, out_dir, tokenizer_dir or adapter_dir,
                           dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
