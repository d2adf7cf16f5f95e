"""The SFT objective on packed vs one-by-one examples, and the PEFT methods on our Transformer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.sft_fixtures import demo_rows, make_tokenizer, tiny_model
from trainer.chat import ensure_chat_template
from trainer.objectives import IGNORE_INDEX
from trainer.sft.config import SFTSection
from trainer.sft.data import tokenize_examples
from trainer.sft.loader import collate_packed, collate_padded, pack_rows
from trainer.sft.objective import sft_objective
from trainer.tuning.methods import apply_method, check_method_supported, trainable_summary


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return ensure_chat_template(make_tokenizer(tmp_path_factory.mktemp("sftobj")), "llama3")


@pytest.fixture(scope="module")
def conversations():
    return [r["messages"] for r in demo_rows("sft")[:24]]


def _one_by_one(model, examples) -> tuple[float, int]:
    loss_sum, tokens = 0.0, 0
    for ex in examples:
        logits = model(torch.as_tensor(ex.input_ids)[None])[0]  # (T, V)
        labels = torch.as_tensor(ex.labels)
        loss_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        tokens += int((labels != IGNORE_INDEX).sum())
    return loss_sum, tokens


def test_packed_loss_equals_token_weighted_loss_of_single_examples(tok, conversations):
    model = tiny_model(len(tok), seed=1).eval()
    examples = tokenize_examples(tok, conversations, seq_len=128)
    ref_sum, ref_tokens = _one_by_one(model, examples)
    rows = pack_rows([len(e) for e in examples], range(len(examples)), seq_len=128)
    assert len(rows) < len(examples)  # several examples share a row
    packed = collate_packed([[examples[i] for i in r] for r in rows], seq_len=128, pad_id=tok.pad_token_id)
    with torch.no_grad():
        loss, stats = sft_objective(model, packed)
        _, padded_stats = sft_objective(model, collate_padded(examples, pad_id=tok.pad_token_id))
    assert stats["tokens"].item() == ref_tokens == padded_stats["tokens"].item()
    assert stats["loss_sum"].item() == pytest.approx(ref_sum, rel=1e-5)
    assert padded_stats["loss_sum"].item() == pytest.approx(ref_sum, rel=1e-5)
    assert loss.item() == pytest.approx(ref_sum, rel=1e-5)  # the summed loss; the loop divides by the step's tokens
    # Without the document boundaries the examples would see each other and the loss would differ.
    leaky = {k: v for k, v in packed.items() if k not in ("position_ids", "document_ids")}
    with torch.no_grad():
        leak_error = abs(sft_objective(model, leaky)[1]["loss_sum"].item() - ref_sum)
    assert leak_error > 20 * abs(stats["loss_sum"].item() - ref_sum)


def test_prompt_tokens_carry_no_loss(tok, conversations):
    model = tiny_model(len(tok), seed=2).eval()
    assistant_only = tokenize_examples(tok, conversations[:6], seq_len=128)
    everything = tokenize_examples(tok, conversations[:6], seq_len=128, train_on_prompt=True)
    for a, b in zip(assistant_only, everything):
        assert (a.input_ids == b.input_ids).all()
        on = a.labels != IGNORE_INDEX
        assert (a.labels[on] == b.labels[on]).all() and on.sum() < (b.labels != IGNORE_INDEX).sum()
    # Changing what the prompt labels would be changes nothing: the loss reads only assistant targets.
    batch = collate_padded(assistant_only, pad_id=tok.pad_token_id)
    scrambled = dict(batch, input_ids=batch["input_ids"].clone())
    with torch.no_grad():
        base = sft_objective(model, batch)[1]
        full = sft_objective(model, collate_padded(everything, pad_id=tok.pad_token_id))[1]
    assert full["tokens"] > base["tokens"]
    assert base["loss_sum"].item() == pytest.approx(_one_by_one(model, assistant_only)[0], rel=1e-5)
    assert torch.equal(scrambled["labels"], batch["labels"])


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_targets_every_linear_layer_by_default_and_accepts_hf_names():
    model = apply_method(tiny_model(300), SFTSection(method="lora"), key="sft")
    names = _trainable(model)
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    assert "trainable parameters" in trainable_summary(model)
    hf_named = apply_method(tiny_model(300), SFTSection(method="lora",
                                                        lora={"target_modules": ["q_proj", "down_proj"]}), key="sft")
    assert {n.split(".")[-4] for n in _trainable(hf_named)} == {"wq", "w2"}
    with pytest.raises(ValueError, match="unknown module"):
        SFTSection(method="lora", lora={"target_modules": ["qkv"]})
    full = apply_method(tiny_model(300), SFTSection(method="full"), key="sft")
    assert all(p.requires_grad for p in full.parameters())


def test_prompt_tuning_trains_only_the_virtual_tokens(tok):
    section = SFTSection(method="prompt_tuning", packing=False, prompt_tuning={"num_virtual_tokens": 4})
    model = apply_method(tiny_model(len(tok)), section, key="sft", tokenizer=tok)
    assert _trainable(model) == {"prompt_encoder.embedding.weight"}
    ids = torch.randint(0, len(tok), (2, 9))
    logits = model(ids)
    assert logits.shape == (2, 9, len(tok))
    logits.sum().backward()
    assert model.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    text = apply_method(tiny_model(len(tok)), SFTSection(method="prompt_tuning", packing=False, prompt_tuning={
        "num_virtual_tokens": 3, "init": "text", "init_text": "Answer:"}), key="sft", tokenizer=tok)
    first = tok("Answer:")["input_ids"][0]
    assert torch.equal(text.prompt_encoder.embedding.weight[0], text.base_model.tok_embeddings.weight[first])
    with pytest.raises(ValueError, match="prompt_tuning needs sft.packing=false"):
        check_method_supported(SFTSection(method="prompt_tuning"), key="sft", deepspeed_stage=None, cuda=False)


def test_qlora_quantizes_the_base_to_nf4_and_trains_lora():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    with pytest.raises(ValueError, match="qlora with train.deepspeed ZeRO-3 is unsupported"):
        check_method_supported(SFTSection(method="qlora"), key="sft", deepspeed_stage=3, cuda=torch.cuda.is_available())
    check_method_supported(SFTSection(method="qlora"), key="sft", deepspeed_stage=2, cuda=torch.cuda.is_available())
    reference = tiny_model(300, seed=4)
    model = apply_method(tiny_model(300, seed=4), SFTSection(method="qlora"), key="sft", compute_dtype=torch.float32)
    layer = model.base_model.model.layers[0].attention.wq
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit) and layer.base_layer.weight.quant_type == "nf4"
    device = layer.base_layer.weight.device
    ids = torch.randint(0, 300, (2, 12), device=device)
    logits = model(ids)
    # 4-bit weights: close to the fp32 model, not equal to it.
    ref = reference.to(device)(ids)
    assert (logits - ref).abs().max() > 0
    assert F.cosine_similarity(logits.flatten().float(), ref.flatten(), dim=0) > 0.9
    logits.float().pow(2).mean().backward()
    assert all("lora_" in n for n in _trainable(model))
    assert model.base_model.model.layers[0].attention.wq.lora_A["default"].weight.grad is not None
