"""Synthetic test data in the real shard format."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import webdataset as wds

from ostinato.data.audio import encode_flac
from ostinato.data.manifest import Manifest, ShardInfo


def tone(freq: float, seconds: float, sr: int, channels: int = 1) -> torch.Tensor:
    t = torch.arange(round(seconds * sr)) / sr
    wav = 0.5 * torch.sin(2 * torch.pi * freq * t)
    return wav.expand(channels, -1).clone()


def tune(seconds: float, notes: list[int], sr: int) -> torch.Tensor:
    """``[1, T]``: MIDI ``notes`` one after the other, each with three overtones (a melody with a clear chroma)."""
    t = torch.arange(round(seconds * sr), dtype=torch.float64) / sr
    step = torch.clamp((t / seconds * len(notes)).long(), max=len(notes) - 1)
    hz = torch.tensor([440.0 * 2 ** ((n - 69) / 12) for n in notes], dtype=torch.float64)[step]
    wav = sum(torch.sin(2 * torch.pi * k * hz * t) / k for k in range(1, 5))
    return (0.3 * wav / wav.abs().max()).float()[None]


def write_shards(folder: Path, *, n_shards: int = 3, per_shard: int = 8, sample_rate: int = 16000,
                 channels: int = 1, seconds: float | list[float] = 1.0, corrupt: set[int] = frozenset()) -> Manifest:
    """Shards of pure tones; sample i has frequency 100 + 10 i Hz and caption 'clip i'.

    ``seconds`` may be a list giving each sample's length; indices in ``corrupt`` get garbage audio bytes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shards, i = [], 0
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        total = 0.0
        with wds.TarWriter(str(folder / name)) as w:
            for _ in range(per_shard):
                dur = seconds[i] if isinstance(seconds, list) else seconds
                audio = (b"not a flac" * 10 if i in corrupt else
                         encode_flac(tone(100 + 10 * i, dur, sample_rate, channels), sample_rate))
                meta = {"caption": f"clip {i}", "index": i, "piece": f"p{i // 4}"}
                w.write({"__key__": f"s{i:05d}", "flac": audio, "json": json.dumps(meta).encode()})
                total += dur
                i += 1
        shards.append(ShardInfo(name=name, samples=per_shard, seconds=total, bytes=(folder / name).stat().st_size))
    m = Manifest(shards=shards, sample_rate=sample_rate, channels=channels)
    m.save(folder)
    return m


def write_tiny_encodec(folder: Path, sample_rate: int = 24000) -> Path:
    """A random transformers EncodecModel (75 Hz at 24 kHz, 4 x 256 codes, 16-dim latents) saved to ``folder``.

    transformers leaves the codebooks at zero, which would make every code decode alike: they are drawn at random.
    """
    import transformers

    torch.manual_seed(0)
    cfg = transformers.EncodecConfig(sampling_rate=sample_rate, audio_channels=1, num_filters=8,
                                     upsampling_ratios=[8, 5, 4, 2], codebook_size=256, hidden_size=16,
                                     codebook_dim=16, num_lstm_layers=1, target_bandwidths=[2.4],
                                     use_causal_conv=False, normalize=False)
    model = transformers.EncodecModel(cfg)
    for layer in model.quantizer.layers:
        layer.codebook.embed.normal_()
    model.save_pretrained(folder)
    return folder


def write_tiny_hubert(folder: Path, do_normalize: bool = False) -> Path:
    """A random 2-layer, 32-wide HubertModel + its 16 kHz feature extractor saved to ``folder``."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(0)
    config = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)
    HubertModel(config).eval().save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=do_normalize).save_pretrained(folder)
    return folder
