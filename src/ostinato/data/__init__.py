"""Data: audio primitives, shard writing and reading, the datamodule, and the demo-corpus renderer."""
from ostinato.data.batch import AudioBatch, collate_audio
from ostinato.data.datamodule import AudioDataModule
from ostinato.data.manifest import Manifest, ShardInfo
from ostinato.data.sources import ShardSource, resolve_shards

__all__ = ["AudioBatch", "AudioDataModule", "Manifest", "ShardInfo", "ShardSource", "collate_audio",
           "resolve_shards"]
