"""prepare_data: exact token streams, document offsets, dtype choice, bad rows, and nothing half-written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainer.data.prepare import prepare_data
from trainer.data.sources import DataError, load_documents
from trainer.data.tokenizer import BOS, EOS, PAD, tokenizer_hash

REPO = Path(__file__).resolve().parents[1]


def wordlevel_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A tokenizer whose token for word "w<i>" is id i (ids 0-2 are BOS/EOS/PAD): documents with known ids."""
    vocab = {BOS: 0, EOS: 1, PAD: 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                  unk_token="<unk>")
    tok.save_pretrained(str(folder))
    return folder


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def docs_as_words(docs: list[list[int]]) -> list[str]:
    return [json.dumps({"text": " ".join(f"w{i}" for i in d)}) for d in docs]


def read_split(folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """(index, concatenated tokens, global document starts) of one split, read independently of the loader."""
    index = json.loads((folder / "index.json").read_text())
    tokens, starts, offset = [], [], 0
    for shard in index["shards"]:
        tokens.append(np.fromfile(folder / shard["file"], dtype=index["dtype"]))
        starts.append(np.load(folder / shard["doc_index"]) + offset)
        offset += shard["tokens"]
    return index, np.concatenate(tokens), np.concatenate(starts)


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory) -> Path:
    return wordlevel_tokenizer(tmp_path_factory.mktemp("wtok") / "tok", 1000)


@pytest.fixture(scope="module")
def known_docs() -> list[list[int]]:
    rng = np.random.default_rng(3)
    return [rng.integers(4, 1000, size=rng.integers(1, 40)).tolist() for _ in range(60)]


