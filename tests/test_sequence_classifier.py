"""SequenceClassifier: parity with transformers' LlamaForSequenceClassification, HF folders both
ways, packed scoring, reuse of a causal LM's trunk, and PEFT LoRA."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

from model_defs import ModelConfig, SequenceClassifier, Transformer
from model_defs.classifier import document_end_index, last_token_index
from model_defs.hf import config_from_hf, load_hf_model
from model_defs.hf_classifier import (
    classifier_state_dict_from_hf,
    classifier_state_dict_to_hf,
    is_hf_classifier_folder,
    load_hf_classifier,
    save_hf_classifier,
)

transformers.logging.set_verbosity_error()

ATOL = 1e-5
PAD = 0  # never drawn as a real token below, so HF's pad_token_id rule and our attention_mask agree
LORA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _randomize_norms(model: torch.nn.Module) -> None:
    with torch.no_grad():  # norms start at 1; randomize them so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)


def _hf_classifier(kv_heads=2, tie=False, num_labels=3, seed=0) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, num_labels=num_labels, pad_token_id=PAD, attn_implementation="eager",
    )
    model = LlamaForSequenceClassification(config).eval()
    _randomize_norms(model)
    return model


def _ours_like(hf: LlamaForSequenceClassification) -> SequenceClassifier:
    cfg = config_from_hf(hf.config)
    ours = SequenceClassifier(cfg, hf.config.num_labels).eval()
    ours.load_state_dict(classifier_state_dict_from_hf(hf.state_dict(), cfg))
    return ours


def _ours(tie=False, num_labels=3, seed=1) -> SequenceClassifier:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, max_seq_len=32, tie_embeddings=tie)
    model = SequenceClassifier(cfg, num_labels).eval()
    _randomize_norms(model)
    return model


def _sequences(lengths, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g) for n in lengths]


def _pad(seqs, left=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input_ids padded with PAD and the (B, T) attention mask."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


def _alone(model, seqs) -> torch.Tensor:
    return torch.cat([model(s[None]) for s in seqs])  # (N, num_labels)


# ----------------------------------------------------------------------------- index helpers


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [[0, 2], [1, 4], [2, 4], [3, 1]]
    with pytest.raises(ValueError, match="without real tokens"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_document_end_index_stops_at_padding_tail():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert document_end_index(doc, valid).tolist() == [[0, 2], [0, 4], [1, 3], [1, 6]]
    # A tail that repeats the last document's id is cut by `valid` too.
    doc[0, 5:] = 1
    assert document_end_index(doc, valid).tolist() == [[0, 2], [0, 4], [1, 3], [1, 6]]
    assert document_end_index(doc).tolist() == [[0, 2], [0, 6], [1, 3], [1, 6]]


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_unpadded_rows_match_hf(kv_heads):
    hf = _hf_classifier(kv_heads=kv_heads)
    ours = _ours_like(hf)
    x = torch.stack(_sequences([12, 12, 12]))
    with torch.no_grad():
        got = ours(x)
        torch.testing.assert_close(got, hf(x).logits, atol=ATOL, rtol=1e-4)
    assert got.shape == (3, 3)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_right_padding_matches_hf_pad_token_rule(kv_heads):
    hf = _hf_classifier(kv_heads=kv_heads)
    ours = _ours_like(hf)
    seqs = _sequences([12, 7, 3], seed=1)
    x, mask = _pad(seqs)
    with torch.no_grad():
        got = ours(x, attention_mask=mask)
        torch.testing.assert_close(got, hf(x, attention_mask=mask).logits, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(got, _alone(ours, seqs), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_left_padding_matches_hf(kv_heads):
    hf = _hf_classifier(kv_heads=kv_heads)
    ours = _ours_like(hf)
    seqs = _sequences([12, 7, 3], seed=2)
    x, mask = _pad(seqs, left=True)
    # HF counts positions from the row start unless told; ours count real tokens, as generation does.
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(x, attention_mask=mask)
        expected = hf(x, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(got, _alone(ours, seqs), atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(got, torch.cat([hf(s[None]).logits for s in seqs]), atol=ATOL, rtol=1e-4)


def test_packed_rows_score_each_document_as_alone():
    ours = _ours()
    seqs = _sequences([5, 4, 6, 3], seed=3)
    T = 12
    # Row 0: docs 0, 1 and a padding tail (its own id, as the SFT loader writes it); row 1: docs 2, 3, no tail.
    ids = torch.full((2, T), PAD)
    doc = torch.zeros(2, T, dtype=torch.long)
    valid = torch.zeros(2, T, dtype=torch.bool)
    for row, members in ((0, (0, 1)), (1, (2, 3))):
        at = 0
        for d, i in enumerate(members):
            n = len(seqs[i])
            ids[row, at:at + n], doc[row, at:at + n], valid[row, at:at + n] = seqs[i], d, True
            at += n
        doc[row, at:] = len(members)
    index = document_end_index(doc, valid)
    assert index.tolist() == [[0, 4], [0, 8], [1, 5], [1, 8]]
    with torch.no_grad():
        got = ours(ids, document_ids=doc, score_index=index)
        torch.testing.assert_close(got, _alone(ours, seqs), atol=ATOL, rtol=1e-4)


# ----------------------------------------------------------------------------- HF folders


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers(tmp_path, tie):
    ours = _ours(tie=tie)
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    out = save_hf_classifier(ours, tmp_path / "clf", id2label=labels, pad_token_id=PAD)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert is_hf_classifier_folder(out)
    hf = AutoModelForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    assert isinstance(hf, LlamaForSequenceClassification)
    assert hf.config.id2label == labels and hf.config.num_labels == 3 and hf.config.pad_token_id == PAD
    x, mask = _pad(_sequences([9, 4, 6], seed=4))
    with torch.no_grad():
        torch.testing.assert_close(hf(x, attention_mask=mask).logits, ours(x, attention_mask=mask),
                                   atol=ATOL, rtol=1e-4)
        back, hf_config = load_hf_classifier(out)
        assert back.num_labels == 3 and back.cfg.tie_embeddings == tie
        assert hf_config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
        torch.testing.assert_close(back(x, attention_mask=mask), ours(x, attention_mask=mask), atol=0, rtol=0)


def test_load_folder_saved_by_transformers(tmp_path):
    hf = _hf_classifier(num_labels=5)
    hf.save_pretrained(tmp_path)
    ours, hf_config = load_hf_classifier(tmp_path)
    assert ours.num_labels == 5 and hf_config["pad_token_id"] == PAD
    assert not any(k.startswith("body.output") for k in ours.state_dict())
    x, mask = _pad(_sequences([10, 2], seed=5))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, attention_mask=mask), hf(x, attention_mask=mask).logits,
                                   atol=ATOL, rtol=1e-4)
    bf16, _ = load_hf_classifier(tmp_path, dtype=torch.bfloat16, attention="eager")
    assert bf16.cfg.attention == "eager" and all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_state_dict_round_trip_is_a_rename():
    hf = _hf_classifier()
    cfg = config_from_hf(hf.config)
    ours = classifier_state_dict_from_hf(hf.state_dict(), cfg)
    assert "score.weight" in ours and "body.layers.1.feed_forward.w3.weight" in ours
    assert not any("output" in k for k in ours)
    back = classifier_state_dict_to_hf(ours, cfg)
    assert set(back) == set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k


def test_save_refuses_an_occupied_folder(tmp_path):
    ours = _ours()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_hf_classifier(ours, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    out = save_hf_classifier(ours, tmp_path / "clf")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_hf_classifier(ours, out)
    save_hf_classifier(ours, out, id2label={0: "a", 1: "b", 2: "c"}, replace=True)
    assert json.loads((out / "config.json").read_text())["label2id"] == {"a": 0, "b": 1, "c": 2}
    with pytest.raises(ValueError, match="id2label keys"):
        save_hf_classifier(ours, tmp_path / "bad", id2label={0: "a", 1: "b"})


def test_wrong_architecture_is_a_one_line_error(tmp_path):
    _hf_classifier().save_pretrained(tmp_path / "clf")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2))
    lm.save_pretrained(tmp_path / "lm")
    assert is_hf_classifier_folder(tmp_path / "clf") and not is_hf_classifier_folder(tmp_path / "lm")
    assert not is_hf_classifier_folder(tmp_path / "nothing-here")

    with pytest.raises(ValueError) as err:
        load_hf_model(tmp_path / "clf")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "clf") in message
    assert "LlamaForSequenceClassification, not a causal LM" in message and "load_hf_classifier" in message

    with pytest.raises(ValueError) as err:
        load_hf_classifier(tmp_path / "lm")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "lm") in message
    assert "LlamaForCausalLM, not a LlamaForSequenceClassification" in message and "load_hf_model" in message


# ----------------------------------------------------------------------------- the module


def test_no_lm_head_and_init_behaves():
    model = _ours(tie=True)
    keys = set(model.state_dict())
    assert "score.weight" in keys and not any("output" in k for k in keys)
    assert model.body.output is None and model.cfg.tie_embeddings
    model.body.tie_weights()  # the trunk's config is untied: nothing to re-create
    model.init_weights()
    assert set(model.state_dict()) == keys
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if "norm" in n)
    assert abs(model.score.weight.std().item() - model.cfg.init_std) < 0.01
    with torch.device("meta"):
        meta = SequenceClassifier(model.cfg, 2)
    assert set(meta.state_dict()) == keys and all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("tie,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_from_causal_lm_keeps_the_trunk(tie, dtype):
    torch.manual_seed(2)
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, max_seq_len=32, tie_embeddings=tie)
    lm = Transformer(cfg).to(dtype).eval()
    _randomize_norms(lm)
    lm_keys = set(lm.state_dict())
    clf = SequenceClassifier.from_causal_lm(lm, num_labels=4).eval()
    assert not any("output" in k for k in clf.state_dict()) and set(lm.state_dict()) == lm_keys
    assert clf.score.weight.shape == (4, cfg.dim) and clf.score.weight.dtype == dtype
    assert clf.body.tok_embeddings.weight.data_ptr() == lm.tok_embeddings.weight.data_ptr()  # shared, not copied
    if tie:
        assert lm.output.weight is lm.tok_embeddings.weight
    x = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        hidden = clf.body(x, return_hidden=True)
        torch.testing.assert_close(hidden, lm(x, return_hidden=True), atol=0, rtol=0)
        torch.testing.assert_close(clf(x), clf.score(hidden[:, -1]), atol=0, rtol=0)


def test_peft_lora_trains_adapters_and_score_only(tmp_path):
    peft = pytest.importorskip("peft")
    model = _ours()
    x, mask = _pad(_sequences([8, 5], seed=6))
    with torch.no_grad():
        before = model(x, attention_mask=mask)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS,
                                                      modules_to_save=["score"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert all("lora_" in n or ".score.modules_to_save." in n for n in trainable), trainable
    assert any(".score.modules_to_save." in n for n in trainable)
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in trainable if "lora_" in n}
    assert adapted == set(LORA_TARGETS)
    with torch.no_grad():
        torch.testing.assert_close(lora(x, attention_mask=mask), before, atol=0, rtol=0)

    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(lora(x, attention_mask=mask), torch.tensor([0, 2]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert not torch.allclose(lora(x, attention_mask=mask), before)
    params = dict(lora.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert all(not torch.equal(params[n], p) for n, p in trained.items() if "lora_A" not in n)  # score and lora_B moved

    with torch.no_grad():
        trained_logits = lora(x, attention_mask=mask)
        merged = lora.merge_and_unload()  # a plain SequenceClassifier again, with the trained score
        assert isinstance(merged, SequenceClassifier) and set(merged.state_dict()) == set(_ours().state_dict())
        torch.testing.assert_close(merged(x, attention_mask=mask), trained_logits, atol=ATOL, rtol=1e-4)
        back, _ = load_hf_classifier(save_hf_classifier(merged, tmp_path / "merged", pad_token_id=PAD))
        torch.testing.assert_close(back(x, attention_mask=mask), merged(x, attention_mask=mask), atol=0, rtol=0)
