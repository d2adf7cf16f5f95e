"""Single steps and the config: readers on bad input, PII, language id, SFT rules, decontamination, perplexity."""
from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest

from datapipe.config import ConfigError, load_config, validate_config
from datapipe.decont import Decontaminate
from datapipe.instructions import InstructionRulesFilter
from datapipe.lid import OfflineLanguageFilter
from datapipe.perplexity import PerplexityFilter, model_loader_name
from datapipe.pii import PIIScrubber, default_patterns, luhn_valid, scrub
from datapipe.readers import BadInputError, StrictJsonlReader, StrictParquetReader, TextFileReader
from datapipe.steps import minhash_detection_probability, minhash_threshold
from datapipe.synthetic import LOOKALIKES, PII_CASES, english_doc, foreign_doc, REFUSALS
from datatrove.data import Document
import random


def docs_of(step, rank: int = 0) -> list[Document]:
    return list(step.run(None, rank, 1))


# --- readers --------------------------------------------------------------------------------
def test_jsonl_reader_errors_name_file_and_line(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(BadInputError, match=r"a\.jsonl:2: invalid JSON"):
        docs_of(StrictJsonlReader(str(tmp_path)))
    f.write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(BadInputError, match=r"a\.jsonl:2: missing text field 'text' \(keys: \['body'\]\)"):
        docs_of(StrictJsonlReader(str(tmp_path)))
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(BadInputError, match=r"a\.jsonl:2: invalid UTF-8"):
        docs_of(StrictJsonlReader(str(tmp_path)))


def test_jsonl_reader_skip_counts_bad_rows(tmp_path):
    rows = [b'{"text": "one", "id": "a"}', b'{"text": ', b'{"other": 1}', b'{"text": "caf\xe9"}',
            b'{"text": 5}', b'{"text": "  "}', b'{"text": "two", "lang": "en"}']
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(b"\n".join(rows) + b"\n")
    reader = StrictJsonlReader(str(tmp_path), on_bad_input="skip")
    docs = docs_of(reader)
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[0].id == "a" and docs[1].metadata["lang"] == "en"
    stats = reader.stats.to_dict()["stats"]
    assert stats["bad_input"] == 4 and stats["empty_text"] == 1
    assert stats["bad_input_invalid_json"] == stats["bad_input_missing_text_field"] == 1
    assert stats["bad_input_invalid_utf8"] == stats["bad_input_text_not_string"] == 1


def test_parquet_and_text_readers(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a doc", "b doc"], "n": [1, 2]}), tmp_path / "x.parquet")
    docs = docs_of(StrictParquetReader(str(tmp_path), text_field="content"))
    assert [d.text for d in docs] == ["a doc", "b doc"] and docs[1].metadata["n"] == 2
    with pytest.raises(BadInputError, match=r"x\.parquet:0: missing text column 'text'"):
        docs_of(StrictParquetReader(str(tmp_path)))

    text_dir = tmp_path / "txt"
    text_dir.mkdir()
    (text_dir / "a.txt").write_text("first block\nline two\n\n\n  \nsecond block\n\nthird")
    blocks = docs_of(TextFileReader(str(text_dir), split="blank_line"))
    assert [d.text for d in blocks] == ["first block\nline two", "second block", "third"]
    assert blocks[1].id.endswith("a.txt:6")
    assert [d.text for d in docs_of(TextFileReader(str(text_dir)))] == [(text_dir / "a.txt").read_text()]
    (text_dir / "b.txt").write_bytes(b"ok\nline\xff two\n")
    with pytest.raises(BadInputError, match=r"b\.txt:2: invalid UTF-8"):
        docs_of(TextFileReader(str(text_dir), glob_pattern="b.txt"))


def test_hf_dataset_folder_reader(tmp_path):
    import datasets

    from datapipe.readers import HFDatasetFolderReader

    datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(10)], "k": list(range(10))}).save_to_disk(
        tmp_path / "ds")
    reader = HFDatasetFolderReader(str(tmp_path / "ds"))
    shards = [[d.text for d in reader.run(None, r, 3)] for r in range(3)]
    assert sum(shards, []) == [f"doc {i}" for i in range(10)]
    with pytest.raises(BadInputError, match="missing text column 'body'"):
        list(HFDatasetFolderReader(str(tmp_path / "ds"), text_field="body").run(None, 0, 1))


