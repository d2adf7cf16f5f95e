"""Reference log-probs computed once before training and cached on disk under a hash of their inputs.

The cache key covers everything the numbers depend on: the reference weights, the tokenizer,
the data files, the chat template, the length limits (and the precision and the tokenized
pairs themselves), so a stale cache can never be reused; a change in any of them is a miss.

Under ZeRO-3 the reference is sharded and every forward gathers weights from all ranks, so
every rank runs the same number of forwards on its own share of the pairs; the results are
gathered, and rank 0 writes the table (write-then-rename) for every rank to read.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file
from torch import nn

from trainer.dpo.data import TokenPair
from trainer.dpo.loader import PairBatches, fingerprint
from trainer.dpo.reference import FrozenCopyReference
from trainer.hub import hub_dataset_folder, hub_dataset_spec

TABLE = "ref_logps"


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def files_fingerprint(files: list[str | Path]) -> str:
    """sha256 over the inputs' names-in-order and bytes (every file of a dataset folder)."""
    h = hashlib.sha256()
    for file in files:
        path = Path(file)
        if hub_dataset_spec(file) is not None:  # the config and split are in the name; the bytes in the snapshot
            h.update(str(file).encode())
            path = hub_dataset_folder(str(file))
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for member in members:
            h.update(str(member.relative_to(path) if path.is_dir() else member.name).encode())
            with open(member, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def reference_cache_key(*, weights: str, tokenizer: str, data: str, template: str, max_len: int,
                        max_prompt_len: int, **extra: object) -> str:
    """One hash of everything the reference log-probs depend on; `extra` (precision, pair fingerprint) too."""
    parts = {"weights": weights, "tokenizer": tokenizer, "data": data, "template": template, "max_len": max_len,
             "max_prompt_len": max_prompt_len, **extra}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


@torch.no_grad()
def compute_reference_logps(accelerator: Accelerator, reference: FrozenCopyReference, pairs: list[TokenPair],
                            batch_size: int, pad_id: int, pad_to_multiple_of: int = 1) -> torch.Tensor:
    """(n, 2) reference log-probs (chosen, rejected) of every pair, computed across all ranks.

    Batches are padded like training's (`pad_to_multiple_of`), so at step 0 policy and reference agree bit for bit.
    """
    batches = PairBatches(pairs, batch_size, pad_id, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, pad_to_multiple_of=pad_to_multiple_of)
    rows = []
    mine = list(range(accelerator.process_index, len(pairs), accelerator.num_processes))
    for b, batch in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        chosen, rejected = reference.logps(None, batch)
        index = mine[b * batch_size:(b + 1) * batch_size]
        index = index + [0] * (batch_size - len(index))
        rows.append(torch.stack([torch.tensor(index, dtype=torch.float64, device=chosen.device),
                                 batch["pair_mask"].double(), chosen.double(), rejected.double()], dim=1))
    local = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local).cpu()  # equal row counts on every rank (PairBatches pads)
    table = torch.full((len(pairs), 2), float("nan"), dtype=torch.float32)
    real = gathered[gathered[:, 1] > 0]
    table[real[:, 0].long()] = real[:, 2:].float()
    if torch.isnan(table).any():
        raise RuntimeError(f"reference precompute left {int(torch.isnan(table).any(1).sum())} pairs without log-probs")
    return table


def cached_reference_logps(accelerator: Accelerator, cache_dir: str | Path, key: str, n_pairs: int,
                           compute: Callable[[], torch.Tensor],
                           describe: dict[str, object]) -> tuple[torch.Tensor, bool]:
    """The (n_pairs, 2) table from `cache_dir/<key>.safetensors`, or computed by `compute()` on every rank and
    written there by rank 0. Returns (table, whether it came from the cache)."""
    path = Path(cache_dir) / f"{key}.safetensors"
    hit = [path.is_file() if accelerator.is_main_process else False]
    broadcast_object_list(hit, from_process=0)  # every rank must take the same branch
    if not hit[0]:
        table = compute()
        if accelerator.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file({TABLE: table.contiguous()}, str(tmp),
                      metadata={k: str(v) for k, v in describe.items()})
            os.replace(tmp, path)
        accelerator.wait_for_everyone()
    table = load_file(str(path))[TABLE]
    if tuple(table.shape) != (n_pairs, 2):
        raise ValueError(f"{path}: reference table has shape {tuple(table.shape)}, expected ({n_pairs}, 2)")
    return table, bool(hit[0])


def pairs_key_parts(pairs: list[TokenPair]) -> dict[str, object]:
    return {"pairs": fingerprint(pairs), "num_pairs": len(pairs)}
