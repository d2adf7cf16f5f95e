"""Prompt tuning on our Transformer: PEFT's `PromptEmbedding` prepended to every row through `inputs_embeds`.

PEFT's `PeftModelForCausalLM` does this for transformers models only, so this module is the
small glue that does the same for ours (virtual tokens at positions 0..n-1, the text after
them), keeping PEFT's config and saved format: a `prompt_embeddings` table that
`PeftModel.from_pretrained` loads onto transformers' `LlamaForCausalLM` and that gives the
same logits there.
"""
from __future__ import annotations

import torch
from torch import nn

from model_defs import Transformer
from trainer.tuning.config import PromptTuningSection

_PEFT_INIT = {"sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}


class PromptTunedModel(nn.Module):
    """A frozen base plus `num_virtual_tokens` trainable input embeddings; returns logits of the real tokens only."""

    def __init__(self, base: Transformer, config):
        super().__init__()
        from peft.tuners.prompt_tuning import PromptEmbedding

        self.base_model = base
        self.peft_config = {"default": config}
        self.num_virtual_tokens = config.num_virtual_tokens
        for p in base.parameters():
            p.requires_grad_(False)
        self.prompt_encoder = PromptEmbedding(config, base.tok_embeddings)
        self.prompt_encoder.embedding.weight.requires_grad_(True)

    @property
    def cfg(self):
        return self.base_model.cfg

    @property
    def output(self) -> nn.Module:
        """The LM head, for callers that project hidden states themselves (generation)."""
        return self.base_model.output

    @classmethod
    def create(cls, base: Transformer, section: PromptTuningSection, tokenizer=None,
               base_name: str | None = None) -> "PromptTunedModel":
        from peft import PromptTuningConfig

        text = {}
        if section.init == "text":
            if tokenizer is None:
                raise ValueError("prompt_tuning.init=text needs the tokenizer")
            text = dict(prompt_tuning_init_text=section.init_text, tokenizer_name_or_path=tokenizer.name_or_path)
        config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=section.num_virtual_tokens, token_dim=base.cfg.dim,
            num_transformer_submodules=1, num_attention_heads=base.cfg.n_heads, num_layers=base.cfg.n_layers,
            prompt_tuning_init=_PEFT_INIT[section.init], base_model_name_or_path=base_name, **text)
        return cls(base, config)

    def prompts(self, batch_size: int) -> torch.Tensor:
        n = self.num_virtual_tokens
        idx = torch.arange(n, device=self.prompt_encoder.embedding.weight.device)
        return self.prompt_encoder(idx)[None].expand(batch_size, n, -1)  # (B, n, dim)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, *, attention_mask: torch.Tensor | None = None,
                kv_cache=None, return_hidden: bool = False) -> torch.Tensor:
        """Like `Transformer.forward` for unpacked rows; `attention_mask`/`position_ids` (without a KV cache)
        describe the real tokens and are extended over the virtual ones."""
        if document_ids is not None or kv_cache is not None:
            raise ValueError("prompt tuning supports neither packed documents nor a KV cache")
        B, T = input_ids.shape
        n = self.num_virtual_tokens
        embeds = self.base_model.tok_embeddings(input_ids)  # (B, T, dim)
        prompts = self.prompts(B).to(embeds.dtype)
        inputs = torch.cat([prompts, embeds], dim=1)  # (B, n + T, dim)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(B, n), attention_mask], dim=1)
        if position_ids is not None:
            virtual = torch.arange(n, device=position_ids.device).expand(B, n)
            position_ids = torch.cat([virtual, position_ids + n], dim=1)
        out = self.base_model(None, position_ids=position_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs, return_hidden=return_hidden)
        return out[:, n:]  # (B, T, vocab | dim)

    def adapter_state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's saved form: one `prompt_embeddings` table."""
        return {"prompt_embeddings": trainable["prompt_encoder.embedding.weight"].contiguous()}


def load_prompt_tuned(base: Transformer, adapter_dir) -> PromptTunedModel:
    """Our base with a saved prompt-tuning adapter."""
    from pathlib import Path

    from peft import PromptTuningConfig
    from safetensors.torch import load_file

    config = PromptTuningConfig.from_pretrained(str(adapter_dir))
    config.inference_mode = True
    model = PromptTunedModel(base, config)
    table = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))["prompt_embeddings"]
    model.prompt_encoder.embedding.weight.data.copy_(table)
    return model
