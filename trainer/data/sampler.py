"""Which units each rank takes at each step, for every loader; resumable exactly.

Order. Epoch e visits the `num_items` items in `permutation(num_items)` from
`numpy.random.default_rng([seed, e])` (index order with `shuffle=False`). A loader may turn
that order into the epoch's units with `group` (SFT packs examples into rows); by default a
unit is an item.

Steps and ranks. Each step consumes the next `batch_size * world_size` units of the epoch and
rank r takes every `world_size`-th of them from r: ranks are disjoint and together cover the
step. The position is (epoch, cursor = units consumed in the epoch by all ranks together),
re-read every step, so `load_state_dict()` takes effect even on a live iterator, `state_dict()`
after k batches resumes at batch k+1, and a new `iter()` continues where the last one stopped.

Training (the default). Units left over at an epoch's end (fewer than a global batch) are not
used in that epoch. `infinite=True` runs epoch after epoch; `infinite=False` stops at the end
of the current one (the next `iter()` runs the next).

Validation (`validation=True`). Every `iter()` is one pass over the epoch's units that visits
each exactly once: the last global batch keeps its remainder and each rank pads its share up to
`batch_size` with filler (repeats of a unit), so every rank yields the same number of batches;
ZeRO-3 gathers weights in every forward, and a rank that stopped early would hang the others.
Each draw says how many of its units are real; the loader masks the rest out of the loss.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from trainer.objectives import IGNORE_INDEX


class Draw(NamedTuple):
    """One rank's units for one batch: the first `real` are data, the rest filler to mask out."""

    units: list
    real: int


def _as_list(units: Sequence) -> list:
    return units.tolist() if isinstance(units, np.ndarray) else list(units)


class StatefulSampler:
    """Iterator of `Draw`s with `state_dict()` / `load_state_dict()`; `identity` names the data it was built for."""

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, infinite: bool = True, validation: bool = False,
                 group: Callable[[np.ndarray], Sequence] | None = None, identity: dict[str, Any] | None = None,
                 name: str = "loader"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.infinite, self.validation = infinite, validation
        self.global_batch = batch_size * world_size
        self.group, self.identity, self.name = group, dict(identity or {}), name
        self.epoch = 0
        self.cursor = 0  # units consumed in this epoch by all ranks together
        self._units_cache: tuple[int, Sequence] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Item indices in the order epoch `epoch` visits them (identical on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_items)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def epoch_units(self, epoch: int) -> Sequence:
        """The units of epoch `epoch` in visiting order: its item order, or that order grouped."""
        if self._units_cache is None or self._units_cache[0] != epoch:
            order = self.epoch_order(epoch)
            self._units_cache = (epoch, order if self.group is None else self.group(order))
        return self._units_cache[1]

    def __len__(self) -> int:
        """Batches per rank in the current epoch (a validation pass counts its padded last batch)."""
        n = len(self.epoch_units(self.epoch))
        return -(-n // self.global_batch) if self.validation else n // self.global_batch

    def require_units(self, what: str, remedy: str) -> None:
        """Refuse data too small to sample: training needs one full global batch, a validation pass one unit."""
        n = len(self.epoch_units(0))
        if self.validation and n == 0:
            raise ValueError(f"{what}: nothing to validate; {remedy}")
        if not self.validation and n < self.global_batch:
            raise ValueError(f"{what}, fewer than one global batch ({self.batch_size} x {self.world_size} "
                             f"rank(s)); {remedy}")

    def __iter__(self) -> Iterator[Draw]:
        if self.validation:
            self.cursor = 0
        need = 1 if self.validation else self.global_batch
        while True:
            units = self.epoch_units(self.epoch)
            if len(units) - self.cursor < need:
                if self.validation:
                    self.cursor = 0
                    return
                self.epoch, self.cursor = self.epoch + 1, 0
                if not self.infinite:
                    return
                continue
            mine = _as_list(units[self.cursor:self.cursor + self.global_batch][self.rank::self.world_size])
            self.cursor = min(self.cursor + self.global_batch, len(units))
            real = len(mine)
            filler = mine[0] if mine else _as_list(units[:1])[0]
            yield Draw(mine + [filler] * (self.batch_size - real), real)

    def _must_match(self) -> tuple[str, ...]:
        return ("seed", "shuffle", *self.identity)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (the same on every rank)."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "shuffle": self.shuffle,
                "batch_size": self.batch_size, "world_size": self.world_size, **self.identity}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. batch_size and world_size may differ from the saved run: the rest of the
        epoch's order is then split with the new layout (still no unit twice)."""
        missing = [k for k in ("epoch", "cursor", *self._must_match()) if k not in state]
        if missing:
            raise ValueError(f"{self.name} state lacks key(s) {', '.join(missing)}")
        mine = self.state_dict()
        for key in self._must_match():
            if state[key] != mine[key]:
                raise ValueError(f"{self.name} state does not match this data: {key} is {state[key]!r} in the "
                                 f"saved state but {mine[key]!r} now")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        n = len(self.epoch_units(epoch))
        if not 0 <= cursor <= n:
            raise ValueError(f"{self.name} state cursor {cursor} is outside 0..{n}")
        self.epoch, self.cursor = epoch, cursor


def _sampler_field(name: str) -> property:
    return property(lambda self: getattr(self.sampler, name), lambda self, value: setattr(self.sampler, name, value),
                    doc=f"The sampler's `{name}`.")


class SampledLoader:
    """A loader whose order and position live in `self.sampler`: what it shows of them to the loop."""

    sampler: StatefulSampler
    epoch = _sampler_field("epoch")
    cursor = _sampler_field("cursor")

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def mask_filler(batch: dict[str, torch.Tensor], real: int) -> dict[str, torch.Tensor]:
    """Rows from `real` on are filler: with every label ignored they add no target to any loss or count."""
    batch["labels"][real:] = IGNORE_INDEX
    return batch
