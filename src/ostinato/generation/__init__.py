"""Sampling and autoregressive generation (KV-cached, pattern-aware, CFG, sliding window, chaining) for
``CodebookLM``."""
