"""Does MusicGen follow its melody? The chroma cosine of melody-conditioned generations against their melody, next
to that of the same prompts generated without one (same seed) against the same melodies: the gap is what the
melody condition does at generation (``ostinato.metrics.chroma.ChromaCosineSimilarity``, at the model's own chroma
hop and one-hot setting).

``melody_through_codec``: training on token shards takes the chroma of the decoded tokens (the codec's
reconstruction), not of the source audio; this scores how much of the source's chroma survives the codec, i.e. how
much melody the LM is shown in training and validation."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ostinato.data.audio import convert_channels
from ostinato.metrics.chroma import ChromaCosineSimilarity
from ostinato.models.codec import Codec
from ostinato.models.musicgen import AudioRef, LongForm, MusicGen
from ostinato.nn.decoding import GenerationParams
from ostinato.nn.resample import resample

__all__ = ["melody_adherence", "melody_through_codec"]


@torch.no_grad()
def melody_adherence(model: MusicGen, prompts: Sequence[str], melodies: Sequence[AudioRef], seconds: float,
                     params: GenerationParams | None = None, codec: Codec | None = None,
                     long_form: LongForm | None = None) -> dict[str, float]:
    """``prompts[i]`` generated for ``seconds`` with ``melodies[i]`` (each ``wav [C, T]`` at its ``sample_rate``)
    and without a melody -> ``{"chroma_cos_melody": .., "chroma_cos_unconditioned": ..}``, each the mean
    frame-wise chroma cosine against ``melodies[i]`` (looped to the clip's length) over its voiced frames, in
    ``[0, 1]``. ``codec``: attached first (default: the model's own); ``params``: sampling, the same seed for both."""
    if model.melody is None:
        raise ValueError("melody_adherence: this model has no melody conditioner (family.melody)")
    if len(prompts) != len(melodies) or not prompts:
        raise ValueError(f"melody_adherence: {len(prompts)} prompts for {len(melodies)} melodies; give one each")
    if codec is not None:
        model.attach_codec(codec)
    params = params or GenerationParams()
    sr = model.sample_rate
    with_melody = model.generate(list(prompts), seconds, melody=list(melodies), params=params, long_form=long_form)
    without = model.generate(list(prompts), seconds, params=params, long_form=long_form)
    refs = [resample(convert_channels(m.wav.float(), "mono"), int(m.sample_rate), sr) for m in melodies]
    longest = max(r.shape[-1] for r in refs)
    reference = torch.stack([torch.nn.functional.pad(r, (0, longest - r.shape[-1])) for r in refs])  # [B, 1, T]
    reference_lengths = torch.tensor([r.shape[-1] for r in refs])
    hop_seconds = model.melody.hop_length / model.melody.sample_rate
    out = {}
    for name, wav in (("chroma_cos_melody", with_melody), ("chroma_cos_unconditioned", without)):
        metric = ChromaCosineSimilarity(sr, hop_seconds=hop_seconds, argmax=model.melody.argmax)
        metric.update(wav.cpu(), reference, reference_lengths=reference_lengths)
        out[name] = float(metric.compute())
    return out


@torch.no_grad()
def melody_through_codec(codec: Codec, clips: Sequence[AudioRef], hop_seconds: float = 0.128,
                         argmax: bool = True) -> float:
    """Mean frame-wise chroma cosine of ``codec``'s reconstruction of each clip (``wav [C, T]`` at its
    ``sample_rate``) against the clip, over the clip's voiced frames, in ``[0, 1]``: 1 = a MusicGen trained on this
    codec's tokens sees the melody of its segments; about 1/12 (one-hot chroma of unrelated audio) = its melody
    prefix is noise in training, whatever the model."""
    if not clips:
        raise ValueError("melody_through_codec: no clips")
    device = next(codec.parameters()).device
    sr = int(codec.sample_rate)
    metric = ChromaCosineSimilarity(sr, hop_seconds=hop_seconds, argmax=argmax)
    for clip in clips:
        wav = resample(convert_channels(clip.wav.float(), codec.channels), int(clip.sample_rate), sr)[None]
        recon = codec.decode(codec.encode(wav.to(device)).codes)[..., :wav.shape[-1]]
        metric.update(recon.float().cpu(), wav)
    return float(metric.compute())
