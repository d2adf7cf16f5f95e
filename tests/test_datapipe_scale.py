"""Corpus-scale cleaning: shared tokenization (same words, sentences and decisions as datatrove's own),
keyword filter, quality classifier, PII look-alikes by structure and context."""
from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from datapipe import run_pipeline, validate_config
from datapipe.config import ConfigError
from datapipe.pii import default_patterns, scrub
from datapipe.synthetic import english_doc, web_corpus
from datapipe.tokens import SharedTokenizer, shared_or_stock

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl_folder(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.rglob("*.jsonl")) for line in f.read_text().splitlines()]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], check=False, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)


# ----------------------------------------------------------------------------- shared tokenization

TRICKY = ["", "   ", "Hello!!! World... ok?! \"Quoted.\" Next one", "e.g. U.S. Mr. Smith went. (Yes.) No",
          "a\n\nb. c", "Ω≈ 日本語。次の文。", "...", "tabs\tand\u00a0nbsp. Then"]


def test_shared_tokenizer_equals_datatrove_spacy():
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    rows = web_corpus(seed=3)
    texts = [r["text"] for r in rows[::20]]
    texts += [line for t in texts[:6] for line in t.splitlines()] + TRICKY
    stock, shared = load_word_tokenizer("en"), SharedTokenizer("en")
    for text in texts:
        assert shared.word_tokenize(text) == stock.word_tokenize(text), text[:80]
        assert shared.sent_tokenize(text) == stock.sent_tokenize(text), text[:80]
        assert shared.span_tokenize(text) == stock.span_tokenize(text), text[:80]


def test_one_parse_per_text_and_vocabulary_bound():
    tok = SharedTokenizer("en", max_lexemes=50)  # its own process state: a tiny vocabulary bound
    state = tok.state
    text = english_doc(random.Random(0))
    words = tok.word_tokenize(text)
    tok.sent_tokenize(text), tok.span_tokenize(text)
    words.append("mutated by a caller")
    assert state.parses == 1 and state.hits == 2
    assert "mutated by a caller" not in tok.word_tokenize(text)
    first_nlp = state.nlp
    tok.word_tokenize(english_doc(random.Random(1)))  # > 50 lexemes by now: the tokenizer is rebuilt
    assert state.nlp is not first_nlp and state.parses == 2


def test_shared_only_where_datatrove_uses_plain_spacy():
    assert isinstance(shared_or_stock("en"), SharedTokenizer)
    assert shared_or_stock("not-a-language") == "not-a-language"


