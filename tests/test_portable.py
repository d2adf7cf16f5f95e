"""The portable checkpoint state (trainer.portable) without DeepSpeed, and the data position across
world sizes; the multi-rank and ZeRO paths are tests/test_resume_reshard.py."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from trainer.config import OptimSection
from trainer.data.sampler import StatefulSampler
from trainer.optim import build_optimizer, build_scheduler
from trainer.portable import (
    Topology,
    TrainingParts,
    UnsupportedResume,
    check_resumable,
    gather_state,
    load_portable,
    needs_portable,
    saved_topology,
    write_portable,
    write_topology,
)

OPTIM = OptimSection(lr=1e-2, warmup_steps=2, weight_decay=0.1)


def make_parts(seed: int = 0, width: int = 16) -> TrainingParts:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(40, width), nn.LayerNorm(width), nn.Linear(width, 40))
    model[0].weight.requires_grad_(False)  # a frozen weight is rebuilt by the run, not stored
    optimizer = build_optimizer(model, OPTIM)
    return TrainingParts(model, optimizer, build_scheduler(optimizer, OPTIM, max_steps=10), zero_stage=None)


def train_steps(parts: TrainingParts, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 40, (4, 8), generator=gen)
        loss = nn.functional.cross_entropy(parts.model(tokens).flatten(0, 1), tokens.roll(1, 1).flatten())
        loss.backward()
        parts.optimizer.step()
        parts.optimizer.zero_grad()
        parts.scheduler.step()
        losses.append(loss.item())
    return losses


def test_portable_state_round_trip_continues_exactly(tmp_path):
    original = make_parts()
    train_steps(original, 3)
    write_portable(tmp_path, *gather_state(original))
    saved = json.loads((tmp_path / "portable" / "meta.json").read_text())
    assert saved["steps"] == [3.0, 3.0] and saved["scheduler"]["last_epoch"] == 3

    resumed = make_parts(seed=5)  # other random weights: everything trainable must come from the file
    resumed.model[0].weight.data.copy_(original.model[0].weight)  # as `init_from` / the seed would
    load_portable(tmp_path, resumed)
    by_name = dict(original.model.named_parameters())
    for name, param in resumed.model.named_parameters():
        assert torch.equal(param, by_name[name]), name
        if param.requires_grad:
            mine, theirs = resumed.optimizer.state[param], original.optimizer.state[by_name[name]]
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(mine[key], theirs[key]), f"{name} {key}"
    assert [g["lr"] for g in resumed.optimizer.param_groups] == [g["lr"] for g in original.optimizer.param_groups]
    assert resumed.scheduler.last_epoch == 3
    # The next steps are the saving run's next steps, bit for bit.
    assert train_steps(resumed, 3, seed=7) == train_steps(original, 3, seed=7)
    for (name, a), b in zip(original.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name


def test_portable_state_of_another_model_is_refused(tmp_path):
    write_portable(tmp_path, *gather_state(make_parts()))
    with pytest.raises(ValueError, match=r"state.safetensors: 1.weight has shape \(16,\) in the checkpoint "
                                         r"but \(8,\) in this model"):
        load_portable(tmp_path, make_parts(width=8))
    other = make_parts()
    other.model[1].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable parameter 1.weight is only in the checkpoint"):
        load_portable(tmp_path, other)


def test_topology_decides_and_refuses_in_one_line(tmp_path):
    write_topology(tmp_path, Topology(2, 2, portable=False))
    saved = saved_topology(tmp_path)
    assert saved == Topology(2, 2, False)
    assert not needs_portable(saved, Topology(2, 2, True))
    for now in (Topology(1, 2, True), Topology(2, 3, True), Topology(2, None, True)):
        assert needs_portable(saved, now)
        with pytest.raises(UnsupportedResume) as err:
            check_resumable(tmp_path, saved, now)
        assert "written by 2 ranks under ZeRO-2" in str(err.value) and "no portable state" in str(err.value)
        assert "\n" not in str(err.value)
    check_resumable(tmp_path, Topology(2, 2, True), Topology(1, None, True))  # portable: fine

    old = tmp_path / "old"  # written before topology.json: what its files show
    (old / "pytorch_model").mkdir(parents=True)
    for rank in (0, 1):
        (old / f"random_states_{rank}.pkl").write_bytes(b"")
    assert saved_topology(old) == Topology(2, -1, False)
    assert not needs_portable(saved_topology(old), Topology(2, 3, True))  # DeepSpeed judges the stage
    assert needs_portable(saved_topology(old), Topology(1, 3, True))
    (tmp_path / "topology.json").write_text("{")
    with pytest.raises(ValueError, match="topology.json: unreadable"):
        saved_topology(tmp_path)


def steps_of(samplers: list[StatefulSampler], steps: int) -> list[list[int]]:
    """Each step's units over every rank, in rank order (each rank's iterator, one batch a step)."""
    iters = [iter(s) for s in samplers]
    return [sorted(u for it in iters for u in next(it).units) for _ in range(steps)]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4)])
def test_sample_order_carries_across_world_sizes(before, after):
    """Same global batch (8): k steps on `before` ranks then on `after` ranks visit exactly the units
    of a straight run, step by step, none skipped or seen twice, across an epoch boundary."""
    n, global_batch = 44, 8

    def ranks(world):
        return [StatefulSampler(n, global_batch // world, seed=3, rank=r, world_size=world) for r in range(world)]

    straight = steps_of(ranks(2), 9)
    first = ranks(before)
    head = steps_of(first, 4)
    state = first[0].state_dict()
    assert all(s.state_dict() == state for s in first)
    rest = ranks(after)
    for sampler in rest:
        sampler.load_state_dict(state)
    assert head + steps_of(rest, 5) == straight
    epoch = [u for step in straight[:5] for u in step]
    assert len(epoch) == len(set(epoch)) == 40  # one epoch: 5 full global batches of 44 units, no repeat
