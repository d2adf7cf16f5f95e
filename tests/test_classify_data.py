"""Classification data: JSONL/CSV/TSV rows, the label map, EOS-final truncation, bad input, the resumable
rank-sharded loader with masked filler rows, summable metrics and the (weighted) loss."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.sft_fixtures import make_tokenizer, write_jsonl
from trainer.classify.data import ClassExample, build_label_map, encode_texts, load_classify_examples
from trainer.classify.loader import ClassifyLoader
from trainer.classify.metrics import (batch_stats, classification_report, make_target_counter,
                                      weighted_cross_entropy, write_confusion_matrix)
from trainer.data.sources import DataError
from trainer.objectives import IGNORE_INDEX

ROWS = [{"text": "free prize, call now", "label": "spam"}, {"text": "see you at lunch", "label": "ham"},
        {"text": "are we still on?", "label": "ham"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("classify"))


class StubTokenizer:
    """Whitespace 'tokenizer' with a known id per word, so lengths and truncation are exact."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, adds_eos: bool = False):
        self.adds_eos = adds_eos

    def __call__(self, texts):
        ids = [[self.bos_token_id] + [10 + len(w) for w in t.split()] + ([self.eos_token_id] if self.adds_eos else [])
               for t in texts]
        return {"input_ids": ids}


def _load(files, **kw):
    kw.setdefault("max_len", 64)
    return load_classify_examples([str(f) for f in files], StubTokenizer(), **kw)


# ----------------------------------------------------------------------------- reading


def test_jsonl_json_and_gz_read_the_same_rows(tmp_path, tok):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    examples, label2id, report = load_classify_examples([path], tok, max_len=64)
    assert label2id == {"ham": 0, "spam": 1}
    assert [e.label for e in examples] == [1, 0, 0]
    assert report.rows == report.examples == 3 and report.class_counts == {"ham": 2, "spam": 1}
    first = examples[0].input_ids.tolist()
    assert first == tok("free prize, call now")["input_ids"] + [tok.eos_token_id]
    assert first[0] == tok.bos_token_id and "3 rows -> 3 examples" in report.summary()
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    with gzip.open(tmp_path / "rows.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    for other in ("rows.json", "rows.jsonl.gz"):
        again, _, _ = load_classify_examples([tmp_path / other], tok, max_len=64)
        assert all(np.array_equal(a.input_ids, b.input_ids) and a.label == b.label for a, b in zip(again, examples))


def test_csv_quoting_tsv_literal_and_headerless_columns(tmp_path):
    csv_path = tmp_path / "rows.csv"
    # BOM from a spreadsheet export, a quoted comma and doubled quotes, a custom column name.
    csv_path.write_text('\ufeffbody,label\n"hi, there",a\n"say ""x"" now",b\n', encoding="utf-8")
    examples, label2id, _ = _load([csv_path], text_column="body")
    assert label2id == {"a": 0, "b": 1}
    assert [len(e) for e in examples] == [1 + 2 + 1, 1 + 3 + 1]
    assert examples[1].input_ids[2] == 10 + len('"x"')  # unquoted: not '""x""'
    # TSV is literal: a leading quote is text, not quoting (the SMS corpus has such rows).
    tsv_path = tmp_path / "rows.tsv"
    tsv_path.write_text('label\tmsg\nham\t"Gimme a few" was late\nspam\t"WIN" now\n')
    examples, _, report = _load([tsv_path], text_column="msg")
    assert [len(e) for e in examples] == [1 + 5 + 1, 1 + 2 + 1] and examples[0].input_ids[1] == 10 + len('"Gimme')
    assert report.class_counts == {"ham": 1, "spam": 1}
    # Without a header, the columns are named by the caller; line numbers still count from 1.
    bare = tmp_path / "bare.tsv"
    bare.write_text("1\tone two\n0\tthree\n")
    examples, label2id, _ = _load([bare], columns=["label", "text"])
    assert label2id == {"0": 0, "1": 1} and [e.label for e in examples] == [1, 0]


def test_real_sms_spam_file(shared_data, tok):
    path = shared_data / "sms-spam-collection-5000.tsv"
    examples, label2id, report = load_classify_examples([path], tok, max_len=48, text_column="msg")
    assert label2id == {"ham": 0, "spam": 1}
    assert report.rows == report.examples == 5000 and report.class_counts == {"ham": 4327, "spam": 673}
    assert report.truncated > 0 and report.longest == 48 and report.skipped_rows == 0
    assert all(e.input_ids[0] == tok.bos_token_id and e.input_ids[-1] == tok.eos_token_id for e in examples)
    assert tok.decode(examples[2].input_ids[1:-1]).startswith("Free entry in 2 a wkly comp")
    assert examples[2].label == 1
    # Rows whose text starts with a quote keep it (the file is literal TSV, not CSV quoting).
    texts = path.read_text(encoding="utf-8").splitlines()[1:]
    quoted = next(i for i, line in enumerate(texts) if line.split("\t", 1)[1].startswith('"'))
    assert tok.decode(examples[quoted].input_ids[1:-1]).startswith('"')


# ----------------------------------------------------------------------------- labels and tokens


def test_label_map_sorted_from_training_and_reused_for_validation(tmp_path):
    assert build_label_map(["spam", "ham", "spam"]) == {"ham": 0, "spam": 1}
    assert build_label_map(["10", "2", "0", "1"]) == {"0": 0, "1": 1, "2": 2, "10": 3}  # numeric order
    assert build_label_map(["10", "2", "x"]) == {"10": 0, "2": 1, "x": 2}
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b", "label": 2}, {"text": "c", "label": 0},
                                                   {"text": "d", "label": "1"}])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "e", "label": 1}, {"text": "f", "label": "2"}])
    examples, label2id, _ = _load([train])
    assert label2id == {"0": 0, "1": 1, "2": 2} and [e.label for e in examples] == [2, 0, 1]
    val_examples, same, report = _load([val], label2id=label2id)
    assert same == label2id and [e.label for e in val_examples] == [1, 2]
    assert report.class_counts == {"0": 0, "1": 1, "2": 1}


