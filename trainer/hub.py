"""Models named by their Hugging Face Hub id (`Qwen/Qwen2.5-0.5B`), resolved through huggingface_hub's cache.

An id that is not a local path becomes the snapshot folder huggingface_hub keeps for it:
downloaded when online, read from the cache alone when `HF_HUB_OFFLINE=1`. Only what our loader
reads is fetched (config, safetensors, tokenizer files), not a repository's duplicate .bin weights.
"""
from __future__ import annotations

import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
               "chat_template.jinja", "adapter_config.json"]


def is_hub_id(name: str | Path) -> bool:
    """`owner/name` that is no local path: a local file or folder of that name always wins."""
    text = str(name)
    return bool(HUB_ID.fullmatch(text)) and ".." not in text and not Path(text).exists()


def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hub model; FileNotFoundError in one line when it cannot be had."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection to the Hub"
        raise FileNotFoundError(f"{repo_id}: not a local path, and not in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}) with {where}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: not a local path nor a Hub model you can access "
                                "(check the name, or log in with `hf auth login` for a gated model)") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"{repo_id}: Hub download failed: {str(err).splitlines()[0]}") from None


# `owner/name`, optionally `:config` and `@split` (train when not given), e.g. `acme/chats:en@validation`.
DATASET_SPEC = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+))?")


def hub_dataset_spec(text: str | Path) -> tuple[str, str | None, str] | None:
    """(repo id, config, split) when `text` names a Hub dataset rather than a local path, else None."""
    text = str(text)
    m = DATASET_SPEC.fullmatch(text)
    if m is None or ".." in text or Path(text).exists():
        return None
    return m["repo"], m["config"], m["split"] or "train"


def hub_dataset_folder(spec: str) -> Path:
    """The snapshot folder of the Hub dataset `spec` names (downloaded when online, cached when offline)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    repo = (hub_dataset_spec(spec) or (spec,))[0]
    try:
        return Path(snapshot_download(repo, repo_type="dataset"))
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else "no connection to the Hub"
        raise FileNotFoundError(f"{spec}: no such file, and not a Hub dataset in the Hugging Face cache "
                                f"({constants.HF_HUB_CACHE}) with {where}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{spec}: no such file nor a Hub dataset you can access") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"{spec}: Hub download failed: {str(err).splitlines()[0]}") from None


def load_hub_dataset(spec: str):
    """The rows of a Hub dataset split, read by `datasets` from huggingface_hub's snapshot of the repo.

    Going through the snapshot (not `load_dataset(repo_id)`) makes HF_HUB_OFFLINE=1 work from the
    same cache as models: datasets' own offline mode only knows datasets it has already prepared.
    """
    import datasets

    _, config, split = hub_dataset_spec(spec) or (spec, None, "train")
    folder = hub_dataset_folder(spec)
    try:
        return datasets.load_dataset(str(folder), config, split=split)
    except (ValueError, FileNotFoundError) as err:  # unknown config or split: datasets names the valid ones
        raise ValueError(f"{spec}: {str(err).strip().splitlines()[0]}") from None