def test_shards_hold_bos_doc_eos_per_document(word_tok, known_docs, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", docs_as_words(known_docs))
    report = prepare_data([src], word_tok, tmp_path / "out", val_fraction=0.25, shard_tokens=200, seed=5,
                          show_progress=False)
    seen = []
    for split in ("train", "val"):
        index, stream, starts = read_split(tmp_path / "out" / split)
        assert len(index["shards"]) > 1 or split == "val"  # small shard_tokens forces several shards
        assert index["dtype"] == "uint16" and index["vocab_size"] == 1000
        assert (index["bos_id"], index["eos_id"]) == (0, 1)
        assert index["tokenizer_hash"] == tokenizer_hash(word_tok)
        assert index["sources"] == [str(src.resolve())]
        assert index["tokens"] == len(stream) == report["splits"][split]["tokens"]
        assert index["documents"] == len(starts) == report["splits"][split]["documents"]
        assert index["max_token_id"] == int(stream.max())
        # Cut the stream at the stored offsets: every piece is BOS + a known document + EOS.
        pieces = np.split(stream, starts[1:])
        for piece in pieces:
            assert piece[0] == 0 and piece[-1] == 1
            seen.append(piece[1:-1].tolist())
        assert all(s["tokens"] >= 200 for s in index["shards"][:-1])
    assert sorted(seen) == sorted(known_docs)  # train and val together: every document exactly once
    assert report["documents"] == len(known_docs) and report["skipped_rows"] == 0
    assert report["splits"]["val"]["documents"] == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # no temp folder left


def test_split_is_deterministic_in_the_seed(word_tok, known_docs, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", docs_as_words(known_docs))
    vals = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        prepare_data([src], word_tok, tmp_path / name, val_fraction=0.2, seed=seed, show_progress=False)
        vals.append(read_split(tmp_path / name / "val")[1].tolist())
    assert vals[0] == vals[1] and vals[0] != vals[2]


def test_large_vocab_is_stored_as_uint32(tmp_path):
    tok = wordlevel_tokenizer(tmp_path / "tok", 70_000)
    src = write_jsonl(tmp_path / "docs.jsonl", docs_as_words([[69_999, 65_536, 5], [65_535, 4]]))
    prepare_data([src], tok, tmp_path / "out", val_fraction=0.0, show_progress=False)
    index, stream, _ = read_split(tmp_path / "out" / "train")
    assert index["dtype"] == "uint32"
    assert stream.tolist() == [0, 69_999, 65_536, 5, 1, 0, 65_535, 4, 1]
    assert not (tmp_path / "out" / "val").exists()


BAD_ROWS = [
    ('{"text": "w5 w6"', "not valid JSON"),
    ('{"body": "w5"}', "no 'text' field"),
    ('{"text": 7}', "'text' is int, expected a string"),
    ('["w5"]', "a JSON array; expected JSON Lines"),
    ('"w5"', "expected a JSON object, got str"),
]


@pytest.mark.parametrize("bad,reason", BAD_ROWS)
def test_malformed_row_names_file_and_line_and_writes_nothing(word_tok, tmp_path, bad, reason):
    src = write_jsonl(tmp_path / "docs.jsonl", ['{"text": "w4 w5"}', "", '{"text": "w6"}', bad, '{"text": "w7"}'])
    with pytest.raises(DataError) as err:
        prepare_data([src], word_tok, tmp_path / "out", show_progress=False)
    assert str(err.value).startswith(f"{src}:4: {reason}")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_skip_bad_rows_counts_them(word_tok, tmp_path):
    lines = ['{"text": "w4 w5"}'] + [bad for bad, _ in BAD_ROWS] + ['{"text": "w6", "other": 1}', '{"text": "w7"}']
    src = write_jsonl(tmp_path / "docs.jsonl", lines)
    report = prepare_data([src], word_tok, tmp_path / "out", val_fraction=0.0, skip_bad_rows=True,
                          show_progress=False)
    assert report["skipped_rows"] == len(BAD_ROWS)
    assert report["skipped_examples"][0].startswith(f"{src}:2: ")
    assert report["documents"] == 3
    assert read_split(tmp_path / "out" / "train")[1].tolist() == [0, 4, 5, 1, 0, 6, 1, 0, 7, 1]


def test_text_modes_parquet_and_saved_datasets(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first para\nstill first\n\n\n\nsecond\n\nthird\n", encoding="utf-8")
    cache = tmp_path / "cache"
    docs = {m: load_documents([txt], text_mode=m, cache_dir=cache / m)[0]["text"] for m in ("paragraph", "line", "file")}
    assert docs["paragraph"] == ["first para\nstill first", "second", "third"]
    assert docs["line"] == ["first para", "still first", "second", "third"]
    assert docs["file"] == [txt.read_text()]

    pq.write_table(pa.table({"body": ["w4", None, "w5"]}), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b.parquet:row 2: 'body' is null"):
        load_documents([tmp_path / "b.parquet"], text_field="body", cache_dir=cache / "pq")
    ds, found = load_documents([tmp_path / "b.parquet"], text_field="body", skip_bad_rows=True, cache_dir=cache / "pq2")
    assert ds["text"] == ["w4", "w5"] and found.skipped_rows == 1
    with pytest.raises(DataError, match="no 'text' column"):
        load_documents([tmp_path / "b.parquet"], cache_dir=cache / "pq3")

    datasets.Dataset.from_dict({"text": ["w8 w9", "w10"]}).save_to_disk(str(tmp_path / "saved"))
    ds, _ = load_documents([txt, tmp_path / "saved"], text_mode="line", cache_dir=cache / "mix")
    assert ds["text"] == ["first para", "still first", "second", "third", "w8 w9", "w10"]

    # A plain folder (a cleaning run's output) reads as its files in sorted order; gzip JSONL included.
    import gzip

    folder = tmp_path / "cleaned"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "00001.jsonl", ['{"text": "w2"}'])
    with gzip.open(folder / "00000.jsonl.gz", "wt") as f:
        f.write('{"text": "w1"}\n')
    write_jsonl(folder / "sub" / "00000.jsonl", ['{"text": "w3"}'])
    (folder / "notes.log").write_text("not an input")
    assert load_documents([folder], cache_dir=cache / "dir")[0]["text"] == ["w1", "w2", "w3"]


def test_refuses_existing_output_and_unknown_inputs(word_tok, tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", ['{"text": "w4"}', '{"text": "w5"}'])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious").write_text("x")
    with pytest.raises(DataError, match="--overwrite"):
        prepare_data([src], word_tok, tmp_path / "out", show_progress=False)
    with pytest.raises(DataError, match="unknown input type"):
        prepare_data([tmp_path / "out" / "precious"], word_tok, tmp_path / "new", show_progress=False)
    prepare_data([src], word_tok, tmp_path / "out", overwrite=True, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]


def test_cli_reports_and_fails_cleanly(word_tok, tmp_path, monkeypatch, capsys):
    import runpy

    src = write_jsonl(tmp_path / "docs.jsonl", ['{"text": "w4 w5"}', "{oops", '{"text": "w6"}'])
    args = ["--tokenizer", str(word_tok), "--out", str(tmp_path / "out"), str(src)]
    # Failure path in-process (same code as the command line, without another interpreter start).
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", *args])
    with pytest.raises(SystemExit) as code:
        runpy.run_path(str(REPO / "launch" / "prepare_data.py"), run_name="__main__")
    assert code.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {src}:2: not valid JSON")
    assert not (tmp_path / "out").exists()
    # Success through a real `python launch/prepare_data.py` from the repository root.
    good = subprocess.run([sys.executable, "launch/prepare_data.py", *args, "--skip-bad-rows"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "skipped 1 bad row" in good.stdout and "train" in good.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["documents"] == 2


def test_real_transcripts_round_trip_through_shards(shared_data, tmp_path):
    """Real, uneven text (hh-rlhf transcripts, gzip JSONL): every document decodes back from the shards."""
    from transformers import AutoTokenizer

    from trainer.data.tokenizer import train_tokenizer

    src = shared_data / "hh-rlhf-harmless-2000.jsonl.gz"
    train_tokenizer([src], tmp_path / "tok", kind="bpe", vocab_size=1024, text_field="chosen")
    report = prepare_data([src], tmp_path / "tok", tmp_path / "out", text_field="chosen", val_fraction=0.1,
                          num_proc=2, show_progress=False)
    assert report["documents"] == 2000 and report["splits"]["val"]["documents"] == 200
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    import gzip

    with gzip.open(src, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["chosen"] for line in f]
    index, stream, starts = read_split(tmp_path / "out" / "train")
    decoded = [tok.decode(piece[1:-1].tolist()) for piece in np.split(stream, starts[1:])]
    assert set(decoded) <= set(texts) and len(decoded) == 1800
    assert index["tokens"] < sum(len(t.encode()) for t in decoded) / 2  # the tokenizer really compresses


def test_demo_data_is_seeded_small_and_true(tmp_path):
    import re

    from trainer.data.demo_corpus import write_demo_data

    counts = write_demo_data(tmp_path / "a", seed=0)
    write_demo_data(tmp_path / "b", seed=0)
    write_demo_data(tmp_path / "c", seed=1, n_pretrain_docs=100)
    for name in counts:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "sft.jsonl").read_bytes() != (tmp_path / "c" / "sft.jsonl").read_bytes()
    assert sum(p.stat().st_size for p in (tmp_path / "a").iterdir()) < 3_000_000

    def rows(name):
        return [json.loads(line) for line in (tmp_path / "a" / name).read_text().splitlines()]

    world = {p["name"]: p for p in rows("world.jsonl")}
    lives = re.compile(r"(\w+) lives in (\w+)\.")
    for doc in rows("pretrain.jsonl"):
        for name, city in lives.findall(doc["text"]):
            assert world[name]["city"] == city
    sums = re.compile(r"^(\d+) \+ (\d+) = (-?\d+)\.$")
    checked = 0
    for sft, dpo in zip(rows("sft.jsonl") + rows("sft_eval.jsonl"), rows("dpo.jsonl") + rows("dpo_eval.jsonl")):
        user, assistant = sft["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert dpo["prompt"] == user["content"] and dpo["chosen"] == assistant["content"] != dpo["rejected"]
        if m := sums.match(dpo["chosen"]):
            assert int(m[1]) + int(m[2]) == int(m[3])
            wrong = sums.match(dpo["rejected"])
            assert int(wrong[1]) + int(wrong[2]) != int(wrong[3])
            checked += 1
        if m := lives.match(dpo["chosen"]):
            assert world[m[1]]["city"] == m[2] and lives.match(dpo["rejected"])[2] != m[2]
            checked += 1
    assert checked > 300
    # Held-out questions are about facts that are not asked in the training split.
    train_prompts = {r["prompt"] for r in rows("dpo.jsonl")}
    assert not train_prompts & {r["prompt"] for r in rows("dpo_eval.jsonl")}


def test_demo_reward_pairs_add_judgeable_rejections():
    """reward.jsonl: per question the DPO pair, an answer about something else (another name, other operands)
    and the right answer running on; the held-out split asks about the same facts as dpo_eval.jsonl."""
    from trainer.data.demo_corpus import build_demo_data

    data = build_demo_data(seed=0, n_pretrain_docs=50)
    dpo = {(r["prompt"], r["chosen"], r["rejected"]) for r in data["dpo"]}
    kinds = {"value": 0, "run_on": 0, "off_topic": 0}
    for r in data["reward"]:
        assert r["chosen"] != r["rejected"]
        if (r["prompt"], r["chosen"], r["rejected"]) in dpo:
            kinds["value"] += 1
        elif r["rejected"].startswith(r["chosen"] + " "):
            kinds["run_on"] += 1
        else:
            kinds["off_topic"] += 1
            name = r["prompt"].split()[-1].rstrip("?.").removesuffix("'s")
            if r["chosen"].startswith(name):  # a fact: the rejected answer names someone else
                assert not r["rejected"].startswith(name)
    assert kinds["value"] == kinds["run_on"] == kinds["off_topic"] == len(data["dpo"])
    assert {r["prompt"] for r in data["reward_eval"]} == {r["prompt"] for r in data["dpo_eval"]}