def test_truncation_keeps_the_start_and_ends_in_eos(tok):
    stub = StubTokenizer()
    (ids, cut), = encode_texts(stub, ["w " * 20], max_len=8)
    assert cut and ids == [1] + [11] * 6 + [2]
    (ids, cut), = encode_texts(stub, ["a bb"], max_len=4)
    assert not cut and ids == [1, 11, 12, 2]
    # A tokenizer that appends EOS itself gets no second one.
    (ids, _), = encode_texts(StubTokenizer(adds_eos=True), ["a bb"], max_len=8)
    assert ids == [1, 11, 12, 2]
    text = "lunch at noon, then the long meeting about the quarterly plans " * 4
    full = tok(text)["input_ids"]
    (ids, cut), = encode_texts(tok, [text], max_len=16)
    assert cut and len(ids) == 16 and ids[:15] == full[:15] and ids[-1] == tok.eos_token_id


# ----------------------------------------------------------------------------- bad input


def _bad_files(tmp: Path) -> dict[str, tuple[list[Path], dict, str]]:
    good = json.dumps(ROWS[0])
    (tmp / "nolabel.jsonl").write_text(f'{good}\n{{"text": "hi"}}\n')
    (tmp / "nulllabel.jsonl").write_text(f'{good}\n\n{{"text": "hi", "label": null}}\n')
    (tmp / "emptytext.jsonl").write_text(f'{good}\n{{"text": "  ", "label": "ham"}}\n')
    (tmp / "notjson.jsonl").write_text(f'{good}\n{{oops\n')
    (tmp / "floatlabel.jsonl").write_text(f'{good}\n{{"text": "x", "label": 1.5}}\n')
    (tmp / "header.csv").write_text("message,label\nhi,ham\n")
    (tmp / "fields.tsv").write_text("label\ttext\nham\thi\nspam\tone\textra\n")
    (tmp / "emptycell.csv").write_text("text,label\nhi,ham\n,spam\n")
    (tmp / "oneclass.jsonl").write_text(f'{json.dumps(ROWS[1])}\n{json.dumps(ROWS[2])}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "onlyheader.csv").write_text("text,label\n")
    (tmp / "latin1.tsv").write_bytes("label\ttext\nham\tcaf\xe9\n".encode("latin-1"))
    (tmp / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    (tmp / "rows.txt").write_text("hi\n")
    write_jsonl(tmp / "train.jsonl", ROWS)
    (tmp / "val.jsonl").write_text(f'{json.dumps(ROWS[1])}\n{{"text": "x", "label": "eggs"}}\n')
    return {
        "no label": ([tmp / "nolabel.jsonl"], {}, r"nolabel.jsonl:2: no label \('label'\)"),
        "null label": ([tmp / "nulllabel.jsonl"], {}, r"nulllabel.jsonl:3: no label"),
        "empty text": ([tmp / "emptytext.jsonl"], {}, r"emptytext.jsonl:2: empty text \('text'\)"),
        "not json": ([tmp / "notjson.jsonl"], {}, r"notjson.jsonl:2: not valid JSON"),
        "float label": ([tmp / "floatlabel.jsonl"], {}, r"floatlabel.jsonl:2: label 'label' is float"),
        "missing column": ([tmp / "header.csv"], {},
                           r"header.csv:1: no column 'text' in the header \(message, label\)"),
        "field count": ([tmp / "fields.tsv"], {}, r"fields.tsv:3: 3 fields, expected 2"),
        "empty cell": ([tmp / "emptycell.csv"], {}, r"emptycell.csv:3: empty text"),
        "single class": ([tmp / "oneclass.jsonl"], {}, r"oneclass.jsonl: every training row has the label 'ham'"),
        "unseen label": ([tmp / "val.jsonl"], {"label2id": {"ham": 0, "spam": 1}},
                         r"val.jsonl:2: label 'eggs' does not occur in the training data \(its labels: ham, spam\)"),
        "empty file": ([tmp / "empty.jsonl"], {}, r"empty.jsonl: no rows"),
        "header only": ([tmp / "onlyheader.csv"], {}, r"onlyheader.csv: no rows"),
        "not utf-8": ([tmp / "latin1.tsv"], {}, r"latin1.tsv: not UTF-8 text"),
        "broken gz": ([tmp / "broken.jsonl.gz"], {}, r"broken.jsonl.gz: cannot be read"),
        "unknown type": ([tmp / "rows.txt"], {}, r"rows.txt: unknown input type '.txt'"),
        "missing file": ([tmp / "nope.jsonl"], {}, r"nope.jsonl: no such file"),
    }


BAD_CASES = ["no label", "null label", "empty text", "not json", "float label", "missing column", "field count",
             "empty cell", "single class", "unseen label", "empty file", "header only", "not utf-8", "broken gz",
             "unknown type", "missing file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, case):
    files, kw, pattern = _bad_files(tmp_path)[case]
    with pytest.raises(DataError, match=pattern) as err:
        _load(files, **kw)
    assert "\n" not in str(err.value)


def test_skip_bad_rows_counts_instead_of_failing(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(ROWS[0]), '{"text": "hi"}', "{oops", json.dumps(ROWS[1]),
                               '{"text": "", "label": "ham"}']) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl:2: .*skip_bad_rows=true"):
        _load([path])
    examples, _, report = _load([path], skip_bad_rows=True)
    assert len(examples) == 2 and report.rows == 5 and report.skipped_rows == 3
    assert report.skipped_examples[0].startswith(f"{path}:2: no label")
    assert "3 malformed rows skipped" in report.summary()
    # A validation label unseen in training still fails: skipping it would change the metrics silently.
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "label": "eggs"}])
    with pytest.raises(DataError, match="does not occur"):
        _load([val], label2id={"ham": 0, "spam": 1}, skip_bad_rows=True)


