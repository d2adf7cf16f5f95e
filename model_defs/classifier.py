"""Sequence classification on the decoder (HF `LlamaForSequenceClassification`'s layout).

The final-normed hidden state of each sequence's last real token goes through `score`, a bias-free
Linear to `num_labels` logits. Which tokens are scored is plain data, an (N, 2) LongTensor of
(row, position) pairs: `last_token_index` computes it for padded rows, `document_end_index` for
packed ones, and data code may use either ahead of time.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .config import ModelConfig
from .model import Transformer


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask (B, T), 1 = real token -> (B, 2) (row, position) of each row's last real token.

    Right and left padding alike. A row with no real token is a ValueError (one host sync).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, T)")
    B, T = attention_mask.shape
    positions = torch.arange(T, device=attention_mask.device).expand(B, T)  # (B, T)
    last = torch.where(attention_mask.bool(), positions, -1).amax(dim=1)  # (B,), -1 for an empty row
    if bool((last < 0).any()):
        raise ValueError("attention_mask has a row without real tokens: there is no token to score")
    rows = torch.arange(B, device=attention_mask.device)  # (B,)
    return torch.stack([rows, last], dim=1)  # (B, 2)


def document_end_index(document_ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """document_ids (B, T) of packed rows -> (N, 2) (row, position) of each document's last token.

    A document is a run of equal consecutive ids, as in `Transformer.forward`. valid (B, T) bool,
    False on the padding tail: invalid tokens end no document (None: all valid). Rows come in
    row-major order, i.e. the order the documents appear in the batch.
    """
    if valid is None:
        valid = torch.ones_like(document_ids, dtype=torch.bool)
    if document_ids.dim() != 2 or valid.shape != document_ids.shape:
        raise ValueError(f"document_ids {tuple(document_ids.shape)} and valid {tuple(valid.shape)} "
                         "must both be (B, T)")
    ends = valid.clone()  # (B, T); the last column ends whatever document it holds
    ends[:, :-1] &= (document_ids[:, 1:] != document_ids[:, :-1]) | ~valid[:, 1:]
    return ends.nonzero()  # (N, 2)


class SequenceClassifier(nn.Module):
    """`body`: the decoder trunk (a `Transformer` without its LM head); `score`: dim -> num_labels.

    `forward` returns one row of logits per scored sequence, (N, num_labels).
    """

    def __init__(self, cfg: ModelConfig, num_labels: int):
        super().__init__()
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels={num_labels!r} must be a positive int")
        self.cfg = cfg
        self.num_labels = num_labels
        self.body = _trunk(cfg)
        self.score = nn.Linear(cfg.dim, num_labels, bias=False)
        nn.init.normal_(self.score.weight, mean=0.0, std=cfg.init_std)  # as HF inits its score layer

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """`Transformer.init_weights` for the trunk (e.g. after `to_empty()` from meta), N(0, init_std) for `score`."""
        self.body.init_weights(buffer_device)
        nn.init.normal_(self.score.weight, mean=0.0, std=self.cfg.init_std)

    @classmethod
    def from_causal_lm(cls, lm: Transformer, num_labels: int) -> SequenceClassifier:
        """A classifier on `lm`'s trunk, whose LM head is dropped and `score` freshly initialised.

        The trunk's tensors are shared with `lm`, not copied (no second copy of a large model):
        `lm` itself is left as it was, but training the classifier changes its weights too; pass
        `copy.deepcopy(lm)` to keep them apart. `score` takes the trunk's device and dtype.
        """
        weight = lm.tok_embeddings.weight
        with torch.device("meta"):
            model = cls(copy.deepcopy(lm.cfg), num_labels)
        trunk = {k: v for k, v in lm.state_dict().items() if not k.startswith("output.")}
        model.body.load_state_dict(trunk, strict=True, assign=True)
        model.body.rope.reset_buffers(device=weight.device)
        model.score.to_empty(device=weight.device).to(weight.dtype)
        nn.init.normal_(model.score.weight, mean=0.0, std=model.cfg.init_std)
        return model

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        score_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (N, num_labels) in the model's (or autocast) dtype.

        score_index (N, 2): the (row, position) pairs to score, e.g. `document_end_index` of packed
            rows. Without it, one per row: the last real token of `attention_mask`, else position T-1.
        position_ids, document_ids, attention_mask: as in `Transformer.forward`.
        """
        h = self.body(input_ids, position_ids, document_ids, return_hidden=True,
                      attention_mask=attention_mask)  # (B, T, dim)
        if score_index is None and attention_mask is not None:
            score_index = last_token_index(attention_mask)  # (B, 2)
        if score_index is None:
            last = h[:, -1]  # (B, dim)
        else:
            if score_index.dim() != 2 or score_index.shape[1] != 2:
                raise ValueError(f"score_index has shape {tuple(score_index.shape)}, expected (N, 2) "
                                 "(row, position) pairs")
            last = h[score_index[:, 0], score_index[:, 1]]  # (N, dim)
        # Scoring only the gathered rows: a (N, dim) @ (dim, labels) product instead of one per position.
        return self.score(last)  # (N, num_labels)


def _trunk(cfg: ModelConfig) -> Transformer:
    """A `Transformer` without its LM head, on the current default device.

    Built on meta and materialised only after `output` is dropped, so the (vocab, dim) head is never
    allocated. Its config is untied, so `tie_weights` has no head to re-create.
    """
    device = torch.get_default_device()
    with torch.device("meta"):
        body = Transformer(dataclasses.replace(cfg, tie_embeddings=False))
    body.output = None  # not in state_dict(); body(..., return_hidden=False) fails instead of returning hidden
    body.to_empty(device=device)
    body.init_weights(buffer_device=device)
    return body
