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
