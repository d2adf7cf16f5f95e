"""The SFT objective: next-token cross-entropy on assistant tokens only, token-weighted.

The loader has already shifted the labels and set IGNORE_INDEX on prompt tokens, padding and
each example's last position, so a packed row's loss is exactly the sum of its examples'
losses: `loss_sum / tokens` summed over micro-batches and ranks by the loop is the
token-weighted mean over every assistant token seen.
"""
from __future__ import annotations

from trainer.objectives import causal_lm, causal_lm_objective

# Same computation as pretraining; what differs is the batch (labels only on assistant tokens).
sft_objective = causal_lm_objective
sft_objective_with = causal_lm  # the same, with the run's `train.loss_chunking` bound