# --- config ---------------------------------------------------------------------------------
def test_config_reports_every_problem_with_file_and_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"""
recipe: custom
input: {{path: {tmp_path}, colour: red}}
output: {{path: {tmp_path / 'out'}}}
executor: {{kind: slurm}}
steps:
  - language: {{languages: [en], treshold: 0.5}}
  - minhash_dedup: {{bands: 0}}
  - sparkle
""")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert "bad.yaml: input.colour: Extra inputs are not permitted" in str(err.value)
    cfg.write_text(cfg.read_text().replace(", colour: red", ""))
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{cfg}: ") for line in lines)
    text = str(err.value)
    assert "executor.slurm: required" in text and "steps.language.treshold: unknown parameter" in text
    assert "steps.minhash_dedup.bands: must be >= 1" in text and "steps.sparkle: unknown step" in text


def test_config_overrides_and_recipe_step_params(tmp_path):
    cfg = tmp_path / "web.yaml"
    cfg.write_text(f"input: {{path: {tmp_path}}}\noutput: {{path: {tmp_path / 'o'}}}\n")
    loaded = load_config(cfg, ["executor.workers=3", "step_params.minhash_dedup={bands: 20, rows: 10}"])
    assert loaded.executor.workers == 3 and loaded.step_params["minhash_dedup"]["bands"] == 20
    with pytest.raises(ConfigError, match=r"step_params\.sparkle: not a step of recipe 'web'"):
        validate_config({"input": {"path": str(tmp_path)}, "output": {"path": "o"}, "step_params": {"sparkle": {}}})
    with pytest.raises(ConfigError, match=r"steps\.decontaminate: decontaminate\.eval_files: not found"):
        validate_config({"input": {"path": str(tmp_path)}, "output": {"path": "o"},
                         "step_params": {"decontaminate": {"eval_files": ["nope.jsonl"]}}})


def test_minhash_threshold_math():
    assert minhash_threshold(14, 8) == pytest.approx(0.719, abs=1e-3)
    assert minhash_detection_probability(0.8, 14, 8) == pytest.approx(0.924, abs=1e-3)
    assert minhash_detection_probability(0.8, 20, 10) == pytest.approx(0.897, abs=1e-3)


# --- PII ------------------------------------------------------------------------------------
def _kind_of(kind: str, value: str) -> str:
    return "private_key" if "PRIVATE KEY" in value else kind


def test_pii_recall_and_lookalikes_on_every_pairing():
    patterns = default_patterns()
    planted = found = 0
    for kind, values in PII_CASES.items():
        for value in values:
            for lookalike in LOOKALIKES:
                counts: dict[str, int] = {}
                out = scrub(f"Reach me at {value} today. See {lookalike} for details.", patterns, counts)
                planted += 1
                found += value not in out and counts.get(_kind_of(kind, value)) == 1
                assert lookalike in out, (value, lookalike, out)  # no look-alike scrubbed
                assert sum(counts.values()) == 1, (value, lookalike, counts)
    assert found / planted >= 0.95
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")


def test_pii_scrubber_counts_per_type():
    rng = random.Random(0)
    step = PIIScrubber()
    docs = []
    for kind, values in PII_CASES.items():
        for value in values:
            docs.append(Document(text=f"{english_doc(rng, 1, 2)} Mail {value} now.", id=f"{kind}{len(docs)}"))
    out = list(step.run(iter(docs)))
    stats = step.stats.to_dict()["stats"]
    for kind, values in PII_CASES.items():
        n_private = sum("PRIVATE KEY" in v for v in values)
        assert stats.get(f"pii_{kind}", 0) == len(values) - n_private
    assert stats["pii_private_key"] == 1
    assert all("<" in d.text and d.metadata["pii"] for d in out)
    with pytest.raises(ValueError, match="unknown"):
        PIIScrubber(types=["email", "ssn"])


# --- language, SFT rules, decontamination -----------------------------------------------------
def test_language_filter_offline():
    rng = random.Random(1)
    lid = OfflineLanguageFilter(["en"], threshold=0.65)
    english = [Document(text=english_doc(rng, 1, 3), id=str(i)) for i in range(20)]
    foreign = [Document(text=foreign_doc(rng, lang, 1, 3), id=lang + str(i))
               for i in range(10) for lang in ("de", "fr", "es")]
    assert all(lid.filter(d) is True for d in english)
    assert sum(lid.filter(d) is not True for d in foreign) / len(foreign) >= 0.9
    assert {d.metadata["language"] for d in foreign} >= {"de", "fr"}