# ----------------------------------------------------------------------------- loader


def _examples(n: int, num_labels: int = 3, seed: int = 0) -> list[ClassExample]:
    """Example i starts with token 100 + i, so every row in a batch says which example it is."""
    rng = np.random.default_rng(seed)
    return [ClassExample(np.array([100 + i] + list(rng.integers(5, 50, int(rng.integers(1, 20)))) + [2],
                                  dtype=np.int64), int(rng.integers(num_labels))) for i in range(n)]


def test_batches_are_right_padded_with_masks():
    exs = _examples(6)
    batch = ClassifyLoader(exs, batch_size=3, pad_id=0, pad_to_multiple_of=8, shuffle=False).make_batch([0, 1, 2])
    lengths = [len(exs[i]) for i in range(3)]
    T = batch["input_ids"].shape[1]
    assert T % 8 == 0 and max(lengths) <= T < max(lengths) + 8
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, ex in enumerate(exs[:3]):
        assert batch["input_ids"][b, :len(ex)].tolist() == ex.input_ids.tolist()
        assert (batch["input_ids"][b, len(ex):] == 0).all() and (batch["attention_mask"][b, len(ex):] == 0).all()
    assert batch["labels"].tolist() == [e.label for e in exs[:3]] and batch["labels"].dtype == torch.int64
    assert batch["example_mask"].tolist() == [1.0, 1.0, 1.0]


