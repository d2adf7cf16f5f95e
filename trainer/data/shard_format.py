"""The on-disk format of packed token shards, shared by the writer (`prepare`) and the reader (`shards`).

A prepared folder holds one sub-folder per split (`train/`, `val/`), each with:

    shard_00000.bin       flat token stream, numpy uint16 (vocab <= 65535) or uint32, no header
    shard_00000.idx.npy   int64 start offset of every document inside that shard
    index.json            dtype, shards [{file, doc_index, tokens, documents}], totals, tokenizer hash, ids

Shards are cut at document boundaries, so every document lies in one shard; the stream of
a split is the shards concatenated in index order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT_NAME = "llamatrain-token-shards"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
SPLITS: tuple[str, ...] = ("train", "val")


def shard_names(i: int) -> tuple[str, str]:
    """(tokens file, document-offsets file) of shard i."""
    return f"shard_{i:05d}.bin", f"shard_{i:05d}.idx.npy"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def write_index(folder: Path, index: dict) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_index(folder: Path) -> dict:
    path = folder / INDEX_FILE
    if not path.exists():
        hint = ""
        if any((folder / split / INDEX_FILE).exists() for split in SPLITS):
            hint = f" (pass a split folder: {folder / 'train'} or {folder / 'val'})"
        raise FileNotFoundError(f"{path}: no token shard index{hint}")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not a {FORMAT_NAME} v{FORMAT_VERSION} index "
                         f"(format={index.get('format')!r}, version={index.get('version')!r})")
    missing = [k for k in ("dtype", "shards", "tokens", "documents", "tokenizer_hash", "vocab_size", "eos_id")
               if k not in index]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}")
    return index
