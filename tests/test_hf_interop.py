"""Parity with transformers' LlamaForCausalLM on the same weights, in both directions."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from model_defs import ModelConfig, Transformer
from model_defs.hf import (
    config_from_hf,
    config_to_hf,
    load_hf_model,
    save_hf_model,
    state_dict_from_hf,
    state_dict_to_hf,
)

transformers.logging.set_verbosity_error()

ROPE_CASES = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
}
ATOL = 1e-5


def _shape(cfg: ModelConfig) -> dict:
    """The config minus the knobs that only derive ffn_dim (HF stores the width itself)."""
    d = cfg.to_dict()
    del d["multiple_of"], d["ffn_dim_multiplier"]
    return d


def _hf_model(rope_scaling=None, tie=False, kv_heads=2, seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=copy.deepcopy(rope_scaling), tie_word_embeddings=tie, attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; randomize them so a swapped norm cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("rope", list(ROPE_CASES))
@pytest.mark.parametrize("tie,kv_heads", [(False, 2), (True, 4)])
def test_hf_to_ours_logits_match(rope, tie, kv_heads):
    hf = _hf_model(ROPE_CASES[rope], tie=tie, kv_heads=kv_heads)
    cfg = config_from_hf(hf.config)
    assert cfg.tie_embeddings == tie and cfg.n_kv_heads == kv_heads
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    # 24 tokens stay inside max_position_embeddings; 48 exercise dynamic NTK growth and long llama3/yarn.
    for T in (24, 48):
        x = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            expected = hf(x).logits
            got = ours(x)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("rope", ["none", "llama3", "yarn"])
@pytest.mark.parametrize("tie", [False, True])
def test_ours_to_hf_folder_loads_in_transformers(tmp_path, rope, tie):
    torch.manual_seed(1)
    cfg = ModelConfig.from_preset("tiny", vocab_size=256, max_seq_len=32, tie_embeddings=tie,
                                  rope_scaling=ROPE_CASES[rope])
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    save_hf_model(ours, cfg, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(hf, LlamaForCausalLM)
    x = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=ATOL, rtol=1e-4)
        back = load_hf_model(tmp_path)
        assert _shape(back.cfg) == _shape(cfg)
        torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


def test_sharded_round_trip_and_hf_written_shards(tmp_path):
    hf = _hf_model(ROPE_CASES["llama3"])
    hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_hf_model(tmp_path / "hf")
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=ATOL, rtol=1e-4)

    out = save_hf_model(ours.state_dict(), ours.cfg, tmp_path / "ours", max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf(x).logits, atol=ATOL, rtol=1e-4)
    # Re-exporting unsharded replaces the shards instead of leaving stale ones beside the new file.
    save_hf_model(ours, ours.cfg, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_load_casts_dtype(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    model = load_hf_model(tmp_path, dtype=torch.bfloat16, attention="eager")
    assert model.cfg.attention == "eager"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_state_dict_round_trip_is_a_rename():
    hf = _hf_model(tie=False)
    cfg = config_from_hf(hf.config)
    ours = state_dict_from_hf(hf.state_dict(), cfg)
    assert "layers.1.feed_forward.w1.weight" in ours and "layers.0.attention_norm.weight" in ours
    back = state_dict_to_hf(ours, cfg)
    assert set(back) == set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert torch.equal(back[k], v), k


def test_config_round_trip_through_hf():
    cfg = ModelConfig.from_preset("llama3.1-8b")
    back = config_from_hf(LlamaConfig(**config_to_hf(cfg)))
    assert _shape(back) == _shape(cfg)


def _base_hf_dict(**changes):
    d = config_to_hf(ModelConfig.from_preset("tiny"))
    d.update(changes)
    return d


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"model_type": "gemma"}, "model_type"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "foo": 1}}, "foo"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_unsupported_configs_name_the_key(changes, key):
    with pytest.raises(ValueError, match=key):
        config_from_hf(_base_hf_dict(**changes))


def test_unsupported_config_in_folder_names_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_base_hf_dict(model_type="gemma")))
    with pytest.raises(ValueError, match="config.json.*model_type"):
        load_hf_model(tmp_path)


def test_bad_weights_are_named(tmp_path):
    hf = _hf_model()
    cfg = config_from_hf(hf.config)
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match="q_proj.bias"):
        state_dict_from_hf(sd, cfg)
    sd = dict(hf.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        state_dict_from_hf(sd, cfg)
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_model(tmp_path)
