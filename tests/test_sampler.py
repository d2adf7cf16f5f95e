"""The shared sampler: epoch order, rank sharding, exact resume, and validation passes that cover every unit."""
from __future__ import annotations

import json
from itertools import islice

import numpy as np
import pytest

from tests.sft_fixtures import demo_rows, make_tokenizer
from tests.sft_fixtures import write_jsonl as write_rows
from tests.test_prepare_data import docs_as_words, wordlevel_tokenizer, write_jsonl
from trainer.chat import ensure_chat_template
from trainer.data.prepare import prepare_data
from trainer.data.sampler import StatefulSampler
from trainer.data.shards import PretrainLoader, TokenShards
from trainer.objectives import IGNORE_INDEX
from trainer.sft.data import load_sft_examples
from trainer.sft.loader import SFTLoader


def formula_draws(n: int, batch_size: int, world: int, rank: int, seed: int, shuffle: bool,
                  epochs: int) -> list[list[int]]:
    """What every loader computed before the sampler existed, written out again independently."""
    gb, out = batch_size * world, []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        out += [order[c:c + gb][rank::world].tolist() for c in range(0, n - gb + 1, gb)]
    return out


def take(sampler: StatefulSampler, k: int) -> list[list[int]]:
    return [d.units for d in islice(iter(sampler), k)]


