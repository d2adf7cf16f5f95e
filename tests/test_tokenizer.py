"""Tokenizer training: both kinds load with AutoTokenizer, carry the special tokens and round-trip text."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from trainer.data.demo_corpus import build_demo_data
from trainer.data.sources import DataError
from trainer.data.tokenizer import BOS, CHAT_TOKENS, EOS, PAD, tokenizer_hash, train_tokenizer

SAMPLES = [
    "Klusklun lives in Gaidoural. 12 + 7 = 19.",
    "Two  spaces, a\ttab and\n\nnew lines.\n",
    "Unicode: wörld, naïve café — 東京 🙂",
    "A literal <0x0A> and <unk> stay as text.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rows = build_demo_data(seed=1, n_pretrain_docs=600, n_people=12)["pretrain"]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for kind, size in (("bpe", 600), ("sentencepiece", 360)):
        train_tokenizer([corpus], root / kind, kind=kind, vocab_size=size)
        out[kind] = root / kind
    return out


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_trained_tokenizer_loads_with_specials_and_round_trips(trained, kind):
    tok = AutoTokenizer.from_pretrained(str(trained[kind]))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, PAD)
    ids = {tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, *CHAT_TOKENS)}
    assert len(ids) == 3 + len(CHAT_TOKENS) and tok.unk_token_id not in ids
    for text in SAMPLES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok(text)["input_ids"][0] == tok.bos_token_id  # encoding adds BOS like Llama-3
    # Chat markers are single special tokens, never split into pieces.
    chat = tok.apply_chat_template([{"role": "user", "content": "Where does Klusklun live?"}],
                                   tokenize=False, add_generation_prompt=True)
    chat_ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert chat_ids.count(tok.convert_tokens_to_ids("<|start_header_id|>")) == 2
    assert tok.decode(chat_ids) == chat


def test_bpe_learns_the_corpus(trained):
    tok = AutoTokenizer.from_pretrained(str(trained["bpe"]))
    text = " lives in the town. The people who live in"  # frequent in the corpus: merged into few tokens
    assert len(tok(text, add_special_tokens=False)["input_ids"]) < len(text.encode()) / 3


def test_sentencepiece_ids_match_the_sentencepiece_model(trained):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(trained["sentencepiece"] / "sentencepiece.model"))
    tok = AutoTokenizer.from_pretrained(str(trained["sentencepiece"]))
    for text in ("Klusklun lives in Gaidoural.", "12 + 7 = 19.", "Counting from 3 to 9: 3, 4, 5, 6, 7, 8, 9."):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)


def test_tokenizer_hash_identifies_the_vocabulary(trained):
    bpe = AutoTokenizer.from_pretrained(str(trained["bpe"]))
    bpe("warm up padding state", padding=True)  # call-time state must not change the hash
    assert tokenizer_hash(bpe) == tokenizer_hash(trained["bpe"])
    assert tokenizer_hash(trained["bpe"]) != tokenizer_hash(trained["sentencepiece"])


def test_failed_training_leaves_nothing(corpus, tmp_path):
    out = tmp_path / "tok"
    with pytest.raises(DataError, match="Vocabulary size too high"):
        train_tokenizer([corpus], out, kind="sentencepiece", vocab_size=60000)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_refused(corpus, tmp_path):
    with pytest.raises(DataError, match="kind 'wordpiece'"):
        train_tokenizer([corpus], tmp_path / "a", kind="wordpiece", vocab_size=500)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([corpus], tmp_path / "b", vocab_size=100)
    with pytest.raises(DataError, match="no such file"):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "c", vocab_size=500)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="--overwrite"):
        train_tokenizer([corpus], tmp_path / "d", vocab_size=500)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
