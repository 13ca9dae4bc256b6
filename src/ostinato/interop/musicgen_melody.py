"""What MusicGen-Melody adds to a MusicGen import: the chroma conditioner and the text as a prefix.

audiocraft (``config/conditioner/chroma2music.yaml``): the fuser prepends ``self_wav`` (``ChromaStemConditioner``:
demucs stems -> ``ChromaExtractor`` -> ``output_proj``) and ``description`` (T5 -> ``output_proj``), nothing is
cross-attended. Its ``ConditioningProvider`` lists the text conditions before the wav ones and the fuser prepends
each in turn, so the sequence is ``[chroma, text, codes]``; the text is zero-padded to the batch's longest and
attended whole. transformers' ``MusicgenMelodyForConditionalGeneration`` builds the same sequence
(``[audio_enc_to_dec_proj(chroma), enc_to_dec_proj(text), codes]``, no mask on the prefix) with the chroma looped
or cut to ``chroma_length`` frames and pitch class C as the null melody, which is also audiocraft's with
``match_len_on_eval: true``.

Names (ostinato on the left):

    melody.proj.{weight,bias}  <- condition_provider.conditioners.self_wav.output_proj.*  (audiocraft)
                               <- audio_enc_to_dec_proj.*                                (transformers)

ostinato has no demucs: an imported melody model takes the chroma of the whole melody mix (``melody.stems:
mix``), where audiocraft takes that of its vocals + other stems.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["AUDIOCRAFT_MELODY_PROJ", "audiocraft_fusing", "audiocraft_melody", "split_audiocraft_melody",
           "transformers_melody", "MELODY_SEMANTICS"]

AUDIOCRAFT_MELODY_PROJ = "condition_provider.conditioners.self_wav.output_proj."
# the ChromaExtractor's Hann window (a torchaudio buffer in the state): source_chromagram makes the same one
AUDIOCRAFT_STFT_WINDOW = "condition_provider.conditioners.self_wav.chroma.spec.window"
# both sources attend the zero-padded text of the prefix whole
MELODY_SEMANTICS = {"text_padding": "attended"}
# transformers' MusicgenMelodyFeatureExtractor defaults (a preprocessor_config.json in the folder replaces them)
HF_FEATURES = {"sampling_rate": 32000, "hop_length": 4096, "n_fft": 16384}


def audiocraft_fusing(cfg: Mapping[str, Any]) -> tuple[bool, str]:
    """``(melody, text fuse)`` of an xp.cfg's ``fuser``: whether ``self_wav`` is prepended, and whether the
    ``description`` is cross-attended ("cross") or prepended ("prefix"). Other fusings raise a one-line error."""
    fuser = dict(cfg.get("fuser") or {})
    for method in ("sum", "input_interpolate"):
        if fuser.get(method):
            raise ValueError(f"xp.cfg: fuser.{method}={fuser[method]} is not supported (only text cross-attention "
                             "or MusicGen-melody's prepended self_wav and description)")
    prepend, cross = list(fuser.get("prepend") or []), list(fuser.get("cross") or [])
    if set(prepend) - {"self_wav", "description"}:
        raise ValueError(f"xp.cfg: fuser.prepend={prepend} is not supported (only self_wav and description)")
    if cross not in ([], ["description"]) or (cross and "description" in prepend):
        raise ValueError(f"xp.cfg: fuser.cross={cross} is not supported (only ['description'], not also prepended)")
    return "self_wav" in prepend, "prefix" if "description" in prepend else "cross"


def audiocraft_melody(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``MusicGen`` ``melody`` kwargs of an audiocraft melody xp.cfg (``conditioners.self_wav.chroma_stem``)."""
    wav = dict((cfg.get("conditioners") or {}).get("self_wav") or {})
    if wav.get("model") != "chroma_stem":
        raise ValueError(f"xp.cfg: conditioners.self_wav.model={wav.get('model')!r} is not supported (only "
                         "chroma_stem)")
    stem = dict(wav.get("chroma_stem") or {})
    if int(stem.get("n_chroma", 12)) != 12 or not stem.get("argmax", False):
        raise ValueError("xp.cfg: conditioners.self_wav.chroma_stem needs n_chroma=12 and argmax=true")
    for key in ("winlen", "winhop", "nfft"):
        if stem.get(key) is not None:
            raise ValueError(f"xp.cfg: conditioners.self_wav.chroma_stem.{key} is not supported (radix2_exp only)")
    sample_rate = int(stem.get("sample_rate") or cfg.get("sample_rate") or 32000)
    n_fft = 2 ** int(stem.get("radix2_exp", 12))
    hop = n_fft // 4
    # the training recipe's attribute dropout of the melody alone (chroma2music.yaml: 0.5), for fine-tuning
    dropout = float(((cfg.get("attribute_dropout") or {}).get("wav") or {}).get("self_wav", 0.0))
    melody: dict[str, Any] = {"sample_rate": sample_rate, "hop_seconds": hop / sample_rate, "n_fft": n_fft,
                              "chroma": "audiocraft", "stems": "mix", "dropout": dropout}
    if stem.get("match_len_on_eval", True):  # looped or cut to the training segment's frames, no mask, null C
        duration = float((cfg.get("dataset") or {}).get("segment_duration") or 30.0)
        melody.update(chroma="transformers", frames=max(int(sample_rate * duration), n_fft) // hop + 1)
    return melody


def split_audiocraft_melody(lm_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Take the chroma projection ``{weight [dim, 12], bias [dim]}`` (and the STFT window) out of an audiocraft LM
    state (renamed by ``audiocraft_state_to_lm``, which keeps unknown keys as they are)."""
    proj = {k[len(AUDIOCRAFT_MELODY_PROJ):]: v for k, v in lm_state.items() if k.startswith(AUDIOCRAFT_MELODY_PROJ)}
    for key in list(lm_state):
        if key.startswith(AUDIOCRAFT_MELODY_PROJ) or key == AUDIOCRAFT_STFT_WINDOW:
            del lm_state[key]
    return proj


def transformers_melody(config: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """The ``melody`` kwargs of a ``MusicgenMelodyForConditionalGeneration`` folder (its config's ``num_chroma``
    and ``chroma_length``; the feature extractor's settings from ``preprocessor_config.json``, else its
    defaults)."""
    if int(config.get("num_chroma", 12)) != 12:
        raise ValueError(f"{folder / 'config.json'}: num_chroma={config['num_chroma']} is not supported (only 12)")
    features = dict(HF_FEATURES)
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        features.update({k: v for k, v in json.loads(pre.read_text()).items() if k in HF_FEATURES})
    sample_rate, hop = int(features["sampling_rate"]), int(features["hop_length"])
    return {"sample_rate": sample_rate, "hop_seconds": hop / sample_rate, "n_fft": int(features["n_fft"]),
            "chroma": "transformers", "frames": int(config.get("chroma_length", 235)), "stems": "mix",
            "dropout": 0.0}
