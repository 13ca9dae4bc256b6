"""Embedding backends for distribution metrics (FAD and kin) and a cache of reference statistics.

``load_backend("vggish:/m/vggish.pth")`` (or ``codec:REF``, ``hf:/m/folder[,layer=N]``, ``clap:...``) gives an
``EmbeddingBackend``; ``reference_stats(backend, shards, cache_dir)`` gives (mu, sigma, n) of a reference set.
Backends load only their own dependencies, when built.
"""
from ostinato.metrics.embeddings.base import EmbeddingBackend, clip_embeddings
from ostinato.metrics.embeddings.cache import reference_embeddings, reference_stats
from ostinato.metrics.embeddings.registry import BACKENDS, known_backends, load_backend

__all__ = ["BACKENDS", "EmbeddingBackend", "clip_embeddings", "known_backends", "load_backend",
           "reference_embeddings", "reference_stats"]
