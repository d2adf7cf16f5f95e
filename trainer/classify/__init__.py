"""Sequence classification: labelled text data, padded batches, the loss and the metrics, for the one loop."""