def test_instruction_rules():
    rules = InstructionRulesFilter()
    rng = random.Random(2)
    good = " ".join(english_doc(rng, 1, 3).split()[:60])
    assert rules.filter(Document(text=good, id="g")) is True
    assert rules.filter(Document(text="Too short to be useful.", id="s")) == (False, "response_too_short")
    assert rules.filter(Document(text=" ".join(["word"] * 2 + good.split() * 20), id="l"))[1] == "response_too_long"
    stutter = good.split()
    stutter[10:10] = ["really"] * 4
    assert rules.filter(Document(text=" ".join(stutter), id="r")) == (False, "repeated_token")
    three = good.split()
    three[10:10] = ["really"] * 3
    assert rules.filter(Document(text=" ".join(three), id="r3")) is True
    for refusal in REFUSALS + ["Sure. " + good + " As an AI, I can’t do more."]:
        assert rules.filter(Document(text=refusal, id="x")) == (False, "refusal")


def test_decontaminate_long_and_short_items(tmp_path):
    ev = tmp_path / "bench.jsonl"
    ev.write_text(json.dumps({"q": "What is the boiling point of water at sea level in degrees Celsius exactly?",
                              "a": "100"}) + "\n" + json.dumps({"q": "Name the largest planet of our solar system.",
                                                                "a": "Jupiter"}) + "\n")
    step = Decontaminate([str(ev)], n=13, min_words=8)
    assert step.filter(Document(text="Quiz: what is the boiling point of water at sea level in degrees "
                                     "celsius EXACTLY? Answer below.", id="1")) == (False, "contaminated")
    assert step.filter(Document(text="name the largest planet of our solar system!", id="2")) == (False, "contaminated")
    assert step.filter(Document(text="The boiling point of water depends on pressure.", id="3")) is True
    with pytest.raises(FileNotFoundError, match="not found"):
        Decontaminate([str(tmp_path / "missing.jsonl")])


# --- perplexity -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama + word-level tokenizer saved as an HF-format folder (our export format)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("ckpt")
    words = english_doc(random.Random(3), 4, 6).lower().replace(".", " .").replace(",", " ,").split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128))
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


def test_perplexity_matches_transformers_and_keeps_the_band(tiny_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [english_doc(random.Random(4 + i), 1, 2).lower() for i in range(6)]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    expected = []
    for t in texts:
        ids = torch.tensor([[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected.append(math.exp(model(ids, labels=ids).loss.item()))
    lo, hi = sorted(expected)[1], sorted(expected)[4]
    step = PerplexityFilter(str(tiny_checkpoint), min_perplexity=lo, max_perplexity=hi)
    results = [step.filter(Document(text=t, id=str(i))) for i, t in enumerate(texts)]
    for r, e, t in zip(results, expected, texts):
        assert step.scorer.perplexity(t) == pytest.approx(e, rel=1e-4)
        assert (r is True) == (lo <= e <= hi)
    assert step.scorer.loader == model_loader_name()


def test_perplexity_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PerplexityFilter(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PerplexityFilter(str(tmp_path))
    (tmp_path / "m.arpa").write_text("")
    try:
        import kenlm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs the `kenlm` package"):
            PerplexityFilter(str(tmp_path / "m.arpa"), kind="kenlm")


def test_code_quality_filter():
    from datapipe.code_filters import CodeQualityFilter

    rules = CodeQualityFilter()
    good = "def add(a, b):\n    # sum two numbers\n    return a + b\n\nprint(add(1, 2))\n"
    assert rules.filter(Document(text=good, id="g")) is True
    assert rules.filter(Document(text="var a=1;" * 200 + "\nx\ny", id="m")) == (False, "long_line")
    assert rules.filter(Document(text="0x00, 0x01,\n" * 3 + "{}[]();:,.\n" * 20, id="d")) == (
        False, "low_alnum_fraction")
    assert rules.filter(Document(text="# Code generated by protoc. DO NOT EDIT.\n" + good, id="p")) == (
        False, "autogenerated")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs" / "data").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    import yaml

    sources = yaml.safe_load(path.read_text()).get("sources")
    paths = [f"sources.{name}.path={tmp_path}" for name in sources] if sources else [f"input.path={tmp_path}"]
    cfg = load_config(path, paths)
    assert cfg.recipe in ("web", "code", "instructions", "custom")
