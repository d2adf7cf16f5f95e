"""Raw text -> packed token shards (see `trainer.data.shard_format` for the layout).

Inputs are read with `datasets` (`trainer.data.sources`), tokenized in `num_proc`
processes with any HF-format tokenizer, wrapped as BOS + tokens + EOS per document,
split into train/val by document, and written as flat uint16/uint32 streams. Everything
is written into a temporary sibling folder that is renamed into place at the end, so a
failed run leaves nothing half-written.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from trainer.data.shard_format import FORMAT_NAME, FORMAT_VERSION, shard_names, token_dtype, write_index
from trainer.data.sources import DataError, TextMode, load_documents
from trainer.data.staging import staged_folder
from trainer.data.tokenizer import load_tokenizer, tokenizer_hash

DEFAULT_SHARD_TOKENS = 100_000_000


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase, bos_id: int | None, eos_id: int) -> dict:
    ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
    head = [bos_id] if bos_id is not None else []
    return {"input_ids": [head + doc + [eos_id] for doc in ids]}


class _ShardWriter:
    """Appends whole documents to shard files, starting a new shard once one holds >= shard_tokens."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.shards: list[dict] = []
        self.max_token_id = -1
        self._file = None
        self._tokens = 0
        self._starts: list[np.ndarray] = []

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents given as their concatenated tokens and per-document lengths."""
        if len(flat):
            self.max_token_id = max(self.max_token_id, int(flat.max()))
        offset = 0
        doc = 0
        ends = np.cumsum(lengths)
        while doc < len(lengths):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._tokens
            # The document that reaches the shard size is the last one in this shard.
            last = int(np.searchsorted(ends - offset, room, side="left"))
            last = min(last, len(lengths) - 1)
            take = lengths[doc:last + 1]
            starts = self._tokens + np.concatenate([[0], np.cumsum(take)[:-1]]).astype(np.int64)
            stop = int(ends[last])
            self._file.write(flat[offset:stop].astype(self.dtype, copy=False).tobytes())
            self._starts.append(starts)
            self._tokens += int(take.sum())
            offset, doc = stop, last + 1
            if self._tokens >= self.shard_tokens:
                self._close()

    def _open(self) -> None:
        self._file = open(self.folder / shard_names(len(self.shards))[0], "wb")
        self._tokens = 0
        self._starts = []

    def _close(self) -> None:
        bin_name, idx_name = shard_names(len(self.shards))
        self._file.close()
        self._file = None
        starts = np.concatenate(self._starts) if self._starts else np.zeros(0, np.int64)
        np.save(self.folder / idx_name, starts)
        self.shards.append({"file": bin_name, "doc_index": idx_name, "tokens": self._tokens, "documents": len(starts)})

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards


def _write_split(tokens: datasets.Dataset, folder: Path, meta: dict, dtype: np.dtype, shard_tokens: int,
                 progress: Progress | None, name: str) -> dict:
    folder.mkdir(parents=True)
    writer = _ShardWriter(folder, dtype, shard_tokens)
    task = progress.add_task(f"Writing {name}", total=len(tokens)) if progress is not None else None
    for batch in tokens.with_format("arrow").iter(batch_size=4096):
        column = batch.column("input_ids").combine_chunks()  # (documents,) list<int32>
        writer.add(column.flatten().to_numpy(zero_copy_only=False),
                   column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64))
        if progress is not None:
            progress.advance(task, len(column))
    shards = writer.finish()
    index = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "split": name, "dtype": dtype.name,
        "tokens": sum(s["tokens"] for s in shards), "documents": sum(s["documents"] for s in shards),
        "max_token_id": writer.max_token_id, **meta, "shards": shards,
    }
    write_index(folder, index)
    return {"documents": index["documents"], "tokens": index["tokens"], "shards": len(shards)}


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) document indices, each in input order; val is a seeded random `val_fraction` of documents."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n >= 2:
        n_val = 1  # a requested validation split is never silently empty
    if n - n_val < 1:
        raise DataError(f"{n} document(s) leave nothing for training with val_fraction={val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def prepare_data(
    inputs: list[str | Path],
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    num_proc: int | None = None,
    text_field: str = "text",
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    skip_bad_rows: bool = False,
    seed: int = 0,
    text_mode: TextMode = "paragraph",
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Tokenize the inputs into `out_dir/{train,val}` token shards; returns the report (also saved as report.json)."""
    started = time.time()
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    tok = load_tokenizer(tokenizer_dir)
    if tok.eos_token_id is None:
        raise DataError(f"{tokenizer_dir}: tokenizer has no eos token; documents need one to be separated")
    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    with staged_folder(out_dir, overwrite) as tmp:
        cache = tmp / ".cache"
        docs, sources = load_documents(inputs, text_field=text_field, text_mode=text_mode,
                                       skip_bad_rows=skip_bad_rows, num_proc=num_proc, cache_dir=cache)
        if len(docs) == 0:
            raise DataError(f"no documents found in {', '.join(map(str, inputs))}")
        if num_proc and num_proc > 1:
            # Worker processes tokenize in parallel already; tokenizers' own threads would fight them.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tokens = docs.map(
            _tokenize_batch, batched=True, num_proc=num_proc, remove_columns=docs.column_names,
            fn_kwargs={"tokenizer": tok, "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id},
            features=datasets.Features({"input_ids": datasets.List(datasets.Value("int32"))}),
            cache_file_name=str(cache / "tokens.arrow"), desc="Tokenizing",
        )
        train_idx, val_idx = split_documents(len(tokens), val_fraction, seed)
        meta = {
            "tokenizer_hash": tokenizer_hash(tok), "tokenizer": str(tokenizer_dir), "vocab_size": vocab_size,
            "bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id,
            "sources": [str(Path(p).resolve()) for p in inputs], "text_field": text_field, "text_mode": text_mode,
            "val_fraction": val_fraction, "seed": seed,
        }
        splits = {}
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      disable=not show_progress) as progress:
            for name, idx in (("train", train_idx), ("val", val_idx)):
                if len(idx):
                    splits[name] = _write_split(tokens.select(idx), tmp / name, meta, dtype, shard_tokens,
                                                progress, name)
        report = {
            "out_dir": str(out_dir), "dtype": dtype.name, "vocab_size": vocab_size,
            "tokenizer_hash": meta["tokenizer_hash"], "documents": len(docs),
            "tokens": sum(s["tokens"] for s in splits.values()), "skipped_rows": sources.skipped_rows,
            "skipped_examples": sources.skipped_examples, "documents_per_source": sources.documents,
            "splits": splits, "seconds": round(time.time() - started, 2),
        }
        del docs, tokens  # release the Arrow memory maps before their files go
        shutil.rmtree(cache)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return report


def print_report(report: dict, console: Console | None = None) -> None:
    """The end-of-run table: documents, tokens and shards per split, and skipped rows."""
    console = console or Console()
    table = Table(title=f"{report['out_dir']}", caption=f"{report['dtype']} tokens, vocab {report['vocab_size']}, "
                  f"tokenizer {report['tokenizer_hash']}")
    for col in ("split", "documents", "tokens", "shards"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, split in report["splits"].items():
        table.add_row(name, f"{split['documents']:,}", f"{split['tokens']:,}", str(split["shards"]))
    table.add_row("total", f"{report['documents']:,}", f"{report['tokens']:,}",
                  str(sum(s["shards"] for s in report["splits"].values())), style="bold")
    console.print(table)
    if report["skipped_rows"]:
        console.print(f"[yellow]skipped {report['skipped_rows']} bad row(s)[/], e.g. {report['skipped_examples'][0]}")
    else:
        console.print("skipped rows: 0")
