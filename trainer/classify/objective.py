"""The classification objective: the head's logits at each text's last token, (weighted) cross-entropy.

Statistics are sums over real examples (validation filler rows count nowhere): `count`,
`accuracy_sum`, the confusion matrix as `confusion_{true}_{pred}`, and, with class weights,
`loss_normalizer` (their total weight), which makes the logged loss the weighted mean the
gradient follows.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer.classify.metrics import batch_stats, weighted_cross_entropy
from trainer.objectives import Stats


class ClassifyObjective:
    def __init__(self, num_labels: int, class_weights: torch.Tensor | None = None):
        self.num_labels, self.class_weights = num_labels, class_weights

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, num_labels)
        loss_sum, normalizer = weighted_cross_entropy(logits, batch["labels"], batch["example_mask"],
                                                      self.class_weights)
        stats = batch_stats(logits.detach(), batch["labels"], batch["example_mask"], self.num_labels)
        stats["accuracy_sum"] = stats.pop("correct_sum")
        stats["loss_sum"] = loss_sum.detach()
        if self.class_weights is not None:
            stats["loss_normalizer"] = normalizer.detach()
        return loss_sum, stats
