"""ostinato: a Lightning-based training platform for music generation models."""

__version__ = "0.1.0"