def triples(order: np.ndarray) -> list[list[int]]:
    """A grouping hook like SFT packing: units made of several items, fewer units than items."""
    return [order[i:i + 3].tolist() for i in range(0, len(order), 3)]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_order_and_rank_stride_follow_the_formula(shuffle, world):
    n, B, seed = 23, 2, 9
    for rank in range(world):
        sampler = StatefulSampler(n, B, seed=seed, rank=rank, world_size=world, shuffle=shuffle)
        want = formula_draws(n, B, world, rank, seed, shuffle, epochs=3)
        draws = list(islice(iter(sampler), len(want)))
        assert [d.units for d in draws] == want
        assert all(d.real == B for d in draws)
        # The epoch advances when the next draw finds it used up, not before.
        assert (sampler.epoch, sampler.cursor) == (2, n // (B * world) * B * world)


def test_one_epoch_mode_stops_at_the_epoch_end_and_the_next_iter_runs_the_next():
    sampler = StatefulSampler(10, 3, seed=1, infinite=False)
    first, second = [d.units for d in sampler], [d.units for d in sampler]
    assert first + second == formula_draws(10, 3, 1, 0, 1, True, epochs=2)
    assert len(first) == len(sampler) == 3


@pytest.mark.parametrize("group", [None, triples])
@pytest.mark.parametrize("cut", [2, 5, 7, 11])  # mid-epoch, at an epoch's end, just after it, two epochs in
def test_resume_from_state_dict_gives_the_same_remaining_sequence(group, cut):
    args = dict(batch_size=2, seed=4, rank=1, world_size=2, group=group, identity={"fingerprint": "f"})
    straight = StatefulSampler(31 if group is None else 60, **args)
    it = iter(straight)
    [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(straight.state_dict()))  # a checkpoint stores plain data
    rest = [next(it).units for _ in range(12)]
    resumed = StatefulSampler(31 if group is None else 60, **args)
    resumed.load_state_dict(state)
    assert take(resumed, 12) == rest
    assert resumed.state_dict() == straight.state_dict()
    # A live iterator follows a state loaded under it.
    live = iter(straight)
    straight.load_state_dict(state)
    assert [next(live).units for _ in range(12)] == rest


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_are_disjoint_and_cover_each_step(world):
    n, B = 40, 3
    per_rank = [take(StatefulSampler(n, B, seed=2, rank=r, world_size=world), 8) for r in range(world)]
    whole = take(StatefulSampler(n, B * world, seed=2), 8)  # one rank taking the whole global batch
    for step in range(8):
        shares = [per_rank[r][step] for r in range(world)]
        together = [u for share in shares for u in share]
        assert len(together) == len(set(together)) == B * world
        assert set(together) == set(whole[step])


@pytest.mark.parametrize("group", [None, triples])
@pytest.mark.parametrize("n", [1, 4, 7, 11, 24])
@pytest.mark.parametrize("batch_size", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_visits_every_unit_once_with_equal_batch_counts(group, n, batch_size, world):
    samplers = [StatefulSampler(n, batch_size, rank=r, world_size=world, shuffle=False, validation=True,
                                group=group) for r in range(world)]
    units = samplers[0].epoch_units(0)
    per_rank = [list(s) for s in samplers]
    counts = {len(draws) for draws in per_rank}
    assert counts == {len(samplers[0])} == {-(-len(units) // (batch_size * world))}  # ZeRO-3: same forwards
    real = []
    for draws in per_rank:
        for d in draws:
            assert len(d.units) == batch_size and 0 <= d.real <= batch_size
            real += [tuple(np.atleast_1d(u).tolist()) for u in d.units[:d.real]]
    assert sorted(real) == sorted(tuple(np.atleast_1d(u).tolist()) for u in units)
    # Every iter() is a full pass again, even after a pass cut short.
    next(iter(samplers[-1]))
    assert [d.units for d in samplers[-1]] == [d.units for d in per_rank[-1]]


def test_too_little_data_refused_for_training_but_not_for_validation():
    with pytest.raises(ValueError, match=r"7 things, fewer than one global batch \(4 x 2 rank\(s\)\); add some"):
        StatefulSampler(7, 4, world_size=2).require_units("7 things", "add some")
    StatefulSampler(3, 4, world_size=2, validation=True).require_units("3 things", "add some")
    with pytest.raises(ValueError, match="nothing to validate"):
        StatefulSampler(0, 4, validation=True).require_units("0 things", "add some")


def test_state_refuses_other_data_seed_or_missing_keys():
    saved = StatefulSampler(20, 2, seed=1, identity={"fingerprint": "aaaa"}, name="thing loader")
    take(saved, 3)
    state = saved.state_dict()
    with pytest.raises(ValueError, match="thing loader state does not match this data: fingerprint is 'aaaa' in the "
                                         "saved state but 'bbbb' now"):
        StatefulSampler(20, 2, seed=1, identity={"fingerprint": "bbbb"}, name="thing loader").load_state_dict(state)
    with pytest.raises(ValueError, match="seed is 1 in the saved state but 2 now"):
        StatefulSampler(20, 2, seed=2, identity={"fingerprint": "aaaa"}).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks key.*fingerprint"):
        StatefulSampler(20, 2, seed=1, identity={"fingerprint": "aaaa"}).load_state_dict(
            {k: v for k, v in state.items() if k != "fingerprint"})
    with pytest.raises(ValueError, match="cursor 99 is outside 0..20"):
        StatefulSampler(20, 2, seed=1, identity={"fingerprint": "aaaa"}).load_state_dict({**state, "cursor": 99})
    # Another batch size or world size continues the same epoch order.
    other = StatefulSampler(20, 1, seed=1, world_size=2, identity={"fingerprint": "aaaa"})
    other.load_state_dict(state)
    assert (other.epoch, other.cursor) == (0, 6)


# ----------------------------------------------------------------------------- the loaders' validation passes


@pytest.fixture(scope="module")
def sft_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler_sft")
    tok = ensure_chat_template(make_tokenizer(root), "llama3")
    path = write_rows(root / "val.jsonl", demo_rows("sft_eval")[:37])
    examples, report = load_sft_examples([path], tok, seq_len=64)
    return examples, report


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sft_validation_counts_every_target_token_the_report_counts(sft_val, packing, world):
    examples, report = sft_val
    assert report.examples == len(examples) == 37
    args = dict(batch_size=4, seq_len=64, pad_id=0, packing=packing, world_size=world, shuffle=False)
    per_rank = [list(SFTLoader(examples, rank=r, validation=True, **args)) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1
    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for batches in per_rank for b in batches)
    assert targets == report.target_tokens
    # The training-style one-epoch pass drops the last partial global batch, and with it some targets.
    dropped = [list(SFTLoader(examples, rank=r, infinite=False, **args)) for r in range(world)]
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for bs in dropped for b in bs) < report.target_tokens


@pytest.mark.parametrize("packing", [True, False])
def test_sft_validation_of_fewer_examples_than_one_global_batch(sft_val, packing):
    examples, _ = sft_val
    three = examples[:3]
    args = dict(batch_size=4, seq_len=64, pad_id=0, packing=packing, world_size=2, shuffle=False)
    per_rank = [list(SFTLoader(three, rank=r, validation=True, **args)) for r in range(2)]
    assert [len(b) for b in per_rank] == [1, 1] and all(b[0]["input_ids"].shape[0] == 4 for b in per_rank)
    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for bs in per_rank for b in bs)
    assert targets == sum(int((ex.labels != IGNORE_INDEX).sum()) for ex in three)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        SFTLoader(three, **args)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> TokenShards:
    """A split whose content tokens are all distinct, so a window is identified by its tokens."""
    root = tmp_path_factory.mktemp("sampler_pretrain")
    rng = np.random.default_rng(1)
    content = rng.permutation(np.arange(4, 600))
    docs, at = [], 0
    for n in rng.integers(1, 20, size=40):
        docs.append(content[at:at + n].tolist())
        at += n
    src = write_jsonl(root / "docs.jsonl", docs_as_words(docs))
    prepare_data([src], wordlevel_tokenizer(root / "tok", 600), root / "out", val_fraction=0.0, shard_tokens=100,
                 show_progress=False)
    return TokenShards(root / "out" / "train")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_pretrain_validation_evaluates_every_window_once(val_shards, world):
    T, B = 8, 3
    every = [tuple(r.tolist()) for b in PretrainLoader(val_shards, 1, T, shuffle=False, infinite=False)
             for r in b["input_ids"]]
    assert len(every) == (val_shards.num_tokens - 1) // T and len(every) % (B * world)  # a partial last step
    per_rank = [list(PretrainLoader(val_shards, B, T, rank=r, world_size=world, shuffle=False, validation=True))
                for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    seen = []
    for batches in per_rank:
        for b in batches:
            for inputs, labels in zip(b["input_ids"], b["labels"]):
                if (labels == IGNORE_INDEX).all():
                    continue  # filler
                assert (labels != IGNORE_INDEX).all()
                seen.append(tuple(inputs.tolist()))
    assert sorted(seen) == sorted(every)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for bs in per_rank for b in bs) == len(every) * T
    # A split too small for one training step still validates.
    PretrainLoader(val_shards, len(every), T, world_size=2, shuffle=False, validation=True)


def test_loaders_refuse_a_state_from_changed_data(sft_val):
    examples, _ = sft_val
    args = dict(batch_size=2, seq_len=64, pad_id=0)
    state = SFTLoader(examples, **args).state_dict()
    with pytest.raises(ValueError, match="SFT loader state does not match this data: fingerprint"):
        SFTLoader(examples[1:] + examples[:1], **args).load_state_dict(state)
    with pytest.raises(ValueError, match="SFT loader state does not match this data: packing"):
        SFTLoader(examples, packing=False, **args).load_state_dict(state)