def test_windowed_language_id_equals_py3langid():
    """Same feature counts in the same order, hence the same (language, score), as py3langid's own walk."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier, visit_counts

    from datapipe.lid import load_identifier

    ours = load_identifier()
    theirs = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    rng = random.Random(0)
    texts = [r["text"] for r in web_corpus(seed=3)[::5]] + TRICKY
    texts += ["Der schnelle braune Fuchs springt. Привет, мир!", "SHOUTING TEXT IS LOWERED", "x" * 5000]
    texts += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))).decode("utf-8", "replace")
              for _ in range(40)]
    for text in texts:
        data = theirs._encode(text)
        expected = visit_counts(theirs.tk_nextmove, theirs._rowbase, theirs.tk_output, data) or {}
        assert list(ours._visits(data).items()) == list(expected.items()), text[:80]
        assert ours.classify(text) == theirs.classify(text), text[:80]


def test_trie_depth_is_the_longest_shortest_path():
    import numpy as np

    from datapipe.lid import trie_depth

    # a chain 0 -a-> 1 -a-> 2 -a-> 3; any other byte (and every byte from 3) goes back to 0
    rowbase = np.arange(4) * 256
    nextmove = np.zeros(4 * 256, np.uint32)
    for state in range(3):
        nextmove[state * 256 + ord("a")] = state + 1
    assert trie_depth(nextmove, rowbase) == 3
    nextmove[ord("b")] = 3  # a shortcut: 3 is one byte from the start
    assert trie_depth(nextmove, rowbase) == 2


@pytest.mark.slow
def test_web_recipe_decisions_equal_datatrove_tokenization(tmp_path):
    """The whole web recipe with shared vs stock tokenization: same kept texts, same removals per step."""
    rows = web_corpus(seed=5, n_unique=60, n_exact=6, near_per_rate=4, n_foreign=8)
    write_jsonl(tmp_path / "raw" / "a.jsonl", rows[0::2])
    write_jsonl(tmp_path / "raw" / "b.jsonl", rows[1::2])

    def run(tokenizer: str) -> tuple[dict, dict]:
        out = tmp_path / tokenizer
        report = run_pipeline(validate_config({
            "recipe": "web", "tokenizer": tokenizer, "input": {"path": str(tmp_path / "raw")},
            "output": {"path": str(out)}, "executor": {"kind": "local", "workers": 1}}))
        kept = {r["id"]: r["text"] for r in read_jsonl_folder(out / "data")}
        removed = {s["step"]: {r["id"] for r in read_jsonl_folder(out / "removed" / s["step"])}
                   for s in report["steps"]}
        return kept, removed

    kept, removed = run("shared")
    assert run("datatrove") == (kept, removed)
    assert sum(map(len, removed.values())) > 10  # the corpus exercised the filters


# ----------------------------------------------------------------------------- keywords


def _pipeline_with(tmp_path: Path, rows: list[dict], steps: list) -> dict:
    write_jsonl(tmp_path / "raw" / "a.jsonl", rows)
    return run_pipeline(validate_config({"recipe": "custom", "steps": steps, "input": {"path": str(tmp_path / "raw")},
                                         "output": {"path": str(tmp_path / "out")}}))


def test_keyword_filter_boundaries_case_and_counts(tmp_path):
    rows = [
        {"id": "casino", "text": "Win big at the Casino tonight."},  # block, any case ("casino" is lower case)
        {"id": "classic", "text": "A classic recipe for bread, about baking."},  # "class" is not a whole word
        {"id": "apple-fruit", "text": "An apple a day, about baking pies."},  # "Apple" blocks only as written
        {"id": "apple-brand", "text": "Apple released a phone about baking."},
        {"id": "multi", "text": "Buy   NOW, about baking!"},  # multi-word keyword across spaces
        {"id": "off-topic", "text": "Nothing relevant here at all."},  # no allow keyword
        {"id": "topic", "text": "Baking bread is about Baking and patience."},
    ]
    report = _pipeline_with(tmp_path, rows, [{"keywords": {
        "block": ["casino", "class", "Apple", "buy now"], "allow": ["baking"]}}])
    kept = {r["id"] for r in read_jsonl_folder(tmp_path / "out" / "data")}
    assert kept == {"classic", "apple-fruit", "topic"}
    step = report["steps"][0]
    assert {k: v["docs"] for k, v in step["removed"].items()} == {"blocked_keyword": 3, "no_allowed_keyword": 1}
    # documents containing each keyword (Apple-brand also had "baking" but block wins)
    keyword_counts = {k: v for k, v in step["counts"].items() if k.startswith("keyword_")}
    assert keyword_counts == {"keyword_block:casino": 1, "keyword_block:Apple": 1, "keyword_block:buy now": 1,
                              "keyword_allow:baking": 5}
    topic = next(r for r in read_jsonl_folder(tmp_path / "out" / "data") if r["id"] == "topic")
    assert topic["text"].startswith("Baking")


def test_keyword_list_errors_name_the_key(tmp_path):
    (tmp_path / "raw").mkdir()
    base = {"recipe": "custom", "input": {"path": str(tmp_path / "raw")}, "output": {"path": str(tmp_path / "o")}}
    with pytest.raises(ConfigError, match=r"steps\.keywords: block: expected a list of strings, got str 'spam'"):
        validate_config({**base, "steps": [{"keywords": {"block": "spam"}}]})
    with pytest.raises(ConfigError, match=r"steps\.keywords: allow_file: .*missing.txt not found"):
        validate_config({**base, "steps": [{"keywords": {"allow_file": str(tmp_path / "missing.txt")}}]})
    with pytest.raises(ConfigError, match=r"steps\.keywords: case: expected"):
        validate_config({**base, "steps": [{"keywords": {"block": ["x"], "case": "upper"}}]})


# ----------------------------------------------------------------------------- quality classifier

GOOD = ["The committee reviewed the annual report and approved the budget for the new library.",
        "Researchers measured the river's flow over three seasons and published their data.",
        "The recipe explains how to knead the dough and why resting it improves the bread.",
        "Students compared two translations of the poem and discussed the choice of words."]
BAD = ["CLICK HERE!!! win $$$ free prize now now now",
       "buy cheap pills online best price click click",
       "hot singles in your area click now free free",
       "you are a winner claim prize call now txt WIN"]


def _generated(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    good = [f"{rng.choice(GOOD)} {english_doc(rng)[:200]}" for _ in range(n)]
    bad = [" ".join(rng.choice(BAD).split()[:rng.randint(4, 9)]) + f" {rng.randint(0, 999)}" for _ in range(n)]
    return good, bad


def test_train_classifier_and_filter_step(tmp_path, capsys):
    good, bad = _generated(120, 0)
    write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in good])
    (tmp_path / "bad.txt").write_text("\n".join(bad) + "\n")
    model = tmp_path / "quality"
    proc = cli("launch/train_quality_classifier.py", "--positive", str(tmp_path / "good.jsonl"),
               "--negative", str(tmp_path / "bad.txt"), "--out", str(model), "--epoch", "10", "--dim", "16")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((model / "classifier.json").read_text())
    assert meta["held_out"]["precision"] >= 0.9 and meta["held_out"]["recall"] >= 0.9, meta
    assert "precision" in proc.stdout and "recall" in proc.stdout
    # an existing model folder is never replaced
    code, err = _train_cli(capsys, "--positive", str(tmp_path / "good.jsonl"), "--negative",
                           str(tmp_path / "bad.txt"), "--out", str(model))
    assert code == 2 and "refusing to replace" in err

    new_good, new_bad = _generated(20, 1)
    rows = [{"id": f"g{i}", "text": t} for i, t in enumerate(new_good)] + \
           [{"id": f"b{i}", "text": t} for i, t in enumerate(new_bad)]
    report = _pipeline_with(tmp_path, rows, [{"quality_classifier": {"model": str(model)}}])
    kept = read_jsonl_folder(tmp_path / "out" / "data")
    kept_ids = {r["id"] for r in kept}
    assert sum(i.startswith("g") for i in kept_ids) >= 18 and sum(i.startswith("b") for i in kept_ids) <= 2
    assert report["steps"][0]["removed"]["low_quality"]["docs"] == 40 - len(kept_ids)
    removed = read_jsonl_folder(tmp_path / "out" / "removed" / "quality_classifier")
    assert all(r["metadata"]["quality_score"] < 0.5 for r in removed)


def test_sms_spam_held_out_precision_recall(shared_data, tmp_path):
    path = shared_data / "sms-spam-collection-5000.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    from datapipe.quality import train

    held = train([r["msg"] for r in rows if r["label"] == "ham"], [r["msg"] for r in rows if r["label"] == "spam"],
                 tmp_path, epoch=10, dim=32)
    # ham is the positive class: keeping messages at >= 0.5 keeps real ones and few spam
    assert held.positives > 500 and held.negatives > 80
    assert held.precision >= 0.95 and held.recall >= 0.95, held


def _train_cli(capsys, *argv: str) -> tuple[int, str]:
    """launch/train_quality_classifier.py in this process (its subprocess path is covered above)."""
    sys.path.insert(0, str(REPO / "launch"))
    try:
        import train_quality_classifier
    finally:
        sys.path.pop(0)
    from trainer.cli import guarded

    try:
        code = guarded(lambda: train_quality_classifier.main(list(argv)))
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err.strip()


def test_classifier_bad_input_is_one_line(tmp_path, capsys):
    good, _ = _generated(10, 0)
    write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in good])
    (tmp_path / "empty.txt").write_text("\n\n")
    out = str(tmp_path / "m")
    assert _train_cli(capsys, "--positive", str(tmp_path / "good.jsonl"), "--negative", str(tmp_path / "empty.txt"),
                      "--out", out) == (2, ("error: negative examples: 0 found; a classifier needs at least 2 of "
                                                "each class (both good and bad examples)"))
    assert not (tmp_path / "m").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    assert _train_cli(capsys, "--positive", str(tmp_path / "good.jsonl"), "--negative", str(tmp_path / "bad.jsonl"),
                      "--out", out) == (2, f"error: {tmp_path / 'bad.jsonl'}:2: no string field 'text'")
    (tmp_path / "raw").mkdir()
    with pytest.raises(ConfigError, match=r"steps\.quality_classifier: model: .*classifier.json not found"):
        validate_config({"recipe": "custom", "steps": [{"quality_classifier": {"model": str(tmp_path / "none")}}],
                         "input": {"path": str(tmp_path / "raw")}, "output": {"path": str(tmp_path / "o")}})


# ----------------------------------------------------------------------------- PII look-alikes


@pytest.mark.parametrize("text", ["ISBN 978-0-7432-7356-5", "ISBN-13: 9780743273565", "isbn 978 0 7432 7356 5",
                                  "section 4.2.1.3", "see § 8.8.4.4", "Figure 3.1.4.1 shows", "clause 12.4.2.1"])
def test_pii_lookalikes_by_structure_and_context(text):
    counts: dict[str, int] = {}
    assert scrub(f"As printed: {text}.", default_patterns(), counts) == f"As printed: {text}." and not counts


@pytest.mark.parametrize("text,kind", [("card 4111-1111-1111-1111", "credit_card"), ("4111111111111111", "credit_card"),
                                        ("Amex 3400 000000 00009", "credit_card"), ("server 4.2.1.3", "ipv4"),
                                        ("ip: 8.8.4.4", "ipv4")])
def test_real_pii_still_scrubbed(text, kind):
    counts: dict[str, int] = {}
    scrub(text, default_patterns(), counts)
    assert counts == {kind: 1}
