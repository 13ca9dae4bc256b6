"""Data: audio primitives, shard writing and reading (audio, token and array shards, manifests), and the shard
datamodules (one ``ShardDataModule`` base). No model code: the models that write token and array shards run in
``ostinato.encoding``."""
from ostinato.data.batch import AudioBatch, collate_audio
from ostinato.data.datamodule import AudioDataModule, ShardDataModule
from ostinato.data.manifest import Manifest, ShardInfo
from ostinato.data.sources import ShardSource, resolve_shards

__all__ = ["AudioBatch", "AudioDataModule", "Manifest", "ShardDataModule", "ShardInfo", "ShardSource",
           "collate_audio", "resolve_shards"]