def test_loader_resumes_exactly_and_refuses_other_data():
    exs = _examples(23)
    args = dict(batch_size=4, pad_id=0, seed=7)
    straight = ClassifyLoader(exs, **args)
    it = iter(straight)
    for _ in range(3):
        next(it)
    state = straight.state_dict()
    rest = [next(it) for _ in range(8)]  # 5 batches per epoch: crosses two epoch ends
    resumed = ClassifyLoader(exs, **args)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = iter(resumed)
    for a in rest:
        b = next(again)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.epoch == 2 and rest[0]["example_mask"].tolist() == [1.0] * 4
    relabelled = [ClassExample(e.input_ids, (e.label + 1) % 3) for e in exs]
    with pytest.raises(ValueError, match="fingerprint"):
        ClassifyLoader(relabelled, **args).load_state_dict(state)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ClassifyLoader(exs[:3], **args)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 12])
def test_validation_visits_every_example_once_and_masks_filler(world_size, n):
    exs = _examples(n)
    seen, batches_per_rank, count = [], [], 0.0
    for rank in range(world_size):
        loader = ClassifyLoader(exs, batch_size=2, pad_id=0, shuffle=False, validation=True, rank=rank,
                                world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        batches_per_rank.append(len(batches))
        for batch in batches:
            real = batch["example_mask"] > 0
            seen += (batch["input_ids"][real, 0] - 100).tolist()
            assert (batch["labels"][~real] == IGNORE_INDEX).all()
            assert batch["labels"][real].tolist() == [exs[i - 100].label for i in batch["input_ids"][real, 0].tolist()]
            logits = torch.randn(len(batch["labels"]), 3)
            count += float(batch_stats(logits, batch["labels"], batch["example_mask"], 3)["count"])
            assert float(make_target_counter()(batch)) == float(real.sum())
        assert list(loader) and len(list(loader)) == len(batches)  # a second pass starts over
    assert sorted(seen) == list(range(n)) and count == n
    assert len(set(batches_per_rank)) == 1


# ----------------------------------------------------------------------------- metrics and loss


def _logits_for(preds: list[int], num_labels: int) -> torch.Tensor:
    return F.one_hot(torch.tensor(preds), num_labels).float() * 4 + 0.1 * torch.randn(len(preds), num_labels)


def test_report_on_a_hand_made_example(tmp_path):
    names = {"0": "a", "1": "b", "2": "c", "3": "d"}  # as JSON stores id2label; "d" never occurs
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 1, 1, 2, 2, 2, 0, 0]
    torch.manual_seed(0)
    logits = _logits_for(preds, 4)
    ones = torch.ones(len(labels))
    # Two micro-batches plus a filler row: the summed stats equal one batch's.
    parts = [batch_stats(logits[:4], torch.tensor(labels[:4]), ones[:4], 4),
             batch_stats(torch.cat([logits[4:], logits[:1]]), torch.tensor(labels[4:] + [IGNORE_INDEX]),
                         torch.cat([ones[4:], torch.zeros(1)]), 4)]
    totals = {k: float(parts[0][k] + parts[1][k]) for k in parts[0]}
    whole = batch_stats(logits, torch.tensor(labels), ones, 4)
    assert totals == {k: float(v) for k, v in whole.items()}
    assert totals["count"] == 9 and totals["correct_sum"] == 5
    assert totals["confusion_2_0"] == 2 and totals["confusion_0_1"] == 1 and totals["confusion_3_3"] == 0
    rep = classification_report(totals, names)
    # Confusion rows a: [2,1,0], b: [0,1,1], c: [2,0,2]. Precision a 2/4, b 1/2, c 2/3; recall a 2/3, b 1/2, c 2/4.
    f1 = {"a": 4 / 7, "b": 1 / 2, "c": 4 / 7, "d": 0.0}
    assert rep["accuracy"] == pytest.approx(5 / 9)
    assert rep["macro_f1"] == pytest.approx((4 / 7 + 1 / 2 + 4 / 7) / 3)  # "d": neither true nor predicted
    assert rep["majority_baseline"] == pytest.approx(4 / 9) and rep["majority_class"] == "c"
    for name, want in f1.items():
        assert rep["per_class"][name]["f1"] == pytest.approx(want)
    assert rep["per_class"]["a"]["precision"] == pytest.approx(1 / 2)
    assert rep["per_class"]["c"]["recall"] == pytest.approx(1 / 2)
    assert rep["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # A class predicted but never true has precision 0 and counts in the macro average.
    two = batch_stats(_logits_for([0, 1], 2), torch.tensor([0, 0]), torch.ones(2), 2)
    rep2 = classification_report({k: float(v) for k, v in two.items()}, ["x", "y"])
    assert rep2["per_class"]["y"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep2["macro_f1"] == pytest.approx((2 / 3 + 0) / 2) and rep2["majority_baseline"] == 1.0
    path = write_confusion_matrix(totals, names, tmp_path / "confusion.csv")
    assert path.read_text().splitlines() == ["true \\ predicted,a,b,c,d", "a,2,1,0,0", "b,0,1,1,0", "c,2,0,2,0",
                                             "d,0,0,0,0"]
    with pytest.raises(ValueError, match="confusion cells"):
        classification_report(totals, ["a", "b"])


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_sum_over_its_normalizer_is_torch_mean(weighted):
    torch.manual_seed(0)
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2, 1])
    logits = torch.randn(8, 3, dtype=torch.bfloat16)
    weights = torch.tensor([0.5, 2.0, 3.0]) if weighted else None
    want = F.cross_entropy(logits.float(), labels, weight=weights)
    loss_sum, norm = weighted_cross_entropy(logits, labels, torch.ones(8), weights)
    assert loss_sum.dtype == torch.float32 and (loss_sum / norm).item() == pytest.approx(want.item(), rel=1e-6)
    # Split into micro-batches with a filler row (non-finite logits, ignored label): the loop's
    # sum(loss_sum) / sum(count_targets) is still the mean over the real rows.
    counter = make_target_counter(weights)
    batches = []
    for part in (slice(0, 3), slice(3, 8)):
        lab = torch.cat([labels[part], torch.tensor([IGNORE_INDEX])])
        lg = torch.cat([logits[part], torch.full((1, 3), float("nan"), dtype=torch.bfloat16)])
        mask = torch.cat([torch.ones(lab.numel() - 1), torch.zeros(1)])
        batches.append({"labels": lab, "example_mask": mask, "logits": lg})
    sums, counts = zip(*(weighted_cross_entropy(b["logits"], b["labels"], b["example_mask"], weights)
                         for b in batches))
    step_targets = sum(counter(b) for b in batches)
    assert all(torch.equal(c, counter(b)) for c, b in zip(counts, batches))
    assert (sum(sums) / step_targets).item() == pytest.approx(want.item(), rel=1e-6)
    assert float(step_targets) == pytest.approx(float(weights[labels].sum()) if weighted else 8.0)
