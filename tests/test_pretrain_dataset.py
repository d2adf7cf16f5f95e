"""The pretraining loader: windows, document boundaries, epochs, ranks and exact resume."""
from __future__ import annotations

import copy
import json
from itertools import islice

import numpy as np
import pytest
import torch

from tests.test_prepare_data import docs_as_words, wordlevel_tokenizer, write_jsonl
from trainer.data.prepare import prepare_data
from trainer.data.shards import PretrainLoader, TokenShards, check_tokenizer_matches

T = 8
B = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Shards of known documents whose content tokens are all distinct (so a window is identified by its tokens)."""
    root = tmp_path_factory.mktemp("pretrain")
    tok = wordlevel_tokenizer(root / "tok", 2000)
    rng = np.random.default_rng(0)
    content = rng.permutation(np.arange(4, 2000))
    lengths = rng.integers(1, 25, size=60)
    docs, at = [], 0
    for n in lengths:
        docs.append(content[at:at + n].tolist())
        at += n
    src = write_jsonl(root / "docs.jsonl", docs_as_words(docs))
    prepare_data([src], tok, root / "out", val_fraction=0.0, shard_tokens=150, show_progress=False)
    return {"tok": tok, "docs": docs, "folder": root / "out" / "train"}


@pytest.fixture()
def shards(data) -> TokenShards:
    return TokenShards(data["folder"])


def expected_stream(docs: list[list[int]]) -> tuple[list[int], list[int]]:
    """(stream, document number of every token), built from the documents themselves."""
    stream, owner = [], []
    for i, d in enumerate(docs):
        stream += [0, *d, 1]
        owner += [i] * (len(d) + 2)
    return stream, owner


def take(loader: PretrainLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return list(islice(iter(loader), n))


def window_key(row: torch.Tensor) -> tuple[int, ...]:
    return tuple(row.tolist())


def test_shards_memory_map_the_stream(data, shards):
    stream, _ = expected_stream(data["docs"])
    assert len(shards.index["shards"]) > 1
    assert shards.num_tokens == len(stream) and shards.num_documents == len(data["docs"])
    assert shards.read(0, shards.num_tokens).tolist() == stream
    assert shards.read(140, 170).tolist() == stream[140:170]  # across a shard file boundary
    assert (shards.vocab_size, shards.eos_id, shards.bos_id) == (2000, 1, 0)


def test_ordered_pass_covers_the_stream_with_next_token_labels(data, shards):
    stream, _ = expected_stream(data["docs"])
    loader = PretrainLoader(shards, batch_size=B, seq_len=T, shuffle=False, infinite=False)
    batches = list(loader)
    assert len(batches) == len(loader) == ((len(stream) - 1) // T) // B
    inputs = torch.cat([b["input_ids"] for b in batches]).flatten().tolist()
    labels = torch.cat([b["labels"] for b in batches]).flatten().tolist()
    n = len(inputs)
    assert inputs == stream[:n] and labels == stream[1:n + 1]
    assert all(v.dtype == torch.long and v.shape == (B, T) for b in batches for v in b.values())
    # A fresh validation loader gives the same pass again.
    again = list(PretrainLoader(shards, batch_size=B, seq_len=T, shuffle=False, infinite=False))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_position_and_document_ids_follow_document_starts(data, shards):
    stream, owner = expected_stream(data["docs"])
    loader = PretrainLoader(shards, batch_size=B, seq_len=T, shuffle=False, infinite=False)
    boundaries_seen = 0
    for step, batch in enumerate(loader):
        for row in range(B):
            start = (step * B + row) * T
            pos, doc = [], []
            for t in range(start, start + T):
                # position: tokens since the document began, or since the window began if that is later
                first = max(start, owner.index(owner[t]))
                pos.append(t - first)
                doc.append(owner[t] - owner[start])
            assert batch["position_ids"][row].tolist() == pos
            assert batch["document_ids"][row].tolist() == doc
            boundaries_seen += doc[-1]
    assert boundaries_seen > 20  # the windows did cross many documents


def test_epochs_are_deterministic_permutations(shards):
    a = PretrainLoader(shards, batch_size=B, seq_len=T, seed=3)
    b = PretrainLoader(shards, batch_size=B, seq_len=T, seed=3)
    c = PretrainLoader(shards, batch_size=B, seq_len=T, seed=4)
    steps = len(a)
    first, second = take(a, 2 * steps), take(b, 2 * steps)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, second))
    assert not torch.equal(first[0]["input_ids"], take(c, 1)[0]["input_ids"])
    epoch0 = [window_key(r) for x in first[:steps] for r in x["input_ids"]]
    epoch1 = [window_key(r) for x in first[steps:] for r in x["input_ids"]]
    assert len(set(epoch0)) == len(epoch0) == steps * B  # no window twice within an epoch
    assert epoch0 != epoch1 and a.epoch == 1
    assert sorted(a.epoch_order(0).tolist()) == list(range(a.num_windows))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_are_disjoint_and_cover_each_step(shards, world):
    all_windows = {window_key(r) for b in PretrainLoader(shards, batch_size=1, seq_len=T, shuffle=False,
                                                          infinite=False) for r in b["input_ids"]}
    loaders = [PretrainLoader(shards, batch_size=B, seq_len=T, seed=1, rank=r, world_size=world) for r in range(world)]
    assert len({len(l) for l in loaders}) == 1
    steps = len(loaders[0])
    per_rank = [[window_key(row) for b in take(l, steps) for row in b["input_ids"]] for l in loaders]
    seen = [w for ws in per_rank for w in ws]
    assert len(seen) == len(set(seen)) == steps * B * world
    assert set(seen) <= all_windows
    assert len(all_windows) - len(seen) < B * world  # only the remainder of the epoch is dropped
    # The ranks together take exactly the next B * world windows of the epoch order at every step.
    single = PretrainLoader(shards, batch_size=B * world, seq_len=T, seed=1)
    for step, batch in enumerate(take(single, steps)):
        together = {w for r in range(world) for w in per_rank[r][step * B:(step + 1) * B]}
        assert together == {window_key(row) for row in batch["input_ids"]}


@pytest.mark.parametrize("cut", ["mid_epoch", "end_of_epoch", "next_epoch"])
def test_resume_gives_identical_batches(shards, cut):
    straight = PretrainLoader(shards, batch_size=B, seq_len=T, seed=7)
    steps = len(straight)
    k = {"mid_epoch": steps // 2, "end_of_epoch": steps, "next_epoch": steps + 3}[cut]
    it = iter(straight)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(straight.state_dict()))  # a checkpoint stores it as plain data
    expected = [next(it) for _ in range(steps)]  # crosses an epoch boundary in every case

    resumed = PretrainLoader(shards, batch_size=B, seq_len=T, seed=7)
    resumed.load_state_dict(state)
    got = take(resumed, steps)
    for e, g in zip(expected, got):
        for key in e:
            assert torch.equal(e[key], g[key]), key
    assert resumed.state_dict() == straight.state_dict()


def test_resume_with_another_world_size_never_repeats_a_window(shards):
    one = PretrainLoader(shards, batch_size=B, seq_len=T, seed=2)
    done = [window_key(r) for b in take(one, 5) for r in b["input_ids"]]
    state = copy.deepcopy(one.state_dict())
    later = []
    for rank in range(2):
        l = PretrainLoader(shards, batch_size=B, seq_len=T, seed=2, rank=rank, world_size=2)
        l.load_state_dict(state)
        later += [window_key(r) for b in take(l, (one.num_windows - l.cursor) // (2 * B)) for r in b["input_ids"]]
    assert not set(done) & set(later) and len(set(later)) == len(later)


def test_resume_refuses_other_data_or_seed(shards):
    state = PretrainLoader(shards, batch_size=B, seq_len=T, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed is 0 in the saved state but 1 now"):
        PretrainLoader(shards, batch_size=B, seq_len=T, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        PretrainLoader(shards, batch_size=B, seq_len=T + 1, seed=0).load_state_dict(state)


def test_too_little_data_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PretrainLoader(shards, batch_size=64, seq_len=64, world_size=2)


def test_tokenizer_check(data, shards, tmp_path):
    check_tokenizer_matches(shards, data["tok"], model_vocab_size=2048)
    other = wordlevel_tokenizer(tmp_path / "other", 2001)
    with pytest.raises(ValueError, match="made with tokenizer .* hashes to"):
        check_tokenizer_matches(shards, other)
    with pytest.raises(ValueError, match="model vocab_size 1999 is smaller than the tokenizer's 2000"):
        check_tokenizer_matches(shards, model_vocab_size=1999)


def test_missing_or_truncated_shards_are_named(data, tmp_path):
    import shutil

    copy_dir = tmp_path / "train"
    shutil.copytree(data["folder"], copy_dir)
    with pytest.raises(FileNotFoundError, match="pass a split folder"):
        TokenShards(tmp_path)
    with open(copy_dir / "shard_00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"shard_00001.bin: 10 bytes, but index.json says"):
        TokenShards(copy_dir)


def test_token_ids_past_the_vocabulary_and_pickled_offsets_are_named(data, shards, tmp_path):
    import shutil

    from trainer.data.shard_format import shard_names

    copy_dir = tmp_path / "train"
    shutil.copytree(data["folder"], copy_dir)
    tokens = np.memmap(copy_dir / shard_names(0)[0], dtype=shards.dtype, mode="r+")
    tokens[5] = shards.max_token_id + 7
    tokens.flush()
    damaged = TokenShards(copy_dir)
    assert damaged.read(6, 20).tolist() == shards.read(6, 20).tolist()  # what is read is checked, nothing else
    with pytest.raises(ValueError, match=rf"{shard_names(0)[0]}: token 5 is id {shards.max_token_id + 7}, beyond "
                                         rf"the largest id index.json allows \({shards.max_token_id}\)"):
        damaged.read(0, 20)

    offsets = copy_dir / shard_names(1)[1]
    np.save(offsets, np.array([{"not": "offsets"}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=rf"{shard_names(1)[1]}: not a numpy array of document offsets"):
        TokenShards(copy_dir)
