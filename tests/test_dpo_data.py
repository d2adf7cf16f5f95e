"""Preference data: row shapes, counted handling of unusable pairs, tokenization, batches and the loader."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.sft_fixtures import make_tokenizer
from trainer.chat import ensure_chat_template
from trainer.data.sources import DataError
from trainer.dpo.data import (PairReport, PreferencePair, TokenPair, load_pairs, load_token_pairs, parse_row,
                              split_transcript, tokenize_pair, tokenize_pairs)
from trainer.dpo.loader import PairBatches, PairLoader, collate_pairs
from trainer.objectives import IGNORE_INDEX

HH_ROW = {
    "chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant: It is 4.",
    "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: what is 2+2?\n\nAssistant: It is 5, obviously.",
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ensure_chat_template(make_tokenizer(tmp_path_factory.mktemp("tok")), "llama3")


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_transcript_pairs_split_at_the_last_shared_assistant_turn():
    shape, pair = parse_row(HH_ROW)
    assert shape == "transcript"
    assert pair.prompt == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                           {"role": "user", "content": "what is 2+2?"}]
    assert (pair.chosen, pair.rejected) == ("It is 4.", "It is 5, obviously.")
    # Responses that start alike still split at the marker, not inside the shared words.
    prompt, c, r = split_transcript("\n\nHuman: q\n\nAssistant: It is A", "\n\nHuman: q\n\nAssistant: It is B")
    assert prompt.endswith("Assistant:") and c == " It is A" and r == " It is B"
    with pytest.raises(ValueError, match="share no 'Assistant:'"):
        parse_row({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"})


def test_explicit_and_conversation_shapes():
    shape, pair = parse_row({"prompt": "Q?", "chosen": "A", "rejected": "B"})
    assert shape == "explicit" and pair.prompt == [{"role": "user", "content": "Q?"}]
    sys_user = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Q?"}]
    shape, pair = parse_row({"prompt": sys_user, "chosen": [{"role": "assistant", "content": "A"}],
                             "rejected": [{"role": "assistant", "content": "B"}]})
    assert shape == "explicit" and pair.prompt == sys_user and (pair.chosen, pair.rejected) == ("A", "B")
    shape, pair = parse_row({"chosen": sys_user + [{"role": "assistant", "content": "A"}],
                             "rejected": sys_user + [{"role": "assistant", "content": "B"}]})
    assert shape == "conversation" and pair.prompt == sys_user and (pair.chosen, pair.rejected) == ("A", "B")
    with pytest.raises(ValueError, match="exactly one assistant message"):
        parse_row({"prompt": "Q", "chosen": [{"role": "user", "content": "A"}], "rejected": "B"})


def test_malformed_rows_name_file_and_line_or_are_counted(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{not json",
                                         {"prompt": "q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: not valid JSON"):
        load_pairs([path])
    report = PairReport()
    pairs = load_pairs([path], skip_bad_rows=True, report=report)
    assert len(pairs) == 1 and report.skipped_rows == 2 and report.rows == 3
    assert "p.jsonl:3: missing 'rejected'" in report.examples[1]


def test_identical_and_empty_pairs_are_counted_or_refused(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                         {"prompt": "q", "chosen": "same ", "rejected": "same"},
                                         {"prompt": "q", "chosen": "", "rejected": "b"},
                                         {"prompt": " ", "chosen": "a", "rejected": "b"}])
    report = PairReport()
    assert len(load_pairs([path], report=report)) == 1
    assert (report.identical, report.empty) == (1, 2)
    assert "identical" in report.summary() and "2 empty dropped" in report.summary()
    with pytest.raises(DataError, match=r"p\.jsonl:2: chosen and rejected responses are identical"):
        load_pairs([path], on_identical="error")
    with pytest.raises(DataError, match=r"p\.jsonl:3: empty chosen"):
        load_pairs([path], on_empty="error")


def test_tokenized_pair_shares_the_prompt_and_labels_only_the_response(tokenizer):
    pair = PreferencePair([{"role": "user", "content": "Where does Ana live?"}], "Ana lives in Oslo.", "No idea.")
    tp = tokenize_pair(tokenizer, pair)
    prompt_text = tokenizer.decode(tp.prompt)
    assert prompt_text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(tp.chosen) == "Ana lives in Oslo.<|eot_id|>"
    assert tokenizer.decode(tp.rejected) == "No idea.<|eot_id|>"
    batch = collate_pairs([tp, tp], pad_id=tokenizer.pad_token_id)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == labels.shape and ids.shape[0] == 4
    for row, resp in ((0, tp.chosen), (2, tp.rejected)):
        target = labels[row][labels[row] != IGNORE_INDEX]
        assert target.tolist() == resp.tolist()
        # Shifted: the label at t is the token the model sees at t + 1.
        at = (labels[row] != IGNORE_INDEX).nonzero().flatten()
        assert ids[row, at[:-1] + 1].tolist() == target[:-1].tolist()
        assert ids[row, at[0]].item() == tp.prompt[-1]


def test_overlong_pairs_truncate_drop_or_fail_and_are_counted(tokenizer):
    long = PreferencePair([{"role": "user", "content": "word " * 60}], "yes " * 40, "no")
    short = PreferencePair([{"role": "user", "content": "q"}], "a", "b", where="f.jsonl:2")
    report = PairReport()
    out = tokenize_pairs(tokenizer, [long, short], max_len=48, max_prompt_len=24, report=report)
    assert report.truncated == 1 and len(out) == 2
    assert len(out[0].prompt) == 24 and out[0].longest <= 48
    assert out[0].prompt[-3:].tolist() == tokenize_pair(tokenizer, long).prompt[-3:].tolist()  # keeps the end
    report = PairReport()
    assert len(tokenize_pairs(tokenizer, [long, short], max_len=48, max_prompt_len=24, overlong="drop",
                              report=report)) == 1
    assert report.dropped_overlong == 1
    long.where = "f.jsonl:1"
    with pytest.raises(DataError, match=r"f\.jsonl:1: pair has"):
        tokenize_pairs(tokenizer, [long], max_len=48, max_prompt_len=24, overlong="error")


def _pairs(n: int, seed: int = 0) -> list[TokenPair]:
    rng = np.random.default_rng(seed)
    return [TokenPair(rng.integers(3, 50, rng.integers(2, 6)), rng.integers(3, 50, rng.integers(1, 5)),
                      rng.integers(3, 50, rng.integers(1, 5))) for _ in range(n)]


def _pair_ids(batch) -> list[tuple]:
    B = batch["input_ids"].shape[0] // 2
    return [tuple(batch["input_ids"][i].tolist()) for i in range(B)]


def test_loader_shards_ranks_disjointly_and_resumes_exactly():
    pairs = _pairs(21)
    table = torch.arange(42, dtype=torch.float32).view(21, 2)
    loaders = [PairLoader(pairs, 2, pad_id=0, seed=3, rank=r, world_size=2, ref_logps=table) for r in range(2)]
    its = [iter(ld) for ld in loaders]
    seen = []
    for _ in range(5):  # one epoch: 21 // 4 steps
        for it in its:
            batch = next(it)
            assert batch["input_ids"].shape[0] == 4
            seen.extend(batch["ref_chosen_logps"].tolist())
    assert len(seen) == len(set(seen)) == 20  # disjoint across ranks, no repeats within an epoch
    # The reference values travel with their pair: rejected = chosen + 1 in this table.
    batch = next(its[0])
    torch.testing.assert_close(batch["ref_rejected_logps"], batch["ref_chosen_logps"] + 1)

    straight = PairLoader(pairs, 3, pad_id=0, seed=5)
    it = iter(straight)
    [next(it) for _ in range(9)]  # crosses an epoch boundary
    state = straight.state_dict()
    expected = [_pair_ids(next(it)) for _ in range(4)]
    resumed = PairLoader(pairs, 3, pad_id=0, seed=5)
    resumed.load_state_dict(state)
    got_it = iter(resumed)
    assert [_pair_ids(next(got_it)) for _ in range(4)] == expected
    with pytest.raises(ValueError, match="fingerprint"):
        PairLoader(_pairs(21, seed=1), 3, pad_id=0, seed=5).load_state_dict(state)


def test_validation_batches_visit_every_pair_once_with_equal_batch_counts():
    pairs, table = _pairs(11), torch.arange(22, dtype=torch.float32).view(11, 2)
    per_rank = [list(PairBatches(pairs, 2, pad_id=0, rank=r, world_size=3, ref_logps=table)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1  # ZeRO-3 needs the same number of forwards everywhere
    real = [v for batches in per_rank for b in batches
            for v, m in zip(b["ref_chosen_logps"].tolist(), b["pair_mask"].tolist()) if m]
    assert sorted(real) == table[:, 0].tolist()


def test_real_hh_rlhf_transcripts_parse(shared_data, tokenizer):
    report = PairReport()
    pairs = load_pairs([shared_data / "hh-rlhf-harmless-2000.jsonl.gz"], report=report)
    assert report.rows == 2000 and report.shapes == {"transcript": len(pairs)}
    assert len(pairs) + report.identical + report.empty == 2000 and len(pairs) > 1900
    assert all(p.prompt[-1]["role"] == "user" and p.chosen != p.rejected for p in pairs)
    tokens, rep = load_token_pairs([shared_data / "hh-rlhf-harmless-2000.jsonl.gz"], tokenizer, max_len=256,
                                   max_prompt_len=128)
    assert len(tokens) == len(pairs) and rep.truncated > 0
    assert max(t.longest for t in tokens) <= 256
