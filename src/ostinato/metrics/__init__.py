"""Evaluation metrics (torchmetrics) for audio models."""
