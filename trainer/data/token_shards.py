"""Reading one split of packed token shards: memory-mapped token stream + document boundaries."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from trainer.data.shard_format import read_index


class TokenShards:
    """The flat token stream of one split folder (`.../train` or `.../val`), memory-mapped.

    `doc_starts` holds the global offset of every document, so any token position maps to
    its document with one `searchsorted`.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = read_index(self.folder)
        self.dtype = np.dtype(self.index["dtype"])
        self._arrays: list[np.ndarray] = []
        starts: list[np.ndarray] = []
        offset = 0
        offsets = [0]
        for shard in self.index["shards"]:
            path = self.folder / shard["file"]
            if not path.exists():
                raise FileNotFoundError(f"{path}: shard listed in {self.folder / 'index.json'} is missing")
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if path.stat().st_size != expected:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, but index.json says {shard['tokens']} "
                                 f"{self.dtype.name} tokens ({expected} bytes)")
            self._arrays.append(np.memmap(path, dtype=self.dtype, mode="r") if expected else
                                np.zeros(0, self.dtype))
            doc_offsets = _load_offsets(self.folder / shard["doc_index"])
            if len(doc_offsets) != int(shard["documents"]) or (len(doc_offsets) and doc_offsets[0] != 0):
                raise ValueError(f"{self.folder / shard['doc_index']}: {len(doc_offsets)} document offsets, "
                                 f"index.json says {shard['documents']} documents starting at 0")
            starts.append(doc_offsets.astype(np.int64) + offset)
            offset += int(shard["tokens"])
            offsets.append(offset)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self.doc_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self.num_tokens = offset
        self.num_documents = len(self.doc_starts)
        if self.num_tokens != int(self.index["tokens"]):
            raise ValueError(f"{self.folder / 'index.json'}: shards hold {self.num_tokens} tokens, "
                             f"'tokens' says {self.index['tokens']}")
        self.vocab_size: int = int(self.index["vocab_size"])
        self.tokenizer_hash: str = self.index["tokenizer_hash"]
        self.eos_id: int = int(self.index["eos_id"])
        self.bos_id: int | None = self.index.get("bos_id")
        self.max_token_id: int = int(self.index.get("max_token_id", self.vocab_size - 1))

    def __len__(self) -> int:
        return self.num_tokens

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split's stream as int64, crossing shard files as needed."""
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside 0..{self.num_tokens}")
        out = np.empty(stop - start, dtype=np.int64)
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        while pos < stop:
            base = int(self._offsets[shard])
            end = min(stop, int(self._offsets[shard + 1]))
            part = self._arrays[shard][pos - base:end - base]
            # Cheap next to the forward, and an id past the vocabulary would otherwise be an IndexError
            # (or a device assert) deep in the embedding, naming no file.
            if len(part) and int(part.max()) > self.max_token_id:
                at = pos - base + int(np.argmax(part > self.max_token_id))
                raise ValueError(f"{self.folder / self.index['shards'][shard]['file']}: token {at} is id "
                                 f"{int(part[at - pos + base])}, beyond the largest id index.json allows "
                                 f"({self.max_token_id}): the shard is damaged or not from this tokenizer")
            out[pos - start:end - start] = part
            pos = end
            shard += 1
        return out

    def document_of(self, positions: np.ndarray) -> np.ndarray:
        """Global document index of each token position."""
        return np.searchsorted(self.doc_starts, positions, side="right") - 1


def _load_offsets(path: Path) -> np.ndarray:
    """A shard's document offsets: a plain integer array (never a pickle)."""
    try:
        offsets = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: document index listed in index.json is missing") from None
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a numpy array of document offsets ({str(err).splitlines()[0]})") from None
    if not isinstance(offsets, np.ndarray) or offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{path}: not a 1-D integer array of document offsets")
    return offsets


def check_tokenizer_matches(
    shards: TokenShards | str | Path,
    tokenizer_dir_or_obj: str | Path | PreTrainedTokenizerBase | None = None,
    model_vocab_size: int | None = None,
) -> None:
    """Raise ValueError (one line) when the shards were made with another tokenizer or the model's vocab is too small."""
    from trainer.data.tokenizer import tokenizer_hash  # transformers-heavy; only needed when checking

    if not isinstance(shards, TokenShards):
        shards = TokenShards(shards)
    if tokenizer_dir_or_obj is not None:
        given = tokenizer_hash(tokenizer_dir_or_obj)
        if given != shards.tokenizer_hash:
            name = tokenizer_dir_or_obj if isinstance(tokenizer_dir_or_obj, (str, Path)) else "the given tokenizer"
            raise ValueError(
                f"{shards.folder}: token shards were made with tokenizer {shards.index.get('tokenizer')} "
                f"(hash {shards.tokenizer_hash}) but {name} hashes to {given}; re-run prepare_data with this "
                "tokenizer or train with the original one")
    if model_vocab_size is not None:
        needed = max(shards.vocab_size, shards.max_token_id + 1)
        if model_vocab_size < needed:
            raise ValueError(
                f"{shards.folder}: model vocab_size {model_vocab_size} is smaller than the tokenizer's "
                f"{shards.vocab_size} (max token id in shards {shards.max_token_id}); set model vocab_size >= {needed}")
