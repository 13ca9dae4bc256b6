"""Importers for checkpoints of other toolkits (transformers, audiocraft)."""
