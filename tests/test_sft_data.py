"""SFT data: row formats, malformed rows, over-long examples, packing and the resumable rank-sharded loader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.sft_fixtures import make_tokenizer, write_jsonl
from trainer.chat import ensure_chat_template
from trainer.data.sources import DataError
from trainer.objectives import IGNORE_INDEX
from trainer.sft.data import DataReport, Example, load_conversations, load_sft_examples, make_example
from trainer.sft.loader import SFTLoader, collate_packed, pack_rows

ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"prompt": "Capital of Dorvale?", "completion": "Ostin."},
    {"instruction": "Name a colour.",
     "instances": [{"input": "", "output": "Red."}, {"input": "warm", "output": "Orange."}]},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ensure_chat_template(make_tokenizer(tmp_path_factory.mktemp("sftdata")), "llama3")


def test_every_format_becomes_conversations(tmp_path):
    report = DataReport()
    convs = load_conversations([write_jsonl(tmp_path / "mixed.jsonl", ROWS)], report=report)
    assert len(convs) == 5 and report.rows == 4
    assert report.formats == {"messages": 1, "alpaca": 1, "prompt_completion": 1, "self_instruct": 2}
    assert convs[1] == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                        {"role": "assistant", "content": "5"}]
    assert convs[4][0]["content"] == "Name a colour.\n\nwarm" and convs[4][1]["content"] == "Orange."
    # A JSON list file and a datasets folder read the same rows.
    (tmp_path / "rows.json").write_text(json.dumps(ROWS[1:3]))
    assert load_conversations([tmp_path / "rows.json"]) == convs[1:3]
    import datasets

    datasets.Dataset.from_list(ROWS[1:2]).save_to_disk(str(tmp_path / "ds"))
    assert load_conversations([tmp_path / "ds"]) == convs[1:2]


def test_malformed_rows_name_file_and_line_or_are_counted(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n" + json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_conversations([path])
    only_third = tmp_path / "third.jsonl"
    only_third.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(DataError, match=r"third.jsonl:3: 'output' is int, expected a string"):
        load_conversations([only_third])
    report = DataReport()
    assert len(load_conversations([path], skip_bad_rows=True, report=report)) == 1
    assert report.skipped_rows == 2 and "bad.jsonl:2" in report.skipped_examples[0]
    with pytest.raises(DataError, match=r"unknown.jsonl:1: cannot tell the row's format"):
        load_conversations([write_jsonl(tmp_path / "unknown.jsonl", [{"text": "hi"}])])
    with pytest.raises(DataError, match="no such file"):
        load_conversations([tmp_path / "missing.jsonl"])


def test_overlong_examples_truncated_or_dropped_and_counted(tmp_path, tok):
    long = {"prompt": "Say it.", "completion": "answer " * 60}
    path = write_jsonl(tmp_path / "long.jsonl", [ROWS[2], long])
    examples, report = load_sft_examples([path], tok, seq_len=48, overlong="truncate")
    assert report.truncated == 1 and len(examples) == 2 and max(len(e) for e in examples) == 48
    examples, report = load_sft_examples([path], tok, seq_len=48, overlong="drop")
    assert report.dropped_overlong == 1 and len(examples) == 1
    # Labels are shifted for next-token prediction and ignore the prompt.
    ex = examples[0]
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(targets) == "Ostin.<|eot_id|>"
    first = int(np.flatnonzero(ex.labels != IGNORE_INDEX)[0])
    assert ex.labels[first] == ex.input_ids[first + 1] and ex.labels[-1] == IGNORE_INDEX


def _examples(lengths: list[int]) -> list[Example]:
    rng = np.random.default_rng(0)
    return [make_example(list(rng.integers(5, 50, n)), list(rng.integers(5, 50, n))) for n in lengths]


def test_packing_fills_rows_and_keeps_documents_apart():
    lengths = [10, 30, 25, 5, 40, 12, 8]
    rows = pack_rows(lengths, range(len(lengths)), seq_len=48)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 48 for r in rows) and len(rows) < len(lengths)
    exs = _examples(lengths)
    batch = collate_packed([[exs[i] for i in r] for r in rows], seq_len=48, pad_id=0)
    row0 = rows[0]
    assert batch["position_ids"][0, :lengths[row0[0]]].tolist() == list(range(lengths[row0[0]]))
    assert batch["position_ids"][0, lengths[row0[0]]] == 0  # the next example restarts
    assert batch["document_ids"][0, lengths[row0[0]]] == 1
    used = sum(lengths[i] for i in row0)
    assert (batch["labels"][0, used:] == IGNORE_INDEX).all() and (batch["input_ids"][0, used:] == 0).all()


@pytest.mark.parametrize("packing", [True, False])
def test_loader_resumes_exactly_and_shards_ranks(packing):
    exs = _examples([int(n) for n in np.random.default_rng(1).integers(4, 30, 60)])
    args = dict(batch_size=2, seq_len=32, pad_id=0, packing=packing, seed=3)
    straight = SFTLoader(exs, **args)
    it = iter(straight)
    for _ in range(3):
        next(it)
    state = straight.state_dict()
    rest = [next(it) for _ in range(8)]  # crosses an epoch boundary
    resumed = SFTLoader(exs, **args)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = iter(resumed)
    for a in rest:
        b = next(again)
        assert all(torch.equal(a[k], b[k]) for k in a)
    # Two ranks split one global step's rows between them without overlap.
    r0, r1 = (next(iter(SFTLoader(exs, rank=r, world_size=2, **args))) for r in (0, 1))
    rows = straight.epoch_rows(0)[:4]
    want = [straight.make_batch(rows[0::2]), straight.make_batch(rows[1::2])]
    assert torch.equal(r0["input_ids"], want[0]["input_ids"]) and torch.equal(r1["input_ids"], want[1]["input_ids"])
    with pytest.raises(ValueError, match="fingerprint"):
        SFTLoader(exs[1:] + exs[:1], **args).load_state_dict(state)
